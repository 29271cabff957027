"""arm64 registers as KVM's one-reg ids, and pyvmm's :class:`CoreRegs` on top of them.

KVM on arm64 has no bulk register ioctl that userspace should use (``KVM_GET_REGS``
is refused there): every register is one ``KVM_GET_ONE_REG`` / ``KVM_SET_ONE_REG``
by id (``Documentation/virt/kvm/api.rst`` "KVM_SET_ONE_REG", arm64 section).  An
id carries its own size in bits 52-55, so the buffer is sized from the id alone.
The ids themselves are core's (:mod:`pyvmm.arch.aarch64`): the same encoding
serves the software CPU and GenieZone.

``CoreRegs.sp`` is the stack pointer the vCPU is using: SP_EL1 when PSTATE says
EL1 with SPSel set (EL1h, where a kernel runs), SP_EL0 otherwise (EL0, or EL1t).
``struct kvm_regs`` keeps the two apart (``user_pt_regs.sp`` is SP_EL0, ``sp_el1``
follows PSTATE), so the mapping picks by PSTATE, as the software CPU does.

The functions here take ``get(id) -> int`` / ``set(id, value)``: the vCPU passes
its one-reg ioctls, tests pass a dict.
"""

from __future__ import annotations

from collections.abc import Callable

from pyvmm.arch.aarch64 import PC_ID, PSTATE_ID, SP_EL1_ID, SP_ID, CoreRegs, x_reg_id
from pyvmm.errors import ConfigError
from pyvmm_kvm.bindings import KVM_REG_ARM64, KVM_REG_SIZE_MASK, KVM_REG_SIZE_SHIFT

GetReg = Callable[[int], int]
SetReg = Callable[[int, int], None]

X_IDS = tuple(x_reg_id(n) for n in range(31))

_ARCH_MASK = 0xFF00_0000_0000_0000
_PSTATE_SPSEL = 1
_PSTATE_EL_SHIFT = 2


def reg_size(reg_id: int) -> int:
    """Bytes KVM moves for ``reg_id`` (``KVM_REG_SIZE``: 1 << the size field).

    :raises ConfigError: not an arm64 one-reg id, or a size beyond 2048 bits.
    """
    if isinstance(reg_id, bool) or not isinstance(reg_id, int) or not 0 <= reg_id < 1 << 64:
        raise ConfigError(f"register id {reg_id!r} is not a 64-bit one-reg id")
    if reg_id & _ARCH_MASK != KVM_REG_ARM64:
        raise ConfigError(f"register id {reg_id:#x} is not an arm64 one-reg id (arch field {reg_id >> 56:#x})")
    size_field = (reg_id & KVM_REG_SIZE_MASK) >> KVM_REG_SIZE_SHIFT
    if size_field > 8:  # KVM_REG_SIZE_U2048 is the largest the uapi names
        raise ConfigError(f"register id {reg_id:#x}: size field {size_field} names no register width")
    return 1 << size_field


def stack_pointer_id(pstate: int) -> int:
    """The one-reg id of the stack pointer in use under ``pstate``."""
    el = (pstate >> _PSTATE_EL_SHIFT) & 3
    return SP_EL1_ID if el >= 1 and pstate & _PSTATE_SPSEL else SP_ID


def read_core_regs(get: GetReg) -> CoreRegs:
    pstate = get(PSTATE_ID)
    return CoreRegs(x=[get(reg) for reg in X_IDS], sp=get(stack_pointer_id(pstate)), pc=get(PC_ID), pstate=pstate)


def write_core_regs(regs: CoreRegs, put: SetReg) -> None:
    """Write ``regs``; PSTATE first, since it decides which stack pointer ``sp`` is.

    :raises ConfigError: ``regs`` holds a value that does not fit (nothing is written).
    """
    regs.check()
    put(PSTATE_ID, regs.pstate)
    for reg, value in zip(X_IDS, regs.x, strict=True):
        put(reg, value)
    put(stack_pointer_id(regs.pstate), regs.sp)
    put(PC_ID, regs.pc)


def boot_order(regs: dict[int, int]) -> list[tuple[int, int]]:
    """The registers of an ``Aarch64VcpuInit`` in the order to set them: PSTATE
    first, for the same reason as in :func:`write_core_regs`."""
    ordered = sorted(regs.items(), key=lambda item: item[0] != PSTATE_ID)
    for reg_id, _ in ordered:
        reg_size(reg_id)
    return ordered
