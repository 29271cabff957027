"""The OS seam: every system call the KVM backend makes goes through here.

Calls go through cffi into libc rather than ``fcntl.ioctl``: cffi releases the
GIL around the call (two vCPU threads run in parallel), hands back ``errno``
without raising, and passes pointers to cdata structs without copying them.
A failing call raises :class:`pyvmm.errors.HypervisorError` naming the ioctl.
"""

from __future__ import annotations

import errno
import mmap
import os
from typing import Any

from pyvmm.errors import HypervisorError
from pyvmm_kvm.bindings import IOCTL_NAMES, ffi

libc: Any = ffi.dlopen(None)

_NO_ARG = ffi.cast("unsigned long", 0)


def ioctl_name(request: int) -> str:
    return IOCTL_NAMES.get(request, f"ioctl {request:#x}")


def ioctl(fd: int, request: int, arg: Any = _NO_ARG) -> int:
    """``ioctl(fd, request, arg)``; ``arg`` is an int (passed by value) or cdata pointer.
    Returns the non-negative result; raises HypervisorError on failure."""
    if isinstance(arg, int):
        arg = ffi.cast("unsigned long", arg)
    result: int = libc.ioctl(fd, request, arg)
    if result < 0:
        raise HypervisorError(ioctl_name(request), ffi.errno)
    return result


def open_device(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise HypervisorError(f"open({path})", exc.errno or errno.EIO) from exc


def map_shared(fd: int, size: int, what: str) -> mmap.mmap:
    """Map ``size`` bytes of a kernel object (the vCPU run page) read-write, shared."""
    try:
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as exc:
        raise HypervisorError(f"mmap({what})", exc.errno or errno.EIO) from exc


def new_eventfd(initial: int = 0) -> int:
    """A non-blocking, close-on-exec eventfd (for irqfds and ioeventfds)."""
    return os.eventfd(initial, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def close(fd: int) -> None:
    # close() can only fail with EBADF here, which would be a bug of ours: let it show.
    os.close(fd)
