"""Raw Intel HAXM interface for pyvmm-haxm: cffi declarations and constants, nothing else.

The interface is HAXM API v4 (HAXM 7.x, ``HAX_CUR_VERSION`` 4), as declared by the
driver's ``include/hax_interface.h`` and ``include/hax_vcpu_state.h`` and, per host
OS, ``include/{linux,darwin,windows}/hax_interface_*.h``.  Every struct there is
``PACKED``; they are all naturally aligned anyway, so the packed cdef below gives
the same layout gcc gives the headers (``tests/test_haxm_bindings_layout.py``
checks every size and offset, compiled with the host C compiler where one exists).

One request per operation and host OS: Linux encodes with asm-generic ``_IOx(0,
nr, T)``, macOS with BSD ``sys/ioccom.h`` (same group 0 and numbers, different
direction bits), Windows with ``CTL_CODE(0x4000, fn, METHOD_BUFFERED,
FILE_ANY_ACCESS)`` for ``DeviceIoControl``.  ``docs/backends/haxm.md`` §3 has
the table and its sources.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Final, Protocol

from pyvmm.backend.ffi_cache import declared_ffi
from pyvmm.backend.ioctl import IoctlRequest, bsd, ctl_code, linux

_CDEF: Final = """
struct hax_module_version {
    uint32_t compat_version;
    uint32_t cur_version;
};

struct hax_capabilityinfo {
    uint16_t wstatus;
    uint16_t winfo;
    uint32_t win_refcount;
    uint64_t mem_quota;
};

struct hax_set_memlimit {
    uint8_t enable_memlimit;
    uint8_t pad[7];
    uint64_t memory_limit;
};

struct hax_tunnel_info {
    uint64_t va;
    uint64_t io_va;
    uint16_t size;
    uint16_t pad[3];
};

struct hax_alloc_ram_info {
    uint32_t size;
    uint32_t pad;
    uint64_t va;
};

struct hax_ramblock_info {
    uint64_t start_va;
    uint64_t size;
    uint64_t reserved;
};

struct hax_set_ram_info {
    uint64_t pa_start;
    uint32_t size;
    uint8_t flags;
    uint8_t pad[3];
    uint64_t va;
};

struct hax_set_ram_info2 {
    uint64_t pa_start;
    uint64_t size;
    uint64_t va;
    uint32_t flags;
    uint32_t reserved1;
    uint64_t reserved2;
};

struct hax_protect_ram_info {
    uint64_t pa_start;
    uint64_t size;
    uint32_t flags;
    uint32_t reserved;
};

struct hax_qemu_version {
    uint32_t cur_version;
    uint32_t least_version;
};

struct vmx_msr {
    uint64_t entry;
    uint64_t value;
};

struct hax_msr_data {
    uint16_t nr_msr;
    uint16_t done;
    uint16_t pad[2];
    struct vmx_msr entries[32];
};

struct fx_layout {
    uint16_t fcw;
    uint16_t fsw;
    uint8_t ftw;
    uint8_t res1;
    uint16_t fop;
    uint32_t fip;
    uint16_t fcs;
    uint16_t res2;
    uint32_t fdp;
    uint16_t fds;
    uint16_t res3;
    uint32_t mxcsr;
    uint32_t mxcsr_mask;
    uint8_t st_mm[8][16];
    uint8_t mmx_1[8][16];
    uint8_t mmx_2[8][16];
    uint8_t pad[96];
};

struct segment_desc_t {
    uint16_t selector;
    uint16_t _dummy;
    uint32_t limit;
    uint64_t base;
    uint32_t ar;
    uint32_t ipad;
};

struct vcpu_state_t {
    uint64_t _regs[16];
    uint64_t _rip;
    uint64_t _rflags;
    struct segment_desc_t _cs;
    struct segment_desc_t _ss;
    struct segment_desc_t _ds;
    struct segment_desc_t _es;
    struct segment_desc_t _fs;
    struct segment_desc_t _gs;
    struct segment_desc_t _ldt;
    struct segment_desc_t _tr;
    struct segment_desc_t _gdt;
    struct segment_desc_t _idt;
    uint64_t _cr0;
    uint64_t _cr2;
    uint64_t _cr3;
    uint64_t _cr4;
    uint64_t _dr0;
    uint64_t _dr1;
    uint64_t _dr2;
    uint64_t _dr3;
    uint64_t _dr6;
    uint64_t _dr7;
    uint64_t _pde;
    uint32_t _efer;
    uint32_t _sysenter_cs;
    uint64_t _sysenter_eip;
    uint64_t _sysenter_esp;
    uint32_t _activity_state;
    uint32_t pad;
    uint64_t _interruptibility_state;
};

