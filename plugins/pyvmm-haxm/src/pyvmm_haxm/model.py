"""A driver *model* of Intel HAXM (API v4, HAXM 7.8): a stand-in for the driver, not a backend.

pyvmm-haxm's tests run on it, and so can a VMM developer without HAXM: the model
sits behind the plugin's seam (``with HaxmModel("linux").installed(): ...``
routes ``pyvmm_haxm.host.HOST`` to it) and answers as the driver does on each
of its three hosts:

* **Linux** (``platforms/linux/components.c``, ``hax_entry.c``) and **macOS**
  (``platforms/darwin``): device files and ``ioctl``; failures are ``-errno``,
  an argument pointer the process has not mapped is ``EFAULT``
  (``copy_from_user``);
* **Windows** (``platforms/windows/hax_entry.c``): ``CreateFileW`` and
  ``DeviceIoControl`` with ``METHOD_BUFFERED`` in and out buffers; failures are
  NTSTATUS values the caller sees as Win32 errors (``STATUS_INVALID_PARAMETER``
  -> ``ERROR_INVALID_PARAMETER``, ``STATUS_UNSUCCESSFUL`` -> ``ERROR_GEN_FAILURE``,
  ``STATUS_BUFFER_TOO_SMALL`` -> ``ERROR_INSUFFICIENT_BUFFER``).

Behind both front ends is one model of the driver core (``core/hax.c``,
``vm.c``, ``memory.c``, ``memslot.c``, ``ramblock.c``, ``vcpu.c``, ``cpu.c``):
at most 8 VMs and vCPU ids below 16; RAM blocks and memslots with their
argument checks (a mapping's host address must lie in a block unless the
mapping is stand-alone; ROM writes are MMIO, ``ept2.c``); every MMIO access a
``HAX_EXIT_FAST_MMIO`` of HAXM 7.8's instruction emulator (``emulate.c``;
NOTIFY_QEMU_VERSION's feature bits are read by nothing); a vCPU starting in the real-mode reset state (``vcpu.c
vcpu_init``: CS F000 base FFFF0000, RIP FFF0); the tunnel protocol of
``vcpu_execute``/``cpu_vmx_execute``/``cpu_vmexit_handler`` -- a pending I/O read
is loaded on the next RUN (``handle_io_post``), a pre-set ``_exit_reason =
PAUSED`` returns ``HAX_EXIT_PAUSED``, ``user_event_pending`` and
``request_interrupt_window`` turn into ``HAX_EXIT_INTERRUPT``, a panicked vCPU
returns ``HAX_EXIT_STATECHANGE`` forever; ``ready_for_interrupt_injection`` as
``cpu_vmx_execute`` and ``exit_hlt`` set it; injected vectors queue in HAXM's
bitmap and enter highest first (``intr_exc.c``), a pending one keeping the
guest from stopping at HLT or at an interrupt window.

The guest runs on pyvmm's software CPU with HAXM's exit timing: port I/O
retires the instruction at the exit (RIP past it; a string instruction moves up
to 64 bytes through the I/O buffer and steps RCX/RSI/RDI, ``handle_string_io``
-- including its unconditional ``RCX -= n``, which the model keeps), an MMIO
access is completed by the next RUN (MOVS/CMPS: one exit per MMIO operand, in
order, as ``em_emulate_insn`` reads, then writes).  The model decodes the port instruction
itself from guest memory and walks the guest's 4-level page tables for ``INS``
(``vcpu_write_guest_virtual``).

Every constraint is a module-level :class:`~pyvmm.testing.driver_model.Rule`
citing ``docs/backends/haxm.md`` and the driver function; each has a POSIX and a
Windows form (:class:`RuleSet`).  The model reads the plugin's structs with its
own ``struct`` formats and imports nothing of the plugin but its host switch.
Where it cannot be faithful it raises
:class:`~pyvmm.testing.driver_model.ModelGap`: a REP string instruction
touching MMIO, MOVS into ROM (HAXM writes the ROM), string I/O under 32-bit or
PAE paging, string I/O touching MMIO, an FPU image the software CPU would have to load
(HAXM's own is all zero until SET_FPU),
MSRs outside the few the software CPU carries, guest debugging, CPUID tables,
RAM protection, memslot splits.

Branches marked ``# behaviour:`` are flipped one at a time by
``tools/mutate_model.py``, which also removes each rule's ``raise``; the tests
must catch every such mutant.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pyvmm.arch.x86_64 import DescriptorTable, Regs, Segment, Sregs
from pyvmm.backend.ioctl import bsd, ctl_code, linux
from pyvmm.errors import ConfigError, ErrorSpace
from pyvmm.exits import HltExit, InterruptedExit, IoExit, IrqWindowOpenExit, MmioExit, ShutdownExit, VcpuExit
from pyvmm.testing.driver_model import (
    PAGE_SIZE,
    DeviceFileModel,
    DeviceIoControlModel,
    FileObject,
    GuestCpu,
    IoControlObject,
    ModelCore,
    Rule,
    RuleViolation,
    UserPages,
)

DOC = "docs/backends/haxm.md"

# --- Win32 codes the Windows driver's NTSTATUS values reach the caller as -------------------
ERROR_INVALID_FUNCTION = 1  # STATUS_INVALID_DEVICE_REQUEST
ERROR_GEN_FAILURE = 31  # STATUS_UNSUCCESSFUL
ERROR_INVALID_PARAMETER = 87  # STATUS_INVALID_PARAMETER
ERROR_INSUFFICIENT_BUFFER = 122  # STATUS_BUFFER_TOO_SMALL


def _rule(rule_id: str, code: int, summary: str, source: str, *, windows: bool = False) -> Rule:
    space = ErrorSpace.WIN32 if windows else ErrorSpace.ERRNO
    return Rule(rule_id, code, summary, source, space=space)


# --- the rules (docs/backends/haxm.md §8), each in its POSIX and Windows form ----------------
@dataclass(frozen=True)
class RuleSet:
    """The rules of one front end (POSIX ``ioctl`` or Windows ``DeviceIoControl``)."""

    VM_LIMIT: Rule
    VCPU_ID: Rule
    MSR_COUNT: Rule
    RAMBLOCK_RESERVED: Rule
    RAMBLOCK_ARGS: Rule
    RAMBLOCK_OVERLAP: Rule
    SET_RAM_RESERVED: Rule
    SET_RAM_UNMAP_ARGS: Rule
    SET_RAM_NO_VA: Rule
    SET_RAM_SIZE: Rule
    SET_RAM_NO_BLOCK: Rule
    UNKNOWN_VCPU_REQUEST: Rule
    VM_FOREIGN_PROCESS: Rule
    VCPU_FOREIGN_THREAD: Rule


_CORE = "core/memory.c handle_alloc_ram; core/ramblock.c ramblock_add"
POSIX_RULES = RuleSet(
    VM_LIMIT=_rule(
        "HAX-VM-LIMIT",
        errno.ENOMEM,
        "at most 8 VMs exist at once",
        f"{DOC} §8; core/vm.c hax_create_vm (HAX_MAX_VMS), platforms/linux/hax_entry.c hax_dev_ioctl -ENOMEM",
    ),
    VCPU_ID=_rule(
        "HAX-VCPU-ID",
        errno.EINVAL,
        "a vCPU id is below 16",
        f"{DOC} §8; core/vcpu.c vcpu_create (valid_vcpu_id, HAX_MAX_VCPUS), components.c hax_vm_ioctl -EINVAL",
    ),
    MSR_COUNT=_rule(
        "HAX-MSR-COUNT",
        errno.EFAULT,
        "a GET/SET_MSRS batch has fewer than 0x20 MSRs",
        f"{DOC} §8; platforms/linux/components.c hax_vcpu_ioctl HAX_VCPU_IOCTL_SET_MSRS/GET_MSRS ('MSRS invalid')",
    ),
    RAMBLOCK_RESERVED=_rule(
        "HAX-RAMBLOCK-RESERVED",
        errno.EINVAL,
        "hax_ramblock_info.reserved is 0",
        f"{DOC} §8; platforms/linux/components.c hax_vm_ioctl HAX_VM_IOCTL_ADD_RAMBLOCK",
    ),
    RAMBLOCK_ARGS=_rule(
        "HAX-RAMBLOCK-ARGS", errno.EINVAL, "a RAM block has a non-zero start and size", f"{DOC} §8; {_CORE}"
    ),
    RAMBLOCK_OVERLAP=_rule(
        "HAX-RAMBLOCK-OVERLAP",
        errno.EINVAL,
        "RAM blocks do not overlap (stand-alone mappings make blocks too)",
        f"{DOC} §8; core/ramblock.c ramblock_add ('overlaps with existing ramblock')",
    ),
    SET_RAM_RESERVED=_rule(
        "HAX-SET-RAM2-RESERVED",
        errno.EINVAL,
        "hax_set_ram_info2.reserved1/reserved2 are 0",
        f"{DOC} §8; platforms/linux/components.c hax_vm_ioctl HAX_VM_IOCTL_SET_RAM2",
    ),
    SET_RAM_UNMAP_ARGS=_rule(
        "HAX-SET-RAM-UNMAP",
        errno.EINVAL,
        "an unmapping has flags == HAX_RAM_INFO_INVALID and va == 0",
        f"{DOC} §8; core/memory.c handle_set_ram",
    ),
    SET_RAM_NO_VA=_rule(
        "HAX-SET-RAM-VA", errno.EINVAL, "a mapping has a host address", f"{DOC} §8; core/memory.c handle_set_ram"
    ),
    SET_RAM_SIZE=_rule(
        "HAX-SET-RAM-SIZE",
        errno.EINVAL,
        "a mapping covers at least one page",
        f"{DOC} §8; core/memory.c handle_set_ram, core/memslot.c memslot_set_mapping (npages == 0)",
    ),
    SET_RAM_NO_BLOCK=_rule(
        "HAX-SET-RAM-BLOCK",
        errno.EINVAL,
        "a mapping's host address lies in a RAM block (unless HAX_RAM_INFO_STANDALONE)",
        f"{DOC} §8; core/memslot.c memslot_set_mapping ('Failed to find uva ... in RAM block')",
    ),
    UNKNOWN_VCPU_REQUEST=_rule(
        "HAX-VCPU-REQUEST",
        errno.ENOSYS,
        "the vCPU device knows the request",
        f"{DOC} §8; platforms/linux/components.c hax_vcpu_ioctl default case (-ENOSYS)",
    ),
    VM_FOREIGN_PROCESS=_rule(
        "HAX-VM-PROCESS",
        0,
        "all requests for a VM come from the process that created it",
        f"{DOC} §8; HAXM docs/api.md 'List of IOCTLs' (the driver does not check)",
    ),
    VCPU_FOREIGN_THREAD=_rule(
        "HAX-VCPU-THREAD",
        0,
        "all requests for a vCPU come from one thread",
        f"{DOC} §8; HAXM docs/api.md 'List of IOCTLs' (the driver does not check)",
    ),
)

_WIN = "platforms/windows/hax_entry.c"
WINDOWS_RULES = RuleSet(
    VM_LIMIT=_rule(
        "HAX-VM-LIMIT",
        ERROR_GEN_FAILURE,
        "at most 8 VMs exist at once",
        f"{DOC} §8; core/vm.c hax_create_vm, {_WIN} HaxDeviceControl STATUS_UNSUCCESSFUL",
        windows=True,
    ),
    VCPU_ID=_rule(
        "HAX-VCPU-ID",
        ERROR_GEN_FAILURE,
        "a vCPU id is below 16",
        f"{DOC} §8; core/vcpu.c vcpu_create, {_WIN} HaxVmControl STATUS_UNSUCCESSFUL",
        windows=True,
    ),
    MSR_COUNT=_rule(
        "HAX-MSR-COUNT",
        ERROR_INVALID_PARAMETER,
        "a GET/SET_MSRS batch has fewer than 0x20 MSRs (and fits the buffer)",
        f"{DOC} §8; {_WIN} HaxVcpuControl HAX_VCPU_IOCTL_SET_MSRS/GET_MSRS",
        windows=True,
    ),
    RAMBLOCK_RESERVED=_rule(
        "HAX-RAMBLOCK-RESERVED",
        ERROR_INVALID_PARAMETER,
        "hax_ramblock_info.reserved is 0",
        f"{DOC} §8; {_WIN} HaxVmControl HAX_VM_IOCTL_ADD_RAMBLOCK",
        windows=True,
    ),
    RAMBLOCK_ARGS=_rule(
        "HAX-RAMBLOCK-ARGS",
        ERROR_GEN_FAILURE,
        "a RAM block has a non-zero start and size",
        f"{DOC} §8; {_CORE}; {_WIN} STATUS_UNSUCCESSFUL",
        windows=True,
    ),
    RAMBLOCK_OVERLAP=_rule(
        "HAX-RAMBLOCK-OVERLAP",
        ERROR_GEN_FAILURE,
        "RAM blocks do not overlap",
        f"{DOC} §8; core/ramblock.c ramblock_add; {_WIN} STATUS_UNSUCCESSFUL",
        windows=True,
    ),
    SET_RAM_RESERVED=_rule(
        "HAX-SET-RAM2-RESERVED",
        ERROR_INVALID_PARAMETER,
        "hax_set_ram_info2.reserved1/reserved2 are 0",
        f"{DOC} §8; {_WIN} HaxVmControl HAX_VM_IOCTL_SET_RAM2",
        windows=True,
    ),
    SET_RAM_UNMAP_ARGS=_rule(
        "HAX-SET-RAM-UNMAP",
        ERROR_INVALID_PARAMETER,
        "an unmapping has flags == HAX_RAM_INFO_INVALID and va == 0",
        f"{DOC} §8; core/memory.c handle_set_ram (-EINVAL -> STATUS_INVALID_PARAMETER in {_WIN})",
        windows=True,
    ),
    SET_RAM_NO_VA=_rule(
        "HAX-SET-RAM-VA",
        ERROR_INVALID_PARAMETER,
        "a mapping has a host address",
        f"{DOC} §8; core/memory.c handle_set_ram (-EINVAL -> STATUS_INVALID_PARAMETER; {_WIN}'s hax_valid_uva "
        "check is a stub that accepts every range, platforms/windows/hax_mm.c)",
        windows=True,
    ),
    SET_RAM_SIZE=_rule(
        "HAX-SET-RAM-SIZE",
        ERROR_INVALID_PARAMETER,
        "a mapping covers at least one page",
        f"{DOC} §8; core/memory.c handle_set_ram (-EINVAL -> STATUS_INVALID_PARAMETER)",
        windows=True,
    ),
    SET_RAM_NO_BLOCK=_rule(
        "HAX-SET-RAM-BLOCK",
        ERROR_INVALID_PARAMETER,
        "a mapping's host address lies in a RAM block (unless stand-alone)",
        f"{DOC} §8; core/memslot.c memslot_set_mapping (-EINVAL -> STATUS_INVALID_PARAMETER)",
        windows=True,
    ),
    UNKNOWN_VCPU_REQUEST=_rule(
        "HAX-VCPU-REQUEST",
        ERROR_INVALID_PARAMETER,
        "the vCPU device knows the control code",
        f"{DOC} §8; {_WIN} HaxVcpuControl default case (STATUS_INVALID_PARAMETER)",
        windows=True,
    ),
    VM_FOREIGN_PROCESS=_rule(
        "HAX-VM-PROCESS",
        0,
        "all requests for a VM come from the process that created it",
        f"{DOC} §8; HAXM docs/api.md 'List of IOCTLs' (the driver does not check)",
        windows=True,
    ),
    VCPU_FOREIGN_THREAD=_rule(
        "HAX-VCPU-THREAD",
        0,
        "all requests for a vCPU come from one thread",
        f"{DOC} §8; HAXM docs/api.md 'List of IOCTLs' (the driver does not check)",
        windows=True,
    ),
)

#: Windows only: an in or out buffer shorter than the request's struct.
W_SHORT_BUFFER = _rule(
    "HAX-SHORT-BUFFER",
    ERROR_INVALID_PARAMETER,
    "the in/out buffer holds the request's whole struct",
    f"{DOC} §8; {_WIN} HaxVcpuControl/HaxVmControl/HaxDeviceControl (inBufLength/outBufLength checks)",
    windows=True,
)
#: Windows only: CREATE_VM's out buffer cannot take the VM id.
W_CREATE_VM_BUFFER = _rule(
    "HAX-CREATE-VM-BUFFER",
    ERROR_INSUFFICIENT_BUFFER,
    "CREATE_VM has a 4-byte out buffer for the VM id",
    f"{DOC} §8; {_WIN} HaxDeviceControl HAX_IOCTL_CREATE_VM (STATUS_BUFFER_TOO_SMALL)",
    windows=True,
)
#: Windows only: the VM device's default case.
W_UNKNOWN_VM_REQUEST = _rule(
    "HAX-VM-REQUEST",
    ERROR_INVALID_PARAMETER,
    "the VM device knows the control code",
    f"{DOC} §8; {_WIN} HaxVmControl default case (STATUS_INVALID_PARAMETER)",
    windows=True,
)
#: Windows only: the system device's default case.
W_UNKNOWN_SYSTEM_REQUEST = _rule(
    "HAX-SYSTEM-REQUEST",
    ERROR_INVALID_FUNCTION,
    "the system device knows the control code",
    f"{DOC} §8; {_WIN} HaxDeviceControl default case (STATUS_INVALID_DEVICE_REQUEST)",
    windows=True,
)

# --- the model's own view of the interface (hax_interface.h; never the plugin's bindings) ---------
HAX_API_CUR = 4
HAX_API_COMPAT = 1
CAP_WORKING, CAP_MEMQUOTA = 1, 2
CAP_FASTMMIO, CAP_UG, CAP_64BIT_RAMBLOCK, CAP_64BIT_SETRAM = 0x2, 0x4, 0x8, 0x10
CAP_EPT, CAP_TUNNEL_PAGE, CAP_RAM_PROTECTION, CAP_DEBUG, CAP_IMPLICIT_RAMBLOCK, CAP_CPUID = (
    0x1,
    0x20,
    0x40,
    0x80,
    0x100,
    0x200,
)
RAM_ROM, RAM_STANDALONE, RAM_INVALID = 0x1, 0x40, 0x80
EXIT_IO, EXIT_MMIO, EXIT_REALMODE, EXIT_INTERRUPT, EXIT_HLT, EXIT_STATECHANGE, EXIT_PAUSED, EXIT_FAST_MMIO = (
    1,
    2,
    3,
    4,
    6,
    7,
    8,
    9,
)
# VMX basic exit reasons the driver leaves in _exit_reason (IA SDM Vol. 3D appendix C).
VMX_INTERRUPT_WINDOW, VMX_HLT, VMX_IO, VMX_EPT_VIOLATION = 7, 12, 30, 48
MAX_VMS, MAX_VCPUS, MAX_MSRS, IOS_MAX_BUFFER = 8, 16, 0x20, 64

_VERSION = struct.Struct("<II")
_CAPINFO = struct.Struct("<HHIQ")
_TUNNEL_INFO = struct.Struct("<QQH6x")
_RAMBLOCK = struct.Struct("<QQQ")
_ALLOC_RAM = struct.Struct("<I4xQ")
_SET_RAM = struct.Struct("<QIB3xQ")
_SET_RAM2 = struct.Struct("<QQQIIQ")
_QEMU_VERSION = struct.Struct("<II")
_PROTECT_RAM_SIZE = 24  # hax_protect_ram_info
_U32 = struct.Struct("<I")
_MSR_HEAD = struct.Struct("<HH4x")
_MSR_ENTRY = struct.Struct("<QQ")
_MSR_DATA_SIZE = 8 + 32 * 16
_SEGMENT = struct.Struct("<HHIQII")
_STATE = struct.Struct("<16QQQ240s4Q7QIIQQIIQ")
_FX_SIZE = 512
#: ``vcpu_state_t._pde``: vcpu_get_regs writes nothing from here to the end.
_OFF_STATE_UNWRITTEN = 16 * 8 + 8 + 8 + 10 * 24 + 4 * 8 + 6 * 8
#: What an uninitialised kernel buffer holds in the model: never the vCPU's values
#: (Linux's GET_REGS copies a stack ``vcpu_state_t``, Windows' system buffer past the input).
_UNINITIALISED = b"\xa5" * 512
# hax_tunnel: _exit_reason, pad0, _exit_status, user_event_pending, ready, request_window
_TUNNEL_HEAD = struct.Struct("<IIIIii")
_TUNNEL_IO = struct.Struct("<BBHHHB3x4xQ")
_OFF_TUNNEL_IO = 24
_OFF_APIC_BASE = 48

MSR_EFER, MSR_FS_BASE, MSR_GS_BASE, MSR_APIC_BASE = 0xC0000080, 0xC0000100, 0xC0000101, 0x1B
#: core/include/ia32_defs.h: APIC_BASE_BSP, APIC_BASE_ADDR_MASK, APIC_BASE_MASK.
APIC_BASE_BSP = 1 << 8
_APIC_BASE_ADDR_MASK = ((1 << 24) - 1) << 12
_APIC_BASE_MASK = APIC_BASE_BSP | (1 << 11) | _APIC_BASE_ADDR_MASK
#: EFER bits a host may set (core/vcpu.c handle_msr_write IA32_EFER: SCE, LME, LMA, NXE).
_EFER_ALLOWED = 0x1 | 0x100 | 0x400 | 0x800
#: MSRs core/vcpu.c handle_msr_write/handle_msr_read take that the model keeps itself
#: (the software CPU's own copies are not updated: the guest reads unicorn's).
_STORED_MSRS = {
    0x10: 0,  # IA32_TSC
    0x1B: 0xFEE00900,  # IA32_APIC_BASE (BSP, enabled)
    0x174: 0,
    0x175: 0,
    0x176: 0,  # SYSENTER_CS/ESP/EIP
    0x1A0: 0,  # IA32_MISC_ENABLE
    0x277: 0x0007040600070406,  # IA32_CR_PAT (vcpu_init)
    0xC0000081: 0,
    0xC0000082: 0,
    0xC0000083: 0,
    0xC0000084: 0,  # STAR, LSTAR, CSTAR, SF_MASK
    0xC0000102: 0,  # KERNEL_GS_BASE
}

CR0_PE, CR0_PG, EFER_LME, EFER_LMA, RFLAGS_DF = 1, 1 << 31, 1 << 8, 1 << 10, 1 << 10


def _requests(host_os: str) -> dict[str, int]:
    """The request numbers of ``host_os``, from the header's (type, nr, size) triples
    (``include/{linux,darwin,windows}/hax_interface_*.h``)."""
    if host_os == "win32":
        functions = {
            "VERSION": 0x900, "CREATE_VM": 0x901, "CAPABILITY": 0x910, "SET_MEMLIMIT": 0x911,
            "VCPU_CREATE": 0x902, "ALLOC_RAM": 0x903, "SET_RAM": 0x904, "VCPU_DESTROY": 0x905,
            "NOTIFY_QEMU_VERSION": 0x910, "ADD_RAMBLOCK": 0x913, "SET_RAM2": 0x914, "PROTECT_RAM": 0x915,
            "RUN": 0x906, "SET_MSRS": 0x907, "GET_MSRS": 0x908, "SET_FPU": 0x909, "GET_FPU": 0x90A,
            "SETUP_TUNNEL": 0x90B, "INTERRUPT": 0x90C, "SET_REGS": 0x90D, "GET_REGS": 0x90E,
            "KICKOFF": 0x90F, "VCPU_DEBUG": 0x916, "SET_CPUID": 0x917, "GET_CPUID": 0x918,
        }  # fmt: skip
        return {name: int(ctl_code(0x4000, fn)) for name, fn in functions.items()}
    e = bsd if host_os == "darwin" else linux
    table = {
        "VERSION": e.iowr(0, 0x20, 8), "CREATE_VM": e.iowr(0, 0x21, 4), "DESTROY_VM": e.iow(0, 0x22, 4),
        "CAPABILITY": e.ior(0, 0x23, 16), "SET_MEMLIMIT": e.iowr(0, 0x24, 16),
        "VCPU_CREATE": e.iowr(0, 0x80, 4), "VCPU_CREATE_ORIG": e.ior(0, 0x80, 4), "ALLOC_RAM": e.iowr(0, 0x81, 16),
        "SET_RAM": e.iowr(0, 0x82, 24), "VCPU_DESTROY": e.ior(0, 0x83, 4), "NOTIFY_QEMU_VERSION": e.iow(0, 0x84, 8),
        "ADD_RAMBLOCK": e.iow(0, 0x85, 24), "SET_RAM2": e.iowr(0, 0x86, 40), "PROTECT_RAM": e.iowr(0, 0x87, 24),
        "RUN": e.io(0, 0xC0), "SET_MSRS": e.iowr(0, 0xC1, 520), "GET_MSRS": e.iowr(0, 0xC2, 520),
        "SET_FPU": e.iow(0, 0xC3, 512), "GET_FPU": e.ior(0, 0xC4, 512), "SETUP_TUNNEL": e.iowr(0, 0xC5, 24),
        "INTERRUPT": e.iowr(0, 0xC6, 4), "SET_REGS": e.iowr(0, 0xC7, 512), "GET_REGS": e.iowr(0, 0xC8, 512),
        "VCPU_DEBUG": e.iow(0, 0xC9, 72), "SET_CPUID": e.iow(0, 0xCA, 8), "GET_CPUID": e.iow(0, 0xCB, 8),
    }  # fmt: skip
    return {name: int(value) for name, value in table.items()}


# --- the driver core -----------------------------------------------------------------------


@dataclass
class RamBlock:
    start: int
    size: int
    standalone: bool = False

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass
class Memslot:
    gpa: int
    size: int
    uva: int
    rom: bool
    block: RamBlock


@dataclass
class ModelVm:
    """``struct vm_t`` (core/include/vm.h), reduced to what the VMM can observe."""

    vm_id: int
    owner: str
    blocks: list[RamBlock] = field(default_factory=list)
    slots: list[Memslot] = field(default_factory=list)
    vcpus: dict[int, ModelVcpu] = field(default_factory=dict)
    #: VM_FEATURES_FASTMMIO_BASIC / _EXTRA (core/vm.c hax_vm_set_qemuversion): set,
    #: but read by nothing in HAXM 7.8 (vcpu.c qemu_support_fastmmio has no caller).
    features: int = 0
    handles: int = 0


@dataclass
class PendingIo:
    """An I/O exit the next RUN completes (``handle_io_post``)."""

    is_in: bool
    string: bool
    size: int
    count: int
    vaddr: int


class ModelVcpu:
    """``struct vcpu_t``: the software CPU, the tunnel, the I/O buffer, the state
    userspace cannot see in the engine (debug registers, the FPU image, stored MSRs)."""

    def __init__(self, driver: Driver, vm: ModelVm, vcpu_id: int) -> None:
        self.driver = driver
        self.vm = vm
        self.vcpu_id = vcpu_id
        self.thread = threading.get_ident()
        self.cpu = GuestCpu("x86_64")
        self.tunnel: UserPages | None = None
        self.iobuf: UserPages | None = None
        self.efer = 0
        self.dr = [0, 0, 0, 0, 0xFFFF0FF0, 0x400]
        self.sysenter = [0, 0, 0]
        self.msrs = dict(_STORED_MSRS)
        # vcpu_init: APIC_BASE_BSP only where vcpu_is_bsp, i.e. vm->bsp_vcpu_id,
        # which nothing sets from its 0.
        if vcpu_id != 0:  # behaviour: bsp-is-vcpu-0
            self.msrs[MSR_APIC_BASE] &= ~APIC_BASE_BSP
        # vcpu_create clears the guest FXSAVE page (hax_clear_page(gfxpage));
        # vcpu_init_fx sets only XCR0 and CR0.ET: GET_FPU reads zeros until
        # SET_FPU, and vcpu_enter_fpu_state FXRSTORs that page at every entry.
        self.fx = bytearray(_FX_SIZE)
        self.panicked = False
        self.pending_io: PendingIo | None = None
        self.pending_mmio: MmioExit | None = None
        self.running_thread: int | None = None
        #: hax_set_pending_intr's bitmap (intr_exc.c): vectors queued with
        #: HAX_VCPU_IOCTL_INTERRUPT and not yet handed to the software CPU, which
        #: holds one vector at a time.
        self.pending_vectors: set[int] = set()
        self._reset()
        for slot in vm.slots:
            self.cpu.map(slot.gpa, slot.size, slot.uva, writable=not slot.rom)

    def _reset(self) -> None:
        """The power-up state of ``vcpu_init`` (core/vcpu.c)."""

        def data(selector: int = 0, base: int = 0) -> Segment:
            return Segment(base=base, limit=0xFFFF, selector=selector, type=3, s=1, present=1)

        sregs = Sregs(
            cs=data(0xF000, 0xFFFF0000),
            ss=data(),
            ds=data(),
            es=data(),
            fs=data(),
            gs=data(),
            ldt=Segment(limit=0xFFFF, type=2, s=0, present=1),
            tr=Segment(limit=0xFFFF, type=3, s=0, present=1),
            gdt=DescriptorTable(0, 0xFFFF),
            idt=DescriptorTable(0, 0xFFFF),
            cr0=0x60000010,
            efer=0,
            apic_base=0xFEE00900,
        )
        self.cpu.engine.set_sregs(sregs)
        self.cpu.engine.set_regs(Regs(rip=0xFFF0, rflags=2))

    # --- pages ---------------------------------------------------------------------
    def tunnel_view(self) -> memoryview:
        if self.tunnel is None or self.tunnel.mapping is None:
            raise self.driver.model.not_modelled("RUN before HAX_VCPU_IOCTL_SETUP_TUNNEL mapped the tunnel")
        return memoryview(self.tunnel.mapping)

    def io_view(self) -> memoryview:
        assert self.iobuf is not None and self.iobuf.mapping is not None
        return memoryview(self.iobuf.mapping)

    # --- state ---------------------------------------------------------------------
    def get_state(self, buffer: bytes) -> bytes:
        """``vcpu_get_regs`` into ``buffer``, the ``vcpu_state_t`` the front end hands
        it: the GPRs, RIP, RFLAGS, the segments and descriptor tables, CR0-CR4 and
        DR0-3/6/7 are written; ``_pde``, ``_efer``, the SYSENTER MSRs, the activity
        and the interruptibility state are not, and keep what ``buffer`` held."""
        engine = self.cpu.engine
        regs, sregs = engine.get_regs(), engine.get_sregs()
        gprs = [getattr(regs, name) for name in _HAX_GPRS]
        segments = b"".join(_pack_segment(getattr(sregs, name)) for name in ("cs", "ss", "ds", "es", "fs", "gs"))
        segments += _pack_segment(sregs.ldt) + _pack_segment(sregs.tr)
        segments += _SEGMENT.pack(0, 0, sregs.gdt.limit, sregs.gdt.base, 0, 0)
        segments += _SEGMENT.pack(0, 0, sregs.idt.limit, sregs.idt.base, 0, 0)
        shadow = engine.x86_events()[3]
        full = _STATE.pack(
            *gprs,
            regs.rip,
            regs.rflags,
            segments,
            sregs.cr0,
            sregs.cr2,
            sregs.cr3,
            sregs.cr4,
            *self.dr[:4],
            self.dr[4],
            self.dr[5],
            0,
            _architectural_efer(sregs) & 0xFFFF_FFFF,
            self.msrs[0x174] & 0xFFFF_FFFF,
            self.msrs[0x176],
            self.msrs[0x175],
            0,
            0,
            1 if shadow else 0,
        )
        return full[:_OFF_STATE_UNWRITTEN] + bytes(buffer[_OFF_STATE_UNWRITTEN : _STATE.size])

    def set_state(self, raw: bytes) -> None:
        """``vcpu_set_regs``: everything but ``_efer``, activity and interruptibility
        (the driver does not copy them)."""
        values = _STATE.unpack(raw)
        gprs = dict(zip(_HAX_GPRS, values[:16], strict=True))
        regs = Regs(**gprs, rip=values[16], rflags=values[17])
        blob = values[18]
        segs = [_unpack_segment(blob[i * 24 : (i + 1) * 24]) for i in range(10)]
        engine = self.cpu.engine
        current = engine.get_sregs()
        sregs = dataclasses.replace(
            current,
            cs=segs[0],
            ss=segs[1],
            ds=segs[2],
            es=segs[3],
            fs=segs[4],
            gs=segs[5],
            ldt=segs[6],
            tr=segs[7],
            gdt=DescriptorTable(segs[8].base, segs[8].limit),
            idt=DescriptorTable(segs[9].base, segs[9].limit),
            cr0=values[19],
            cr2=values[20],
            cr3=values[21],
            cr4=values[22],
            efer=self._effective_efer(values[19]),
        )
        # fix_dr6/fix_dr7 (core/include/ia32_defs.h): high half 0, reserved bits 1.
        dr6 = (values[27] & 0xFFFF_FFFF) | 0xFFFF0FF0
        dr7 = (values[28] & 0xFFFF_FFFF) | 0x400
        self.dr = [values[23], values[24], values[25], values[26], dr6, dr7]
        self._apply_sregs(sregs, current)
        engine.set_regs(regs)

    def _effective_efer(self, cr0: int) -> int:
        efer = self.efer & ~EFER_LMA
        if efer & EFER_LME and cr0 & CR0_PG:
            efer |= EFER_LMA
        return efer

    def _apply_sregs(self, sregs: Sregs, current: Sregs) -> None:
        if _same_sregs(sregs, current):
            return
        try:
            self.cpu.engine.set_sregs(sregs)
        except ConfigError as exc:
            raise self.driver.model.not_modelled(f"this CPU state on the software CPU ({exc})") from None

    def set_msr(self, index: int, value: int) -> bool:
        """``handle_msr_write(by_host=true)``: False where the driver fails it."""
        engine = self.cpu.engine
        if index == MSR_EFER:
            if value & ~_EFER_ALLOWED:  # behaviour: efer-reserved
                return False
            self.efer = value
            current = engine.get_sregs()
            self._apply_sregs(dataclasses.replace(current, efer=self._effective_efer(current.cr0)), current)
            return True
        if index in (MSR_FS_BASE, MSR_GS_BASE):
            current = engine.get_sregs()
            name = "fs" if index == MSR_FS_BASE else "gs"
            seg = dataclasses.replace(getattr(current, name), base=value)
            self._apply_sregs(dataclasses.replace(current, **{name: seg}), current)
            return True
        if index == MSR_APIC_BASE and not self._apic_base_allowed(value):  # behaviour: apic-base-checks
            return False
        if index in self.msrs:
            self.msrs[index] = value
            return True
        return False

    def _apic_base_allowed(self, value: int) -> bool:
        """``vcpu_set_apic_base``: no bits outside APIC_BASE_MASK, no relocation
        from FEE00000, the BSP bit only on the BSP (vCPU 0)."""
        if value & ~_APIC_BASE_MASK or value & _APIC_BASE_ADDR_MASK != 0xFEE0_0000:
            return False
        return not (value & APIC_BASE_BSP and self.vcpu_id != 0)

    def get_msr(self, index: int) -> int | None:
        if index == MSR_EFER:
            return _architectural_efer(self.cpu.engine.get_sregs())
        if index in (MSR_FS_BASE, MSR_GS_BASE):
            sregs = self.cpu.engine.get_sregs()
            return (sregs.fs if index == MSR_FS_BASE else sregs.gs).base
        return self.msrs.get(index)

    def msr_batch(self, data: bytes, write: bool, rules: RuleSet) -> bytes:
        """GET/SET_MSRS on a ``hax_msr_data``: the processed prefix and ``done``."""
        nr, _ = _MSR_HEAD.unpack_from(data, 0)
        if nr >= MAX_MSRS:
            raise RuleViolation(rules.MSR_COUNT, f"nr_msr {nr}")
        out = bytearray(data[:_MSR_DATA_SIZE].ljust(_MSR_DATA_SIZE, b"\0"))
        done = 0
        for i in range(nr):
            index, value = _MSR_ENTRY.unpack_from(data, 8 + 16 * i)
            if write:
                if not self.set_msr(index, value):
                    break
            else:
                read = self.get_msr(index)
                if read is None:
                    break
                _MSR_ENTRY.pack_into(out, 8 + 16 * i, index, read)
            done += 1
        _MSR_HEAD.pack_into(out, 0, nr, done)
        return bytes(out)

    def interrupt(self, vector: int) -> None:
        """``vcpu_interrupt``: ``hax_set_pending_intr`` sets the vector's bit (again:
        no change); the next RUN injects the highest pending one."""
        if vector != self.cpu.engine.x86_events()[0]:
            self.pending_vectors.add(vector & 0xFF)

    # --- run -----------------------------------------------------------------------
    def run(self) -> None:
        """``vcpu_execute``: one HAX_VCPU_IOCTL_RUN; the exit goes into the tunnel."""
        # From here a signal's IPI finds the vCPU (closing the race with a kick
        # that saw no run yet: the software CPU keeps a kick for its next run).
        self.running_thread = threading.get_ident()
        try:
            self._run()
        finally:
            self.running_thread = None

    def _run(self) -> None:
        tunnel = self.tunnel_view()
        reason, _, status, event, _, window = _TUNNEL_HEAD.unpack_from(tunnel, 0)
        engine = self.cpu.engine
        if not self.driver.ug and not engine.get_sregs().cr0 & CR0_PE:  # behaviour: realmode-without-ug
            self._status(EXIT_REALMODE, 0)
            return
        if status == EXIT_IO and self.pending_io is not None:  # behaviour: io-post
            self._io_post(self.pending_io)
        self.pending_io = None
        if self.pending_mmio is not None:
            self._mmio_post(self.pending_mmio)
        if reason == EXIT_PAUSED:  # behaviour: paused
            self._status(EXIT_PAUSED, None)
            return
        if self.panicked:  # behaviour: panicked
            self._status(EXIT_STATECHANGE, None)
            return
        if self.dr[5] & 0xFF:
            raise self.driver.model.not_modelled("hardware breakpoints in DR7 (the software CPU does not take them)")
        if _differs_from_softcpu_fpu(bytes(self.fx)):
            raise self.driver.model.not_modelled(
                "an FPU image other than the software CPU's power-up one (FCW 0x37F, MXCSR 0x1F80; "
                "a vCPU never given SET_FPU has HAXM's all-zero image)"
            )
        if event:  # behaviour: user-event
            # An exit the driver handles itself will find the event pending.
            self.cpu.kick()
        while True:
            self._inject_pending()
            # vcpu_inject_intr: a pending vector turns the interrupt window on too.
            engine.request_interrupt_window(bool(window) or bool(self.pending_vectors))
            exit_ = self.cpu.run()
            if self.pending_vectors and isinstance(exit_, (IrqWindowOpenExit, HltExit)):  # behaviour: pending-resume
                # exit_interrupt_window resumes and the next entry injects (no
                # HAX_EXIT_INTERRUPT while nr_pending_intrs); exit_hlt with a
                # pending vector advances RIP and resumes.
                continue
            break
        self._report(exit_, bool(event))

    def _inject_pending(self) -> None:
        """``vcpu_inject_intr``: the highest pending vector goes first
        (``vcpu_get_pending_intrs``); one the software CPU holds but has not
        delivered is still pending and goes back into the bitmap."""
        if not self.pending_vectors:
            return
        engine = self.cpu.engine
        top = max(self.pending_vectors)
        held = engine.x86_events()[0]
        if held is not None:
            if held > top:
                return
            self.pending_vectors.add(held)
        self.pending_vectors.discard(top)
        engine.inject_interrupt(top)

    def _report(self, exit_: VcpuExit, event: bool) -> None:
        if isinstance(exit_, IoExit):
            self._io_exit(exit_)
        elif isinstance(exit_, MmioExit):
            self._mmio_exit(exit_)
        elif isinstance(exit_, HltExit):
            self._exit(EXIT_HLT, VMX_HLT, ready=True)
        elif isinstance(exit_, IrqWindowOpenExit):
            self._exit(EXIT_INTERRUPT, VMX_INTERRUPT_WINDOW)
        elif isinstance(exit_, InterruptedExit):
            # A signal's or KICKOFF's IPI: an external-interrupt exit, returned as
            # HAX_EXIT_INTERRUPT (exit_interrupt); a pending user event is consumed
            # by the check in cpu_vmexit_handler.
            # exit_interrupt writes no _exit_reason: the last handler's stays.
            if event:
                _U32.pack_into(self.tunnel_view(), 12, 0)
            self._exit(EXIT_INTERRUPT, None)
        elif isinstance(exit_, ShutdownExit):
            # exit_triple_fault: vcpu_set_panic, and no _exit_reason either.
            self.panicked = True
            self._exit(EXIT_STATECHANGE, None)
        else:
            raise self.driver.model.not_modelled(f"what HAXM does after the software CPU's {exit_!r}")

    def _status(self, status: int, reason: int | None) -> None:
        """An exit taken before entering the guest: ``ready_for_interrupt_injection``
        keeps what the last VM exit left (vcpu_execute's early ``goto out``).
        ``reason`` None: the handler leaves ``_exit_reason`` as it was."""
        tunnel = self.tunnel_view()
        if reason is not None:  # behaviour: exit-reason-kept
            _U32.pack_into(tunnel, 0, reason)
        _U32.pack_into(tunnel, 8, status)
        struct.pack_into("<Q", tunnel, _OFF_APIC_BASE, self.msrs[0x1B])

    def _exit(self, status: int, reason: int | None, *, ready: bool | None = None) -> None:
        """A VM exit: ``cpu_vmx_execute`` sets ``ready_for_interrupt_injection``
        (no interrupt pending or blocked), ``exit_hlt`` forces it to 1."""
        if ready is None:
            # cpu_vmx_execute: 0 while nr_pending_intrs or interrupts blocked.
            ready = self.cpu.engine.ready_for_interrupt() and not self.pending_vectors
        self._status(status, reason)
        _U32.pack_into(self.tunnel_view(), 16, 1 if ready else 0)

    # --- port I/O -------------------------------------------------------------------
    def _io_exit(self, exit_: IoExit) -> None:
        """``exit_io_access``: decode the instruction, move the data, retire it."""
        engine = self.cpu.engine
        regs, sregs = engine.get_regs(), engine.get_sregs()
        bits = _code_bits(sregs)
        code = engine.read_virtual(sregs.cs.base + regs.rip, 15) or b""
        insn = _decode_port(code, bits)
        if insn is None:
            raise self.driver.model.not_modelled(f"the port instruction {code[:4].hex()} at {regs.rip:#x}")
        size, string = exit_.size, insn.string
        io = self.io_view()
        new = dataclasses.replace(regs)
        if not string:
            # handle_io: OUT data into the buffer, RIP past the instruction.
            if exit_.is_write:
                io[:size] = bytes(exit_.data[:size])
            new.rip = regs.rip + insn.length
            # handle_io leaves _vaddr as the last string exit left it.
            vaddr = struct.unpack_from("<Q", self.tunnel_view(), _OFF_TUNNEL_IO + 16)[0]
            count, df = 1, 0
        else:
            # handle_string_io: up to IOS_MAX_BUFFER bytes, lowest address first.
            count_all = regs.rcx if insn.rep else 1
            n = count_all if count_all * size <= IOS_MAX_BUFFER else IOS_MAX_BUFFER // size
            df = 1 if regs.rflags & RFLAGS_DF else 0
            if exit_.is_write:
                seg = getattr(sregs, insn.segment)
                gla = seg.base + (regs.rsi & _mask(insn.address_bits))
            else:
                gla = sregs.es.base + (regs.rdi & _mask(insn.address_bits))
            vaddr = gla - (n - 1) * size if df else gla
            if exit_.is_write:
                data = engine.read_virtual(vaddr, n * size)
                if data is None:
                    raise self.driver.model.not_modelled("OUTS from memory the guest cannot read (HAXM panics)")
                io[: n * size] = data
            new.rcx = (regs.rcx - n) & _mask(64)  # unconditional in handle_string_io
            step = -n * size if df else n * size
            if exit_.is_write:
                new.rsi = (regs.rsi + step) & _mask(64)
            else:
                new.rdi = (regs.rdi + step) & _mask(64)
            if n == count_all:
                new.rip = regs.rip + insn.length
            count = n
        self._retire(new)
        self.pending_io = PendingIo(not exit_.is_write, string, size, count, vaddr)
        tunnel = self.tunnel_view()
        _TUNNEL_IO.pack_into(
            tunnel,
            _OFF_TUNNEL_IO,
            0 if exit_.is_write else 1,
            df,
            size,
            exit_.port,
            count,
            1 if string else 0,
            vaddr,
        )
        self._exit(EXIT_IO, VMX_IO)

    def _retire(self, regs: Regs) -> None:
        """Set the registers HAXM leaves at an I/O exit; the software CPU must not
        re-execute the instruction (a changed RIP makes it forget the access, so
        an unchanged one is moved away and back)."""
        engine = self.cpu.engine
        if regs.rip == engine.get_regs().rip:
            engine.set_regs(dataclasses.replace(regs, rip=regs.rip + 1))
        engine.set_regs(regs)

    def _io_post(self, pending: PendingIo) -> None:
        """``handle_io_post``: an IN's data from the I/O buffer into AL/AX/EAX, an
        INS's into guest memory at ``_vaddr`` (read back from the tunnel: the
        driver trusts the tunnel, not its own copy)."""
        if not pending.is_in:
            return
        io = self.io_view()
        tunnel = self.tunnel_view()
        _, _, size, _, count, flags, vaddr = _TUNNEL_IO.unpack_from(tunnel, _OFF_TUNNEL_IO)
        engine = self.cpu.engine
        if flags == 1:
            self._write_guest_virtual(vaddr, bytes(io[: size * count]))
            return
        regs = engine.get_regs()
        value = int.from_bytes(bytes(io[:size]), "little")
        # The driver writes _al/_ax/_eax of the 64-bit register: the rest stays.
        keep = _mask(64) ^ _mask(8 * size)
        engine.set_regs(dataclasses.replace(regs, rax=(regs.rax & keep) | value))

    def _write_guest_virtual(self, vaddr: int, data: bytes) -> None:
        for offset in range(0, len(data)):
            gpa = self._translate(vaddr + offset)
            slot = self.driver.slot_at(self.vm, gpa)
            if slot is None or slot.rom:
                raise self.driver.model.not_modelled("INS into memory that is not RAM (HAXM panics)")
            ctypes.memmove(slot.uva + (gpa - slot.gpa), data[offset : offset + 1], 1)

    def _translate(self, linear: int) -> int:
        """The guest-physical address of ``linear`` (``vcpu_translate``): paging off,
        or 4-level long-mode paging."""
        sregs = self.cpu.engine.get_sregs()
        if not sregs.cr0 & CR0_PG:
            return linear & 0xFFFF_FFFF
        if not sregs.efer & EFER_LMA:
            raise self.driver.model.not_modelled("string I/O under 32-bit or PAE paging")
        table = sregs.cr3 & 0x000F_FFFF_FFFF_F000
        for level, shift in enumerate((39, 30, 21, 12)):
            raw = self.cpu.engine.read_physical(table + ((linear >> shift) & 0x1FF) * 8, 8)
            entry = int.from_bytes(raw or b"\0" * 8, "little")
            if not entry & 1:
                raise self.driver.model.not_modelled("INS into a page the guest has not mapped (HAXM panics)")
            if level in (1, 2) and entry & 0x80:
                return (entry & 0x000F_FFFF_FFFF_F000 & ~_mask(shift)) | (linear & _mask(shift))
            table = entry & 0x000F_FFFF_FFFF_F000
        return table | (linear & 0xFFF)

    # --- MMIO -----------------------------------------------------------------------------
    def _mmio_exit(self, exit_: MmioExit) -> None:
        """``exit_ept_violation`` -> ``vcpu_emulate_insn``: HAXM 7.8's emulator
        (core/emulate.c ``em_emulate_insn``) stops at each MMIO access with
        ``HAX_EXIT_FAST_MMIO``, whatever NOTIFY_QEMU_VERSION said (vm.c records
        the VM_FEATURES_FASTMMIO bits, nothing reads them; ``handle_mem_fault``,
        the legacy ``HAX_EXIT_MMIO``, has no caller).  ``vcpu_read_memory`` /
        ``vcpu_write_memory`` write ``gpa``, ``size``, ``direction`` and, for a
        write, ``value`` into the I/O buffer -- nothing else of ``hax_fastmmio``."""
        engine = self.cpu.engine
        sregs = engine.get_sregs()
        insn = _string_insn(engine.read_virtual(sregs.cs.base + engine.pc, 15) or b"")
        if insn is not None:
            rep, two_memory = insn
            if rep:
                # em_emulate_insn runs every iteration itself, flushing RCX/RSI/RDI
                # between two accesses; the software CPU does not promise that.
                raise self.driver.model.not_modelled("a REP string instruction touching MMIO")
            slot = self.driver.slot_at(self.vm, exit_.address)
            if two_memory and exit_.is_write and slot is not None:  # behaviour: twomem-rom-write
                # MOVS/CMPS translate their addresses (is_translation_required) and
                # is_mmio_address sees a memslot: HAXM writes the ROM's pages.
                raise self.driver.model.not_modelled("MOVS into ROM (HAXM writes the ROM's host pages)")
        io = self.io_view()
        struct.pack_into("<Q", io, 0, exit_.address)
        if exit_.is_write:
            value = int.from_bytes(bytes(exit_.data[: exit_.size]), "little")
            struct.pack_into("<Q", io, 8, value)
        struct.pack_into("<BB", io, 16, exit_.size, 1 if exit_.is_write else 0)
        self.pending_mmio = exit_
        self._exit(EXIT_FAST_MMIO, VMX_EPT_VIOLATION)

    def _mmio_post(self, exit_: MmioExit) -> None:
        """The next RUN finishes the instruction (vcpu_execute's ``em_emulate_insn``
        while ``!em_ctxt->finished``); a read takes ``hax_fastmmio.value``
        (``vcpu_read_memory_post``)."""
        self.pending_mmio = None
        if not exit_.is_write:
            value = struct.unpack_from("<Q", self.io_view(), 8)[0]
            self.cpu.complete_read(value.to_bytes(8, "little"))

    def close(self) -> None:
        self.cpu.close()


_HAX_GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", *(f"r{n}" for n in range(8, 16)))


def _architectural_efer(sregs: Sregs) -> int:
    """EFER as the CPU has it: LMA only with LME and paging on (the software CPU's
    real-mode state starts from its pseudo long mode and can report LMA)."""
    efer = sregs.efer & ~EFER_LMA
    if efer & EFER_LME and sregs.cr0 & CR0_PG:
        efer |= EFER_LMA
    return efer


#: The software CPU's own FPU state as an FXSAVE image: FCW 0x37F, MXCSR 0x1F80.
_SOFTCPU_FX = (0x37F).to_bytes(2, "little") + bytes(22) + (0x1F80).to_bytes(4, "little") + bytes(_FX_SIZE - 28)


def _differs_from_softcpu_fpu(image: bytes) -> bool:
    """Whether FXRSTOR of ``image`` gives the guest another FPU than the software
    CPU holds (which cannot load one).  FXRSTOR ignores MXCSR_MASK (bytes 28-31)."""
    return image[:28] + image[32:] != _SOFTCPU_FX[:28] + _SOFTCPU_FX[32:]


def _mask(bits: int) -> int:
    return (1 << bits) - 1


def _pack_segment(seg: Segment) -> bytes:
    ar = (
        (seg.type & 0xF)
        | (seg.s & 1) << 4
        | (seg.dpl & 3) << 5
        | (seg.present & 1) << 7
        | (seg.avl & 1) << 12
        | (seg.l & 1) << 13
        | (seg.db & 1) << 14
        | (seg.g & 1) << 15
        | (seg.unusable & 1) << 16
    )
    return _SEGMENT.pack(seg.selector, 0, seg.limit, seg.base, ar, 0)


def _unpack_segment(raw: bytes) -> Segment:
    selector, _, limit, base, ar, _ = _SEGMENT.unpack(raw)
    return Segment(
        base=base,
        limit=limit,
        selector=selector,
        type=ar & 0xF,
        s=(ar >> 4) & 1,
        dpl=(ar >> 5) & 3,
        present=(ar >> 7) & 1,
        avl=(ar >> 12) & 1,
        l=(ar >> 13) & 1,
        db=(ar >> 14) & 1,
        g=(ar >> 15) & 1,
        unusable=(ar >> 16) & 1,
    )


def _same_sregs(a: Sregs, b: Sregs) -> bool:
    keys = ("cs", "ss", "ds", "es", "fs", "gs", "ldt", "tr", "gdt", "idt", "cr0", "cr2", "cr3", "cr4", "efer")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def _string_insn(code: bytes) -> tuple[bool, bool] | None:
    """For a string instruction at the start of ``code`` (MOVS, CMPS, STOS, LODS,
    SCAS: A4-A7, AA-AF after prefixes and REX): whether it has a REP prefix and
    whether it has two memory operands (MOVS/CMPS, core/emulate.c INSN_TWOMEM)."""
    at, rep = 0, False
    while at < len(code) and (code[at] in _SEGMENT_PREFIXES or code[at] in (0x66, 0x67, 0xF0, 0xF2, 0xF3)):
        rep = rep or code[at] in (0xF2, 0xF3)
        at += 1
    if at < len(code) and 0x40 <= code[at] <= 0x4F:
        at += 1
    if at >= len(code) or not (0xA4 <= code[at] <= 0xA7 or 0xAA <= code[at] <= 0xAF):
        return None
    return rep, code[at] <= 0xA7


def _code_bits(sregs: Sregs) -> int:
    if not sregs.cr0 & CR0_PE:
        return 16
    if sregs.efer & EFER_LMA and sregs.cs.l:
        return 64
    return 32 if sregs.cs.db else 16


@dataclass(frozen=True)
class PortInstruction:
    length: int
    string: bool
    rep: bool
    address_bits: int
    segment: str


_SEGMENT_PREFIXES = {0x26: "es", 0x2E: "cs", 0x36: "ss", 0x3E: "ds", 0x64: "fs", 0x65: "gs"}


def _decode_port(code: bytes, bits: int) -> PortInstruction | None:
    """IN/OUT/INS/OUTS at the start of ``code`` (IA SDM Vol. 2), or None."""
    at, rep, address_override, segment = 0, False, False, "ds"
    while at < len(code):
        byte = code[at]
        if byte in (0xF2, 0xF3):
            rep = True
        elif byte == 0x67:
            address_override = True
        elif byte in _SEGMENT_PREFIXES:
            segment = _SEGMENT_PREFIXES[byte]
        elif byte not in (0x66, 0xF0):
            break
        at += 1
    if bits == 64 and at < len(code) and 0x40 <= code[at] <= 0x4F:
        at += 1
    if at >= len(code):
        return None
    opcode = code[at]
    address_bits = {64: 32, 32: 16, 16: 32}[bits] if address_override else bits
    if 0xE4 <= opcode <= 0xE7:
        return PortInstruction(at + 2, False, False, address_bits, segment)
    if 0xEC <= opcode <= 0xEF:
        return PortInstruction(at + 1, False, False, address_bits, segment)
    if 0x6C <= opcode <= 0x6F:
        return PortInstruction(at + 1, True, rep, address_bits, segment)
    return None


class Driver:
    """The driver core shared by both front ends: VMs, RAM, vCPUs."""

    def __init__(self, model: ModelCore, rules: RuleSet, *, ug: bool, caps: int, mem_quota: int | None) -> None:
        self.model = model
        self.rules = rules
        self.ug = ug
        self.caps = caps
        self.mem_quota = mem_quota
        self.vms: dict[int, ModelVm] = {}

    def version(self) -> bytes:
        return _VERSION.pack(HAX_API_COMPAT, HAX_API_CUR)

    def capability(self) -> bytes:
        """``hax_get_capability`` on a VT-x/NX-enabled host."""
        winfo = self.caps | (CAP_UG if self.ug else 0)
        wstatus = CAP_WORKING | (CAP_MEMQUOTA if self.mem_quota is not None else 0)
        return _CAPINFO.pack(wstatus, winfo, 0, self.mem_quota or 0)

    def create_vm(self) -> ModelVm:
        """``hax_create_vm``: the lowest free id."""
        free = [i for i in range(MAX_VMS) if i not in self.vms]
        if not free:
            raise RuleViolation(self.rules.VM_LIMIT, f"{len(self.vms)} VMs exist")
        vm = ModelVm(free[0], self.model.caller)
        self.vms[vm.vm_id] = vm
        return vm

    def check_owner(self, vm: ModelVm) -> None:
        if self.model.caller != vm.owner:  # behaviour: vm-owner
            self.model.advise(self.rules.VM_FOREIGN_PROCESS, f"VM {vm.vm_id}")

    def create_vcpu(self, vm: ModelVm, vcpu_id: int) -> ModelVcpu:
        if not 0 <= vcpu_id < MAX_VCPUS:
            raise RuleViolation(self.rules.VCPU_ID, f"vcpu_id {vcpu_id}")
        if vcpu_id in vm.vcpus:
            raise self.model.not_modelled("a second vCPU with an id in use")
        vcpu = vm.vcpus[vcpu_id] = ModelVcpu(self, vm, vcpu_id)
        return vcpu

    def check_thread(self, vcpu: ModelVcpu) -> None:
        if threading.get_ident() != vcpu.thread:  # behaviour: vcpu-thread
            self.model.advise(self.rules.VCPU_FOREIGN_THREAD, f"vCPU {vcpu.vcpu_id} of VM {vcpu.vm.vm_id}")

    # --- RAM ----------------------------------------------------------------------------
    def add_ramblock(self, vm: ModelVm, start: int, size: int, *, standalone: bool = False) -> RamBlock:
        """``handle_alloc_ram`` / ``ramblock_add``."""
        if not start or not size:
            raise RuleViolation(self.rules.RAMBLOCK_ARGS, f"start_uva {start:#x} size {size:#x}")
        for block in vm.blocks:
            if start < block.end and block.start < start + size:
                raise RuleViolation(self.rules.RAMBLOCK_OVERLAP, f"{start:#x}+{size:#x} overlaps {block.start:#x}")
        block = RamBlock(start, size, standalone)
        vm.blocks.append(block)
        return block

    def set_ram(self, vm: ModelVm, gpa: int, size: int, uva: int, flags: int) -> None:
        """``handle_set_ram`` / ``memslot_set_mapping``."""
        unmap = bool(flags & RAM_INVALID)
        if unmap and (flags != RAM_INVALID or uva):
            raise RuleViolation(self.rules.SET_RAM_UNMAP_ARGS, f"flags {flags:#x} va {uva:#x}")
        if not unmap and not uva:
            raise RuleViolation(self.rules.SET_RAM_NO_VA, "va 0")
        if size >> 12 == 0:
            raise RuleViolation(self.rules.SET_RAM_SIZE, f"size {size:#x}")
        if gpa % PAGE_SIZE or size % PAGE_SIZE or uva % PAGE_SIZE:
            raise self.model.not_modelled("a mapping that is not page-aligned")
        overlapping = [s for s in vm.slots if s.gpa < gpa + size and gpa < s.gpa + s.size]
        if any(s.gpa != gpa or s.size != size for s in overlapping):
            raise self.model.not_modelled("a mapping that splits an existing one")
        block: RamBlock | None = None
        if not unmap:
            if flags & RAM_STANDALONE:  # behaviour: standalone
                block = self.add_ramblock(vm, uva, size, standalone=True)
            else:
                block = next((b for b in vm.blocks if b.start <= uva < b.end), None)
                if block is None:
                    raise RuleViolation(self.rules.SET_RAM_NO_BLOCK, f"va {uva:#x}")
        for old in overlapping:
            self._unmap(vm, old)
        if block is not None:
            slot = Memslot(gpa, size, uva, bool(flags & RAM_ROM), block)
            vm.slots.append(slot)
            for vcpu in vm.vcpus.values():
                vcpu.cpu.map(gpa, size, uva, writable=not slot.rom)

    def _unmap(self, vm: ModelVm, slot: Memslot) -> None:
        vm.slots.remove(slot)
        for vcpu in vm.vcpus.values():
            vcpu.cpu.engine.unmap(slot.gpa, slot.size)
        if slot.block.standalone:  # ramblock_deref of a stand-alone block frees it
            vm.blocks.remove(slot.block)

    def slot_at(self, vm: ModelVm, gpa: int) -> Memslot | None:
        return next((s for s in vm.slots if s.gpa <= gpa < s.gpa + s.size), None)

    def notify_version(self, vm: ModelVm, cur_version: int) -> None:
        """``hax_vm_set_qemuversion``."""
        if cur_version >= 2:
            vm.features |= 1
            if cur_version >= 4:
                vm.features |= 2

    def destroy_vcpu(self, vcpu: ModelVcpu) -> None:
        vcpu.vm.vcpus.pop(vcpu.vcpu_id, None)
        vcpu.close()
        self._maybe_destroy_vm(vcpu.vm)

    def release_vm_handle(self, vm: ModelVm) -> None:
        vm.handles -= 1
        self._maybe_destroy_vm(vm)

    def _maybe_destroy_vm(self, vm: ModelVm) -> None:
        if vm.handles <= 0 and not vm.vcpus:
            self.vms.pop(vm.vm_id, None)

    def on_signal(self, thread_id: int) -> None:
        """A signal's IPI takes the CPU running a vCPU on ``thread_id`` out of the guest."""
        for vm in list(self.vms.values()):
            for vcpu in list(vm.vcpus.values()):
                if vcpu.running_thread == thread_id:
                    vcpu.cpu.kick()

    def kickoff(self, vcpu: ModelVcpu) -> None:
        """``vcpu_takeoff``: an IPI to the CPU running the vCPU, if it runs."""
        if vcpu.running_thread is not None:  # behaviour: kickoff
            vcpu.cpu.kick()

    def close_all(self) -> None:
        for vm in list(self.vms.values()):
            for vcpu in list(vm.vcpus.values()):
                vcpu.close()
        self.vms.clear()


