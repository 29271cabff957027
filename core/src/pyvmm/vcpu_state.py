"""Names for the pieces of vCPU state the register hooks exchange."""

from __future__ import annotations

import enum

from pyvmm.lean_dataclass import lean_dataclass


class StateKind(enum.Enum):
    """Which register set ``pyvmm_get_vcpu_state`` / ``pyvmm_set_vcpu_state`` move,
    and the type that carries it."""

    REGS = "regs"  #: x86 :class:`pyvmm.arch.x86_64.Regs`
    SREGS = "sregs"  #: x86 :class:`pyvmm.arch.x86_64.Sregs`
    FPU = "fpu"  #: x86 :class:`pyvmm.arch.x86_64.Fpu`
    DEBUG_REGS = "debug_regs"  #: x86 :class:`pyvmm.arch.x86_64.DebugRegs`
    XCRS = "xcrs"  #: x86 ``list[`` :class:`pyvmm.arch.x86_64.Xcr` ``]``
    LAPIC = "lapic"  #: x86 :class:`pyvmm.arch.x86_64.Lapic`
    MP_STATE = "mp_state"  #: x86 :class:`pyvmm.arch.x86_64.MpState`, aarch64 :class:`pyvmm.arch.aarch64.MpState`
    CORE_REGS = "core_regs"  #: aarch64 :class:`pyvmm.arch.aarch64.CoreRegs`
    XSAVE = "xsave"  #: x86 :class:`pyvmm.arch.x86_64.Xsave` (backends declaring ``XSAVE``)
    #: aarch64 ``list[`` :class:`pyvmm.arch.aarch64.OneReg` ``]``: every register the
    #: hypervisor lists for the vCPU, in its order (backends declaring ``REGISTER_LIST``)
    REGISTER_LIST = "register_list"


class AddressSpace(enum.Enum):
    PIO = "pio"
    MMIO = "mmio"


@lean_dataclass(frozen=True, slots=True)
class IoEventAddress:
    space: AddressSpace
    address: int

    @classmethod
    def pio(cls, port: int) -> IoEventAddress:
        return cls(AddressSpace.PIO, port)

    @classmethod
    def mmio(cls, address: int) -> IoEventAddress:
        return cls(AddressSpace.MMIO, address)
