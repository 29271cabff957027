"""Host memory for guest RAM, behind one function: :func:`allocate_ram`.

* **POSIX**: an anonymous private ``mmap``, read-write, with ``MAP_NORESERVE``
  where the platform has it, so a large guest costs nothing until its pages are
  touched (Linux mmap(2): no swap space is reserved; pages are zero-filled on first
  touch).
* **Windows**: ``VirtualAlloc(NULL, size, MEM_RESERVE | MEM_COMMIT,
  PAGE_READWRITE)``, released with ``VirtualFree(address, 0, MEM_RELEASE)``
  (Microsoft Learn, "VirtualAlloc function (memoryapi.h)": committed pages are
  zero-filled and get physical pages only when first accessed; the commit is
  charged against the system commit limit at once, as Windows has no equivalent of
  MAP_NORESERVE for private memory).  The buffer is a ctypes array over the
  allocation.

Either way the memory is page-aligned and zeroed, :attr:`HostRam.address` is what a
hypervisor is given (KVM's ``userspace_addr``, WHPX's ``SourceAddress``), and
:attr:`HostRam.buffer` a zero-copy writable ``memoryview`` of it.  Views keep the
memory alive: :meth:`HostRam.close` frees it at once when nothing else holds a
view, otherwise when the last view goes, so no view ever points at freed memory.
"""

from __future__ import annotations

import mmap
import os
import sys
import weakref
from typing import Any

from pyvmm.errors import ConfigError, ErrorSpace, HypervisorError, VmStateError
from pyvmm.host import win32
from pyvmm.lazy_logging import LazyLogger

# Loads logging only when a record goes out (start-up time).
log = LazyLogger("pyvmm.host")

#: ``MAP_NORESERVE`` in linux/include/uapi/asm-generic/mman-common.h's family:
#: 0x4000 on x86 and arm64 (asm-generic/mman.h), which Python 3.10's mmap module
#: does not export; other architectures use other values, so they get none.
_LINUX_MAP_NORESERVE = 0x4000
_GENERIC_MMAN_MACHINES = frozenset({"x86_64", "amd64", "i386", "i686", "aarch64", "arm64", "riscv64"})


def map_noreserve() -> int:
    """The ``MAP_NORESERVE`` flag for this host, or 0 where there is none."""
    flag = getattr(mmap, "MAP_NORESERVE", None)
    if flag is not None:
        return int(flag)
    # uname's machine is platform.machine() on a POSIX host, without importing platform.
    machine = os.uname().machine if hasattr(os, "uname") else ""
    if sys.platform.startswith("linux") and machine.lower() in _GENERIC_MMAN_MACHINES:
        return _LINUX_MAP_NORESERVE
    return 0


class HostRam:
    """Zeroed, page-aligned, read-write host memory (see the module docstring).

    ``address`` is the host virtual address, ``size`` the size asked for,
    ``buffer`` a writable ``memoryview`` (format ``"B"``) of all of it, and
    ``mapping`` the object whose lifetime is the memory's: an ``mmap`` on POSIX, a
    ctypes array on Windows; every view of ``buffer`` keeps it alive.
    """

    __slots__ = ("__weakref__", "_mapping", "_view", "address", "size")

    def __init__(self, mapping: Any, view: memoryview, address: int, size: int) -> None:
        self._mapping: Any = mapping
        self._view: memoryview | None = view
        self.address = address
        self.size = size

    @property
    def buffer(self) -> memoryview:
        """The whole allocation as bytes.  Raises :class:`VmStateError` once closed."""
        view = self._view  # read once: close() may run on another thread
        if view is None:
            raise VmStateError(f"host RAM at {self.address:#x} has been released")
        return view

    @property
    def mapping(self) -> Any:
        """The object that owns the memory (None once closed)."""
        return self._mapping

    @property
    def closed(self) -> bool:
        return self._view is None

    def close(self) -> None:
        """Release the memory: now if no view of it is alive, else when the last one
        goes.  Idempotent."""
        # Drop our references rather than memoryview.release(): a thread that read
        # ``buffer`` just before may still be slicing it, and a released view would
        # fail that with an untyped ValueError.  Without views the export count drops
        # to zero with the reference.
        self._view = None
        mapping, self._mapping = self._mapping, None
        close = getattr(mapping, "close", None)  # an mmap; a ctypes array has none
        if close is not None:
            # BufferError: a caller's view still exports it; the mmap then unmaps
            # itself when the last view is released and the object is collected.
            try:  # noqa: SIM105 - not contextlib.suppress: this runs for every region of every VM
                close()
            except BufferError:
                pass
        # A Windows allocation is freed by the finalizer on its ctypes array.

    def __enter__(self) -> HostRam:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"at {self.address:#x}"
        return f"HostRam({self.size:#x} bytes, {state})"


def allocate_ram(size: int) -> HostRam:
    """``size`` bytes of zeroed, read-write host memory for guest RAM.

    :raises ConfigError: ``size`` is not a positive integer.
    :raises OSError: the host refused (on Windows a :class:`HypervisorError` in the
        WIN32 space naming ``VirtualAlloc``).
    """
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ConfigError(f"allocate_ram: size must be a positive integer number of bytes, not {size!r}")
    if sys.platform == "win32":
        return _allocate_windows(size)
    return _allocate_posix(size)


_posix_flags: int | None = None


def _allocate_posix(size: int) -> HostRam:
    global _posix_flags
    flags = _posix_flags
    if flags is None:  # worked out on first use, not at import (and not per region: it costs µs)
        flags = _posix_flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | map_noreserve()
    mapping = mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return HostRam(mapping, memoryview(mapping), _buffer_address(mapping), size)


_ffi: Any = None


def _buffer_address(mapping: Any) -> int:
    """The host address of ``mapping``'s first byte.

    Through cffi's runtime (a pyvmm-core dependency, already loaded by every
    backend with C bindings) rather than ctypes, which would cost a few
    milliseconds of every start-up for this one number.
    """
    global _ffi
    if _ffi is None:
        import _cffi_backend  # type: ignore[import-untyped]  # cffi's runtime, shipped without stubs

        _ffi = _cffi_backend.FFI()
    pointer = _ffi.from_buffer(mapping)
    try:
        return int(_ffi.cast("uintptr_t", pointer))
    finally:
        _ffi.release(pointer)  # release the buffer export so close() can unmap


def _virtual_free(kernel32: Any, address: int) -> None:
    """Finalizer of a Windows allocation.  It cannot raise to anyone: log instead."""
    if not kernel32.VirtualFree(address, 0, win32.MEM_RELEASE):
        log.error("VirtualFree(%#x) failed: Win32 error %d", address, win32.last_error())


def _allocate_windows(size: int) -> HostRam:
    kernel32 = win32.kernel32()
    address = kernel32.VirtualAlloc(None, size, win32.MEM_RESERVE | win32.MEM_COMMIT, win32.PAGE_READWRITE)
    if not address:
        raise HypervisorError("VirtualAlloc", win32.last_error(), f"{size:#x} bytes", space=ErrorSpace.WIN32)
    import ctypes  # Windows only: see _buffer_address

    try:
        owner = (ctypes.c_char * size).from_address(address)
        # The array is what every view exports, so it lives exactly as long as the
        # last view: free the allocation when it goes, never before.
        weakref.finalize(owner, _virtual_free, kernel32, address)
    except BaseException:
        kernel32.VirtualFree(address, 0, win32.MEM_RELEASE)
        raise
    return HostRam(owner, memoryview(owner).cast("B"), address, size)
