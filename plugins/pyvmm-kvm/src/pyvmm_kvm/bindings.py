"""Raw KVM uapi for pyvmm-kvm: cffi declarations and constants, nothing else.

cffi runs in ABI mode: nothing is compiled at install or run time, so every
struct below is written out in full with its exact uapi layout rather than
left to a C compiler with ``...`` placeholders.  ``tests/test_bindings_layout.py``
compiles a probe against ``<linux/kvm.h>`` and checks every size, field offset
and ioctl number here against the real header.

Two FFI instances exist because x86_64 and arm64 give different layouts to the
same struct names (``struct kvm_regs``, ``struct kvm_debug_exit_arch``, ...):

* :data:`ffi` -- x86_64 layouts plus the arch-independent structs.  Load libc
  with ``ffi.dlopen(None)`` to call the declared functions.
* :data:`ffi_aarch64` -- arm64 layouts plus the same arch-independent structs.
  They are only *declared* on an x86_64 host; since both are LP64 with the same
  alignment rules, cffi still computes the arm64 sizes correctly.  Sizes taken
  from the arm64 uapi: ``kvm_vcpu_init`` 32, ``user_pt_regs`` 272,
  ``user_fpsimd_state`` 528, ``kvm_regs`` 864 (``fp_regs`` at 336).

ioctl numbers are computed from ``sizeof`` of the cffi structs, exactly as the
kernel's ``_IOW``-style macros do, so a layout error also shows up as an ioctl
number mismatch in the layout test.
"""

from __future__ import annotations

from typing import Any, Final

from pyvmm.backend.ffi_cache import declared_ffi
from pyvmm.backend.ioctl import IoctlRequest, linux, request_names

# Everything in linux/kvm.h that is the same on every architecture.  It names
# the arch structs (kvm_debug_exit_arch, kvm_guest_debug_arch, kvm_sync_regs),
# so each FFI prepends its own definitions of those.
_GENERIC_CDEF: Final = """
struct kvm_userspace_memory_region {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
};

struct kvm_irq_level {
    union {
        uint32_t irq;
        int32_t status;
    };
    uint32_t level;
};

struct kvm_pit_config {
    uint32_t flags;
    uint32_t pad[15];
};

struct kvm_irqfd {
    uint32_t fd;
    uint32_t gsi;
    uint32_t flags;
    uint32_t resamplefd;
    uint8_t pad[16];
};

struct kvm_ioeventfd {
    uint64_t datamatch;
    uint64_t addr;
    uint32_t len;
    int32_t fd;
    uint32_t flags;
    uint8_t pad[36];
};

struct kvm_clock_data {
    uint64_t clock;
    uint32_t flags;
    uint32_t pad0;
    uint64_t realtime;
    uint64_t host_tsc;
    uint32_t pad[4];
};

struct kvm_dirty_log {
    uint32_t slot;
    uint32_t padding1;
    union {
        void *dirty_bitmap;
        uint64_t padding2;
    };
};

struct kvm_enable_cap {
    uint32_t cap;
    uint32_t flags;
    uint64_t args[4];
    uint8_t pad[64];
};

struct kvm_mp_state {
    uint32_t mp_state;
};

struct kvm_interrupt {
    uint32_t irq;
};

struct kvm_msi {
    uint32_t address_lo;
    uint32_t address_hi;
    uint32_t data;
    uint32_t flags;
    uint32_t devid;
    uint8_t pad[12];
};

struct kvm_irq_routing_irqchip {
    uint32_t irqchip;
    uint32_t pin;
};

struct kvm_irq_routing_msi {
    uint32_t address_lo;
    uint32_t address_hi;
    uint32_t data;
    union {
        uint32_t pad;
        uint32_t devid;
    };
};

struct kvm_irq_routing_s390_adapter {
    uint64_t ind_addr;
    uint64_t summary_addr;
    uint64_t ind_offset;
    uint32_t summary_offset;
    uint32_t adapter_id;
};

struct kvm_irq_routing_hv_sint {
    uint32_t vcpu;
    uint32_t sint;
};

struct kvm_irq_routing_xen_evtchn {
    uint32_t port;
    uint32_t vcpu;
    uint32_t priority;
};

/* The s390 member is declared because its u64s make the entry 8-aligned. */
struct kvm_irq_routing_entry {
    uint32_t gsi;
    uint32_t type;
    uint32_t flags;
    uint32_t pad;
    union {
        struct kvm_irq_routing_irqchip irqchip;
        struct kvm_irq_routing_msi msi;
        struct kvm_irq_routing_s390_adapter adapter;
        struct kvm_irq_routing_hv_sint hv_sint;
        struct kvm_irq_routing_xen_evtchn xen_evtchn;
        uint32_t pad[8];
    } u;
};

struct kvm_irq_routing {
    uint32_t nr;
    uint32_t flags;
    struct kvm_irq_routing_entry entries[];
};

struct kvm_one_reg {
    uint64_t id;
    uint64_t addr;
};

struct kvm_reg_list {
    uint64_t n;
    uint64_t reg[];
};

struct kvm_create_device {
    uint32_t type;
    uint32_t fd;
    uint32_t flags;
};

struct kvm_device_attr {
    uint32_t flags;
    uint32_t group;
    uint64_t attr;
    uint64_t addr;
};

struct kvm_guest_debug {
    uint32_t control;
    uint32_t pad;
    struct kvm_guest_debug_arch arch;
};

/* Mapped from the vCPU fd (offset 0); the union is the per-exit payload. */
struct kvm_run {
    uint8_t request_interrupt_window;
    uint8_t immediate_exit;
    uint8_t padding1[6];

    uint32_t exit_reason;
    uint8_t ready_for_interrupt_injection;
    uint8_t if_flag;
    uint16_t flags;

    uint64_t cr8;
    uint64_t apic_base;

    union {
        struct {
            uint64_t hardware_exit_reason;
        } hw;
        struct {
            uint64_t hardware_entry_failure_reason;
            uint32_t cpu;
        } fail_entry;
        struct {
            uint32_t exception;
            uint32_t error_code;
        } ex;
        struct {
            uint8_t direction;
            uint8_t size;
            uint16_t port;
            uint32_t count;
            uint64_t data_offset;
        } io;
        struct {
            struct kvm_debug_exit_arch arch;
        } debug;
        struct {
            uint64_t phys_addr;
            uint8_t data[8];
            uint32_t len;
            uint8_t is_write;
        } mmio;
        struct {
            uint64_t nr;
            uint64_t args[6];
            uint64_t ret;
            uint32_t longmode;
            uint32_t pad;
        } hypercall;
        struct {
            uint64_t rip;
            uint32_t is_write;
            uint32_t pad;
        } tpr_access;
        struct {
            uint32_t suberror;
            uint32_t ndata;
            uint64_t data[16];
        } internal;
        struct {
            uint32_t suberror;
            uint32_t ndata;
            uint64_t flags;
            uint8_t insn_size;
            uint8_t insn_bytes[15];
        } emulation_failure;
        struct {
            uint32_t type;
            uint32_t ndata;
            union {
                uint64_t flags;
                uint64_t data[16];
            };
        } system_event;
        struct {
            uint8_t vector;
        } eoi;
        struct {
            uint64_t esr_iss;
            uint64_t fault_ipa;
        } arm_nisv;
        struct {
            uint8_t error;
            uint8_t pad[7];
            uint32_t reason;
            uint32_t index;
            uint64_t data;
        } msr;
        struct {
            uint32_t flags;
        } notify;
        char padding[256];
    };

    uint64_t kvm_valid_regs;
    uint64_t kvm_dirty_regs;
    union {
        struct kvm_sync_regs regs;
        char padding[2048];
    } s;
};

struct kvm_coalesced_mmio_zone {
    uint64_t addr;
    uint32_t size;
    union {
        uint32_t pad;
        uint32_t pio;
    };
};

struct kvm_coalesced_mmio {
    uint64_t phys_addr;
    uint32_t len;
    union {
        uint32_t pad;
        uint32_t pio;
    };
    uint8_t data[8];
};

struct kvm_coalesced_mmio_ring {
    uint32_t first;
    uint32_t last;
    struct kvm_coalesced_mmio coalesced_mmio[];
};

int ioctl(int fd, unsigned long request, ...);
void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
int munmap(void *addr, size_t length);
int eventfd(unsigned int initval, int flags);
int close(int fd);
"""

