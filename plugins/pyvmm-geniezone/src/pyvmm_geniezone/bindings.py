"""Raw GenieZone uapi for pyvmm-geniezone: cffi declarations and constants, nothing else.

The interface is ``include/uapi/linux/gzvm.h`` of the Android Common Kernel
(the driver in ``drivers/virt/geniezone/``), whose structs crosvm's
``hypervisor/src/geniezone/geniezone_sys`` bindings declare with the same layout
(crosvm keeps older names for a few constants, with the same values:
``docs/backends/geniezone.md`` §2).

cffi runs in ABI mode: nothing is compiled at install or run time, so every struct
is written out with its exact layout.  ``tests/test_geniezone_bindings_layout.py``
checks every size and offset here against numbers worked out from the header
text, and, where an aarch64 cross compiler is installed, against what that
compiler makes of these very declarations.

ioctl numbers are computed from ``sizeof`` of the cffi structs, as the kernel's
``_IOW`` macros do, so a layout error also shows up as a wrong ioctl number.  The
encoding (asm-generic, which arm64 uses) is the backend kit's, and
:data:`IOCTL_NAMES` is collected from the names the requests are assigned to.
"""

from __future__ import annotations

from typing import Final

from pyvmm.backend.ffi_cache import declared_ffi
from pyvmm.backend.ioctl import IoctlRequest, linux, request_names

_CDEF: Final = """
struct gzvm_memory_region {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
};

struct gzvm_userspace_memory_region {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
};

struct gzvm_irq_level {
    union {
        uint32_t irq;
        int32_t status;
    };
    uint32_t level;
};

struct gzvm_create_device {
    uint32_t dev_type;
    uint32_t id;
    uint64_t flags;
    uint64_t dev_addr;
    uint64_t dev_reg_size;
    uint64_t attr_addr;
    uint64_t attr_size;
};

struct gzvm_vcpu_run {
    uint32_t exit_reason;
    uint8_t immediate_exit;
    uint8_t padding1[3];
    union {
        struct {
            uint64_t phys_addr;
            uint8_t data[8];
            uint64_t size;
            uint32_t reg_nr;
            uint8_t is_write;
        } mmio;
        struct {
            uint64_t hardware_entry_failure_reason;
            uint32_t cpu;
        } fail_entry;
        struct {
            uint32_t exception;
            uint32_t error_code;
            uint64_t fault_gpa;
            uint64_t reserved[30];
        } exception;
        struct {
            uint64_t args[8];
        } hypercall;
        struct {
            uint32_t suberror;
            uint32_t ndata;
            uint64_t data[16];
        } internal;
        struct {
            uint32_t type;
            uint32_t ndata;
            uint64_t data[16];
        } system_event;
        char padding[256];
    };
};

struct gzvm_enable_cap {
    uint64_t cap;
    uint64_t args[5];
};

struct gzvm_one_reg {
    uint64_t id;
    uint64_t addr;
};

struct gzvm_irqfd {
    uint32_t fd;
    uint32_t gsi;
    uint32_t flags;
    uint32_t resamplefd;
    uint8_t pad[16];
};

struct gzvm_ioeventfd {
    uint64_t datamatch;
    uint64_t addr;
    uint32_t len;
    int32_t fd;
    uint32_t flags;
    uint8_t pad[36];
};

struct gzvm_dtb_config {
    uint64_t dtb_addr;
    uint64_t dtb_size;
};
"""

ffi: Final = declared_ffi(_CDEF)

#: Every struct the bindings declare (for the layout test's compiled check).
STRUCTS: Final = (
    "struct gzvm_memory_region",
    "struct gzvm_userspace_memory_region",
    "struct gzvm_irq_level",
    "struct gzvm_create_device",
    "struct gzvm_vcpu_run",
    "struct gzvm_enable_cap",
    "struct gzvm_one_reg",
    "struct gzvm_irqfd",
    "struct gzvm_ioeventfd",
    "struct gzvm_dtb_config",
)


def declarations() -> str:
    """The C text of the declarations above (the layout test compiles it)."""
    return _CDEF


