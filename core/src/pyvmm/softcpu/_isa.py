"""The interface between the engine and its architecture halves.

:class:`~pyvmm.softcpu.SoftCpu` (the engine) runs unicorn, owns guest memory,
MMIO, kicks and debugging; an :class:`Isa` half owns everything one architecture
adds -- its exits and their completion, its registers, its pending events -- and
keeps that state to itself.  The two talk only through the methods here: the
engine calls :class:`Isa`'s, an ISA half calls :class:`Engine`'s.  Neither module
imports the other (this module imports neither).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pyvmm.exits import InternalErrorExit, VcpuExit
from pyvmm.softcpu._uc import RegisterFile

#: KVM's suberror for "instruction emulation failed", reused for what the
#: software CPU cannot do.
INTERNAL_ERROR_EMULATION = 1


class Stop(enum.Enum):
    """Why the last emulation slice ended, as the hooks saw it."""

    NONE = 0
    MEMORY = 1  # an access no RAM backs, or a write to read-only RAM
    FETCH = 2  # an instruction fetch from unbacked memory
    PORT = 3  # x86 IN/OUT
    INTERRUPT = 4  # a CPU exception or software interrupt
    INVALID = 5  # an undefined instruction (x86 #UD)
    BREAKPOINT = 6
    ISA = 7  # an architecture exit the ISA half recorded (CPUID, MSR, RDTSC, ...)


class Conduit(str, enum.Enum):
    """How an aarch64 guest called the hypervisor (or firmware)."""

    HVC = "hvc"
    SMC = "smc"


@dataclass(frozen=True, slots=True)
class Hypercall:
    """An aarch64 ``HVC``/``SMC`` the guest made.  ``function`` is X0 (the SMCCC
    function id), ``args`` X1..X7, ``imm`` the instruction's 16-bit immediate."""

    conduit: Conduit
    imm: int
    function: int
    args: tuple[int, ...]
    pc: int


#: ``handler(cpu, call)`` sees every HVC/SMC first (``cpu`` is the
#: :class:`~pyvmm.softcpu.SoftCpu`).  Return an exit to end ``run()`` with it,
#: True when the call is handled (the handler has set X0 and whatever else it
#: answers with), or None to leave it to the default: PSCI
#: SYSTEM_OFF/SYSTEM_RESET become a :class:`~pyvmm.exits.SystemEventExit`,
#: PSCI_VERSION/FEATURES are answered, other PSCI calls get NOT_SUPPORTED, and
#: anything else is a :class:`~pyvmm.exits.HypercallExit` for the VMM.
HypercallHandler = Callable[[Any, Hypercall], "VcpuExit | bool | None"]


class Engine(Protocol):
    """What an ISA half may ask of the engine."""

    def read_virtual(self, address: int, size: int) -> bytes | None:
        """Guest-virtual memory through the guest's translation, or None."""

    def read_physical(self, gpa: int, size: int) -> bytes | None:
        """Guest-physical memory the emulator can see, or None."""

    def is_ram(self, gpa: int, size: int, *, write: bool) -> bool:
        """Whether RAM (writable RAM for ``write``) backs all of ``gpa..+size``
        inside one mapping: no MMIO, no read-only region for a write."""

    def write_ram(self, gpa: int, data: bytes) -> bool:
        """Write guest RAM as a guest write would land (dirty pages logged);
        False, writing nothing, where :meth:`is_ram` would say no."""

    def stop_slice(self, reason: Stop) -> None:
        """From inside a unicorn hook: end the current slice for ``reason``; the
        engine then asks the ISA half for the exit (``port_exit``/``isa_exit``)."""

    def forget_pending(self) -> None:
        """The VMM moved the guest: drop every access waiting for re-execution."""

    def internal_error(self, description: str, pc: int, data: tuple[int, ...] = ()) -> InternalErrorExit:
        """An internal-error exit carrying the instruction bytes at ``pc``."""

    def hypercall(self, call: Hypercall) -> VcpuExit | bool | None:
        """Hand ``call`` to the owner's hypercall handler (None without one)."""

    def flush_code(self) -> None:
        """Drop translated code (after a change translations depend on)."""

    def instruction_length(self, pc: int) -> int:
        """The length of the instruction at ``pc`` as the engine decodes it (0
        where it cannot say); the guest's state is left as it was."""


class Isa:
    """Base of the per-architecture halves of :class:`~pyvmm.softcpu.SoftCpu`."""

    #: ``DebugExit.exception`` for a step or breakpoint.
    debug_exception = 0
    #: Longest instruction, for the bytes an internal error carries.
    max_instruction = 4
    #: The last :meth:`slice_budget` cut the slice short on purpose (to look at
    #: an event): a slice ending where it began is no sign of a stuck engine.
    budget_limited = False

    def __init__(self, engine: Engine, u: Any, uc: Any) -> None:
        self.engine = engine
        self.u = u
        self.uc = uc
        self.regs = RegisterFile(uc)

    def install(self) -> None:
        """Add the architecture's hooks (called once, by the engine)."""

    def pc(self) -> int:
        raise NotImplementedError

    def before_slice(self) -> None:
        """Called before every emulation slice of a normal run."""

    def before_run(self) -> VcpuExit | None:
        """Called at the start of every run, before any guest instruction: deliver
        pending events; an exit returned here ends the run at once."""
        return None

    def slice_budget(self, count: int) -> int:
        """The instruction budget of the next slice (the engine asks for
        ``count``); an ISA half watching for an event may ask for fewer."""
        return count

    def after_quiet_slice(self, start_pc: int) -> VcpuExit | None:
        """A slice ended with no hook and no halt: an exit the ISA half wants now
        (an interrupt window that opened), or None."""
        return None

    def port_exit(self) -> VcpuExit:
        raise NotImplementedError("port I/O is x86 only")

    def isa_exit(self) -> VcpuExit | None:
        """The exit for a :attr:`Stop.ISA` the ISA half recorded."""
        raise NotImplementedError

    def at_interrupt(self, intno: int) -> None:
        """Inside unicorn's interrupt hook, before the slice ends: look at what
        the engine forgets once it returns (x86: the error code)."""

    def interrupt_exit(self, intno: int) -> VcpuExit | None:
        """The exit for a CPU exception unicorn raised (``intno`` is its number),
        or None when it was handled and the guest goes on."""
        raise NotImplementedError

    def invalid_instruction_exit(self, pc: int) -> VcpuExit | None:
        return self.engine.internal_error(f"undefined instruction at {pc:#x}", pc)

    def halted(self, step_start: int | None) -> bool:
        """Whether the slice that just ended stopped on the halt instruction.
        ``step_start`` is the PC before a single step, None after a normal run."""
        raise NotImplementedError

    def complete(self, last: VcpuExit) -> bool:
        """Take what the VMM wrote into ``last`` (a read's data, a hypercall's
        result) before the guest runs again; True when ``last`` was this half's."""
        return False

    def forget_pending(self) -> None:
        """Drop any access waiting to be completed by re-execution."""

    def instruction_in_flight(self) -> bool:
        """An instruction reported an exit and completes on the next run (an x86
        port access): a kicked run finishes it before it stops, as KVM does."""
        return False

    def describe_access(self, gpa: int) -> tuple[bytes, int | None]:
        """For an exit before the instruction at the PC, which accesses ``gpa``:
        the instruction's bytes and the access's guest-virtual address (None
        where it cannot be worked out)."""
        raise NotImplementedError("exits before the instruction are x86 only")