struct hax_tunnel_io {
    uint8_t _direction;
    uint8_t _df;
    uint16_t _size;
    uint16_t _port;
    uint16_t _count;
    uint8_t _flags;
    uint8_t _pad0;
    uint16_t _pad1;
    uint32_t _pad2;
    uint64_t _vaddr;
};

struct hax_tunnel_pagefault {
    uint64_t gpa;
    uint32_t flags;
    uint32_t reserved1;
    uint64_t reserved2;
};

struct hax_tunnel_debug {
    uint64_t rip;
    uint64_t dr6;
    uint64_t dr7;
};

struct hax_tunnel {
    uint32_t _exit_reason;
    uint32_t pad0;
    uint32_t _exit_status;
    uint32_t user_event_pending;
    int32_t ready_for_interrupt_injection;
    int32_t request_interrupt_window;
    union {
        struct hax_tunnel_io io;
        struct { uint64_t gla; } mmio;
        struct hax_tunnel_pagefault pagefault;
        struct { uint64_t dummy; } state;
        struct hax_tunnel_debug debug;
    };
    uint64_t apic_base;
};

struct hax_fastmmio {
    uint64_t gpa;
    uint64_t value;
    uint8_t size;
    uint8_t direction;
    uint16_t reg_index;
    uint32_t pad0;
    uint64_t _cr0;
    uint64_t _cr2;
    uint64_t _cr3;
    uint64_t _cr4;
};

struct hax_debug_t {
    uint32_t control;
    uint32_t reserved;
    uint64_t dr[8];
};

struct hax_cpuid_entry {
    uint32_t function;
    uint32_t index;
    uint32_t flags;
    uint32_t eax;
    uint32_t ebx;
    uint32_t ecx;
    uint32_t edx;
    uint32_t pad[3];
};

