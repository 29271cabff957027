"""The OS seam: every system call the Gunyah backend makes goes through here.

The calls go to one *seam* object, wrapped in a :class:`Host` that adds the
backend's error conventions.  In production the seam is :class:`LibcSeam`:
``ioctl`` through cffi into libc (cffi releases the GIL around the call, so two
vCPU threads run in parallel, and hands back ``errno`` without raising), ``mmap``
from the standard library, ``pthread_kill`` for kicks.  Tests replace it with a
driver model (:mod:`pyvmm.testing.driver_model`) through :func:`use` -- the one
switch, touched only by tests and ``pyvmm.testing``.

Conventions (those of :class:`pyvmm.testing.driver_model.DeviceSeam`): ``ioctl``
takes an integer argument -- a value, or the address of the argument struct --
and returns the result or ``-errno``; :meth:`Host.ioctl` turns a failure into a
:class:`pyvmm.errors.HypervisorError` naming the ioctl.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import signal
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pyvmm.errors import HypervisorError
from pyvmm_gunyah.bindings import IOCTL_NAMES, ffi

if TYPE_CHECKING:
    from pyvmm.testing.driver_model import DeviceSeam


class LibcSeam:
    """The real system calls."""

    def __init__(self) -> None:
        self._libc: Any = ffi.dlopen(None)

    def open(self, path: str, flags: int) -> int:
        try:
            return os.open(path, flags)
        except OSError as exc:
            return -(exc.errno or errno.EIO)

    def close(self, fd: int) -> int:
        try:
            os.close(fd)
        except OSError as exc:
            return -(exc.errno or errno.EIO)
        return 0

    def ioctl(self, fd: int, request: int, arg: int) -> int:
        result: int = self._libc.ioctl(fd, request, arg)
        return result if result >= 0 else -ffi.errno

    def mmap(self, fd: int, length: int, offset: int) -> mmap.mmap:
        return mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)

    def eventfd(self, initval: int, flags: int) -> int:
        return os.eventfd(initval, flags)

    def signal_thread(self, thread_id: int, signum: int) -> None:
        signal.pthread_kill(thread_id, signum)


class Host:
    """A seam with the backend's error conventions.  Every VM and vCPU keeps the
    host it was created with, so switching seams never reroutes a live object."""

    def __init__(self, seam: DeviceSeam) -> None:
        self.seam = seam
        #: The probed /dev/gunyah of this seam (see :func:`pyvmm_gunyah.system.system`).
        self.system: Any = None
        self.lock = threading.Lock()

    def try_ioctl(self, fd: int, request: int, arg: int = 0) -> int:
        """``ioctl``: the result, or ``-errno`` (for probes that expect some errors)."""
        return self.seam.ioctl(fd, request, arg)

    def ioctl(self, fd: int, request: int, arg: int = 0, *, detail: str = "") -> int:
        """``ioctl``: the non-negative result; raises :class:`HypervisorError` naming it."""
        result = self.seam.ioctl(fd, request, arg)
        if result < 0:
            raise HypervisorError(ioctl_name(request), -result, detail)
        return result

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

    def map_shared(self, fd: int, size: int, what: str) -> mmap.mmap:
        """Map ``size`` bytes of a kernel object (the vCPU run page) at offset 0."""
        try:
            return self.seam.mmap(fd, size, 0)
        except OSError as exc:
            raise HypervisorError(f"mmap({what})", exc.errno or errno.EIO) from exc

    def new_eventfd(self, initial: int = 0) -> int:
        """A non-blocking, close-on-exec eventfd."""
        return self.seam.eventfd(initial, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def signal_thread(self, thread_id: int, signum: int) -> None:
        self.seam.signal_thread(thread_id, signum)


_host = Host(LibcSeam())
_switch_lock = threading.Lock()


def current() -> Host:
    """The host in use."""
    return _host


@contextlib.contextmanager
def use(seam: DeviceSeam) -> Iterator[Host]:
    """Route the backend's system calls to ``seam`` (a driver model) for objects
    created inside the block.  Only tests and ``pyvmm.testing`` call this."""
    global _host
    with _switch_lock:
        previous, _host = _host, Host(seam)
        installed = _host
    try:
        yield installed
    finally:
        with _switch_lock:
            _host = previous


def ioctl_name(request: int) -> str:
    return IOCTL_NAMES.get(request, f"ioctl {request:#x}")


def address_of(cdata: Any) -> int:
    """The address of a cffi object: what an ioctl taking a pointer receives."""
    return int(ffi.cast("uintptr_t", cdata))
