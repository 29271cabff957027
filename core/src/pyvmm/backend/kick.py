"""Kicking a vCPU out of the hypervisor, from any thread.

Setting a run page's ``immediate_exit`` stops only the *next* entry into the
guest; a thread already inside the hypervisor (a guest spinning, a vCPU waiting
in WFI/HLT) leaves only when a signal is pending for it.  :class:`SignalKicker`
does both, under the thread rules every device-file backend shares:

* **The kick follows the running thread.**  A vCPU may run on a thread other
  than the one that created it; the backend's ``run`` calls :meth:`SignalKicker.bind`
  when the calling thread changes, and the signal goes to that thread.
* **Never a dead thread.**  ``pthread_kill`` on the id of a thread that has
  exited is undefined behaviour (a crash, in practice).  Every bound thread
  registers a sentinel in its thread-local storage; CPython drops it while the
  thread is still alive but finishing, and the sentinel takes the thread off the
  live list under the same lock a kick holds while it signals.
* **Coalesced.**  At most one signal is in flight per vCPU: a kick flood sets
  ``immediate_exit`` over and over but signals once, until the vCPU reports the
  interruption (:meth:`SignalKicker.acknowledge`).
* **Safe against close.**  :meth:`SignalKicker.close` stops the vCPU for good:
  no run starts afterwards (it raises :class:`~pyvmm.errors.VmStateError`), a run
  under way is kicked until it has left the hypervisor, and only then does close
  return -- so the backend can release the run page and descriptor, and core can
  unmap guest RAM, knowing no vCPU is inside the guest.  After close a kick does
  nothing, so it can never touch a released run page.

A backend applies these rules by running every exit through
:meth:`SignalKicker.guard_run` (one closure around its own single run: the
thread check, the running flag, the closed check and the acknowledgement).

The signal needs a handler (the default action of a real-time signal kills the
process) and Python installs handlers only from the main thread: backends call
:func:`install_kick_handler` when a VM is created.  Nothing here touches a
POSIX-only name at import time.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from pyvmm.errors import VmStateError

E = TypeVar("E")

#: How long :meth:`SignalKicker.close` waits for a running vCPU to leave.
CLOSE_TIMEOUT = 5.0

_installed = False


def kick_signal() -> int:
    """The signal a kick sends: the first real-time signal where the host has
    them, else ``SIGUSR2``."""
    return int(getattr(signal, "SIGRTMIN", 0) or getattr(signal, "SIGUSR2", 0))


def _ignore_kick(signum: int, frame: object) -> None:
    """The kick only needs the blocked call to see a pending signal."""


def install_kick_handler() -> bool:
    """Install the kick signal's handler if possible; True once one is in place."""
    global _installed
    if _installed:
        return True
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_kill"):
        return False
    signal.signal(kick_signal(), _ignore_kick)
    _installed = True
    return True


def kick_handler_installed() -> bool:
    return _installed


# --- which threads are alive ------------------------------------------------------

_alive_lock: threading.Lock | None = threading.Lock()
_alive: set[int] = set()
_local = threading.local()


class _ThreadSentinel:
    """Lives in one thread's local storage; its finaliser runs on that thread as
    it finishes, before the OS thread is gone."""

    __slots__ = ("ident",)

    def __init__(self, ident: int) -> None:
        self.ident = ident

    def __del__(self) -> None:
        lock = _alive_lock
        if lock is None:  # interpreter shutdown has already cleared this module
            return
        with lock:
            _alive.discard(self.ident)


def _register_current_thread() -> int:
    ident = threading.get_ident()
    if getattr(_local, "sentinel", None) is None:
        with _require_lock():
            _alive.add(ident)
        _local.sentinel = _ThreadSentinel(ident)
    return ident


def _require_lock() -> threading.Lock:
    assert _alive_lock is not None
    return _alive_lock


def thread_alive(ident: int) -> bool:
    with _require_lock():
        return ident in _alive


# --- the kicker -------------------------------------------------------------------


