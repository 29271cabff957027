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
from dataclasses import field
from typing import TYPE_CHECKING

from pyvmm.errors import ConfigError
from pyvmm.lean_dataclass import lean_dataclass

if TYPE_CHECKING:
    from pyvmm.arch.x86_64_extra_state import (
        DebugRegs,
        ExceptionEvent,
        Fpu,
        InterruptEvent,
        InterruptShadow,
        Lapic,
        NmiEvent,
        SmiEvent,
        VcpuEvents,
        Xcr,
        Xsave,
    )

#: Every public name, those of :mod:`pyvmm.arch.x86_64_extra_state` included
#: (loaded on first use, by ``__getattr__`` below).
__all__ = [
    "GPR_NAMES",
    "check_fields",
    "check_bytes",
    "Regs",
    "Segment",
    "DescriptorTable",
    "Sregs",
    "MsrEntry",
    "CpuidEntry",
    "MpState",
    "CR0_PE",
    "CR0_MP",
    "CR0_ET",
    "CR0_NE",
    "CR0_WP",
    "CR0_PG",
    "CR4_PAE",
    "CR4_OSFXSR",
    "CR4_OSXMMEXCPT",
    "EFER_SCE",
    "EFER_LME",
    "EFER_LMA",
    "DebugRegs",
    "ExceptionEvent",
    "Fpu",
    "InterruptEvent",
    "InterruptShadow",
    "Lapic",
    "NmiEvent",
    "SmiEvent",
    "VcpuEvents",
    "Xcr",
    "Xsave",
]

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


@lean_dataclass(slots=True)
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


@lean_dataclass(slots=True)
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


@lean_dataclass(slots=True)
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


@lean_dataclass(slots=True)
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


@lean_dataclass(slots=True)
class MsrEntry:
    index: int
    data: int = 0

    def __post_init__(self) -> None:
        check_fields(self, _MSR_WIDTHS)

    def check(self) -> None:
        check_fields(self, _MSR_WIDTHS)


@lean_dataclass(slots=True)
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


class MpState(enum.IntEnum):
    """Multiprocessing state (KVM numbering)."""

    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3
    SIPI_RECEIVED = 4


# Field widths, from the KVM uapi structs (arch/x86/include/uapi/asm/kvm.h).
_GPR_WIDTHS = tuple((name, 64) for name in GPR_NAMES)
_SEGMENT_WIDTHS = (
    ("base", 64), ("limit", 32), ("selector", 16), ("type", 8), ("present", 8), ("dpl", 8),
    ("db", 8), ("s", 8), ("l", 8), ("g", 8), ("avl", 8), ("unusable", 8),
)  # fmt: skip
_DTABLE_WIDTHS = (("base", 64), ("limit", 16))
_SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_CONTROL_WIDTHS = tuple((name, 64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"))
_MSR_WIDTHS = (("index", 32), ("data", 64))
_CPUID_WIDTHS = tuple((name, 32) for name in ("function", "index", "flags", "eax", "ebx", "ecx", "edx"))

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


#: The records kept in :mod:`pyvmm.arch.x86_64_extra_state` (created only when
#: first used: a start-up cost), and still this module's names.
_EXTRA_STATE = frozenset(
    {
        "DebugRegs", "ExceptionEvent", "Fpu", "InterruptEvent", "InterruptShadow", "Lapic",
        "NmiEvent", "SmiEvent", "VcpuEvents", "Xcr", "Xsave",
    }
)  # fmt: skip


def __getattr__(name: str) -> object:
    if name not in _EXTRA_STATE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from pyvmm.arch import x86_64_extra_state

    value = getattr(x86_64_extra_state, name)
    globals()[name] = value
    return value
