"""The board interface: everything of a machine that depends on the guest architecture.

A board decides where RAM goes, which devices sit where on the buses, how the
boot image (with its firmware or device tree) goes into RAM, what each vCPU
needs on its own thread before it runs (x86 CPUID), and how the exits a guest
waits on that are neither device accesses nor stops are answered (CPUID, MSRs,
hypercalls).  The PC (:mod:`pyvmm.machine.pc`) and ``virt``
(:mod:`pyvmm.machine.virt`) implement :class:`Board`.

The rest is shared and lives elsewhere: :class:`~pyvmm.machine.machine.Machine`
owns the VM, the buses and the console and picks the board for the guest
architecture; :mod:`pyvmm.machine.runner` runs the vCPU threads and decides when
the run ends.  So a new device touches its device file and one board file, and a
board never decides that a run is over: it reports events through
:class:`MachineEvents`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, BinaryIO, ClassVar, Protocol

from pyvmm.capabilities import Capability
from pyvmm.config import Arch
from pyvmm.errors import ConfigError
from pyvmm.lean_dataclass import lean_dataclass

if TYPE_CHECKING:
    from pyvmm.exits import VcpuExit
    from pyvmm.machine.bus import MmioBus, PortBus
    from pyvmm.machine.config import MachineConfig
    from pyvmm.machine.images import Aarch64BootSource, BootSource
    from pyvmm.vm import Backend, Vcpu, Vm


@lean_dataclass(frozen=True)
class MachineEvents:
    """What a board's devices and firmware ask of the running machine; the runner
    answers.  Each may be called from any vCPU thread."""

    #: ``(code, status)``: the guest wrote ``code`` to a debug-exit device.
    debug_exit: Callable[[int, int], None]
    #: The guest powered the machine off.
    poweroff: Callable[[], None]
    #: The guest reset the machine.
    reset: Callable[[], None]
    #: The vCPU of the calling thread (a device acting on behalf of the guest).
    current_vcpu: Callable[[], Vcpu]
    #: Block for ``seconds`` (None: until the run stops); False once the run is stopping.
    wait: Callable[[float | None], bool]
    #: ``wait_for(predicate, seconds)``: block until ``predicate()`` is true, the
    #: run stops or ``seconds`` pass (None: no limit); returns ``predicate()``.
    #: Whoever makes the predicate true calls :attr:`wake`.
    wait_for: Callable[[Callable[[], bool], float | None], bool]
    #: Wake the threads blocked in :attr:`wait_for`, to look at their predicates again.
    wake: Callable[[], None]


@lean_dataclass(frozen=True)
class BoardParts:
    """What the machine hands a board to build on."""

    config: MachineConfig
    backend: Backend
    #: The VM, created for the board's architecture with ``config.cpus`` vCPUs.
    vm: Vm
    pio: PortBus
    mmio: MmioBus
    #: Whether the hypervisor emulates the interrupt controllers (configured and supported).
    irqchip: bool
    events: MachineEvents
    #: Whether the board emulates the interrupt controllers and timer itself and
    #: injects their interrupts (``--irqchip userspace``; never with ``irqchip``).
    userspace_irqchip: bool = False


class InterruptDelivery(Protocol):
    """How a board that emulates the interrupt controllers itself gets their
    interrupts into a vCPU (:class:`~pyvmm.machine.userspace_irqchip.UserspaceIrqchip`).
    The runner calls both on the vCPU's thread."""

    def run_function(self, vcpu: Vcpu, run: Callable[[], VcpuExit]) -> Callable[[], VcpuExit]:
        """``run`` with the interrupt delivery before each entry into the guest."""
        ...

    def wait_for_interrupt(self, vcpu: Vcpu) -> bool:
        """The vCPU halted: block until an interrupt can wake it (True, and the next
        run delivers it) or the run stops (True too: the loop sees the stop).
        False: nothing can wake it (interrupts disabled, no timer running)."""
        ...

    def timers_held(self) -> AbstractContextManager[object]:
        """While held (any thread), the controllers' timers do not fire."""
        ...