struct hax_cpuid {
    uint32_t total;
    uint32_t pad;
    struct hax_cpuid_entry entries[];
};
"""

ffi = declared_ffi(_CDEF, packed=True)

# --- versions and capabilities (hax.h, hax_interface.h) --------------------------------
#: The API version pyvmm-haxm speaks; QEMU 2.12+ asked for the same (hax-all.c).
HAX_API_VERSION = 4
HAX_CAP_STATUS_WORKING = 1 << 0
HAX_CAP_MEMQUOTA = 1 << 1
HAX_CAP_FAILREASON_VT = 1 << 0
HAX_CAP_FAILREASON_NX = 1 << 1
HAX_CAP_EPT = 1 << 0
HAX_CAP_FASTMMIO = 1 << 1
HAX_CAP_UG = 1 << 2
HAX_CAP_64BIT_RAMBLOCK = 1 << 3
HAX_CAP_64BIT_SETRAM = 1 << 4
HAX_CAP_TUNNEL_PAGE = 1 << 5
HAX_CAP_RAM_PROTECTION = 1 << 6
HAX_CAP_DEBUG = 1 << 7
HAX_CAP_IMPLICIT_RAMBLOCK = 1 << 8
HAX_CAP_CPUID = 1 << 9

# --- memory (hax_interface.h) -----------------------------------------------------------
HAX_RAM_INFO_ROM = 1 << 0
HAX_RAM_INFO_STANDALONE = 1 << 6
HAX_RAM_INFO_INVALID = 1 << 7
HAX_RAM_PERM_NONE = 0
HAX_RAM_PERM_RWX = 7

# --- the tunnel (hax_interface.h; exit statuses: core/include/vm.h) ------------------------
HAX_IO_OUT = 0
HAX_IO_IN = 1
#: ``io._flags`` bit: a string instruction (INS/OUTS), its data at ``_vaddr``.
HAX_IO_STRING = 1
HAX_EXIT_IO = 1
HAX_EXIT_MMIO = 2
HAX_EXIT_REALMODE = 3
HAX_EXIT_INTERRUPT = 4
HAX_EXIT_UNKNOWN = 5
HAX_EXIT_HLT = 6
HAX_EXIT_STATECHANGE = 7
HAX_EXIT_PAUSED = 8
HAX_EXIT_FAST_MMIO = 9
HAX_EXIT_PAGEFAULT = 10
HAX_EXIT_DEBUG = 11
#: ``hax_fastmmio.direction``: 0 read, 1 write, 2 copy ``gpa`` -> ``gpa2`` (API v4).
HAX_FASTMMIO_READ = 0
HAX_FASTMMIO_WRITE = 1
HAX_FASTMMIO_COPY = 2
#: The driver's I/O buffer holds at most this many bytes of string I/O per exit
#: (``IOS_MAX_BUFFER``, core/include/vcpu.h).
IOS_MAX_BUFFER = 64
#: ``hax_msr_data.entries`` has room for 32, the drivers refuse ``nr_msr >= 0x20``.
HAX_MAX_MSR_ARRAY = 0x20
HAX_MAX_CPUID_ENTRIES = 0x40
HAX_MAX_VCPUS = 16
HAX_MAX_VMS = 8

# --- segment_desc_t.ar bits (hax_vcpu_state.h) -------------------------------------------
AR_TYPE_MASK = 0xF
AR_S = 1 << 4
AR_DPL_SHIFT = 5
AR_PRESENT = 1 << 7
AR_AVL = 1 << 12
AR_L = 1 << 13
AR_DB = 1 << 14
AR_G = 1 << 15
AR_NULL = 1 << 16

# --- Windows device type (windows/hax_interface_windows.h) ----------------------------------
HAX_DEVICE_TYPE = 0x4000


@dataclass(frozen=True)
class HaxRequests:
    """Every HAXM request number of one host OS.  ``None``: the OS has no such request
    (``DESTROY_VM`` and ``KICKOFF`` exist on one side only)."""

    VERSION: int
    CREATE_VM: int
    DESTROY_VM: int | None
    CAPABILITY: int
    SET_MEMLIMIT: int
    VCPU_CREATE: int
    ALLOC_RAM: int
    SET_RAM: int
    VCPU_DESTROY: int
    NOTIFY_QEMU_VERSION: int
    ADD_RAMBLOCK: int
    SET_RAM2: int
    PROTECT_RAM: int
    RUN: int
    SET_MSRS: int
    GET_MSRS: int
    SET_FPU: int
    GET_FPU: int
    SETUP_TUNNEL: int
    INTERRUPT: int
    SET_REGS: int
    GET_REGS: int
    KICKOFF: int | None
    VCPU_DEBUG: int
    SET_CPUID: int
    GET_CPUID: int

    def names(self) -> dict[int, str]:
        """``{request: name}`` (the header's names), for error messages."""
        return {getattr(self, f.name): f"HAX_{f.name}" for f in fields(self) if getattr(self, f.name) is not None}


class _Encoding(Protocol):
    """The kit's ``linux`` and ``bsd`` encoders."""

    def io(self, kind: int, nr: int) -> IoctlRequest: ...
    def ior(self, kind: int, nr: int, size: int) -> IoctlRequest: ...
    def iow(self, kind: int, nr: int, size: int) -> IoctlRequest: ...
    def iowr(self, kind: int, nr: int, size: int) -> IoctlRequest: ...


def _posix(e: _Encoding) -> HaxRequests:
    """The Linux and macOS headers share the numbers and argument types; only the
    direction bits of the encoding differ (asm-generic vs BSD)."""
    size = ffi.sizeof
    return HaxRequests(
        VERSION=e.iowr(0, 0x20, size("struct hax_module_version")),
        CREATE_VM=e.iowr(0, 0x21, 4),
        DESTROY_VM=e.iow(0, 0x22, 4),
        CAPABILITY=e.ior(0, 0x23, size("struct hax_capabilityinfo")),
        SET_MEMLIMIT=e.iowr(0, 0x24, size("struct hax_set_memlimit")),
        VCPU_CREATE=e.iowr(0, 0x80, 4),
        ALLOC_RAM=e.iowr(0, 0x81, size("struct hax_alloc_ram_info")),
        SET_RAM=e.iowr(0, 0x82, size("struct hax_set_ram_info")),
        VCPU_DESTROY=e.ior(0, 0x83, 4),
        NOTIFY_QEMU_VERSION=e.iow(0, 0x84, size("struct hax_qemu_version")),
        ADD_RAMBLOCK=e.iow(0, 0x85, size("struct hax_ramblock_info")),
        SET_RAM2=e.iowr(0, 0x86, size("struct hax_set_ram_info2")),
        PROTECT_RAM=e.iowr(0, 0x87, size("struct hax_protect_ram_info")),
        RUN=e.io(0, 0xC0),
        SET_MSRS=e.iowr(0, 0xC1, size("struct hax_msr_data")),
        GET_MSRS=e.iowr(0, 0xC2, size("struct hax_msr_data")),
        SET_FPU=e.iow(0, 0xC3, size("struct fx_layout")),
        GET_FPU=e.ior(0, 0xC4, size("struct fx_layout")),
        SETUP_TUNNEL=e.iowr(0, 0xC5, size("struct hax_tunnel_info")),
        INTERRUPT=e.iowr(0, 0xC6, 4),
        SET_REGS=e.iowr(0, 0xC7, size("struct vcpu_state_t")),
        GET_REGS=e.iowr(0, 0xC8, size("struct vcpu_state_t")),
        KICKOFF=None,
        VCPU_DEBUG=e.iow(0, 0xC9, size("struct hax_debug_t")),
        # The argument type is ``struct hax_cpuid *``: the size of a pointer.
        SET_CPUID=e.iow(0, 0xCA, size("void *")),
        GET_CPUID=e.iow(0, 0xCB, size("void *")),
    )


def _windows(function: int) -> int:
    return ctl_code(HAX_DEVICE_TYPE, function)


#: Linux (``include/linux/hax_interface_linux.h``).
LINUX: Final = _posix(linux)
#: macOS (``include/darwin/hax_interface_mac.h``).
DARWIN: Final = _posix(bsd)
#: Windows (``include/windows/hax_interface_windows.h``): ``NOTIFY_QEMU_VERSION``
#: shares ``CAPABILITY``'s function 0x910 (on a VM handle instead of the system one).
WINDOWS: Final = HaxRequests(
    VERSION=_windows(0x900),
    CREATE_VM=_windows(0x901),
    DESTROY_VM=None,
    CAPABILITY=_windows(0x910),
    SET_MEMLIMIT=_windows(0x911),
    VCPU_CREATE=_windows(0x902),
    ALLOC_RAM=_windows(0x903),
    SET_RAM=_windows(0x904),
    VCPU_DESTROY=_windows(0x905),
    NOTIFY_QEMU_VERSION=_windows(0x910),
    ADD_RAMBLOCK=_windows(0x913),
    SET_RAM2=_windows(0x914),
    PROTECT_RAM=_windows(0x915),
    RUN=_windows(0x906),
    SET_MSRS=_windows(0x907),
    GET_MSRS=_windows(0x908),
    SET_FPU=_windows(0x909),
    GET_FPU=_windows(0x90A),
    SETUP_TUNNEL=_windows(0x90B),
    INTERRUPT=_windows(0x90C),
    SET_REGS=_windows(0x90D),
    GET_REGS=_windows(0x90E),
    KICKOFF=_windows(0x90F),
    VCPU_DEBUG=_windows(0x916),
    SET_CPUID=_windows(0x917),
    GET_CPUID=_windows(0x918),
)

#: ``{request: name}`` of the POSIX requests (Linux and macOS together: the same
#: name gives the same number where the encodings agree, never another name).
POSIX_NAMES: Final = {**LINUX.names(), **DARWIN.names()}


@dataclass(frozen=True)
class DevicePaths:
    """Where one host OS puts the system, VM and vCPU devices."""

    system: str
    vm: str  # format with vm=
    vcpu: str  # format with vm=, vcpu=

    def vm_path(self, vm: int) -> str:
        return self.vm.format(vm=vm)

    def vcpu_path(self, vm: int, vcpu: int) -> str:
        return self.vcpu.format(vm=vm, vcpu=vcpu)


#: Linux: misc devices ``HAX``, ``hax_vm/vm%02d``, ``hax_vm%02d/vcpu%02d``
#: (platforms/linux/components.c ``HAX_VM_DEVFS_FMT``/``HAX_VCPU_DEVFS_FMT``).
LINUX_PATHS: Final = DevicePaths("/dev/HAX", "/dev/hax_vm/vm{vm:02d}", "/dev/hax_vm{vm:02d}/vcpu{vcpu:02d}")
#: macOS: the same names under devfs (platforms/darwin/hax_entry.c).
DARWIN_PATHS: Final = LINUX_PATHS
#: Windows: ``\\.\HAX``, ``\\.\hax_vm%02d``, ``\\.\hax_vm%02d_vcpu%02d`` (docs/api.md).
WINDOWS_PATHS: Final = DevicePaths(r"\\.\HAX", r"\\.\hax_vm{vm:02d}", r"\\.\hax_vm{vm:02d}_vcpu{vcpu:02d}")
