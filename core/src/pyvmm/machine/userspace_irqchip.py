"""Interrupts from interrupt controllers the machine emulates itself, into the
vCPU: for backends without the hypervisor's interrupt controllers (no
``IRQCHIP``) and when asked (``pyvmm run --irqchip userspace``).

The PC board (:mod:`pyvmm.machine.pc`) puts its own 8259 pair and 8254 on the
port bus and hands the pair to :class:`UserspaceIrqchip`, which delivers the
pair's INT output to vCPU 0 with the backend's ``INTERRUPT_INJECTION`` hooks, as
QEMU and crosvm do with their userspace PICs:

1. Before each entry into the guest, if the controller has an interrupt for the
   CPU: when the vCPU can take one (:meth:`pyvmm.vm.Vcpu.ready_for_interrupt`),
   run the acknowledge cycle and inject its vector
   (:meth:`pyvmm.vm.Vcpu.interrupt`); when it cannot (interrupts off, an
   interrupt shadow), or another interrupt still waits after the injection,
   request an interrupt window.  One injection per exit.
2. At the :class:`~pyvmm.exits.IrqWindowOpenExit` (or any exit while a window is
   requested) step 1 runs again; with nothing left to deliver the request is
   withdrawn.
3. An interrupt raised from another thread (the timer's) kicks the vCPU out of
   the guest (``IMMEDIATE_EXIT``), so step 1 runs promptly.
4. A ``hlt`` with interrupts enabled exits to the VMM (no local APIC in the
   hypervisor to sleep in): the vCPU thread waits until the controller has an
   interrupt, then step 1 wakes the guest.  With interrupts disabled, or nothing
   that could ever interrupt (``can_wake``), the vCPU has halted for good.

A hypervisor that never reports an interrupt window (this machine's software
hypervisor is one; its backend's notes in ``docs/backends/`` say so) still gets
its interrupts: while a window is requested, the timer thread kicks the vCPU
every :data:`WINDOW_POLL_NS`, and step 1 looks again at that exit.

The timer thread also runs the emulated timers: each one registered with
:meth:`UserspaceIrqchip.add_timer` says when it next has something to do and is
called then.

One vCPU only: the controller's output goes to one CPU; an SMP guest needs the
hypervisor's local APICs and IOAPIC (the PC board refuses ``cpus > 1`` without
them).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

from pyvmm.capabilities import Capability
from pyvmm.errors import PyvmmError
from pyvmm.exits import VcpuExit
from pyvmm.lazy_logging import LazyLogger
from pyvmm.machine.board import MachineEvents
from pyvmm.vm import Backend, Vcpu

# Loads logging only when a record goes out (start-up time).
log = LazyLogger("pyvmm.machine")

#: While an interrupt window is requested and no exit has come, kick the vCPU
#: this often, for hypervisors that do not report the window (10 ms).
WINDOW_POLL_NS = 10_000_000


class InterruptController(Protocol):
    """What the delivery needs of an emulated interrupt controller (the 8259 pair)."""

    def has_interrupt(self) -> bool:
        """Its INT output: an interrupt waits for the CPU."""
        ...

    def acknowledge(self) -> int | None:
        """The acknowledge cycle: the vector to deliver (None: nothing after all)."""
        ...


class UserspaceIrqchip:
    """An emulated interrupt controller's way into vCPU 0, and the timer thread.

    :param backend: needs ``INTERRUPT_INJECTION``; ``IMMEDIATE_EXIT`` lets interrupts
        from other threads preempt a running guest.
    :param events: the runner's wait and wake (for a halted vCPU).
    :param controller: the interrupt controller; call :meth:`output_changed` after
        any change that may have raised its output.
    :param can_wake: whether anything can still raise an interrupt while the vCPU
        sleeps in ``hlt`` (a timer that runs, unmasked); None: something always can.
    :param clock: host time in ns.
    :param timer_thread: run the timers and the window poll on a thread of their
        own (tests call :meth:`tick` by hand instead).
    """

    def __init__(
        self,
        backend: Backend,
        events: MachineEvents,
        controller: InterruptController,
        *,
        can_wake: Callable[[], bool] | None = None,
        clock: Callable[[], int] = time.monotonic_ns,
        timer_thread: bool = True,
    ) -> None:
        backend.require(Capability.INTERRUPT_INJECTION, "the userspace interrupt controller")
        self._events = events
        self._controller = controller
        self._can_wake = can_wake
        self._clock = clock
        self._can_kick = backend.supports(Capability.IMMEDIATE_EXIT)
        self._timers: list[tuple[Callable[[], int | None], Callable[[], object]]] = []
        #: Held while the timers fire (:meth:`timers_held`).
        self._firing = threading.Lock()
        self._vcpu: Vcpu | None = None
        #: An interrupt waits at the controller's output (a hint; the controller decides).
        self._pending = False
        #: Look at the controller before the next entry into the guest.
        self._attention = False
        self._window = False
        self._window_poll_at: int | None = None
        self._waiting = False
        self._timer = _TimerThread(self) if timer_thread else None
        self._error: BaseException | None = None
        self._closed = False
        #: Counts, for tests and reports.
        self.injected = 0
        self.windows_requested = 0

    def add_timer(self, next_deadline: Callable[[], int | None], expire: Callable[[], object]) -> None:
        """Run ``expire()`` on the timer thread at ``next_deadline()`` (host ns; None:
        nothing to do).  Call :meth:`timer_changed` when the deadline moves."""
        self._timers.append((next_deadline, expire))

    # --- the vCPU side ------------------------------------------------------------
    def attach(self, vcpu: Vcpu) -> None:
        """Deliver to ``vcpu`` (on its thread, before it runs)."""
        if self._vcpu is not None and self._vcpu is not vcpu:
            raise PyvmmError("the userspace interrupt controller drives one vCPU")
        self._vcpu = vcpu
        self._attention = self._pending

    def run_function(self, vcpu: Vcpu, run: Callable[[], VcpuExit]) -> Callable[[], VcpuExit]:
        """``run`` with step 1 before each entry (one attribute test when there is
        nothing to do)."""
        deliver = self._deliver

        def run_with_interrupts() -> VcpuExit:
            if self._attention:
                if self._error is not None:
                    raise self._error
                deliver(vcpu)
            return run()

        return run_with_interrupts

    def _deliver(self, vcpu: Vcpu) -> None:
        self._attention = False  # a change from now on sets it again
        controller = self._controller
        want_window = False
        if controller.has_interrupt():
            if vcpu.ready_for_interrupt():
                vector = controller.acknowledge()
                if vector is not None:
                    vcpu.interrupt(vector)
                    self.injected += 1
                # One per exit: another one waits for the next window.
                want_window = controller.has_interrupt()
            else:
                want_window = True
        self._pending = controller.has_interrupt()
        if want_window != self._window:
            vcpu.request_interrupt_window(want_window)
            self._window = want_window
            if want_window:
                self.windows_requested += 1
        if want_window:
            self._attention = True  # the next exit, whichever it is, looks again
            self._window_poll_at = self._clock() + WINDOW_POLL_NS
            self.timer_changed()
        else:
            self._window_poll_at = None

    def wait_for_interrupt(self, vcpu: Vcpu) -> bool:
        """Step 4: the vCPU executed ``hlt``."""
        if not vcpu.ready_for_interrupt():
            return False  # interrupts disabled: only an NMI or a reset could wake it
        if not self._pending and self._can_wake is not None and not self._can_wake():
            return False
        self._waiting = True
        try:
            self._events.wait_for(lambda: self._pending or self._error is not None, None)
        finally:
            self._waiting = False
        self._attention = True
        return True

    # --- changes from any thread ----------------------------------------------------
    def output_changed(self) -> None:
        """The controller's output may have changed (any thread)."""
        pending = self._controller.has_interrupt()
        self._pending = pending
        if not pending:
            return
        self._attention = True
        vcpu = self._vcpu
        if self._waiting:
            self._events.wake()
        elif vcpu is not None and self._can_kick and threading.get_ident() != vcpu.thread_id:
            # From another thread: get the vCPU out of the guest so step 1 runs.
            self._kick(vcpu)

    def _kick(self, vcpu: Vcpu) -> None:
        try:
            vcpu.kick()
        except PyvmmError as exc:  # a vCPU closing under us needs no kick
            log.debug("kick of vCPU %d failed: %s", vcpu.index, exc)

    def timer_changed(self) -> None:
        """A timer's deadline moved: the timer thread looks again."""
        if self._timer is not None and not self._closed:
            self._timer.poke()

    # --- the timer thread ----------------------------------------------------------
    def next_deadline(self) -> int | None:
        """When :meth:`tick` has something to do next (host ns), or None."""
        deadlines = [next_deadline() for next_deadline, _ in self._timers]
        deadlines.append(self._window_poll_at)
        due = [d for d in deadlines if d is not None]
        return min(due) if due else None

    def tick(self) -> None:
        """Run the timers that are due, and kick a vCPU whose interrupt window is
        overdue (the timer thread calls this at :meth:`next_deadline`)."""
        with self._firing:
            now = self._clock()
            for next_deadline, expire in self._timers:
                deadline = next_deadline()
                if deadline is not None and deadline <= now:
                    expire()
        poll_at = self._window_poll_at
        vcpu = self._vcpu
        if poll_at is not None and now >= poll_at:
            self._window_poll_at = now + WINDOW_POLL_NS
            if vcpu is not None and self._can_kick and not self._waiting:
                self._kick(vcpu)

    def timers_held(self) -> AbstractContextManager[object]:
        """While held (any thread), no timer fires: one already firing finishes
        first, and one due meanwhile fires after, from its state then.  So a tick
        decided on a timer's earlier state never lands in a controller loaded
        since (a restore loading the 8259s and 8254 again as the guest starts)."""
        return self._firing

    def timer_failed(self, exc: BaseException) -> None:
        """The timer thread raised: the vCPU thread raises it at its next entry,
        and the run ends with it (nothing is swallowed)."""
        self._error = exc
        self._attention = True
        vcpu = self._vcpu
        if vcpu is not None and self._can_kick:
            self._kick(vcpu)
        self._events.wake()

    def close(self) -> None:
        """Stop the timer thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.stop()


class _TimerThread:
    """One daemon thread that sleeps until the chip's next deadline, started the
    first time there is one."""

    def __init__(self, chip: UserspaceIrqchip) -> None:
        self._chip = chip
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._changed = False

    def poke(self) -> None:
        with self._cond:
            if self._stopping:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pyvmm-pit", daemon=True)
                self._thread.start()
            self._changed = True
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)

    def _poked(self) -> bool:
        return self._changed or self._stopping

    def _stop_requested(self) -> bool:
        return self._stopping

    def _run(self) -> None:
        chip = self._chip
        clock = chip._clock
        while True:
            with self._cond:
                if self._stopping:
                    return
                self._changed = False
                deadline = chip.next_deadline()
                now = clock()
                if deadline is None or deadline > now:
                    timeout = None if deadline is None else (deadline - now) / 1e9
                    if self._cond.wait_for(self._poked, timeout):
                        if self._stop_requested():
                            return
                        if deadline is None or clock() < deadline:
                            continue  # reprogrammed: compute the deadline again
            try:
                chip.tick()
            except BaseException as exc:  # noqa: BLE001 - handed to the vCPU thread, which raises it
                chip.timer_failed(exc)
                return
