"""One run of a machine: a thread per vCPU, and the rule of when the run ends.

:meth:`Runner.run` starts one thread per vCPU.  Each thread creates its own vCPU
(vCPU calls must come from the thread that created it), lets the board prepare
it (:meth:`~pyvmm.machine.board.Board.prepare_vcpu`), applies its boot registers,
waits until every vCPU is ready, and enters :func:`~pyvmm.machine.vcpu_loop.run_loop`.
Once all are ready the VM is started (where the backend needs that) and they go.

The first stop request wins: a guest exit (debug port, power-off, reset, triple
fault, system event such as PSCI SYSTEM_OFF, emulation failure, an exit nothing
answers), ``timeout``, Ctrl-C, or an exception in a device or the backend.  It
sets the flag every loop checks on each exit and kicks every running vCPU out of
the hypervisor (``IMMEDIATE_EXIT``), so a vCPU waiting in the guest (an AP that
never got a SIPI, a guest spinning) stops too.  Which exit ends the run is
decided here, in :meth:`Runner._other_exit`, and nowhere else; the board only
answers the exits a guest waits on.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from types import FrameType
from typing import TYPE_CHECKING, Protocol

from pyvmm.capabilities import Capability
from pyvmm.errors import PyvmmError, VmStateError
from pyvmm.exits import ExitKind, FailEntryExit, InternalErrorExit, SystemEvent, SystemEventExit, VcpuExit
from pyvmm.lazy_logging import LazyLogger
from pyvmm.machine.board import Board, MachineEvents
from pyvmm.machine.bus import MmioBus, PortBus
from pyvmm.machine.coalesced_io import CoalescedDevices
from pyvmm.machine.config import MachineConfig
from pyvmm.machine.doorbells import Doorbells
from pyvmm.machine.outcome import (
    STATUS_CLEAN,
    STATUS_ERROR,
    STATUS_GUEST_FAILED,
    STATUS_INTERRUPTED,
    STATUS_TIMEOUT,
    RunResult,
    StopReason,
)
from pyvmm.machine.served_devices import serve_device_registers
from pyvmm.machine.vcpu_loop import StopFlag, guest_pc, run_loop
from pyvmm.vm import Vcpu, Vm

if TYPE_CHECKING:
    from pyvmm.machine.stats import VcpuStats

# Loads logging only when a record goes out (start-up time).
log = LazyLogger("pyvmm.machine")

#: How long to wait for a kicked vCPU thread to leave the hypervisor.
JOIN_GRACE_SECONDS = 10.0


class Debugger(Protocol):
    """What the runner asks of a debugger (:mod:`pyvmm.gdbstub`); each call comes
    from the thread named."""

    def vcpu_started(self, vcpu: Vcpu) -> None:
        """On the vCPU's thread, before its first instruction: may block."""

    def vcpu_exit(self, vcpu: Vcpu, exit_: VcpuExit) -> bool:
        """On the vCPU's thread, for a debug exit or a kick: may block; True ends the vCPU's loop."""

    def machine_stopping(self, status: int) -> None:
        """From any thread (a signal handler too): the run is ending with
        ``status``; let every vCPU go."""


class RunAborted(PyvmmError):
    """Code running for the guest (a backend hook or a device) raised something
    that is not an error, such as ``SystemExit``; ``__cause__`` is what it raised.
    The run ends as an error, never with a guest result it did not get."""


def _new_stats(count: int) -> list[VcpuStats]:
    """Exit counters for ``count`` vCPUs.  :mod:`pyvmm.machine.stats` is imported
    only by the runs that count (``stats``, the status line): a start-up cost."""
    from pyvmm.machine.stats import VcpuStats

    return [VcpuStats(i) for i in range(count)]