# --- the POSIX front end --------------------------------------------------------------------


class _HaxFile(FileObject):
    """A HAXM device file; requests are matched against the flavour's own table."""

    kind = "hax"
    #: Request name -> handler method name.
    handlers: ClassVar[dict[str, str]] = {}

    def __init__(self, model: HaxmModel) -> None:
        super().__init__(model)
        self.hax: HaxmModel = model

    def ioctl_name(self, request: int) -> str:  # type: ignore[override]
        name = self.hax.request_names.get(request)
        return f"HAX_{name}" if name else f"ioctl {request:#x}"

    def dispatch(self, request: int, arg: int) -> int:
        name = self.hax.request_names.get(request, "")
        method = self.handlers.get(name)
        if method is None:
            # ``or 0``: a handler that returns nothing must never reach the
            # harness's restart loop as "restart" (None).
            return self.unknown(request) or 0
        handler: Callable[[int], int] = getattr(self, method)
        return handler(arg)

    def unknown(self, request: int) -> int:
        # platforms/linux: the system and VM devices' default case logs and returns 0.
        return 0

    def read(self, arg: int, layout: struct.Struct) -> tuple[Any, ...]:
        return layout.unpack(self.model.copy_from_user(arg, layout.size))


class SystemFile(_HaxFile):
    """``/dev/HAX`` (platforms/linux/hax_entry.c ``hax_dev_ioctl``)."""

    kind = "hax"

    def version(self, arg: int) -> int:
        self.model.copy_to_user(arg, self.hax.driver.version())
        return 0

    def capability(self, arg: int) -> int:
        self.model.copy_to_user(arg, self.hax.driver.capability())
        return 0

    def create_vm(self, arg: int) -> int:
        vm = self.hax.driver.create_vm()
        self.hax.devices[self.hax.paths[1].format(vm=vm.vm_id)] = lambda model: VmFile(self.hax, vm)
        self.model.copy_to_user(arg, _U32.pack(vm.vm_id))
        return 0

    handlers: ClassVar[dict[str, str]] = {"VERSION": "version", "CAPABILITY": "capability", "CREATE_VM": "create_vm"}