# --- ioctl numbers (asm-generic/ioctl.h, used by arm64) ------------------------------

GZVM_IOC_MAGIC: Final = 0x92


def _iow(nr: int, ctype: str) -> IoctlRequest:
    return linux.iow(GZVM_IOC_MAGIC, nr, ffi.sizeof(ctype))


# --- /dev/gzvm (GZVM_CHECK_EXTENSION works on a VM fd too) ---
GZVM_CREATE_VM: Final = linux.io(GZVM_IOC_MAGIC, 0x01)  # arg: the VM type, by value
GZVM_CHECK_EXTENSION: Final = linux.io(GZVM_IOC_MAGIC, 0x03)  # arg: pointer to a u64 capability

# --- VM fd ---
GZVM_SET_MEMORY_REGION: Final = _iow(0x40, "struct gzvm_memory_region")  # declared; no driver handles it
GZVM_CREATE_VCPU: Final = linux.io(GZVM_IOC_MAGIC, 0x41)  # arg: the vCPU id, by value
GZVM_SET_USER_MEMORY_REGION: Final = _iow(0x46, "struct gzvm_userspace_memory_region")
GZVM_IRQ_LINE: Final = _iow(0x61, "struct gzvm_irq_level")
GZVM_IRQFD: Final = _iow(0x76, "struct gzvm_irqfd")
GZVM_IOEVENTFD: Final = _iow(0x79, "struct gzvm_ioeventfd")
GZVM_ENABLE_CAP: Final = _iow(0xA3, "struct gzvm_enable_cap")
GZVM_CREATE_DEVICE: Final = linux.iowr(GZVM_IOC_MAGIC, 0xE0, ffi.sizeof("struct gzvm_create_device"))
GZVM_SET_DTB_CONFIG: Final = _iow(0xFF, "struct gzvm_dtb_config")

# --- vCPU fd ---
GZVM_RUN: Final = linux.io(GZVM_IOC_MAGIC, 0x80)  # arg: pointer to the VMM's struct gzvm_vcpu_run
GZVM_GET_ONE_REG: Final = _iow(0xAB, "struct gzvm_one_reg")  # always EOPNOTSUPP
GZVM_SET_ONE_REG: Final = _iow(0xAC, "struct gzvm_one_reg")

# --- capabilities (CHECK_EXTENSION / ENABLE_CAP) ---
GZVM_CAP_VM_GPA_SIZE: Final = 0xA5  # crosvm: GZVM_CAP_ARM_VM_IPA_SIZE
GZVM_CAP_PROTECTED_VM: Final = 0xFFBADAB1  # crosvm: GZVM_CAP_ARM_PROTECTED_VM
GZVM_CAP_BLOCK_BASED_DEMAND_PAGING: Final = 0x9201
GZVM_CAP_ENABLE_DEMAND_PAGING: Final = 0x9202
GZVM_CAP_ENABLE_IDLE: Final = 0x9203
# args[0] of ENABLE_CAP(GZVM_CAP_PROTECTED_VM)
GZVM_CAP_PVM_SET_PVMFW_GPA: Final = 0
GZVM_CAP_PVM_GET_PVMFW_SIZE: Final = 1
GZVM_CAP_PVM_SET_PROTECTED_VM: Final = 2

#: GZVM_CREATE_VM's argument: the only VM type, a Linux guest.
GZVM_VM_TYPE_LINUX: Final = 0

# --- gzvm_userspace_memory_region.flags: the region's purpose (crosvm's names;
#     ACK forwards the value to the hypervisor without defining it) ---
GZVM_USER_MEM_REGION_GUEST_MEM: Final = 1 << 0
GZVM_USER_MEM_REGION_PROTECT_FW: Final = 1 << 1
GZVM_USER_MEM_REGION_STATIC_SWIOTLB: Final = 1 << 2