_X86_64_CDEF: Final = """
struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx;
    uint64_t rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11;
    uint64_t r12, r13, r14, r15;
    uint64_t rip, rflags;
};

struct kvm_segment {
    uint64_t base;
    uint32_t limit;
    uint16_t selector;
    uint8_t type;
    uint8_t present, dpl, db, s, l, g, avl;
    uint8_t unusable;
    uint8_t padding;
};

struct kvm_dtable {
    uint64_t base;
    uint16_t limit;
    uint16_t padding[3];
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8;
    uint64_t efer;
    uint64_t apic_base;
    uint64_t interrupt_bitmap[4];
};

struct kvm_fpu {
    uint8_t fpr[8][16];
    uint16_t fcw;
    uint16_t fsw;
    uint8_t ftwx;
    uint8_t pad1;
    uint16_t last_opcode;
    uint64_t last_ip;
    uint64_t last_dp;
    uint8_t xmm[16][16];
    uint32_t mxcsr;
    uint32_t pad2;
};

struct kvm_msr_entry {
    uint32_t index;
    uint32_t reserved;
    uint64_t data;
};

struct kvm_msrs {
    uint32_t nmsrs;
    uint32_t pad;
    struct kvm_msr_entry entries[];
};

struct kvm_msr_list {
    uint32_t nmsrs;
    uint32_t indices[];
};

struct kvm_cpuid_entry2 {
    uint32_t function;
    uint32_t index;
    uint32_t flags;
    uint32_t eax;
    uint32_t ebx;
    uint32_t ecx;
    uint32_t edx;
    uint32_t padding[3];
};

struct kvm_cpuid2 {
    uint32_t nent;
    uint32_t padding;
    struct kvm_cpuid_entry2 entries[];
};

struct kvm_lapic_state {
    char regs[1024];
};

struct kvm_vcpu_events {
    struct {
        uint8_t injected;
        uint8_t nr;
        uint8_t has_error_code;
        uint8_t pending;
        uint32_t error_code;
    } exception;
    struct {
        uint8_t injected;
        uint8_t nr;
        uint8_t soft;
        uint8_t shadow;
    } interrupt;
    struct {
        uint8_t injected;
        uint8_t pending;
        uint8_t masked;
        uint8_t pad;
    } nmi;
    uint32_t sipi_vector;
    uint32_t flags;
    struct {
        uint8_t smm;
        uint8_t pending;
        uint8_t smm_inside_nmi;
        uint8_t latched_init;
    } smi;
    struct {
        uint8_t pending;
    } triple_fault;
    uint8_t reserved[26];
    uint8_t exception_has_payload;
    uint64_t exception_payload;
};

struct kvm_debugregs {
    uint64_t db[4];
    uint64_t dr6;
    uint64_t dr7;
    uint64_t flags;
    uint64_t reserved[9];
};

struct kvm_xcr {
    uint32_t xcr;
    uint32_t reserved;
    uint64_t value;
};

struct kvm_xcrs {
    uint32_t nr_xcrs;
    uint32_t flags;
    struct kvm_xcr xcrs[16];
    uint64_t padding[16];
};

struct kvm_xsave {
    uint32_t region[1024];
    uint32_t extra[];
};

struct kvm_translation {
    uint64_t linear_address;
    uint64_t physical_address;
    uint8_t valid;
    uint8_t writeable;
    uint8_t usermode;
    uint8_t pad[5];
};

struct kvm_pic_state {
    uint8_t last_irr;
    uint8_t irr;
    uint8_t imr;
    uint8_t isr;
    uint8_t priority_add;
    uint8_t irq_base;
    uint8_t read_reg_select;
    uint8_t poll;
    uint8_t special_mask;
    uint8_t init_state;
    uint8_t auto_eoi;
    uint8_t rotate_on_auto_eoi;
    uint8_t special_fully_nested_mode;
    uint8_t init4;
    uint8_t elcr;
    uint8_t elcr_mask;
};

struct kvm_ioapic_state {
    uint64_t base_address;
    uint32_t ioregsel;
    uint32_t id;
    uint32_t irr;
    uint32_t pad;
    union {
        uint64_t bits;
        struct {
            uint8_t vector;
            uint8_t delivery_mode:3;
            uint8_t dest_mode:1;
            uint8_t delivery_status:1;
            uint8_t polarity:1;
            uint8_t remote_irr:1;
            uint8_t trig_mode:1;
            uint8_t mask:1;
            uint8_t reserve:7;
            uint8_t reserved[4];
            uint8_t dest_id;
        } fields;
    } redirtbl[24];
};

struct kvm_irqchip {
    uint32_t chip_id;
    uint32_t pad;
    union {
        char dummy[512];
        struct kvm_pic_state pic;
        struct kvm_ioapic_state ioapic;
    } chip;
};

struct kvm_pit_channel_state {
    uint32_t count;
    uint16_t latched_count;
    uint8_t count_latched;
    uint8_t status_latched;
    uint8_t status;
    uint8_t read_state;
    uint8_t write_state;
    uint8_t write_latch;
    uint8_t rw_mode;
    uint8_t mode;
    uint8_t bcd;
    uint8_t gate;
    int64_t count_load_time;
};

struct kvm_pit_state2 {
    struct kvm_pit_channel_state channels[3];
    uint32_t flags;
    uint32_t reserved[9];
};

struct kvm_debug_exit_arch {
    uint32_t exception;
    uint32_t pad;
    uint64_t pc;
    uint64_t dr6;
    uint64_t dr7;
};

struct kvm_guest_debug_arch {
    uint64_t debugreg[8];
};

struct kvm_sync_regs {
    struct kvm_regs regs;
    struct kvm_sregs sregs;
    struct kvm_vcpu_events events;
};
"""