class VmFile(_HaxFile):
    """``/dev/hax_vm/vmNN`` (platforms/linux/components.c ``hax_vm_ioctl``)."""

    kind = "hax-vm"

    def __init__(self, model: HaxmModel, vm: ModelVm) -> None:
        super().__init__(model)
        self.vm = vm
        vm.handles += 1

    def dispatch(self, request: int, arg: int) -> int:
        self.hax.driver.check_owner(self.vm)
        return super().dispatch(request, arg)

    def vcpu_create(self, arg: int) -> int:
        (vcpu_id,) = self.read(arg, _U32)
        vcpu = self.hax.driver.create_vcpu(self.vm, vcpu_id)
        path = self.hax.paths[2].format(vm=self.vm.vm_id, vcpu=vcpu_id)
        self.hax.devices[path] = lambda model: VcpuFile(self.hax, vcpu)
        return 0

    def alloc_ram(self, arg: int) -> int:
        size, va = self.read(arg, _ALLOC_RAM)
        self.hax.driver.add_ramblock(self.vm, va, size)
        return 0

    def add_ramblock(self, arg: int) -> int:
        start, size, reserved = self.read(arg, _RAMBLOCK)
        if reserved:
            raise RuleViolation(self.hax.driver.rules.RAMBLOCK_RESERVED, f"reserved {reserved:#x}")
        self.hax.driver.add_ramblock(self.vm, start, size)
        return 0

    def set_ram(self, arg: int) -> int:
        gpa, size, flags, va = self.read(arg, _SET_RAM)
        self.hax.driver.set_ram(self.vm, gpa, size, va, flags)
        return 0

    def set_ram2(self, arg: int) -> int:
        gpa, size, va, flags, reserved1, reserved2 = self.read(arg, _SET_RAM2)
        if reserved1 or reserved2:
            raise RuleViolation(self.hax.driver.rules.SET_RAM_RESERVED, f"{reserved1:#x} {reserved2:#x}")
        self.hax.driver.set_ram(self.vm, gpa, size, va, flags)
        return 0

    def notify_qemu_version(self, arg: int) -> int:
        cur, _ = self.read(arg, _QEMU_VERSION)
        self.hax.driver.notify_version(self.vm, cur)
        return 0

    def protect_ram(self, arg: int) -> int:
        raise self.model.not_modelled("HAX_VM_IOCTL_PROTECT_RAM")

    handlers: ClassVar[dict[str, str]] = {
        "VCPU_CREATE": "vcpu_create",
        "VCPU_CREATE_ORIG": "vcpu_create",
        "ALLOC_RAM": "alloc_ram",
        "ADD_RAMBLOCK": "add_ramblock",
        "SET_RAM": "set_ram",
        "SET_RAM2": "set_ram2",
        "NOTIFY_QEMU_VERSION": "notify_qemu_version",
        "PROTECT_RAM": "protect_ram",
    }

    def release(self) -> None:
        self.hax.devices.pop(self.hax.paths[1].format(vm=self.vm.vm_id), None)
        self.hax.driver.release_vm_handle(self.vm)