# --- gzvm_irq_level.irq ---
GZVM_IRQ_LINE_NUM_MASK: Final = 0xFFFF  # bits 15..0: the SPI index (INTID - 32)
GZVM_IRQ_LINE_VCPU_SHIFT: Final = 16  # bits 23..16
GZVM_IRQ_LINE_TYPE_SHIFT: Final = 24  # bits 27..24
GZVM_IRQ_LINE_VCPU2_SHIFT: Final = 28  # bits 31..28
GZVM_IRQ_TYPE_CPU: Final = 0
GZVM_IRQ_TYPE_SPI: Final = 1
GZVM_IRQ_TYPE_PPI: Final = 2

# --- gzvm_create_device.dev_type ---
GZVM_DEV_TYPE_ARM_VGIC_V3_DIST: Final = 0
GZVM_DEV_TYPE_ARM_VGIC_V3_REDIST: Final = 1

# --- gzvm_vcpu_run.exit_reason ---
GZVM_EXIT_UNKNOWN: Final = 0x92920000
GZVM_EXIT_MMIO: Final = 0x92920001
GZVM_EXIT_HYPERCALL: Final = 0x92920002  # crosvm: GZVM_EXIT_HVC
GZVM_EXIT_IRQ: Final = 0x92920003
GZVM_EXIT_EXCEPTION: Final = 0x92920004
GZVM_EXIT_DEBUG: Final = 0x92920005
GZVM_EXIT_FAIL_ENTRY: Final = 0x92920006
GZVM_EXIT_INTERNAL_ERROR: Final = 0x92920007
GZVM_EXIT_SYSTEM_EVENT: Final = 0x92920008
GZVM_EXIT_SHUTDOWN: Final = 0x92920009
GZVM_EXIT_GZ: Final = 0x9292000A
GZVM_EXIT_IDLE: Final = 0x9292000B
GZVM_EXIT_IPI: Final = 0x9292000D

GZVM_EXCEPTION_UNKNOWN: Final = 0
GZVM_EXCEPTION_PAGE_FAULT: Final = 1

GZVM_HVC_PTP: Final = 0x86000001
GZVM_HVC_MEM_RELINQUISH: Final = 0xC6000009

GZVM_SYSTEM_EVENT_SHUTDOWN: Final = 1
GZVM_SYSTEM_EVENT_RESET: Final = 2
GZVM_SYSTEM_EVENT_CRASH: Final = 3
GZVM_SYSTEM_EVENT_WAKEUP: Final = 4
GZVM_SYSTEM_EVENT_SUSPEND: Final = 5
GZVM_SYSTEM_EVENT_SEV_TERM: Final = 6
GZVM_SYSTEM_EVENT_S2IDLE: Final = 7

# --- one-reg ids (KVM's core-register encoding) ---
GZVM_REG_ARCH_ARM64: Final = 0x6000000000000000
GZVM_REG_ARCH_MASK: Final = 0xFF00000000000000
GZVM_REG_SIZE_SHIFT: Final = 52
GZVM_REG_SIZE_MASK: Final = 0x00F0000000000000
GZVM_REG_SIZE_U64: Final = 0x0030000000000000
GZVM_REG_TYPE_GENERAL2: Final = 0x10 << 16  # crosvm: GZVM_REG_ARM_CORE

# --- irqfd / ioeventfd flags ---
GZVM_IRQFD_FLAG_DEASSIGN: Final = 1 << 0
GZVM_IRQFD_FLAG_RESAMPLE: Final = 1 << 1
GZVM_IOEVENTFD_FLAG_DATAMATCH: Final = 1 << 0
GZVM_IOEVENTFD_FLAG_PIO: Final = 1 << 1
GZVM_IOEVENTFD_FLAG_DEASSIGN: Final = 1 << 2

# --- driver limits (include/linux/soc/mediatek/gzvm_drv.h) ---
GZVM_MAX_VCPUS: Final = 8
GZVM_MAX_MEM_REGION: Final = 10
GZVM_MEM_MAX_NR_PAGES: Final = (1 << 31) - 1

#: Name of every ioctl request, from the names above (for errors and call logs).
IOCTL_NAMES: Final = request_names(globals())