class SignalKicker:
    """The kick of one vCPU: ``immediate_exit`` plus one coalesced signal to the
    thread running it.

    :param request_exit: sets the vCPU's ``immediate_exit`` (its run page's
        :meth:`~pyvmm.backend.run_page.RunPage.request_immediate_exit`).
    :param send_signal: ``pthread_kill`` (a seam's ``signal_thread``).
    :param backend: the backend's name, for errors.
    """

    __slots__ = ("_backend", "_lock", "_request_exit", "_send_signal", "_signalled", "closed", "running", "thread")

    def __init__(self, request_exit: Callable[[], None], send_signal: Callable[[int, int], None], backend: str) -> None:
        self._request_exit = request_exit
        self._send_signal = send_signal
        self._backend = backend
        self._lock = threading.Lock()
        self._signalled = False
        self.closed = False
        #: True while a run is under way (set and cleared by :meth:`guard_run`).
        self.running = False
        #: The thread the vCPU runs on (the creator until another thread runs it).
        self.thread = _register_current_thread()

    def bind(self) -> None:
        """Make the calling thread the one a kick signals.  The backend's ``run``
        calls this when ``threading.get_ident() != kicker.thread``."""
        ident = _register_current_thread()
        with self._lock:
            self.thread = ident

    def kick(self) -> None:
        """Make the vCPU's current or next run return promptly.  Any thread; idempotent."""
        with self._lock:
            if self.closed:
                return
            self._request_exit()
            target = self.thread
            if target == threading.get_ident() or self._signalled:
                return
            if not _installed:
                raise VmStateError(
                    f"cannot interrupt a running {self._backend} vCPU: the kick signal handler could not be "
                    "installed (create the VM from the main thread, or call "
                    "pyvmm.backend.install_kick_handler() there)"
                )
            with _require_lock():
                # Holding the lock keeps a finishing target from completing its exit
                # (its sentinel waits for it) until the signal is sent.
                if target in _alive:
                    self._send_signal(target, kick_signal())
                    self._signalled = True

    def acknowledge(self) -> None:
        """The vCPU returned an interruption: the next kick may signal again."""
        self._signalled = False

    def guard_run(self, run: Callable[[], E], interrupted: E) -> Callable[[], E]:
        """``run`` (one entry into the hypervisor) under the thread rules.

        The returned function is what the backend's vCPU exposes as ``run``:
        the kick follows the calling thread, ``running`` is set for the time
        the run takes (``close`` waits on it), a closed vCPU refuses to run,
        and an interruption (``interrupted``, the backend's one
        ``InterruptedExit``) re-arms the kick signal.
        """
        kicker = self
        get_ident = threading.get_ident

        def run_vcpu() -> E:
            if kicker.thread != get_ident():
                kicker.bind()
            kicker.running = True
            try:
                # After setting ``running``: close sets ``closed`` before reading
                # ``running``, so one of the two always sees the other.
                if kicker.closed:
                    raise VmStateError(f"this {kicker._backend} vCPU is closed")
                exit = run()
                if exit is interrupted:
                    kicker._signalled = False
                return exit
            finally:
                kicker.running = False

        return run_vcpu

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Stop the vCPU for good; return once no run is under way.

        :raises VmStateError: a run did not leave the hypervisor within
            ``timeout`` seconds; the caller must then keep every resource the
            vCPU could still touch (the run page, guest RAM).
        """
        with self._lock:
            self.closed = True
        if not self.running or self.thread == threading.get_ident():
            return
        deadline = time.monotonic() + timeout
        while self.running:
            # Kick it out, signalling again each round: a signal that arrived
            # between two runs is spent.
            with self._lock:
                self._request_exit()
                if _installed:
                    with _require_lock():
                        if self.thread in _alive:
                            self._send_signal(self.thread, kick_signal())
            if time.monotonic() > deadline:
                raise VmStateError(f"a {self._backend} vCPU did not leave the hypervisor within {timeout:g} s of close")
            time.sleep(0.0005)