class VcpuFile(_HaxFile):
    """``/dev/hax_vmNN/vcpuMM`` (platforms/linux/components.c ``hax_vcpu_ioctl``)."""

    kind = "hax-vcpu"

    def __init__(self, model: HaxmModel, vcpu: ModelVcpu) -> None:
        super().__init__(model)
        self.vcpu = vcpu

    def dispatch(self, request: int, arg: int) -> int:
        self.hax.driver.check_thread(self.vcpu)
        return super().dispatch(request, arg)

    def unknown(self, request: int) -> int:
        raise RuleViolation(self.hax.driver.rules.UNKNOWN_VCPU_REQUEST, f"request {request:#x}")

    def run(self, arg: int) -> int:
        self.vcpu.run()
        return 0

    def setup_tunnel(self, arg: int) -> int:
        vcpu = self.vcpu
        if vcpu.tunnel is None:
            vcpu.tunnel = self.map_user_pages(PAGE_SIZE, "hax-tunnel")
            vcpu.iobuf = self.map_user_pages(PAGE_SIZE, "hax-iobuf")
        assert vcpu.iobuf is not None
        self.model.copy_to_user(arg, _TUNNEL_INFO.pack(vcpu.tunnel.address, vcpu.iobuf.address, PAGE_SIZE))
        return 0

    def set_msrs(self, arg: int) -> int:
        data = self.model.copy_from_user(arg, _MSR_DATA_SIZE)
        out = self.vcpu.msr_batch(data, True, self.hax.driver.rules)
        if self.hax.host_os == "darwin":  # behaviour: set-msrs-done
            # BSD ioctl copies an _IOWR argument back; Linux's handler does not.
            self.model.copy_to_user(arg, out)
        return 0

    def get_msrs(self, arg: int) -> int:
        data = self.model.copy_from_user(arg, _MSR_DATA_SIZE)
        self.model.copy_to_user(arg, self.vcpu.msr_batch(data, False, self.hax.driver.rules))
        return 0

    def set_fpu(self, arg: int) -> int:
        self.vcpu.fx[:] = self.model.copy_from_user(arg, _FX_SIZE)
        return 0

    def get_fpu(self, arg: int) -> int:
        self.model.copy_to_user(arg, bytes(self.vcpu.fx))
        return 0

    def set_regs(self, arg: int) -> int:
        self.vcpu.set_state(self.model.copy_from_user(arg, _STATE.size))
        return 0

    def get_regs(self, arg: int) -> int:
        # Linux: hax_vcpu_ioctl's vc_state is an uninitialised stack variable.
        buffer = _UNINITIALISED
        if self.hax.host_os == "darwin":  # behaviour: get-regs-copyin
            # BSD ioctl copies an _IOWR argument in: the fields vcpu_get_regs
            # skips come back as the caller sent them.
            buffer = self.model.copy_from_user(arg, _STATE.size)
        self.model.copy_to_user(arg, self.vcpu.get_state(buffer))
        return 0

    def interrupt(self, arg: int) -> int:
        # copy_from_user of a uint8_t: only the low byte (components.c).
        (vector,) = struct.unpack("<B", self.model.copy_from_user(arg, 1))
        self.vcpu.interrupt(vector)
        return 0

    def not_modelled(self, arg: int) -> int:
        raise self.model.not_modelled("guest debugging and CPUID tables")

    handlers: ClassVar[dict[str, str]] = {
        "RUN": "run",
        "SETUP_TUNNEL": "setup_tunnel",
        "SET_MSRS": "set_msrs",
        "GET_MSRS": "get_msrs",
        "SET_FPU": "set_fpu",
        "GET_FPU": "get_fpu",
        "SET_REGS": "set_regs",
        "GET_REGS": "get_regs",
        "INTERRUPT": "interrupt",
        "VCPU_DEBUG": "not_modelled",
        "SET_CPUID": "not_modelled",
        "GET_CPUID": "not_modelled",
    }

    def release(self) -> None:
        self.hax.devices.pop(self.hax.paths[2].format(vm=self.vcpu.vm.vm_id, vcpu=self.vcpu.vcpu_id), None)
        self.hax.driver.destroy_vcpu(self.vcpu)


