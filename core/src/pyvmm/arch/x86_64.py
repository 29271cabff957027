"""x86_64 register sets, as backends exchange them with core.

Slotted dataclasses, not pydantic: they are built and read on the vCPU path.
Field names follow the KVM uapi (``struct kvm_regs`` etc.), which is what the
other x86 hypervisors' register sets map onto as well.

Every integer field has the width of its uapi field.  A record checks its fields
when it is built, and :meth:`check` checks them again (fields are mutable): a
value that does not fit (``Regs(rip=-1)``, a 2**64 base) raises
:class:`~pyvmm.errors.ConfigError` naming the field and its range, instead of an
``OverflowError`` from a backend's struct or a silent wrap.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pyvmm.errors import ConfigError

GPR_NAMES = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    "rip", "rflags",
)  # fmt: skip


def _fail(record: object, name: str, value: object, bits: int) -> ConfigError:
    return ConfigError(
        f"{type(record).__name__}.{name}: {value!r} is out of range: must be an integer from 0 to {(1 << bits) - 1:#x}"
    )


def check_fields(record: object, widths: tuple[tuple[str, int], ...]) -> None:
    """Raise :class:`ConfigError` unless each ``(name, bits)`` field of ``record`` is
    an integer that fits in ``bits`` unsigned bits (a bool counts as 0 or 1)."""
    for name, bits in widths:
        value = getattr(record, name)
        if value.__class__ is not int and not isinstance(value, int):
            raise _fail(record, name, value, bits)
        if not 0 <= value < 1 << bits:
            raise _fail(record, name, value, bits)


def check_bytes(record: object, name: str, value: object, size: int) -> None:
    """``value`` is ``size`` bytes (a register image)."""
    if not isinstance(value, (bytes, bytearray, memoryview)) or len(value) != size:
        shown = f"{len(value)} bytes" if isinstance(value, (bytes, bytearray, memoryview)) else repr(value)
        raise ConfigError(f"{type(record).__name__}.{name}: must be {size} bytes, not {shown}")


@dataclass(slots=True)
class Regs:
    """General-purpose registers.  The reset state is ``rip=0xfff0, rflags=2``."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0xFFF0
    rflags: int = 0x2

    def __post_init__(self) -> None:
        check_fields(self, _GPR_WIDTHS)

    def check(self) -> None:
        """:class:`ConfigError` unless every register fits in 64 bits."""
        check_fields(self, _GPR_WIDTHS)


@dataclass(slots=True)
class Segment:
    base: int = 0
    limit: int = 0xFFFF
    selector: int = 0
    type: int = 0
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0  # noqa: E741 - the architectural name of the long-mode bit
    g: int = 0
    avl: int = 0
    unusable: int = 0

    def __post_init__(self) -> None:
        check_fields(self, _SEGMENT_WIDTHS)

    def check(self) -> None:
        check_fields(self, _SEGMENT_WIDTHS)


@dataclass(slots=True)
class DescriptorTable:
    base: int = 0
    limit: int = 0xFFFF

    def __post_init__(self) -> None:
        check_fields(self, _DTABLE_WIDTHS)

    def check(self) -> None:
        check_fields(self, _DTABLE_WIDTHS)


def _code_reset() -> Segment:
    return Segment(base=0xFFFF0000, selector=0xF000, type=0xB)


def _data_reset() -> Segment:
    return Segment(type=0x3)


