"""x86_64 register sets, as backends exchange them with core.

Slotted dataclasses, not pydantic: they are built and read on the vCPU path.
Field names follow the KVM uapi (``struct kvm_regs`` etc.), which is what the
other x86 hypervisors' register sets map onto as well.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

GPR_NAMES = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    "rip", "rflags",
)  # fmt: skip


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


@dataclass(slots=True)
class DescriptorTable:
    base: int = 0
    limit: int = 0xFFFF


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


@dataclass(slots=True)
class DebugRegs:
    db: tuple[int, int, int, int] = (0, 0, 0, 0)
    dr6: int = 0xFFFF0FF0
    dr7: int = 0x400


@dataclass(slots=True)
class MsrEntry:
    index: int
    data: int = 0


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


@dataclass(slots=True)
class Xcr:
    index: int
    value: int


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
