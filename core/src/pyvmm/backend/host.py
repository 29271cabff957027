"""A backend's host: its seam with error conventions, and the one switch tests use.

Every device-file backend has one :class:`HostSwitch` in its ``host.py``::

    HOST = HostSwitch("kvm", LibcDeviceSeam, IOCTL_NAMES)

Production code takes ``HOST.current()`` (a :class:`DeviceHost`) when it opens the
device, and every VM and vCPU keeps the host it was made with, so switching seams
never reroutes a live object.  Tests, and only tests, route new objects to a
driver model with ``with HOST.use(model): ...``.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import operator
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from pyvmm.backend.seam import DeviceSeam
from pyvmm.backend.stand_in import standing_in
from pyvmm.errors import HypervisorError

_ffi: Any = None
T = TypeVar("T")


def address_of(cdata: Any) -> int:
    """The address of a cffi object: what an ioctl taking a pointer receives.
    (cffi pointers of any ``FFI`` instance cast the same way.)"""
    global _ffi
    if _ffi is None:
        # cffi's runtime FFI knows the primitive types without declarations;
        # cffi.FFI() would load the C parser (pycparser) to declare nothing.
        import _cffi_backend  # type: ignore[import-untyped]  # shipped without stubs

        _ffi = _cffi_backend.FFI()
    return int(_ffi.cast("uintptr_t", cdata))


class DeviceHost:
    """A :class:`DeviceSeam` with the backend's error conventions: a failing call
    raises :class:`~pyvmm.errors.HypervisorError` naming the ioctl."""

    def __init__(self, seam: DeviceSeam, names: Mapping[int, str]) -> None:
        self.seam = seam
        self.names = names
        #: Per-host state a backend shares between its VMs (an opened device).
        self.state: dict[str, Any] = {}
        self.lock = threading.Lock()
        self._fast_ioctl: tuple[Callable[[int, int, int], int], Callable[[int], int]] | None = None

    def shared(self, key: str, make: Callable[[DeviceHost], T], kind: type[T]) -> T:
        """The one ``kind`` object of this host under ``key`` (an opened device
        that every VM shares), made by ``make(host)`` on first use."""
        with self.lock:
            value = self.state.get(key)
            if value is None:
                value = self.state[key] = make(self)
            if not isinstance(value, kind):
                raise TypeError(f"host state {key!r} holds a {type(value).__name__}, not a {kind.__name__}")
            return value

    def ioctl_name(self, request: int) -> str:
        return self.names.get(request, f"ioctl {request:#x}")

    def try_ioctl(self, fd: int, request: int, arg: int | Any = 0) -> int:
        """``ioctl``: the result, or ``-errno`` (for probes that expect some errors)."""
        return self.seam.ioctl(fd, request, arg if isinstance(arg, int) else address_of(arg))

    def ioctl(self, fd: int, request: int, arg: int | Any = 0, *, detail: str = "") -> int:
        """``ioctl(fd, request, arg)``; ``arg`` is an int (passed by value) or a
        cffi pointer (passed by address).  The non-negative result; a failure
        raises :class:`HypervisorError` naming the request."""
        result = self.seam.ioctl(fd, request, arg if isinstance(arg, int) else address_of(arg))
        if result < 0:
            raise HypervisorError(self.ioctl_name(request), -result, detail)
        return result

    def fast_ioctl(self) -> tuple[Callable[[int, int, int], int], Callable[[int], int]]:
        """``(ioctl, errno_of)`` for the per-exit path: ``ioctl(fd, request, arg)``
        returns a negative value on failure, and ``errno_of(result)`` is then the
        error number.  On the libc seam this is libc's own function, called with
        no Python frame in between; on any other seam (a driver model) it is the
        seam's ``ioctl``, whose negative result is ``-errno``.  Worked out once
        per host (the seam never changes): every vCPU asks."""
        fast = self._fast_ioctl
        if fast is None:
            raw = getattr(self.seam, "raw_ioctl", None)
            fast = self._fast_ioctl = raw() if callable(raw) else (self.seam.ioctl, operator.neg)
        return fast

    def open_device(self, path: str) -> int:
        fd = self.seam.open(path, os.O_RDWR | os.O_CLOEXEC)
        if fd < 0:
            raise HypervisorError(f"open({path})", -fd)
        return fd

    def close(self, fd: int) -> None:
        result = self.seam.close(fd)
        if result < 0:
            # Only EBADF can happen here, which would be a bug of ours: let it show.
            raise HypervisorError("close", -result)

    def map_shared(self, fd: int, size: int, what: str, offset: int = 0) -> mmap.mmap:
        """Map ``size`` bytes of a kernel object (a vCPU run page)."""
        try:
            return self.seam.mmap(fd, size, offset)
        except OSError as exc:
            raise HypervisorError(f"mmap({what})", exc.errno or errno.EIO) from exc

    def signal_thread(self, thread_id: int, signum: int) -> None:
        self.seam.signal_thread(thread_id, signum)


class HostSwitch:
    """The one switch between the real system calls and a driver model, for one backend."""

    def __init__(self, backend: str, make_seam: Callable[[], DeviceSeam], names: Mapping[int, str]) -> None:
        self.backend = backend
        self.names = names
        self._make_seam = make_seam
        self._host: DeviceHost | None = None
        self._lock = threading.Lock()

    def current(self) -> DeviceHost:
        """The host new objects are created on."""
        with self._lock:
            if self._host is None:
                self._host = DeviceHost(self._make_seam(), self.names)
            return self._host

    @contextlib.contextmanager
    def use(self, seam: DeviceSeam) -> Iterator[DeviceHost]:
        """Route the objects created inside the block to ``seam``.  Only tests and
        :mod:`pyvmm.testing` call this; while it lasts the backend counts as
        standing in (:mod:`pyvmm.backend.stand_in`)."""
        with self._lock:
            previous, self._host = self._host, DeviceHost(seam, self.names)
            installed = self._host
        try:
            with standing_in(self.backend):
                yield installed
        finally:
            with self._lock:
                self._host = previous