class Runner:
    """The vCPU threads of one machine's single run, and its stop state.

    :param vm: the VM, built by the board.
    :param config: ``cpus``, ``timeout`` and ``stats`` are read.
    :param irqchip: the hypervisor wakes halted vCPUs, so a halt exit is spurious.
    """

    def __init__(self, vm: Vm, config: MachineConfig, pio: PortBus, mmio: MmioBus, *, irqchip: bool) -> None:
        self.vm = vm
        self.cpus = config.cpus
        self.timeout = config.timeout
        self.pio = pio
        self.mmio = mmio
        self.irqchip = irqchip
        self._flag = StopFlag()
        self._cond = threading.Condition(threading.RLock())
        self._result: RunResult | None = None
        self._error: BaseException | None = None
        self._running: dict[int, Vcpu] = {}
        self._ready = 0
        self._go = False
        self._halted = 0
        self._can_kick = vm.backend.supports(Capability.IMMEDIATE_EXIT)
        self._stats = _new_stats(config.cpus) if config.stats else None
        self._report_stats = config.stats
        #: A debugger (the gdb stub) that stops vCPUs: set before :meth:`run`.
        self.debugger: Debugger | None = None
        self._board: Board | None = None
        self._coalesced: CoalescedDevices | None = None
        #: A vCPU thread did not leave the hypervisor: the VM must stay open.
        self.stuck_threads = False
        #: Called on each vCPU's thread after its boot state, before it runs
        #: (a restored machine sets the snapshot's state there).
        self.vcpu_ready: Callable[[Vcpu], None] | None = None
        #: Called on each vCPU's thread when its loop ended (a machine saving a
        #: snapshot reads the vCPU's state there, where its calls must come from).
        self.vcpu_stopped: Callable[[Vcpu], None] | None = None
        #: Called on the thread of :meth:`run` once every vCPU is ready, before
        #: any runs (a restored machine sets the hypervisor's irqchip and clock
        #: there: a hypervisor delivers what an IOAPIC image holds pending to vCPUs that exist).
        self.vcpus_ready: Callable[[], None] | None = None
        #: The vCPUs whose run was stopped while they waited in ``hlt`` for the
        #: board's own interrupt controllers (their RIP is past the ``hlt``):
        #: a snapshot records them, and its restore starts them waiting.
        self.stopped_in_hlt: set[int] = set()
        #: The vCPUs that start in that wait instead of entering the guest (a
        #: restored machine's :attr:`stopped_in_hlt`): as after their ``hlt``
        #: exit, the board's controllers wake them; set before :meth:`run`.
        self.start_in_hlt_wait: frozenset[int] = frozenset()
        #: Stop with ``StopReason.SNAPSHOT`` after this many seconds (None: never).
        self.snapshot_after: float | None = None
        self.events = MachineEvents(
            debug_exit=self._on_debug_exit,
            poweroff=self._on_poweroff,
            reset=self._on_reset,
            current_vcpu=self._current_vcpu,
            wait=self._wait,
            wait_for=self._wait_for,
            wake=self._wake,
        )

    # --- running ----------------------------------------------------------------
    def run(self, board: Board) -> RunResult:
        """Run every vCPU until the first stop request; ``board`` prepares each vCPU
        and answers the exits it knows.

        :raises DeviceError: a device raised (the cause is chained).
        :raises PyvmmError: the backend failed.
        """
        self._board = board
        coalesced = CoalescedDevices(self.vm, self.pio, self.mmio)
        self._coalesced = coalesced if coalesced.register() else None
        serve_device_registers(self.vm, self.pio, self.mmio)
        doorbells = Doorbells(self.vm, self.pio, self.mmio, self._fail)
        cpus = self.cpus
        threads = [
            threading.Thread(target=self._vcpu_thread, args=(i,), name=f"pyvmm-vcpu-{i}", daemon=True)
            for i in range(cpus)
        ]
        restore_sigint = self._catch_sigint()
        try:
            if doorbells.register():
                doorbells.start()
            for thread in threads:
                thread.start()
            with self._cond:
                self._cond.wait_for(lambda: self._ready == cpus or self._flag.stopping)
            if not self._flag.stopping:
                try:
                    self.vm.start()
                    if self.vcpus_ready is not None:
                        self.vcpus_ready()
                except BaseException as exc:  # noqa: BLE001 - whatever it is ends the run and is re-raised
                    self._fail(exc)
            with self._cond:
                self._go = True
                self._cond.notify_all()
                stopped = self._cond.wait_for(lambda: self._flag.stopping, self._first_deadline())
            if not stopped and self._snapshot_due():
                self.request_stop(StopReason.SNAPSHOT, STATUS_CLEAN, f"snapshot after {self.snapshot_after:g} s")
            elif not stopped:
                self.request_stop(StopReason.TIMEOUT, STATUS_TIMEOUT, f"timeout after {self.timeout:g} s")
        except BaseException as exc:
            self._fail(exc)
            raise
        finally:
            self._join(threads)
            restore_sigint()
            doorbells.close()
            self._close_devices()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        if self._stats is not None and self._report_stats:
            from pyvmm.machine.stats import MachineStats  # see _new_stats

            return replace(self._result, stats=MachineStats(self._stats))
        return self._result

    @property
    def stop_reason(self) -> StopReason | None:
        """Why the run is stopping, once a stop was requested."""
        with self._cond:
            return None if self._result is None else self._result.reason

    def _first_deadline(self) -> float | None:
        """Seconds until the run is stopped from here: the timeout, or the
        snapshot if it comes first."""
        times = [t for t in (self.timeout, self.snapshot_after) if t is not None]
        return min(times) if times else None

    def _snapshot_due(self) -> bool:
        return self.snapshot_after is not None and (self.timeout is None or self.snapshot_after < self.timeout)

    def count_exits(self) -> Callable[[], tuple[int, int]]:
        """From the next :meth:`run` on, count exits and time in the guest (as
        ``stats`` does); returns a function that reads (exits, guest ns) so far,
        from any thread."""
        if self._stats is None:
            self._stats = _new_stats(self.cpus)
        stats = self._stats
        return lambda: (sum(v.exits for v in stats), sum(v.guest_ns for v in stats))

    def _vcpu_thread(self, index: int) -> None:
        assert self._board is not None
        try:
            vcpu = self.vm.create_vcpu(index)
            self._board.prepare_vcpu(vcpu)
            vcpu.apply_boot()
            if self.vcpu_ready is not None:
                self.vcpu_ready(vcpu)
            with self._cond:
                self._ready += 1
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._go or self._flag.stopping)
                if self._flag.stopping:
                    return
                self._running[index] = vcpu
            try:
                if self.debugger is not None:
                    self.debugger.vcpu_started(vcpu)  # waits while the debugger holds the guest
                self._loop(vcpu)
                if self.vcpu_stopped is not None:
                    self.vcpu_stopped(vcpu)
            finally:
                with self._cond:
                    del self._running[index]
        except BaseException as exc:  # noqa: BLE001 - a vCPU thread reports everything to run()
            self._fail(exc)

    def _loop(self, vcpu: Vcpu) -> None:
        assert self._board is not None
        if vcpu.index in self.start_in_hlt_wait and self._resume_in_hlt_wait(vcpu):
            return  # nothing can wake it: halted for good, as it would be after its hlt exit
        interrupts = self._board.interrupts  # the board's own interrupt controllers, if any
        if self._stats is None:
            run = vcpu.run if self._coalesced is None else self._coalesced.draining(vcpu.run)
            run = run if interrupts is None else interrupts.run_function(vcpu, run)
            run_loop(vcpu, run, flag=self._flag, pio=self.pio, mmio=self.mmio, other_exit=self._other_exit)
            return
        stats = self._stats[vcpu.index]
        start = time.perf_counter_ns()
        try:
            run = stats.timed(vcpu.run)
            if self._coalesced is not None:
                run = self._coalesced.draining(run)
            if interrupts is not None:
                run = interrupts.run_function(vcpu, run)
            run_loop(vcpu, run, flag=self._flag, pio=self.pio, mmio=self.mmio, other_exit=self._other_exit)
        finally:
            stats.wall_ns = time.perf_counter_ns() - start

    def _current_vcpu(self) -> Vcpu:
        """The vCPU of the calling thread (a device asking on behalf of the guest)."""
        me = threading.get_ident()
        with self._cond:
            for vcpu in self._running.values():
                if vcpu.thread_id == me:
                    return vcpu
        raise VmStateError("not called from a running vCPU's thread")

    def _wait(self, seconds: float | None) -> bool:
        """Block for ``seconds`` (None: until the run stops); False once the run is stopping."""
        with self._cond:
            return not self._cond.wait_for(lambda: self._flag.stopping, seconds)

    def _wait_for(self, predicate: Callable[[], bool], seconds: float | None) -> bool:
        """Block until ``predicate()``, the run stops or ``seconds`` pass; returns ``predicate()``."""
        with self._cond:
            self._cond.wait_for(lambda: predicate() or self._flag.stopping, seconds)
            return predicate()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _join(self, threads: list[threading.Thread]) -> None:
        deadline = time.monotonic() + JOIN_GRACE_SECONDS
        for thread in threads:
            if thread.ident is not None:
                thread.join(max(deadline - time.monotonic(), 0.0))
            if thread.is_alive():
                self.stuck_threads = True
        if self.stuck_threads:
            how = "did not leave" if self._can_kick else "cannot be kicked out of (no IMMEDIATE_EXIT)"
            log.warning("a vCPU %s the hypervisor; its VM is left open", how)

    def _close_devices(self) -> None:
        if self.stuck_threads:
            return  # a vCPU still in the guest may yet call into a device: leave them open
        for bus in (self.pio, self.mmio):
            for device in bus.devices():
                try:
                    device.close()
                except Exception:
                    log.exception("closing device %r failed", device)

    # --- stopping ---------------------------------------------------------------
    def request_stop(self, reason: StopReason, status: int, detail: str = "", code: int | None = None) -> None:
        """End the run (the first request wins) and kick every vCPU out of the guest.
        Safe from any thread and from a signal handler."""
        with self._cond:
            if self._result is not None:
                return
            self._result = RunResult(reason, status, detail, code)
            self._flag.stopping = True
            if self._can_kick:
                for vcpu in self._running.values():
                    try:
                        vcpu.kick()
                    except PyvmmError as exc:  # a vCPU closing under us needs no kick
                        log.debug("kick of vCPU %d failed: %s", vcpu.index, exc)
            self._cond.notify_all()
        if self.debugger is not None:
            self.debugger.machine_stopping(status)

    def _fail(self, exc: BaseException) -> None:
        if not isinstance(exc, (Exception, KeyboardInterrupt)):
            # SystemExit (or any other non-error) from a hook or a device would
            # otherwise reach the caller as "the program is exiting normally",
            # and `pyvmm run` would report a guest result it never got.
            wrapped = RunAborted(f"the run was aborted by {type(exc).__name__}({exc}) raised while the guest ran")
            wrapped.__cause__ = exc
            exc = wrapped
        with self._cond:
            # Even after a clean stop: an error is never swallowed.
            if self._error is None:
                self._error = exc
        self.request_stop(StopReason.ERROR, STATUS_ERROR, f"{type(exc).__name__}: {exc}")

    def _on_debug_exit(self, code: int, status: int) -> None:
        self.request_stop(StopReason.DEBUG_EXIT, status, f"debug-exit code {code:#x}", code)

    def _on_poweroff(self) -> None:
        self.request_stop(StopReason.POWEROFF, STATUS_CLEAN, "the guest powered off")

    def _on_reset(self) -> None:
        self.request_stop(StopReason.RESET, STATUS_CLEAN, "the guest reset the machine (pyvmm does not reboot)")

    def _catch_sigint(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def on_sigint(signum: int, frame: FrameType | None) -> None:
            self.request_stop(StopReason.INTERRUPTED, STATUS_INTERRUPTED, "interrupted (Ctrl-C)")

        previous = signal.signal(signal.SIGINT, on_sigint)

        def restore() -> None:
            signal.signal(signal.SIGINT, previous)

        return restore

    def timers_held(self) -> AbstractContextManager[object]:
        """While held, the board's own timers do not fire (nothing to hold with
        the hypervisor's irqchip); during :meth:`run`."""
        interrupts = None if self._board is None else self._board.interrupts
        return nullcontext() if interrupts is None else interrupts.timers_held()

    # --- exits other than port and MMIO I/O ----------------------------------------
    def _other_exit(self, vcpu: Vcpu, exit_: VcpuExit) -> bool:
        """Which exit ends the run: True stops this vCPU's loop."""
        kind = exit_.kind
        if self.debugger is not None and (kind is ExitKind.DEBUG or kind is ExitKind.INTERRUPTED):
            return self.debugger.vcpu_exit(vcpu, exit_)
        if kind is ExitKind.INTERRUPTED or kind in (ExitKind.IRQ_WINDOW_OPEN, ExitKind.IOAPIC_EOI, ExitKind.OTHER):
            return False
        where = f"vCPU {vcpu.index}"
        if kind is ExitKind.HLT:
            if self.irqchip:
                return False  # the hypervisor wakes it; an exit here is spurious
            return self._wait_in_hlt(vcpu)
        if kind is ExitKind.SHUTDOWN:
            self.request_stop(StopReason.TRIPLE_FAULT, STATUS_GUEST_FAILED, f"{where}: triple fault{_pc(vcpu)}")
            return True
        if isinstance(exit_, SystemEventExit):
            self._system_event(where, exit_)
            return True
        if isinstance(exit_, InternalErrorExit):
            text = internal_error_text(where + _pc(vcpu), exit_)
            self.request_stop(StopReason.EMULATION_ERROR, STATUS_GUEST_FAILED, text)
            return True
        if isinstance(exit_, FailEntryExit):
            self.request_stop(
                StopReason.ENTRY_FAILED,
                STATUS_GUEST_FAILED,
                f"{where}: the hypervisor could not enter the guest (hardware reason {exit_.reason:#x})",
            )
            return True
        assert self._board is not None
        if self._board.answer_exit(vcpu, exit_):
            return False
        self.request_stop(StopReason.UNEXPECTED_EXIT, STATUS_GUEST_FAILED, f"{where}: unexpected exit {exit_!r}")
        return True

    def _resume_in_hlt_wait(self, vcpu: Vcpu) -> bool:
        """:meth:`_wait_in_hlt` for a restored ``vcpu`` that was saved in it,
        before it runs any guest code."""
        # The wait asks the backend whether the vCPU takes an interrupt, which
        # the backend answers from the vCPU's last exit, and a restored vCPU has
        # had none.  A run that enters no guest code gives it one, in the state
        # its hlt exit left (the backend notes, snapshots, say where each
        # hypervisor reports it on such a run).
        from pyvmm.snapshot import settle_vcpu  # only restored machines get here

        settle_vcpu(vcpu)
        return self._wait_in_hlt(vcpu)

    def _wait_in_hlt(self, vcpu: Vcpu) -> bool:
        """``vcpu`` executed ``hlt`` (RIP is past it): wait until the board's own
        interrupt controllers have an interrupt for it, which the next entry
        delivers.  True: nothing can wake it, its loop ends."""
        assert self._board is not None
        interrupts = self._board.interrupts
        if interrupts is not None and interrupts.wait_for_interrupt(vcpu):
            if self._flag.stopping:
                self.stopped_in_hlt.add(vcpu.index)
            return False  # woken by an interrupt of the board's own controllers (or the stop)
        with self._cond:
            self._halted += 1
            if self._halted == self.cpus:
                self.request_stop(StopReason.HALTED, STATUS_CLEAN, "every vCPU halted, with nothing to wake it")
        return True

    def _system_event(self, where: str, event: SystemEventExit) -> None:
        if event.event is SystemEvent.SHUTDOWN:
            self.request_stop(StopReason.POWEROFF, STATUS_CLEAN, f"{where}: the guest powered off")
        elif event.event is SystemEvent.RESET:
            self._on_reset()
        else:
            self.request_stop(StopReason.CRASHED, STATUS_GUEST_FAILED, f"{where}: the guest crashed {event.data}")


def _pc(vcpu: Vcpu) -> str:
    pc = guest_pc(vcpu)
    return f" at {pc}" if pc else ""


def internal_error_text(where: str, exit_: InternalErrorExit) -> str:
    what = exit_.description or f"internal error, suberror {exit_.suberror}"
    if exit_.instruction:
        return f"{where}: the hypervisor failed: {what}; instruction bytes: {exit_.instruction.hex(' ')}"
    return f"{where}: the hypervisor failed: {what} (instruction bytes not reported)"