@dataclass(slots=True)
class Sregs:
    """Segment and control registers.  Defaults are the architectural reset state."""

    cs: Segment = field(default_factory=_code_reset)
    ds: Segment = field(default_factory=_data_reset)
    es: Segment = field(default_factory=_data_reset)
    fs: Segment = field(default_factory=_data_reset)
    gs: Segment = field(default_factory=_data_reset)
    ss: Segment = field(default_factory=_data_reset)
    tr: Segment = field(default_factory=lambda: Segment(type=0xB, s=0))
    ldt: Segment = field(default_factory=lambda: Segment(type=0x2, s=0))
    gdt: DescriptorTable = field(default_factory=DescriptorTable)
    idt: DescriptorTable = field(default_factory=DescriptorTable)
    cr0: int = 0x60000010
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0xFEE00900

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Every segment, descriptor table and control register (64 bits each)."""
        for name in _SEGMENT_NAMES:
            segment = getattr(self, name)
            if not isinstance(segment, Segment):
                raise ConfigError(f"Sregs.{name}: must be a Segment, not {type(segment).__name__}")
            segment.check()
        for name in ("gdt", "idt"):
            table = getattr(self, name)
            if not isinstance(table, DescriptorTable):
                raise ConfigError(f"Sregs.{name}: must be a DescriptorTable, not {type(table).__name__}")
            table.check()
        check_fields(self, _CONTROL_WIDTHS)


@dataclass(slots=True)
class Fpu:
    """x87/SSE state.  ``fpr`` and ``xmm`` hold 16-byte registers as bytes."""

    fpr: list[bytes] = field(default_factory=lambda: [bytes(16)] * 8)
    fcw: int = 0x37F
    fsw: int = 0
    ftwx: int = 0
    last_opcode: int = 0
    last_ip: int = 0
    last_dp: int = 0
    xmm: list[bytes] = field(default_factory=lambda: [bytes(16)] * 16)
    mxcsr: int = 0x1F80

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        check_fields(self, _FPU_WIDTHS)
        for name, count in (("fpr", 8), ("xmm", 16)):
            registers = getattr(self, name)
            if not isinstance(registers, (list, tuple)) or len(registers) != count:
                raise ConfigError(f"Fpu.{name}: must be a list of {count} 16-byte registers")
            for index, value in enumerate(registers):
                check_bytes(self, f"{name}[{index}]", value, 16)


@dataclass(slots=True)
class DebugRegs:
    db: tuple[int, int, int, int] = (0, 0, 0, 0)
    dr6: int = 0xFFFF0FF0
    dr7: int = 0x400

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        if not isinstance(self.db, (tuple, list)) or len(self.db) != 4:
            raise ConfigError("DebugRegs.db: must be 4 breakpoint addresses (DR0..DR3)")
        for index, value in enumerate(self.db):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
                raise _fail(self, f"db[{index}]", value, 64)
        check_fields(self, (("dr6", 64), ("dr7", 64)))


@dataclass(slots=True)
class MsrEntry:
    index: int
    data: int = 0

    def __post_init__(self) -> None:
        check_fields(self, _MSR_WIDTHS)

    def check(self) -> None:
        check_fields(self, _MSR_WIDTHS)


@dataclass(slots=True)
class CpuidEntry:
    """One CPUID leaf.  ``flags`` bit 0 means ``index`` (ECX) matters."""

    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0

    def __post_init__(self) -> None:
        check_fields(self, _CPUID_WIDTHS)

    def check(self) -> None:
        check_fields(self, _CPUID_WIDTHS)


@dataclass(slots=True)
class Xcr:
    index: int
    value: int

    def __post_init__(self) -> None:
        check_fields(self, _XCR_WIDTHS)

    def check(self) -> None:
        check_fields(self, _XCR_WIDTHS)


class MpState(enum.IntEnum):
    """Multiprocessing state (KVM numbering)."""

    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3
    SIPI_RECEIVED = 4


@dataclass(slots=True)
class Lapic:
    """The local APIC's 1 KiB register page, as the hypervisor stores it."""

    regs: bytes = bytes(1024)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        check_bytes(self, "regs", self.regs, 1024)


@dataclass(slots=True)
class Xsave:
    """The XSAVE area (legacy FPU/SSE region, header and every extended component
    the hypervisor saves: AVX, AVX-512, PKRU, AMX tiles ...), as the hypervisor
    stores it: at least 4 KiB, a whole number of KiB (KVM: ``struct kvm_xsave``,
    larger with ``KVM_CAP_XSAVE2``)."""

    region: bytes = bytes(4096)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        region = self.region
        if not isinstance(region, (bytes, bytearray)) or len(region) < 4096 or len(region) % 1024:
            shown = f"{len(region)} bytes" if isinstance(region, (bytes, bytearray)) else repr(region)
            raise ConfigError(f"Xsave.region: must be at least 4096 bytes, a multiple of 1024, not {shown}")


class InterruptShadow(enum.IntFlag):
    """Why the guest cannot take an interrupt for one instruction: it just
    executed MOV SS / POP SS, or STI with interrupts disabled before."""

    NONE = 0
    MOV_SS = 1
    STI = 2


def _check_optional_bool(record: object, name: str, value: object) -> None:
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"{type(record).__name__}.{name}: must be True, False or None, not {value!r}")


