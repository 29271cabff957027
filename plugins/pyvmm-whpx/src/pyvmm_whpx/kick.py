"""The WHPX kick: ``WHvCancelRunVirtualProcessor``, from any thread.

WHPX needs no signal: "canceling the execution of a virtual processor allows
an application to abort the call to run the virtual processor by another
thread" (Microsoft, ``WHvCancelRunVirtualProcessor``), and the run returns
with ``WHvRunVpExitReasonCanceled``.  What a cancel does when no run is under
way is not documented, so the kick never relies on it: it sets a flag the
next run checks before entering the guest, and cancels only a run under way.
A cancel that lands between that check and the entry is assumed to end the run
it precedes (the driver model does so; the documentation does not say); at worst
a later run returns one spurious interruption.

:meth:`CancelKicker.close` stops the vCPU for good and waits for a run under
way to leave, so the VP and guest RAM can be released safely.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from pyvmm.errors import VmStateError

E = TypeVar("E")
CLOSE_TIMEOUT = 5.0


class CancelKicker:
    """The kick and the run guard of one virtual processor."""

    def __init__(self, cancel: Callable[[], None]) -> None:
        self._cancel = cancel
        self._lock = threading.Lock()
        self.kicked = False
        self.running = False
        self.closed = False

    def kick(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.kicked = True
            if self.running:
                self._cancel()

    def guard_run(self, enter: Callable[[], E], interrupted: E) -> Callable[[], E]:
        """The vCPU's ``run``: refuses a closed vCPU, answers a pending kick
        with ``interrupted`` without entering, and marks the run under way."""

        def run() -> E:
            with self._lock:
                if self.closed:
                    raise VmStateError("this whpx vCPU is closed")
                if self.kicked:
                    self.kicked = False
                    return interrupted
                self.running = True
            try:
                return enter()
            finally:
                with self._lock:
                    self.running = False

        return run

    def acknowledge(self) -> None:
        """A run came back cancelled: the kick it answered is spent."""
        with self._lock:
            self.kicked = False

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        with self._lock:
            self.closed = True
        deadline = time.monotonic() + timeout
        while self.running:
            with self._lock:
                if self.running:
                    self._cancel()
            if time.monotonic() > deadline:
                raise VmStateError(f"a whpx vCPU did not leave WHvRunVirtualProcessor within {timeout:g} s of close")
            time.sleep(0.0005)