# arm64 uapi (arch/arm64/include/uapi/asm/kvm.h, asm/ptrace.h).  cffi has no
# __uint128_t and no alignment attribute; a union with `long double` (16 bytes,
# 16-aligned on both x86_64 and arm64 Linux) reproduces the V-register slot's
# size and alignment, and u64[2] (little-endian: [0] low, [1] high) reads it.
_AARCH64_CDEF: Final = """
typedef union {
    uint64_t u64[2];
    uint8_t u8[16];
    long double _align16;
} kvm_arm64_vreg;

struct user_pt_regs {
    uint64_t regs[31];
    uint64_t sp;
    uint64_t pc;
    uint64_t pstate;
};

struct user_fpsimd_state {
    kvm_arm64_vreg vregs[32];
    uint32_t fpsr;
    uint32_t fpcr;
    uint32_t __reserved[2];
};

struct kvm_regs {
    struct user_pt_regs regs;
    uint64_t sp_el1;
    uint64_t elr_el1;
    uint64_t spsr[5];
    struct user_fpsimd_state fp_regs;
};

struct kvm_vcpu_init {
    uint32_t target;
    uint32_t features[7];
};

struct kvm_debug_exit_arch {
    uint32_t hsr;
    uint32_t hsr_high;
    uint64_t far;
};

struct kvm_guest_debug_arch {
    uint64_t dbg_bcr[16];
    uint64_t dbg_bvr[16];
    uint64_t dbg_wcr[16];
    uint64_t dbg_wvr[16];
};

struct kvm_sync_regs {
    uint64_t device_irq_level;
};
"""

# Parsed once per machine, not per process (pyvmm.backend.ffi_cache).
ffi: Final = declared_ffi(_X86_64_CDEF + _GENERIC_CDEF)

ffi_aarch64: Final = declared_ffi(_AARCH64_CDEF + _GENERIC_CDEF)


