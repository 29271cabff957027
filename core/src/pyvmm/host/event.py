"""A signalable event: what irqfds, ioeventfds and the machine layer's wake-ups
use instead of raw eventfd numbers.

``Event()`` gives the best kind for this host:

* :class:`EventFd` on Linux: an ``eventfd(2)``, non-blocking and close-on-exec.
  ``fileno()`` is what KVM-style ioctls take (irqfd, ioeventfd); the kernel can
  signal or consume it directly.  Its value counts the signals.
* :class:`PipeEvent` on other POSIX hosts (macOS): a non-blocking pipe; one byte
  per signal, ``fileno()`` is the read end, so it can be polled like an eventfd.
* :class:`Win32Event` on Windows: a manual-reset event object from
  ``CreateEventW``; ``handle`` is the HANDLE.  An event object is a flag, not a
  counter, so :meth:`consume` returns 1 or 0.

All kinds share the rules: :meth:`signal` never blocks (signals coalesce when the
counter or pipe is full: the event is already signalled); :meth:`consume` never
blocks and returns how many signals it took (0 if none); :meth:`wait` blocks until
the event is signalled or the timeout passes, without consuming; :meth:`close` is
idempotent, wakes any thread in :meth:`wait`, and frees the descriptor only once no
thread is using it, so a racing call can never reach an unrelated file that reused
the number.  After close every call raises :class:`~pyvmm.errors.VmStateError`.
"""

from __future__ import annotations

import contextlib
import errno
import io
import math
import os
import sys
import threading
import warnings
from typing import Any, TypeVar

from pyvmm.errors import ConfigError, ErrorSpace, HypervisorError, VmStateError
from pyvmm.host import win32

_E = TypeVar("_E", bound="Event")


