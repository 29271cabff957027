"""The x86_64 vCPU state beyond the registers a guest boots with: x87/SSE, the
debug registers, XCRs, the local APIC page, the XSAVE area and the pending
events -- what snapshots, reset points and the explicit getters read.

Apart from :mod:`pyvmm.arch.x86_64` because a machine that only boots and runs
never builds one of these records, and each slotted dataclass costs its
creation at import (about half a millisecond each, a start-up cost: issue 19).
Every name here is also :mod:`pyvmm.arch.x86_64`'s, loaded on first use there;
the rules of that module hold (every integer field has its uapi width, checked
when built and by :meth:`check`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pyvmm.arch.x86_64 import _fail, check_bytes, check_fields
from pyvmm.errors import ConfigError

# Field widths, from the KVM uapi structs (arch/x86/include/uapi/asm/kvm.h).
_FPU_WIDTHS = (
    ("fcw", 16),
    ("fsw", 16),
    ("ftwx", 8),
    ("last_opcode", 16),
    ("last_ip", 64),
    ("last_dp", 64),
    ("mxcsr", 32),
)
_XCR_WIDTHS = (("index", 32), ("value", 64))


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
class Xcr:
    index: int
    value: int

    def __post_init__(self) -> None:
        check_fields(self, _XCR_WIDTHS)

    def check(self) -> None:
        check_fields(self, _XCR_WIDTHS)


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