# --- ioctl number encoding (asm-generic/ioctl.h, used by x86 and arm64) -----

KVMIO: Final = 0xAE


# The kernel's _IOR/_IOW take a type and use its sizeof; these take the C type
# name and ask cffi, so the number follows the declared layout.  The encoding
# itself (asm-generic, x86 and arm64 alike) is the backend kit's.
def _io(nr: int) -> IoctlRequest:
    return linux.io(KVMIO, nr)


def _ior(nr: int, ctype: str, of: Any = ffi) -> IoctlRequest:
    return linux.ior(KVMIO, nr, of.sizeof(ctype))


def _iow(nr: int, ctype: str, of: Any = ffi) -> IoctlRequest:
    return linux.iow(KVMIO, nr, of.sizeof(ctype))


def _iowr(nr: int, ctype: str, of: Any = ffi) -> IoctlRequest:
    return linux.iowr(KVMIO, nr, of.sizeof(ctype))


KVM_API_VERSION: Final = 12

# Not a uapi constant: how many CPUID / MSR entries to allocate room for.  The
# kernel caps KVM_GET_SUPPORTED_CPUID at 256 entries (E2BIG above the real count).
KVM_MAX_CPUID_ENTRIES: Final = 256
KVM_MAX_XCRS: Final = 16

# --- /dev/kvm (system) ioctls ---
KVM_GET_API_VERSION: Final = _io(0x00)
KVM_CREATE_VM: Final = _io(0x01)
KVM_GET_MSR_INDEX_LIST: Final = _iowr(0x02, "struct kvm_msr_list")
KVM_CHECK_EXTENSION: Final = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE: Final = _io(0x04)
KVM_GET_SUPPORTED_CPUID: Final = _iowr(0x05, "struct kvm_cpuid2")
KVM_GET_EMULATED_CPUID: Final = _iowr(0x09, "struct kvm_cpuid2")
KVM_GET_MSR_FEATURE_INDEX_LIST: Final = _iowr(0x0A, "struct kvm_msr_list")

# --- VM ioctls ---
KVM_CREATE_VCPU: Final = _io(0x41)
KVM_GET_DIRTY_LOG: Final = _iow(0x42, "struct kvm_dirty_log")
KVM_SET_USER_MEMORY_REGION: Final = _iow(0x46, "struct kvm_userspace_memory_region")
KVM_SET_TSS_ADDR: Final = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR: Final = _iow(0x48, "uint64_t")
KVM_CREATE_IRQCHIP: Final = _io(0x60)
KVM_IRQ_LINE: Final = _iow(0x61, "struct kvm_irq_level")
KVM_GET_IRQCHIP: Final = _iowr(0x62, "struct kvm_irqchip")
KVM_SET_IRQCHIP: Final = _ior(0x63, "struct kvm_irqchip")  # sic: the uapi declares SET as _IOR
KVM_IRQ_LINE_STATUS: Final = _iowr(0x67, "struct kvm_irq_level")
KVM_SET_GSI_ROUTING: Final = _iow(0x6A, "struct kvm_irq_routing")
KVM_IRQFD: Final = _iow(0x76, "struct kvm_irqfd")
KVM_CREATE_PIT2: Final = _iow(0x77, "struct kvm_pit_config")
KVM_IOEVENTFD: Final = _iow(0x79, "struct kvm_ioeventfd")
KVM_SET_CLOCK: Final = _iow(0x7B, "struct kvm_clock_data")
KVM_GET_CLOCK: Final = _ior(0x7C, "struct kvm_clock_data")
KVM_GET_PIT2: Final = _ior(0x9F, "struct kvm_pit_state2")
KVM_SET_PIT2: Final = _iow(0xA0, "struct kvm_pit_state2")
KVM_SIGNAL_MSI: Final = _iow(0xA5, "struct kvm_msi")
KVM_CREATE_DEVICE: Final = _iowr(0xE0, "struct kvm_create_device")
KVM_SET_DEVICE_ATTR: Final = _iow(0xE1, "struct kvm_device_attr")
KVM_GET_DEVICE_ATTR: Final = _iow(0xE2, "struct kvm_device_attr")
KVM_HAS_DEVICE_ATTR: Final = _iow(0xE3, "struct kvm_device_attr")
KVM_REGISTER_COALESCED_MMIO: Final = _iow(0x67, "struct kvm_coalesced_mmio_zone")
KVM_UNREGISTER_COALESCED_MMIO: Final = _iow(0x68, "struct kvm_coalesced_mmio_zone")

# --- VM or vCPU (KVM_ENABLE_CAP works on both since KVM_CAP_ENABLE_CAP_VM) ---
KVM_ENABLE_CAP: Final = _iow(0xA3, "struct kvm_enable_cap")