class HaxmModel(DeviceFileModel):
    """HAXM on Linux (default) or macOS, behind pyvmm-haxm's seam."""

    def __init__(
        self,
        host_os: str = "linux",
        *,
        ug: bool = True,
        caps: int = CAP_EPT
        | CAP_FASTMMIO
        | CAP_64BIT_RAMBLOCK
        | CAP_64BIT_SETRAM
        | CAP_TUNNEL_PAGE
        | CAP_RAM_PROTECTION
        | CAP_DEBUG
        | CAP_IMPLICIT_RAMBLOCK
        | CAP_CPUID,
        mem_quota: int | None = None,
    ) -> None:
        super().__init__()
        if host_os not in ("linux", "darwin"):
            raise ValueError(f"HaxmModel models the Linux or macOS driver, not {host_os!r} (HaxmWindowsModel)")
        self.host_os = host_os
        self.driver = Driver(self, POSIX_RULES, ug=ug, caps=caps, mem_quota=mem_quota)
        requests = _requests(host_os)
        self.request_names = {value: name for name, value in requests.items()}
        self.paths = ("/dev/HAX", "/dev/hax_vm/vm{vm:02d}", "/dev/hax_vm{vm:02d}/vcpu{vcpu:02d}")
        self.devices[self.paths[0]] = lambda model: SystemFile(self)

    def on_signal(self, thread_id: int) -> None:
        self.driver.on_signal(thread_id)

    def close_all(self) -> None:
        super().close_all()
        self.driver.close_all()

    @contextmanager
    def installed(self) -> Iterator[HaxmModel]:
        """Install the model as pyvmm-haxm's seam for the block."""
        from pyvmm_haxm.host import HOST

        with HOST.use(self, self.host_os):
            yield self