def _check_bools(record: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(record, name)
        if not isinstance(value, bool):
            raise ConfigError(f"{type(record).__name__}.{name}: must be True or False, not {value!r}")


@dataclass(slots=True)
class ExceptionEvent:
    """An exception the vCPU is delivering or about to raise.

    ``injected``: delivery has started and is redone on the next entry;
    ``pending``: raised but not yet delivered (None where the hypervisor does not
    tell the two apart: KVM without ``KVM_CAP_EXCEPTION_PAYLOAD`` reports both as
    injected).  ``payload`` is what the exception leaves behind when it is
    delivered (CR2 for #PF, DR6 for #DB), where the hypervisor keeps it apart.
    """

    injected: bool = False
    pending: bool | None = None
    vector: int = 0
    has_error_code: bool = False
    error_code: int = 0
    payload: int | None = None

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        _check_bools(self, ("injected", "has_error_code"))
        _check_optional_bool(self, "pending", self.pending)
        check_fields(self, (("vector", 8), ("error_code", 32)))
        if self.payload is not None and (
            isinstance(self.payload, bool) or not isinstance(self.payload, int) or not 0 <= self.payload < 1 << 64
        ):
            raise _fail(self, "payload", self.payload, 64)


@dataclass(slots=True)
class InterruptEvent:
    """An external or software interrupt being delivered, and the interrupt shadow.

    ``shadow`` None: not reported (on read) / left as it is (on write)."""

    injected: bool = False
    vector: int = 0
    soft: bool = False
    shadow: InterruptShadow | None = None

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        _check_bools(self, ("injected", "soft"))
        check_fields(self, (("vector", 8),))
        shadow: object = self.shadow
        if shadow is not None:
            if isinstance(shadow, bool) or not isinstance(shadow, int) or not 0 <= shadow <= 3:
                raise ConfigError(f"InterruptEvent.shadow: an InterruptShadow or None, not {shadow!r}")
            self.shadow = InterruptShadow(shadow)


@dataclass(slots=True)
class NmiEvent:
    """Non-maskable interrupts: one being delivered, one waiting, and whether NMIs
    are blocked (from an NMI's delivery until the next IRET).

    ``pending`` None: not reported (on read) / left as it is (on write)."""

    injected: bool = False
    pending: bool | None = None
    masked: bool = False

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        _check_bools(self, ("injected", "masked"))
        _check_optional_bool(self, "pending", self.pending)


@dataclass(slots=True)
class SmiEvent:
    """System-management mode: whether the vCPU is in SMM (None: not reported /
    left as it is), an SMI waiting, SMM entered from an NMI handler, and an INIT
    latched while in SMM."""

    smm: bool | None = None
    pending: bool = False
    inside_nmi: bool = False
    latched_init: bool = False

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        _check_bools(self, ("pending", "inside_nmi", "latched_init"))
        _check_optional_bool(self, "smm", self.smm)


@dataclass(slots=True)
class VcpuEvents:
    """The vCPU's pending-event state: what it is delivering or about to deliver,
    the interrupt shadow and NMI blocking (crosvm's ``VcpuEvents``; KVM's
    ``KVM_GET/SET_VCPU_EVENTS``).  Read it with :meth:`pyvmm.vm.Vcpu.get_events`,
    change what you need and write it back with :meth:`pyvmm.vm.Vcpu.set_events`.

    A field that is None was not reported by the hypervisor, and writing None
    leaves the hypervisor's value as it is.
    """

    exception: ExceptionEvent = field(default_factory=ExceptionEvent)
    interrupt: InterruptEvent = field(default_factory=InterruptEvent)
    nmi: NmiEvent = field(default_factory=NmiEvent)
    smi: SmiEvent = field(default_factory=SmiEvent)
    #: The vector of a SIPI waiting for an AP in wait-for-SIPI state.
    sipi_vector: int | None = None
    #: A triple fault waiting to shut the vCPU down.
    triple_fault_pending: bool | None = None

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        parts = (("exception", ExceptionEvent), ("interrupt", InterruptEvent), ("nmi", NmiEvent), ("smi", SmiEvent))
        for name, kind in parts:
            value = getattr(self, name)
            if not isinstance(value, kind):
                raise ConfigError(f"VcpuEvents.{name}: must be a {kind.__name__}, not {type(value).__name__}")
            value.check()
        if self.sipi_vector is not None:
            check_fields(self, (("sipi_vector", 32),))
        _check_optional_bool(self, "triple_fault_pending", self.triple_fault_pending)


# Field widths, from the KVM uapi structs (arch/x86/include/uapi/asm/kvm.h).
_GPR_WIDTHS = tuple((name, 64) for name in GPR_NAMES)
_SEGMENT_WIDTHS = (
    ("base", 64), ("limit", 32), ("selector", 16), ("type", 8), ("present", 8), ("dpl", 8),
    ("db", 8), ("s", 8), ("l", 8), ("g", 8), ("avl", 8), ("unusable", 8),
)  # fmt: skip
_DTABLE_WIDTHS = (("base", 64), ("limit", 16))
_SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_CONTROL_WIDTHS = tuple((name, 64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"))
_FPU_WIDTHS = (
    ("fcw", 16),
    ("fsw", 16),
    ("ftwx", 8),
    ("last_opcode", 16),
    ("last_ip", 64),
    ("last_dp", 64),
    ("mxcsr", 32),
)
_MSR_WIDTHS = (("index", 32), ("data", 64))
_CPUID_WIDTHS = tuple((name, 32) for name in ("function", "index", "flags", "eax", "ebx", "ecx", "edx"))
_XCR_WIDTHS = (("index", 32), ("value", 64))

# Control-register and EFER bits used by the boot-state builders.
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