# --- vCPU ioctls ---
KVM_RUN: Final = _io(0x80)
KVM_GET_REGS: Final = _ior(0x81, "struct kvm_regs")
KVM_SET_REGS: Final = _iow(0x82, "struct kvm_regs")
KVM_GET_SREGS: Final = _ior(0x83, "struct kvm_sregs")
KVM_SET_SREGS: Final = _iow(0x84, "struct kvm_sregs")
KVM_TRANSLATE: Final = _iowr(0x85, "struct kvm_translation")
KVM_INTERRUPT: Final = _iow(0x86, "struct kvm_interrupt")
KVM_GET_MSRS: Final = _iowr(0x88, "struct kvm_msrs")
KVM_SET_MSRS: Final = _iow(0x89, "struct kvm_msrs")
KVM_GET_FPU: Final = _ior(0x8C, "struct kvm_fpu")
KVM_SET_FPU: Final = _iow(0x8D, "struct kvm_fpu")
KVM_GET_LAPIC: Final = _ior(0x8E, "struct kvm_lapic_state")
KVM_SET_LAPIC: Final = _iow(0x8F, "struct kvm_lapic_state")
KVM_SET_CPUID2: Final = _iow(0x90, "struct kvm_cpuid2")
KVM_GET_CPUID2: Final = _iowr(0x91, "struct kvm_cpuid2")
KVM_GET_MP_STATE: Final = _ior(0x98, "struct kvm_mp_state")
KVM_SET_MP_STATE: Final = _iow(0x99, "struct kvm_mp_state")
KVM_NMI: Final = _io(0x9A)
KVM_SET_GUEST_DEBUG: Final = _iow(0x9B, "struct kvm_guest_debug")
KVM_GET_VCPU_EVENTS: Final = _ior(0x9F, "struct kvm_vcpu_events")
KVM_SET_VCPU_EVENTS: Final = _iow(0xA0, "struct kvm_vcpu_events")
KVM_GET_DEBUGREGS: Final = _ior(0xA1, "struct kvm_debugregs")
KVM_SET_DEBUGREGS: Final = _iow(0xA2, "struct kvm_debugregs")
KVM_GET_XSAVE: Final = _ior(0xA4, "struct kvm_xsave")
KVM_SET_XSAVE: Final = _iow(0xA5, "struct kvm_xsave")
KVM_GET_XCRS: Final = _ior(0xA6, "struct kvm_xcrs")
KVM_SET_XCRS: Final = _iow(0xA7, "struct kvm_xcrs")
KVM_GET_ONE_REG: Final = _iow(0xAB, "struct kvm_one_reg")  # sic: GET is _IOW too (the struct is only read)
KVM_SET_ONE_REG: Final = _iow(0xAC, "struct kvm_one_reg")
KVM_KVMCLOCK_CTRL: Final = _io(0xAD)
KVM_GET_XSAVE2: Final = _ior(0xCF, "struct kvm_xsave")  # the size is XSAVE's; the buffer is KVM_CAP_XSAVE2's
KVM_SET_TSC_KHZ: Final = _io(0xA2)  # value: kHz
KVM_GET_TSC_KHZ: Final = _io(0xA3)  # returns kHz
KVM_ARM_VCPU_INIT: Final = _iow(0xAE, "struct kvm_vcpu_init", ffi_aarch64)
KVM_ARM_PREFERRED_TARGET: Final = _ior(0xAF, "struct kvm_vcpu_init", ffi_aarch64)
KVM_GET_REG_LIST: Final = _iowr(0xB0, "struct kvm_reg_list")
KVM_ARM_VCPU_FINALIZE: Final = _iow(0xC2, "int")

