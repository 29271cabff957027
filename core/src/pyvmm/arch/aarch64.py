"""aarch64 core registers and KVM-style "one reg" identifiers.

The one-reg id encoding is the one KVM and GenieZone share
(``arch/arm64/include/uapi/asm/kvm.h``): core registers are addressed by their
32-bit word offset inside ``struct kvm_regs``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pyvmm.errors import ConfigError

REG_ARM64 = 0x6000000000000000
REG_SIZE_U64 = 0x0030000000000000
REG_SIZE_U128 = 0x0040000000000000
REG_ARM_CORE = 0x0010 << 16
REG_ARM64_SYSREG = 0x0013 << 16

#: PSTATE for entering a kernel: EL1h with D, A, I and F masked.
PSTATE_EL1H_DAIF = 0x3C5
#: The same at EL2 (nested virtualisation).
PSTATE_EL2H_DAIF = 0x3C9


def core_reg_id(word_offset: int, size: int = REG_SIZE_U64) -> int:
    """One-reg id of the core register at ``word_offset`` 32-bit words into kvm_regs."""
    return REG_ARM64 | size | REG_ARM_CORE | word_offset


def x_reg_id(n: int) -> int:
    """Id of general register Xn (0..30)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 30:
        # ConfigError is a ValueError: callers that caught ValueError still do.
        raise ConfigError(f"X{n} does not exist (X0..X30)")
    return core_reg_id(2 * n)


#: SP_EL0 (``user_pt_regs.sp``).
SP_ID = core_reg_id(2 * 31)
PC_ID = core_reg_id(2 * 32)
PSTATE_ID = core_reg_id(2 * 33)
#: SP_EL1 and ELR_EL1 follow ``user_pt_regs`` (34 u64s) in ``struct kvm_regs``:
#: a kernel entered at EL1h runs on SP_EL1, not on SP_EL0.
SP_EL1_ID = core_reg_id(2 * 34)
ELR_EL1_ID = core_reg_id(2 * 35)


def sysreg_id(op0: int, op1: int, crn: int, crm: int, op2: int) -> int:
    """One-reg id of a system register, from its encoding."""
    return REG_ARM64 | REG_SIZE_U64 | REG_ARM64_SYSREG | (op0 << 14) | (op1 << 11) | (crn << 7) | (crm << 3) | op2


MPIDR_EL1_ID = sysreg_id(3, 0, 0, 0, 5)


@dataclass(slots=True)
class CoreRegs:
    """X0..X30, SP (SP_EL1 for a kernel), PC and PSTATE."""

    x: list[int] = field(default_factory=lambda: [0] * 31)
    sp: int = 0
    pc: int = 0
    pstate: int = PSTATE_EL1H_DAIF

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """:class:`ConfigError` unless there are 31 X registers and every value fits
        in 64 bits (fields are mutable: backends call this before setting them)."""
        if not isinstance(self.x, (list, tuple)) or len(self.x) != 31:
            raise ConfigError("CoreRegs.x: must be a list of 31 registers (X0..X30)")
        values = [(f"x[{n}]", value) for n, value in enumerate(self.x)]
        values += [("sp", self.sp), ("pc", self.pc), ("pstate", self.pstate)]
        for name, value in values:
            if not isinstance(value, int) or not 0 <= value < 1 << 64:
                raise ConfigError(
                    f"CoreRegs.{name}: {value!r} is out of range: must be an integer from 0 to {(1 << 64) - 1:#x}"
                )


@dataclass(frozen=True, slots=True)
class OneReg:
    """One register of a vCPU by its one-reg id, its value as the hypervisor
    moves it: little-endian, as many bytes as the id's size field says (the
    FP/SIMD registers are 16)."""

    reg_id: int
    value: bytes

    def __post_init__(self) -> None:
        if isinstance(self.reg_id, bool) or not isinstance(self.reg_id, int) or not 0 <= self.reg_id < 1 << 64:
            raise ConfigError(f"OneReg.reg_id: {self.reg_id!r} is not a 64-bit one-reg id")
        size_field = (self.reg_id >> REG_SIZE_SHIFT) & 0xF
        if not isinstance(self.value, bytes) or size_field > 8 or len(self.value) != 1 << size_field:
            shown = len(self.value) if isinstance(self.value, bytes) else type(self.value).__name__
            raise ConfigError(f"register {self.reg_id:#x}: its id says {1 << size_field} bytes, the value has {shown}")


#: Where a one-reg id keeps its size (log2 of the bytes) in bits 52-55.
REG_SIZE_SHIFT = 52


class MpState(enum.IntEnum):
    """An aarch64 vCPU's multiprocessing state (KVM's numbering,
    ``KVM_MP_STATE_*`` in ``include/uapi/linux/kvm.h``)."""

    RUNNABLE = 0
    #: Powered off (PSCI ``CPU_OFF``, or never started by ``CPU_ON``).
    STOPPED = 5
    #: Suspended by PSCI ``SYSTEM_SUSPEND`` until an interrupt wakes it.
    SUSPENDED = 10