def interrupt_controllers(mode: str, backend: Backend, arch: Arch) -> tuple[bool, bool]:
    """``(in the hypervisor, in userspace)`` for the machine setting ``irqchip``:
    ``kernel`` the hypervisor's (``IRQCHIP``), ``userspace`` the board's own 8259s
    and 8254 (x86_64, ``INTERRUPT_INJECTION``), ``none`` neither, ``auto`` the
    hypervisor's where it has them, else the board's where the backend can inject.

    :raises UnsupportedCapability: ``kernel`` or ``userspace`` on a backend that lacks it.
    :raises ConfigError: ``userspace`` for a guest other than x86_64.
    """
    if mode == "none":
        return False, False
    if mode == "kernel":
        backend.require(Capability.IRQCHIP, "irqchip = kernel (the hypervisor's interrupt controllers)")
        return True, False
    userspace_possible = arch is Arch.X86_64 and backend.supports(Capability.INTERRUPT_INJECTION)
    if mode == "userspace":
        if arch is not Arch.X86_64:
            raise ConfigError(f"irqchip: the userspace interrupt controller is the PC's (x86_64), not {arch.value}")
        backend.require(Capability.INTERRUPT_INJECTION, "irqchip = userspace (pyvmm's 8259s and 8254)")
        return False, True
    if backend.supports(Capability.IRQCHIP):
        return True, False
    return False, userspace_possible


class Board(ABC):
    """One guest architecture's machine: its RAM layout, devices and boot.

    The machine calls, in order: :meth:`check` (before any VM exists), the
    constructor, :meth:`build`; then, during the run, :meth:`prepare_vcpu` on each
    vCPU's thread and :meth:`answer_exit` for exits the runner does not decide;
    :meth:`close` once the VM is closed.
    """

    #: The guest architecture the board is for.
    arch: ClassVar[Arch]

    @classmethod
    @abstractmethod
    def check(cls, config: MachineConfig, backend: Backend, irqchip: bool) -> None:
        """Refuse what this board cannot build, before the VM is created.

        :raises ConfigError: a setting the board cannot honour on ``backend``.
        :raises UnsupportedCapability: ``backend`` lacks what the board needs.
        """

    def __init__(self, parts: BoardParts) -> None:
        self.config = parts.config
        self.backend = parts.backend
        self.vm = parts.vm
        self.pio = parts.pio
        self.mmio = parts.mmio
        self.irqchip = parts.irqchip
        self.userspace_irqchip = parts.userspace_irqchip
        self.events = parts.events
        #: The board's own interrupt delivery, where it emulates the interrupt
        #: controllers (``userspace_irqchip``); set by :meth:`build`.
        self.interrupts: InterruptDelivery | None = None

    @abstractmethod
    def build(self, image: BootSource | Aarch64BootSource | None, serial: BinaryIO | None) -> None:
        """Map RAM, create the irqchip where wanted, put the devices on the buses,
        load ``image`` (None: ``config.kernel``, else the demo guest) and hand the
        VM its boot.  ``serial`` is the console's output (None: discarded).

        :raises ConfigError: an image of another architecture, or one the board
            or the hypervisor cannot take.
        """

    def prepare_vcpu(self, vcpu: Vcpu) -> None:  # noqa: B027 - optional step, most boards need nothing
        """Set up ``vcpu`` on its own thread, before its boot registers are applied."""

    @abstractmethod
    def answer_exit(self, vcpu: Vcpu, exit_: VcpuExit) -> bool:
        """Answer an exit the guest waits on that is neither a device access nor
        a reason to stop (CPUID, MSRs, hypercalls), filling in the exit's result
        fields.  False: not an exit this board answers, so the run stops on it."""

    def close(self) -> None:  # noqa: B027 - optional step, most boards hold nothing
        """Release what the board holds outside the VM.  Called once the VM is
        closed, since a vCPU still in the guest could otherwise use it."""