# --- capabilities (KVM_CHECK_EXTENSION argument) ---
KVM_CAP_IRQCHIP: Final = 0
KVM_CAP_HLT: Final = 1
KVM_CAP_USER_MEMORY: Final = 3
KVM_CAP_SET_TSS_ADDR: Final = 4
KVM_CAP_EXT_CPUID: Final = 7
KVM_CAP_CLOCKSOURCE: Final = 8
KVM_CAP_NR_VCPUS: Final = 9
KVM_CAP_NR_MEMSLOTS: Final = 10
KVM_CAP_PIT: Final = 11
KVM_CAP_NOP_IO_DELAY: Final = 12
KVM_CAP_MP_STATE: Final = 14
KVM_CAP_COALESCED_MMIO: Final = 15
KVM_CAP_SYNC_MMU: Final = 16
KVM_CAP_USER_NMI: Final = 22
KVM_CAP_SET_GUEST_DEBUG: Final = 23
KVM_CAP_REINJECT_CONTROL: Final = 24
KVM_CAP_IRQ_ROUTING: Final = 25
KVM_CAP_IRQ_INJECT_STATUS: Final = 26
KVM_CAP_MCE: Final = 31
KVM_CAP_IRQFD: Final = 32
KVM_CAP_PIT2: Final = 33
KVM_CAP_SET_BOOT_CPU_ID: Final = 34
KVM_CAP_PIT_STATE2: Final = 35
KVM_CAP_IOEVENTFD: Final = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR: Final = 37
KVM_CAP_ADJUST_CLOCK: Final = 39
KVM_CAP_INTERNAL_ERROR_DATA: Final = 40
KVM_CAP_VCPU_EVENTS: Final = 41
KVM_CAP_INTR_SHADOW: Final = 49
KVM_CAP_DEBUGREGS: Final = 50
KVM_CAP_X86_ROBUST_SINGLESTEP: Final = 51
KVM_CAP_ENABLE_CAP: Final = 54
KVM_CAP_XSAVE: Final = 55
KVM_CAP_XCRS: Final = 56
KVM_CAP_ASYNC_PF: Final = 59
KVM_CAP_TSC_CONTROL: Final = 60
KVM_CAP_GET_TSC_KHZ: Final = 61
KVM_CAP_MAX_VCPUS: Final = 66
KVM_CAP_ONE_REG: Final = 70
KVM_CAP_TSC_DEADLINE_TIMER: Final = 72
KVM_CAP_SYNC_REGS: Final = 74
KVM_CAP_KVMCLOCK_CTRL: Final = 76
KVM_CAP_SIGNAL_MSI: Final = 77
KVM_CAP_READONLY_MEM: Final = 81
KVM_CAP_IRQFD_RESAMPLE: Final = 82
KVM_CAP_ARM_PSCI: Final = 87
KVM_CAP_DEVICE_CTRL: Final = 89
KVM_CAP_ARM_EL1_32BIT: Final = 93
KVM_CAP_EXT_EMUL_CPUID: Final = 95
KVM_CAP_ENABLE_CAP_VM: Final = 98
KVM_CAP_IOEVENTFD_NO_LENGTH: Final = 100
KVM_CAP_VM_ATTRIBUTES: Final = 101
KVM_CAP_ARM_PSCI_0_2: Final = 102
KVM_CAP_CHECK_EXTENSION_VM: Final = 105
KVM_CAP_DISABLE_QUIRKS: Final = 116
KVM_CAP_X86_SMM: Final = 117
KVM_CAP_MULTI_ADDRESS_SPACE: Final = 118
KVM_CAP_GUEST_DEBUG_HW_BPS: Final = 119
KVM_CAP_GUEST_DEBUG_HW_WPS: Final = 120
KVM_CAP_SPLIT_IRQCHIP: Final = 121
KVM_CAP_IOEVENTFD_ANY_LENGTH: Final = 122
KVM_CAP_ARM_PMU_V3: Final = 126
KVM_CAP_VCPU_ATTRIBUTES: Final = 127
KVM_CAP_MAX_VCPU_ID: Final = 128
KVM_CAP_X2APIC_API: Final = 129
KVM_CAP_IMMEDIATE_EXIT: Final = 136
KVM_CAP_X86_DISABLE_EXITS: Final = 143
KVM_CAP_GET_MSR_FEATURES: Final = 153
KVM_CAP_NESTED_STATE: Final = 157
KVM_CAP_COALESCED_PIO: Final = 162
KVM_CAP_EXCEPTION_PAYLOAD: Final = 164
KVM_CAP_ARM_VM_IPA_SIZE: Final = 165
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: Final = 168
KVM_CAP_ARM_SVE: Final = 170
KVM_CAP_ARM_PTRAUTH_ADDRESS: Final = 171
KVM_CAP_ARM_PTRAUTH_GENERIC: Final = 172
KVM_CAP_ARM_NISV_TO_USER: Final = 177
KVM_CAP_X86_USER_SPACE_MSR: Final = 188
KVM_CAP_X86_MSR_FILTER: Final = 189
KVM_CAP_DIRTY_LOG_RING: Final = 192
KVM_CAP_X86_BUS_LOCK_EXIT: Final = 193
KVM_CAP_SET_GUEST_DEBUG2: Final = 195
KVM_CAP_SREGS2: Final = 200
KVM_CAP_EXIT_HYPERCALL: Final = 201
KVM_CAP_BINARY_STATS_FD: Final = 203
KVM_CAP_EXIT_ON_EMULATION_FAILURE: Final = 204
KVM_CAP_VM_GPA_BITS: Final = 207
KVM_CAP_XSAVE2: Final = 208
KVM_CAP_SYSTEM_EVENT_DATA: Final = 215
KVM_CAP_ARM_SYSTEM_SUSPEND: Final = 216
KVM_CAP_X86_TRIPLE_FAULT_EVENT: Final = 218
KVM_CAP_X86_NOTIFY_VMEXIT: Final = 219

# --- exit reasons (kvm_run.exit_reason) ---
KVM_EXIT_UNKNOWN: Final = 0
KVM_EXIT_EXCEPTION: Final = 1
KVM_EXIT_IO: Final = 2
KVM_EXIT_HYPERCALL: Final = 3
KVM_EXIT_DEBUG: Final = 4
KVM_EXIT_HLT: Final = 5
KVM_EXIT_MMIO: Final = 6
KVM_EXIT_IRQ_WINDOW_OPEN: Final = 7
KVM_EXIT_SHUTDOWN: Final = 8
KVM_EXIT_FAIL_ENTRY: Final = 9
KVM_EXIT_INTR: Final = 10
KVM_EXIT_SET_TPR: Final = 11
KVM_EXIT_TPR_ACCESS: Final = 12
KVM_EXIT_S390_SIEIC: Final = 13
KVM_EXIT_S390_RESET: Final = 14
KVM_EXIT_DCR: Final = 15
KVM_EXIT_NMI: Final = 16
KVM_EXIT_INTERNAL_ERROR: Final = 17
KVM_EXIT_OSI: Final = 18
KVM_EXIT_PAPR_HCALL: Final = 19
KVM_EXIT_S390_UCONTROL: Final = 20
KVM_EXIT_WATCHDOG: Final = 21
KVM_EXIT_S390_TSCH: Final = 22
KVM_EXIT_EPR: Final = 23
KVM_EXIT_SYSTEM_EVENT: Final = 24
KVM_EXIT_S390_STSI: Final = 25
KVM_EXIT_IOAPIC_EOI: Final = 26
KVM_EXIT_HYPERV: Final = 27
KVM_EXIT_ARM_NISV: Final = 28
KVM_EXIT_X86_RDMSR: Final = 29
KVM_EXIT_X86_WRMSR: Final = 30
KVM_EXIT_DIRTY_RING_FULL: Final = 31
KVM_EXIT_AP_RESET_HOLD: Final = 32
KVM_EXIT_X86_BUS_LOCK: Final = 33
KVM_EXIT_XEN: Final = 34
KVM_EXIT_RISCV_SBI: Final = 35
KVM_EXIT_RISCV_CSR: Final = 36
KVM_EXIT_NOTIFY: Final = 37
# Newer than some build hosts' headers (Debian 12 ships 6.1's), but a newer
# running kernel can return them, so name them rather than print a number.
KVM_EXIT_LOONGARCH_IOCSR: Final = 38
KVM_EXIT_MEMORY_FAULT: Final = 39

