"""What the engine asks of an architecture: where the PC is, what its I/O,
exceptions and halts look like, and how a completed exit goes back in."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pyvmm.exits import InternalErrorExit, VcpuExit
from pyvmm.softcpu._uc import RegisterFile

if TYPE_CHECKING:
    from pyvmm.softcpu.engine import SoftCpu


class Isa:
    """Base of the per-architecture halves of :class:`~pyvmm.softcpu.SoftCpu`."""

    #: ``DebugExit.exception`` for a step or breakpoint.
    debug_exception = 0
    #: Longest instruction, for the bytes an internal error carries.
    max_instruction = 4

    def __init__(self, cpu: SoftCpu) -> None:
        self.cpu = cpu
        self.u: Any = cpu._u
        self.uc: Any = cpu._uc
        self.regs = RegisterFile(cpu._uc)

    def install(self) -> None:
        """Add the architecture's hooks (called once, by the engine)."""

    def pc(self) -> int:
        raise NotImplementedError

    def before_slice(self) -> None:
        """Called before every emulation slice of a normal run."""

    def port_exit(self) -> VcpuExit:
        raise NotImplementedError("port I/O is x86 only")

    def interrupt_exit(self, intno: int) -> VcpuExit | None:
        """The exit for a CPU exception unicorn raised (``intno`` is its number),
        or None when it was handled and the guest goes on."""
        raise NotImplementedError

    def invalid_instruction_exit(self, pc: int) -> VcpuExit:
        return self.cpu._internal_error(f"undefined instruction at {pc:#x}", pc)

    def halted(self, step_start: int | None) -> bool:
        """Whether the slice that just ended stopped on the halt instruction.
        ``step_start`` is the PC before a single step, None after a normal run."""
        raise NotImplementedError

    def complete(self, last: VcpuExit) -> None:
        """Take what the VMM wrote into ``last`` (a read's data, a hypercall's
        result) before the guest runs again."""

    def forget_pending(self) -> None:
        """Drop any access waiting to be completed by re-execution."""

    def internal_error(self, description: str, pc: int, data: tuple[int, ...] = ()) -> InternalErrorExit:
        return self.cpu._internal_error(description, pc, data)