def _check_timeout(timeout: float | None) -> float | None:
    """None or a number; infinity means None, a negative number 0 (as
    ``threading.Event.wait``)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or math.isnan(timeout):
        raise ConfigError(f"Event.wait: timeout must be None or a number of seconds, not {timeout!r}")
    if math.isinf(timeout) and timeout > 0:
        return None
    return max(float(timeout), 0.0)


class Event:
    """A signalable event (see the module docstring).  ``Event()`` picks the kind
    for this host; the subclasses can be made directly."""

    #: Names this kind in messages.
    kind = "event"

    def __new__(cls, *args: Any, **kwargs: Any) -> Event:
        kind = default_event_class() if cls is Event else cls
        return object.__new__(kind)

    def __init__(self) -> None:
        # Subclasses call this once their descriptor or handle exists.
        # _lock guards _closed and _users; the raw operations of signal() and
        # consume() run under it (they never block), wait() only counts itself in.
        self._lock = threading.Lock()
        self._closed = False
        self._users = 0
        self._released = False

    # --- what each kind implements ----------------------------------------------
    def _raw_signal(self) -> None:
        raise NotImplementedError

    def _raw_consume(self) -> int:
        raise NotImplementedError

    def _raw_wait(self, timeout: float | None) -> bool:
        raise NotImplementedError

    def _raw_close(self) -> None:
        raise NotImplementedError

    # --- the API ----------------------------------------------------------------
    def _closed_error(self) -> VmStateError:
        return VmStateError(f"the {self.kind} has been closed")

    def signal(self) -> None:
        """Signal the event (add 1 to its count).  Never blocks."""
        with self._lock:
            if self._closed:
                raise self._closed_error()
            self._raw_signal()

    set = signal

    def consume(self) -> int:
        """Take the pending signals: their count (1 for a Windows event), 0 if none."""
        with self._lock:
            if self._closed:
                raise self._closed_error()
            return self._raw_consume()

    read = consume

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the event is signalled (True) or ``timeout`` seconds pass
        (False).  Does not consume.  A :meth:`close` from another thread wakes it;
        it then raises :class:`VmStateError`."""
        timeout = _check_timeout(timeout)
        with self._lock:
            if self._closed:
                raise self._closed_error()
            self._users += 1
        try:
            signalled = self._raw_wait(timeout)
        finally:
            self._leave()
        if self._closed:
            raise self._closed_error()
        return signalled

    def _leave(self) -> None:
        with self._lock:
            self._users -= 1
            release = self._closed and self._users == 0 and not self._released
            if release:
                self._released = True
        if release:
            self._raw_close()

    def close(self) -> None:
        """Close the event.  Idempotent.  Threads in :meth:`wait` are woken, and the
        descriptor is freed when the last of them has left."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._users:
                # Wake the waiters; the last one to leave releases the descriptor.
                with contextlib.suppress(OSError):
                    self._raw_signal()
                return
            self._released = True
        self._raw_close()

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        """The file descriptor a hypervisor or ``select`` can use (POSIX kinds)."""
        raise io.UnsupportedOperation(f"a {self.kind} has no file descriptor")

    def __enter__(self: _E) -> _E:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Like an unclosed file: free the descriptor, and say so.
        if getattr(self, "_closed", True):
            return
        with contextlib.suppress(Exception):
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {'closed' if self._closed else 'open'}>"


def _wait_readable(fd: int, timeout: float | None) -> bool:
    """Whether ``fd`` became readable within ``timeout`` (None: no limit).  poll()
    where there is one (select() cannot take descriptors past FD_SETSIZE)."""
    import select

    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        # poll() wants milliseconds; round up so a short timeout still waits.
        events = poller.poll(None if timeout is None else math.ceil(timeout * 1000))
        return bool(events)
    readable, _, _ = select.select([fd], [], [], timeout)
    return bool(readable)


class EventFd(Event):
    """An ``eventfd(2)`` (Linux): non-blocking, close-on-exec, counting."""

    kind = "eventfd"

    def __init__(self, initial: int = 0) -> None:
        if isinstance(initial, bool) or not isinstance(initial, int) or not 0 <= initial <= 0xFFFF_FFFF:
            raise ConfigError(f"EventFd: initial must be an integer from 0 to 0xffffffff, not {initial!r}")
        # The descriptor first, the base state after: a failed open leaves nothing
        # for __del__ to close.
        self._fd: int = os.eventfd(initial, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        super().__init__()

    def fileno(self) -> int:
        if self._closed:
            raise self._closed_error()
        return self._fd

    def _raw_signal(self) -> None:
        with contextlib.suppress(BlockingIOError):  # the counter is at its maximum: already signalled
            os.eventfd_write(self._fd, 1)

    def _raw_consume(self) -> int:
        try:
            return os.eventfd_read(self._fd)
        except BlockingIOError:
            return 0

    def _raw_wait(self, timeout: float | None) -> bool:
        return _wait_readable(self._fd, timeout)

    def _raw_close(self) -> None:
        os.close(self._fd)


class PipeEvent(Event):
    """A non-blocking, close-on-exec pipe: the event for POSIX hosts without
    eventfd.  ``fileno()`` is the read end."""

    kind = "pipe event"

    def __init__(self) -> None:
        # os.pipe() makes non-inheritable descriptors (PEP 446): close-on-exec.
        self._read_fd, self._write_fd = os.pipe()
        try:
            os.set_blocking(self._read_fd, False)
            os.set_blocking(self._write_fd, False)
        except BaseException:
            os.close(self._read_fd)
            os.close(self._write_fd)
            raise
        super().__init__()

    def fileno(self) -> int:
        if self._closed:
            raise self._closed_error()
        return self._read_fd

    def _raw_signal(self) -> None:
        with contextlib.suppress(BlockingIOError):  # the pipe is full: already signalled
            os.write(self._write_fd, b"\1")

    def _raw_consume(self) -> int:
        count = 0
        while True:
            try:
                chunk = os.read(self._read_fd, 65536)
            except BlockingIOError:
                return count
            if not chunk:
                return count
            count += len(chunk)

    def _raw_wait(self, timeout: float | None) -> bool:
        return _wait_readable(self._read_fd, timeout)

    def _raw_close(self) -> None:
        try:
            os.close(self._read_fd)
        finally:
            os.close(self._write_fd)


class Win32Event(Event):
    """A manual-reset, unnamed Windows event object (``CreateEventW``).

    Manual reset, so :meth:`wait` (``WaitForSingleObject``) does not consume;
    :meth:`consume` tests it with a zero timeout and resets it.  A signal that
    lands between the test and the reset is merged into the one consumed, as an
    eventfd merges signals into its count.
    """

    kind = "Windows event"

    def __init__(self) -> None:
        self._kernel32 = win32.kernel32()
        # No security attributes, manual reset, initially not signalled, unnamed.
        handle = self._kernel32.CreateEventW(None, True, False, None)
        if not handle:
            raise HypervisorError("CreateEventW", win32.last_error(), space=ErrorSpace.WIN32)
        self._handle: int = int(handle)
        super().__init__()

    @property
    def handle(self) -> int:
        """The event's HANDLE, for a Windows API that waits on or signals it."""
        if self._closed:
            raise self._closed_error()
        return self._handle

    def _check(self, ok: int, function: str) -> None:
        if not ok:
            raise HypervisorError(function, win32.last_error(), space=ErrorSpace.WIN32)

    def _raw_signal(self) -> None:
        self._check(self._kernel32.SetEvent(self._handle), "SetEvent")

    def _wait_for(self, milliseconds: int) -> bool:
        result = self._kernel32.WaitForSingleObject(self._handle, milliseconds)
        if result == win32.WAIT_OBJECT_0:
            return True
        if result == win32.WAIT_TIMEOUT:
            return False
        if result == win32.WAIT_FAILED:
            raise HypervisorError("WaitForSingleObject", win32.last_error(), space=ErrorSpace.WIN32)
        # WAIT_ABANDONED is for mutexes only: an event never returns it.
        raise HypervisorError("WaitForSingleObject", errno.EPROTO, f"unexpected result {result:#x}")

    def _raw_consume(self) -> int:
        if not self._wait_for(0):
            return 0
        self._check(self._kernel32.ResetEvent(self._handle), "ResetEvent")
        return 1

    def _raw_wait(self, timeout: float | None) -> bool:
        return self._wait_for(win32.timeout_ms(timeout))

    def _raw_close(self) -> None:
        self._check(self._kernel32.CloseHandle(self._handle), "CloseHandle")


def default_event_class() -> type[Event]:
    """The kind ``Event()`` makes on this host (decided when called, not at import)."""
    if sys.platform == "win32":
        return Win32Event
    if hasattr(os, "eventfd"):
        return EventFd
    return PipeEvent