KVM_EXIT_IO_IN: Final = 0
KVM_EXIT_IO_OUT: Final = 1

KVM_SYSTEM_EVENT_SHUTDOWN: Final = 1
KVM_SYSTEM_EVENT_RESET: Final = 2
KVM_SYSTEM_EVENT_CRASH: Final = 3
KVM_SYSTEM_EVENT_WAKEUP: Final = 4
KVM_SYSTEM_EVENT_SUSPEND: Final = 5
KVM_SYSTEM_EVENT_SEV_TERM: Final = 6

KVM_INTERNAL_ERROR_EMULATION: Final = 1
KVM_INTERNAL_ERROR_SIMUL_EX: Final = 2
KVM_INTERNAL_ERROR_DELIVERY_EV: Final = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: Final = 4
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES: Final = 1 << 0

KVM_MSR_EXIT_REASON_INVAL: Final = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN: Final = 1 << 1
KVM_MSR_EXIT_REASON_FILTER: Final = 1 << 2

# --- flags ---
KVM_MEM_LOG_DIRTY_PAGES: Final = 1 << 0
KVM_MEM_READONLY: Final = 1 << 1

KVM_GUESTDBG_ENABLE: Final = 0x00000001
KVM_GUESTDBG_SINGLESTEP: Final = 0x00000002
KVM_GUESTDBG_USE_SW_BP: Final = 0x00010000
KVM_GUESTDBG_USE_HW_BP: Final = 0x00020000
KVM_GUESTDBG_INJECT_DB: Final = 0x00040000
KVM_GUESTDBG_INJECT_BP: Final = 0x00080000
KVM_GUESTDBG_BLOCKIRQ: Final = 0x00100000

KVM_IOEVENTFD_FLAG_DATAMATCH: Final = 1 << 0
KVM_IOEVENTFD_FLAG_PIO: Final = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN: Final = 1 << 2
KVM_IOEVENTFD_FLAG_VIRTIO_CCW_NOTIFY: Final = 1 << 3

KVM_IRQFD_FLAG_DEASSIGN: Final = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE: Final = 1 << 1

KVM_MP_STATE_RUNNABLE: Final = 0
KVM_MP_STATE_UNINITIALIZED: Final = 1
KVM_MP_STATE_INIT_RECEIVED: Final = 2
KVM_MP_STATE_HALTED: Final = 3
KVM_MP_STATE_SIPI_RECEIVED: Final = 4
KVM_MP_STATE_STOPPED: Final = 5
KVM_MP_STATE_CHECK_STOP: Final = 6
KVM_MP_STATE_OPERATING: Final = 7
KVM_MP_STATE_LOAD: Final = 8
KVM_MP_STATE_AP_RESET_HOLD: Final = 9
KVM_MP_STATE_SUSPENDED: Final = 10

KVM_PIT_SPEAKER_DUMMY: Final = 1

KVM_IRQCHIP_PIC_MASTER: Final = 0
KVM_IRQCHIP_PIC_SLAVE: Final = 1
KVM_IRQCHIP_IOAPIC: Final = 2

KVM_IRQ_ROUTING_IRQCHIP: Final = 1
KVM_IRQ_ROUTING_MSI: Final = 2

KVM_MSI_VALID_DEVID: Final = 1 << 0

KVM_CLOCK_TSC_STABLE: Final = 2
KVM_CLOCK_REALTIME: Final = 1 << 2
KVM_CLOCK_HOST_TSC: Final = 1 << 3

KVM_CPUID_FLAG_SIGNIFCANT_INDEX: Final = 1 << 0  # sic: the uapi spelling

KVM_SYNC_X86_REGS: Final = 1 << 0
KVM_SYNC_X86_SREGS: Final = 1 << 1
KVM_SYNC_X86_EVENTS: Final = 1 << 2

KVM_VCPUEVENT_VALID_NMI_PENDING: Final = 0x00000001
KVM_VCPUEVENT_VALID_SIPI_VECTOR: Final = 0x00000002
KVM_VCPUEVENT_VALID_SHADOW: Final = 0x00000004
KVM_VCPUEVENT_VALID_SMM: Final = 0x00000008
KVM_VCPUEVENT_VALID_PAYLOAD: Final = 0x00000010
KVM_VCPUEVENT_VALID_TRIPLE_FAULT: Final = 0x00000020

KVM_X86_SHADOW_INT_MOV_SS: Final = 0x01
KVM_X86_SHADOW_INT_STI: Final = 0x02

KVM_NR_INTERRUPTS: Final = 256