# --- the Windows front end ------------------------------------------------------------------


class _HaxHandle(IoControlObject):
    kind = "hax"
    #: Request name -> handler method name.
    handlers: ClassVar[dict[str, str]] = {}

    def __init__(self, model: HaxmWindowsModel) -> None:
        super().__init__(model)
        self.hax = model

    def control_name(self, code: int) -> str:  # type: ignore[override]
        name = self.hax.request_names.get(code)
        return f"HAX_{name}" if name else f"control {code:#x}"

    def dispatch(self, code: int, data: bytes, out_size: int) -> bytes:
        name = self.hax.request_names.get(code, "")
        method = self.handlers.get(name)
        if method is None:
            return self.unknown(code) or b""
        handler: Callable[[bytes, int], bytes] = getattr(self, method)
        return handler(data, out_size)

    def unknown(self, code: int) -> bytes:
        raise RuleViolation(WINDOWS_RULES.UNKNOWN_VCPU_REQUEST, f"control {code:#x}")

    @staticmethod
    def need(length: int, size: int, what: str) -> None:
        if length < size:
            raise RuleViolation(W_SHORT_BUFFER, f"{what}: {length} bytes, {size} needed")

    @staticmethod
    def system_buffer(data: bytes, out_size: int) -> bytes:
        """METHOD_BUFFERED: one system buffer of max(in, out) bytes holding the input."""
        return bytes(data).ljust(max(len(data), out_size), b"\0")


