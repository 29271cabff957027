"""The OS seams: the only way a backend reaches its hypervisor.

A backend never calls ``os.open``, ``ioctl``, ``mmap`` or a DLL directly.  It
calls a *seam*, an object with one method per system call, that production code
gets from the host and tests replace with a driver model
(:mod:`pyvmm.testing.driver_model`).  Two kinds cover every hypervisor:

* :class:`DeviceSeam` -- a device-file driver (KVM, Gunyah, GenieZone, HAXM on
  Linux/macOS): open, close, ioctl, mmap, signal a thread.  (Events for
  irqfds and ioeventfds are the VMM's: :class:`pyvmm.host.Event`.)
  :class:`LibcDeviceSeam` is the POSIX implementation.
* :class:`DllSeam` -- a DLL API (WHPX, HAXM's Windows device through
  ``DeviceIoControl``): a table of functions, found when the DLL loads, some of
  them optional (newer Windows builds export more).
  :class:`pyvmm.backend.dll.LoadedDll` is the implementation over ``ctypes``.

Conventions of :class:`DeviceSeam`, chosen to match the raw system calls so that
the real seam is a thin shim and a model can answer exactly as the driver does:

* ``open``, ``close`` and ``ioctl`` return the non-negative result or
  ``-errno``: no exception on the per-exit path;
* ``ioctl``'s argument is always an integer: the value itself or the address of
  the argument struct, exactly what the kernel receives;
* ``mmap`` returns an :class:`mmap.mmap` or raises :class:`OSError`;
* ``signal_thread`` interrupts a thread blocked in the driver (the kick).
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
from collections.abc import Callable
from typing import Any, Protocol


class DeviceSeam(Protocol):
    """The system calls a device-file backend makes."""

    def open(self, path: str, flags: int) -> int:
        """``open(2)``: a file descriptor, or ``-errno``."""
        ...

    def close(self, fd: int) -> int:
        """``close(2)``: 0 or ``-errno``."""
        ...

    def ioctl(self, fd: int, request: int, arg: int) -> int:
        """``ioctl(2)`` with an integer argument (a value or an address): the
        non-negative result, or ``-errno``."""
        ...

    def mmap(self, fd: int, length: int, offset: int) -> mmap.mmap:
        """A shared read-write mapping of ``length`` bytes of ``fd`` at ``offset``;
        raises :class:`OSError`."""
        ...

    def signal_thread(self, thread_id: int, signum: int) -> None:
        """``pthread_kill``: interrupt ``thread_id`` (blocked in the driver)."""
        ...


_LIBC_CDEF = "int ioctl(int fd, unsigned long request, unsigned long arg);"


class LibcDeviceSeam:
    """The real system calls, for POSIX hosts.

    ``ioctl`` goes through cffi into libc rather than ``fcntl.ioctl``: cffi
    releases the GIL around the call (two vCPU threads run in parallel) and hands
    back ``errno`` without raising.  libc is opened on first use, never at import,
    so importing a backend works on every host.
    """

    def __init__(self) -> None:
        self._libc: Any = None
        self._ffi: Any = None

    def _load(self) -> Any:
        from pyvmm.backend.ffi_cache import declared_ffi

        ffi = declared_ffi(_LIBC_CDEF)
        self._ffi = ffi
        self._libc = ffi.dlopen(None)
        return self._libc

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
        libc = self._libc or self._load()
        result: int = libc.ioctl(fd, request, arg)
        return result if result >= 0 else -self._ffi.errno

    def raw_ioctl(self) -> tuple[Callable[[int, int, int], int], Callable[[int], int]]:
        """libc's ``ioctl`` itself (-1 on failure) and how to get the errno after a
        failure: for the per-exit path, where this method's own Python frame
        would cost a few percent of an exit.  cffi keeps the errno of the calling
        thread's last call, so reading it after the failed call is exact."""
        libc = self._libc or self._load()
        ffi = self._ffi

        def errno_after(result: int) -> int:
            return int(ffi.errno)

        return libc.ioctl, errno_after

    def mmap(self, fd: int, length: int, offset: int) -> mmap.mmap:
        return mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)

    def signal_thread(self, thread_id: int, signum: int) -> None:
        signal.pthread_kill(thread_id, signum)


class DllSeam(Protocol):
    """A DLL API: the functions a backend calls, by name.  A model implements
    the same names as Python callables."""

    def function(self, name: str) -> Any:
        """The callable for export ``name``; raises :class:`KeyError` if the DLL
        does not export it."""
        ...

    def has(self, name: str) -> bool:
        """Whether the DLL exports ``name`` (optional exports differ between builds)."""
        ...

    def last_error(self) -> int:
        """The calling thread's Win32 last-error value (``GetLastError``), for
        functions that report failure as a ``BOOL``."""
        ...