# vCPU device attributes (KVM_{GET,SET,HAS}_DEVICE_ATTR on the vCPU fd).
KVM_VCPU_TSC_CTRL: Final = 0
KVM_VCPU_TSC_OFFSET: Final = 0

# --- ONE_REG ids (linux/kvm.h) ---
KVM_REG_ARCH_MASK: Final = 0xFF00000000000000
KVM_REG_X86: Final = 0x2000000000000000
KVM_REG_ARM64: Final = 0x6000000000000000
KVM_REG_SIZE_SHIFT: Final = 52
KVM_REG_SIZE_MASK: Final = 0x00F0000000000000
KVM_REG_SIZE_U32: Final = 0x0020000000000000
KVM_REG_SIZE_U64: Final = 0x0030000000000000
KVM_REG_SIZE_U128: Final = 0x0040000000000000

# --- arm64-only (arch/arm64/include/uapi/asm/kvm.h; not in an x86 header) ---
KVM_ARM_VCPU_POWER_OFF: Final = 0
KVM_ARM_VCPU_EL1_32BIT: Final = 1
KVM_ARM_VCPU_PSCI_0_2: Final = 2
KVM_ARM_VCPU_PMU_V3: Final = 3
KVM_REG_ARM_COPROC_SHIFT: Final = 16
KVM_REG_ARM_CORE: Final = 0x0010 << KVM_REG_ARM_COPROC_SHIFT

EXIT_REASON_NAMES: Final[dict[int, str]] = {
    KVM_EXIT_UNKNOWN: "KVM_EXIT_UNKNOWN",
    KVM_EXIT_EXCEPTION: "KVM_EXIT_EXCEPTION",
    KVM_EXIT_IO: "KVM_EXIT_IO",
    KVM_EXIT_HYPERCALL: "KVM_EXIT_HYPERCALL",
    KVM_EXIT_DEBUG: "KVM_EXIT_DEBUG",
    KVM_EXIT_HLT: "KVM_EXIT_HLT",
    KVM_EXIT_MMIO: "KVM_EXIT_MMIO",
    KVM_EXIT_IRQ_WINDOW_OPEN: "KVM_EXIT_IRQ_WINDOW_OPEN",
    KVM_EXIT_SHUTDOWN: "KVM_EXIT_SHUTDOWN",
    KVM_EXIT_FAIL_ENTRY: "KVM_EXIT_FAIL_ENTRY",
    KVM_EXIT_INTR: "KVM_EXIT_INTR",
    KVM_EXIT_SET_TPR: "KVM_EXIT_SET_TPR",
    KVM_EXIT_TPR_ACCESS: "KVM_EXIT_TPR_ACCESS",
    KVM_EXIT_S390_SIEIC: "KVM_EXIT_S390_SIEIC",
    KVM_EXIT_S390_RESET: "KVM_EXIT_S390_RESET",
    KVM_EXIT_DCR: "KVM_EXIT_DCR",
    KVM_EXIT_NMI: "KVM_EXIT_NMI",
    KVM_EXIT_INTERNAL_ERROR: "KVM_EXIT_INTERNAL_ERROR",
    KVM_EXIT_OSI: "KVM_EXIT_OSI",
    KVM_EXIT_PAPR_HCALL: "KVM_EXIT_PAPR_HCALL",
    KVM_EXIT_S390_UCONTROL: "KVM_EXIT_S390_UCONTROL",
    KVM_EXIT_WATCHDOG: "KVM_EXIT_WATCHDOG",
    KVM_EXIT_S390_TSCH: "KVM_EXIT_S390_TSCH",
    KVM_EXIT_EPR: "KVM_EXIT_EPR",
    KVM_EXIT_SYSTEM_EVENT: "KVM_EXIT_SYSTEM_EVENT",
    KVM_EXIT_S390_STSI: "KVM_EXIT_S390_STSI",
    KVM_EXIT_IOAPIC_EOI: "KVM_EXIT_IOAPIC_EOI",
    KVM_EXIT_HYPERV: "KVM_EXIT_HYPERV",
    KVM_EXIT_ARM_NISV: "KVM_EXIT_ARM_NISV",
    KVM_EXIT_X86_RDMSR: "KVM_EXIT_X86_RDMSR",
    KVM_EXIT_X86_WRMSR: "KVM_EXIT_X86_WRMSR",
    KVM_EXIT_DIRTY_RING_FULL: "KVM_EXIT_DIRTY_RING_FULL",
    KVM_EXIT_AP_RESET_HOLD: "KVM_EXIT_AP_RESET_HOLD",
    KVM_EXIT_X86_BUS_LOCK: "KVM_EXIT_X86_BUS_LOCK",
    KVM_EXIT_XEN: "KVM_EXIT_XEN",
    KVM_EXIT_RISCV_SBI: "KVM_EXIT_RISCV_SBI",
    KVM_EXIT_RISCV_CSR: "KVM_EXIT_RISCV_CSR",
    KVM_EXIT_NOTIFY: "KVM_EXIT_NOTIFY",
    KVM_EXIT_LOONGARCH_IOCSR: "KVM_EXIT_LOONGARCH_IOCSR",
    KVM_EXIT_MEMORY_FAULT: "KVM_EXIT_MEMORY_FAULT",
}

#: Name of every ioctl request, from the names above (for errors and call logs).
IOCTL_NAMES: Final[dict[int, str]] = request_names(globals())