class WinSystemHandle(_HaxHandle):
    """``\\\\.\\HAX`` (``HaxDeviceControl``)."""

    def unknown(self, code: int) -> bytes:
        raise RuleViolation(W_UNKNOWN_SYSTEM_REQUEST, f"control {code:#x}")

    def version(self, data: bytes, out_size: int) -> bytes:
        self.need(out_size, _VERSION.size, "HAX_IOCTL_VERSION out")
        return self.hax.driver.version()

    def capability(self, data: bytes, out_size: int) -> bytes:
        self.need(out_size, _CAPINFO.size, "HAX_IOCTL_CAPABILITY out")
        raw = bytearray(self.hax.driver.capability())
        _U32.pack_into(raw, 4, len(self.hax.handles))  # win_refcount: the device's references
        return bytes(raw)

    def create_vm(self, data: bytes, out_size: int) -> bytes:
        if out_size < 4:
            raise RuleViolation(W_CREATE_VM_BUFFER, f"{out_size} bytes")
        vm = self.hax.driver.create_vm()
        self.hax.devices[self.hax.paths[1].format(vm=vm.vm_id)] = lambda model: WinVmHandle(self.hax, vm)
        return _U32.pack(vm.vm_id)

    handlers: ClassVar[dict[str, str]] = {"VERSION": "version", "CAPABILITY": "capability", "CREATE_VM": "create_vm"}


