"""The kick of a HAXM vCPU: through the tunnel, then out of the guest.

HAXM has no ``immediate_exit`` byte; its tunnel has two fields that do the job
(``docs/backends/haxm.md`` §7.4):

* ``_exit_reason = HAX_EXIT_PAUSED`` written before RUN makes RUN return
  ``HAX_EXIT_PAUSED`` at once, after finishing a pending I/O or MMIO completion
  (``core/vcpu.c vcpu_execute``; crosvm's ``set_immediate_exit``);
* ``user_event_pending = 1`` makes the driver return ``HAX_EXIT_INTERRUPT`` at
  the next exit it would otherwise handle itself (``core/cpu.c
  cpu_vmexit_handler`` through ``vcpu_event_pending``; QEMU's
  ``hax_raise_event``).

A guest that runs without exiting leaves only when its CPU is interrupted: on
Linux and macOS a signal to the vCPU thread (its IPI makes the CPU leave the
guest with an external-interrupt exit, which HAXM returns as
``HAX_EXIT_INTERRUPT``), on Windows ``HAX_VCPU_IOCTL_KICKOFF`` (``vcpu_takeoff``
IPIs the CPU running the vCPU).  POSIX uses the kit's
:class:`~pyvmm.backend.SignalKicker` as it is; :class:`KickoffKicker` is the same
kicker with ``KICKOFF`` in place of the signal, which needs no signal handler.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from pyvmm.backend import SignalKicker
from pyvmm.backend.kick import CLOSE_TIMEOUT
from pyvmm.errors import VmStateError


class KickoffKicker(SignalKicker):
    """:class:`SignalKicker` whose "signal" is a ``KICKOFF`` request (Windows)."""

    __slots__ = ("_kickoff",)

    def __init__(self, request_exit: Callable[[], None], kickoff: Callable[[], None], backend: str) -> None:
        super().__init__(request_exit, lambda thread, signum: kickoff(), backend)
        self._kickoff = kickoff

    def kick(self) -> None:
        with self._lock:
            if self.closed:
                return
            self._request_exit()
            if self.thread == threading.get_ident() or self._signalled:
                return
            self._kickoff()
            self._signalled = True

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        with self._lock:
            self.closed = True
        if not self.running or self.thread == threading.get_ident():
            return
        deadline = time.monotonic() + timeout
        while self.running:
            with self._lock:
                self._request_exit()
                self._kickoff()
            if time.monotonic() > deadline:
                raise VmStateError(f"a {self._backend} vCPU did not leave the hypervisor within {timeout:g} s of close")
            time.sleep(0.0005)