class WinVmHandle(_HaxHandle):
    """``\\\\.\\hax_vmNN`` (``HaxVmControl``)."""

    kind = "hax-vm"

    def __init__(self, model: HaxmWindowsModel, vm: ModelVm) -> None:
        super().__init__(model)
        self.vm = vm
        vm.handles += 1

    def dispatch(self, code: int, data: bytes, out_size: int) -> bytes:
        self.hax.driver.check_owner(self.vm)
        return super().dispatch(code, data, out_size)

    def unknown(self, code: int) -> bytes:
        raise RuleViolation(W_UNKNOWN_VM_REQUEST, f"control {code:#x}")

    def protect_ram(self, data: bytes, out_size: int) -> bytes:
        self.need(len(data), _PROTECT_RAM_SIZE, "HAX_VM_IOCTL_PROTECT_RAM in")
        raise self.hax.not_modelled("HAX_VM_IOCTL_PROTECT_RAM")

    def vcpu_create(self, data: bytes, out_size: int) -> bytes:
        self.need(len(data), 4, "HAX_VM_IOCTL_VCPU_CREATE in")
        (vcpu_id,) = _U32.unpack_from(data)
        vcpu = self.hax.driver.create_vcpu(self.vm, vcpu_id)
        name = self.hax.paths[2].format(vm=self.vm.vm_id, vcpu=vcpu_id)
        self.hax.devices[name] = lambda model: WinVcpuHandle(self.hax, vcpu)
        return b""

    def add_ramblock(self, data: bytes, out_size: int) -> bytes:
        self.need(len(data), _RAMBLOCK.size, "HAX_VM_IOCTL_ADD_RAMBLOCK in")
        start, size, reserved = _RAMBLOCK.unpack_from(data)
        if reserved:
            raise RuleViolation(WINDOWS_RULES.RAMBLOCK_RESERVED, f"reserved {reserved:#x}")
        self.hax.driver.add_ramblock(self.vm, start, size)
        return b""

    def alloc_ram(self, data: bytes, out_size: int) -> bytes:
        self.need(len(data), _ALLOC_RAM.size, "HAX_VM_IOCTL_ALLOC_RAM in")
        size, va = _ALLOC_RAM.unpack_from(data)
        self.hax.driver.add_ramblock(self.vm, va, size)
        return b""

    def set_ram(self, data: bytes, out_size: int) -> bytes:
        self.need(len(data), _SET_RAM.size, "HAX_VM_IOCTL_SET_RAM in")
        gpa, size, flags, va = _SET_RAM.unpack_from(data)
        self.hax.driver.set_ram(self.vm, gpa, size, va, flags)
        return b""

    def set_ram2(self, data: bytes, out_size: int) -> bytes:
        self.need(len(data), _SET_RAM2.size, "HAX_VM_IOCTL_SET_RAM2 in")
        gpa, size, va, flags, reserved1, reserved2 = _SET_RAM2.unpack_from(data)
        if reserved1 or reserved2:
            raise RuleViolation(WINDOWS_RULES.SET_RAM_RESERVED, f"{reserved1:#x} {reserved2:#x}")
        self.hax.driver.set_ram(self.vm, gpa, size, va, flags)
        return b""

    def notify_qemu_version(self, data: bytes, out_size: int) -> bytes:
        self.need(len(data), _QEMU_VERSION.size, "HAX_VM_IOCTL_NOTIFY_QEMU_VERSION in")
        cur, _ = _QEMU_VERSION.unpack_from(data)
        self.hax.driver.notify_version(self.vm, cur)
        return b""

    handlers: ClassVar[dict[str, str]] = {
        "VCPU_CREATE": "vcpu_create",
        "ADD_RAMBLOCK": "add_ramblock",
        "ALLOC_RAM": "alloc_ram",
        "SET_RAM": "set_ram",
        "SET_RAM2": "set_ram2",
        "PROTECT_RAM": "protect_ram",
        # 0x910 on a VM handle is NOTIFY_QEMU_VERSION (CAPABILITY on the system one).
        "NOTIFY_QEMU_VERSION": "notify_qemu_version",
        "CAPABILITY": "notify_qemu_version",
    }

    def release(self) -> None:
        self.hax.devices.pop(self.hax.paths[1].format(vm=self.vm.vm_id), None)
        self.hax.driver.release_vm_handle(self.vm)


class WinVcpuHandle(_HaxHandle):
    """``\\\\.\\hax_vmNN_vcpuMM`` (``HaxVcpuControl``)."""

    kind = "hax-vcpu"

    def __init__(self, model: HaxmWindowsModel, vcpu: ModelVcpu) -> None:
        super().__init__(model)
        self.vcpu = vcpu

    def dispatch(self, code: int, data: bytes, out_size: int) -> bytes:
        if self.hax.request_names.get(code) != "KICKOFF":  # behaviour: kickoff-any-thread
            self.hax.driver.check_thread(self.vcpu)
        return super().dispatch(code, data, out_size)

    def run(self, data: bytes, out_size: int) -> bytes:
        self.vcpu.run()
        return b""

    def setup_tunnel(self, data: bytes, out_size: int) -> bytes:
        self.need(out_size, _TUNNEL_INFO.size, "HAX_VCPU_IOCTL_SETUP_TUNNEL out")
        vcpu = self.vcpu
        if vcpu.tunnel is None:
            vcpu.tunnel = self.map_user_pages(PAGE_SIZE, "hax-tunnel")
            vcpu.iobuf = self.map_user_pages(PAGE_SIZE, "hax-iobuf")
        assert vcpu.iobuf is not None
        return _TUNNEL_INFO.pack(vcpu.tunnel.address, vcpu.iobuf.address, PAGE_SIZE)

    def set_msrs(self, data: bytes, out_size: int) -> bytes:
        self.need(len(data), _MSR_DATA_SIZE, "HAX_VCPU_IOCTL_SET_MSRS in")
        self.need(out_size, _MSR_DATA_SIZE, "HAX_VCPU_IOCTL_SET_MSRS out")
        return self.vcpu.msr_batch(self.system_buffer(data, out_size), True, WINDOWS_RULES)

    def get_msrs(self, data: bytes, out_size: int) -> bytes:
        self.need(out_size, _MSR_DATA_SIZE, "HAX_VCPU_IOCTL_GET_MSRS out")
        return self.vcpu.msr_batch(self.system_buffer(data, out_size), False, WINDOWS_RULES)

    def set_fpu(self, data: bytes, out_size: int) -> bytes:
        self.need(len(data), _FX_SIZE, "HAX_VCPU_IOCTL_SET_FPU in")
        self.vcpu.fx[:] = data[:_FX_SIZE]
        return b""

    def get_fpu(self, data: bytes, out_size: int) -> bytes:
        self.need(out_size, _FX_SIZE, "HAX_VCPU_IOCTL_GET_FPU out")
        return bytes(self.vcpu.fx)

    def set_regs(self, data: bytes, out_size: int) -> bytes:
        self.need(len(data), _STATE.size, "HAX_VCPU_SET_REGS in")
        self.vcpu.set_state(data[: _STATE.size])
        return b""

    def get_regs(self, data: bytes, out_size: int) -> bytes:
        self.need(out_size, _STATE.size, "HAX_VCPU_GET_REGS out")
        # The system buffer: the input bytes, then pool memory nobody wrote.
        buffer = (bytes(data) + _UNINITIALISED)[: _STATE.size]
        return self.vcpu.get_state(buffer)

    def interrupt(self, data: bytes, out_size: int) -> bytes:
        self.need(len(data), 4, "HAX_VCPU_IOCTL_INTERRUPT in")
        self.vcpu.interrupt(_U32.unpack_from(data)[0] & 0xFF)
        return b""

    def kickoff(self, data: bytes, out_size: int) -> bytes:
        self.hax.driver.kickoff(self.vcpu)
        return b""

    def not_modelled(self, data: bytes, out_size: int) -> bytes:
        raise self.hax.not_modelled("guest debugging and CPUID tables")

    handlers: ClassVar[dict[str, str]] = {
        "RUN": "run",
        "SETUP_TUNNEL": "setup_tunnel",
        "SET_MSRS": "set_msrs",
        "GET_MSRS": "get_msrs",
        "SET_FPU": "set_fpu",
        "GET_FPU": "get_fpu",
        "SET_REGS": "set_regs",
        "GET_REGS": "get_regs",
        "INTERRUPT": "interrupt",
        "KICKOFF": "kickoff",
        "VCPU_DEBUG": "not_modelled",
        "SET_CPUID": "not_modelled",
        "GET_CPUID": "not_modelled",
    }

    def release(self) -> None:
        self.hax.devices.pop(self.hax.paths[2].format(vm=self.vcpu.vm.vm_id, vcpu=self.vcpu.vcpu_id), None)
        self.hax.driver.destroy_vcpu(self.vcpu)


class HaxmWindowsModel(DeviceIoControlModel):
    """HAXM on Windows, behind pyvmm-haxm's seam (kernel32 as a DLL seam)."""

    host_os = "win32"

    def __init__(
        self,
        *,
        ug: bool = True,
        caps: int = CAP_EPT
        | CAP_FASTMMIO
        | CAP_64BIT_RAMBLOCK
        | CAP_64BIT_SETRAM
        | CAP_TUNNEL_PAGE
        | CAP_RAM_PROTECTION
        | CAP_DEBUG
        | CAP_IMPLICIT_RAMBLOCK
        | CAP_CPUID,
        mem_quota: int | None = None,
    ) -> None:
        super().__init__()
        self.driver = Driver(self, WINDOWS_RULES, ug=ug, caps=caps, mem_quota=mem_quota)
        self.request_names = {value: name for name, value in _requests("win32").items()}
        # CAPABILITY and NOTIFY_QEMU_VERSION share 0x910: the handle decides.
        self.request_names[_requests("win32")["CAPABILITY"]] = "CAPABILITY"
        self.paths = (r"\\.\HAX", r"\\.\hax_vm{vm:02d}", r"\\.\hax_vm{vm:02d}_vcpu{vcpu:02d}")
        self.devices[self.paths[0]] = lambda model: WinSystemHandle(self)

    def close_all(self) -> None:
        for handle in list(self.handles):
            self.close_handle(handle)
        self.driver.close_all()

    @contextmanager
    def installed(self) -> Iterator[HaxmWindowsModel]:
        from pyvmm_haxm.host import HOST

        with HOST.use(self, "win32"):
            yield self
