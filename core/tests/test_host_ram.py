"""pyvmm.host.allocate_ram on POSIX: an anonymous private mmap with MAP_NORESERVE."""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import platform
import sys
import types
import weakref
from typing import Any

import pytest

from pyvmm.errors import ConfigError, VmStateError
from pyvmm.host import HostRam, allocate_ram, map_noreserve

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the POSIX side; Windows has test_host_win32.py")

PAGE = mmap.PAGESIZE


def test_zeroed_page_aligned_read_write_memory_at_its_address() -> None:
    with allocate_ram(4 * PAGE) as ram:
        assert isinstance(ram, HostRam)
        assert ram.size == 4 * PAGE
        assert ram.address % PAGE == 0
        buffer = ram.buffer
        assert (buffer.nbytes, buffer.format, buffer.readonly) == (4 * PAGE, "B", False)
        assert bytes(buffer) == bytes(4 * PAGE)
        buffer[PAGE : PAGE + 4] = b"wxyz"
        assert ctypes.string_at(ram.address + PAGE, 4) == b"wxyz"  # what a hypervisor is given
        ctypes.memmove(ram.address + 2 * PAGE, b"1234", 4)
        assert buffer[2 * PAGE : 2 * PAGE + 4].tobytes() == b"1234"
        mapping = ram.mapping
        assert isinstance(mapping, mmap.mmap)
        del buffer, mapping
    assert ram.closed
    assert ram.mapping is None
    assert repr(ram) == f"HostRam({4 * PAGE:#x} bytes, closed)"


def test_close_without_views_unmaps_at_once() -> None:
    ram = allocate_ram(PAGE)
    mapping = ram.mapping
    ram.close()
    assert mapping.closed
    ram.close()  # idempotent
    with pytest.raises(VmStateError, match="released"):
        _ = ram.buffer


def test_a_live_view_keeps_the_memory_mapped() -> None:
    ram = allocate_ram(PAGE)
    view = ram.buffer[8:16]
    view[:] = b"ABCDEFGH"
    mapping_ref = weakref.ref(ram.mapping)
    ram.close()
    assert ram.closed
    assert view.tobytes() == b"ABCDEFGH"  # no use after unmap
    view[0] = ord("Z")
    assert mapping_ref() is not None
    view.release()
    gc.collect()
    assert mapping_ref() is None  # unmapped with the last view


def test_close_while_another_reference_slices_the_buffer() -> None:
    """close() drops its references instead of releasing the view, so a thread that
    read ``buffer`` just before can still slice it (no untyped ValueError)."""
    ram = allocate_ram(PAGE)
    buffer = ram.buffer
    ram.close()
    piece = buffer[0:4]
    piece[:] = b"ok!!"
    assert piece.tobytes() == b"ok!!"


def test_map_noreserve_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []
    real = mmap.mmap

    def spy(*args: Any, **kwargs: Any) -> mmap.mmap:
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(mmap, "mmap", spy)
    allocate_ram(PAGE).close()
    flags = seen[0]["flags"]
    assert flags & mmap.MAP_PRIVATE and flags & mmap.MAP_ANONYMOUS
    assert flags & map_noreserve() == map_noreserve()
    assert seen[0]["prot"] == mmap.PROT_READ | mmap.PROT_WRITE
    if sys.platform.startswith("linux") and platform.machine() in ("x86_64", "aarch64"):
        assert map_noreserve() == 0x4000


def test_map_noreserve_without_the_constant(monkeypatch: pytest.MonkeyPatch) -> None:
    """Python 3.10's mmap module lacks MAP_NORESERVE: the Linux value is used on the
    architectures whose mman.h has 0x4000, nothing elsewhere."""
    monkeypatch.delattr(mmap, "MAP_NORESERVE", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(os, "uname", lambda: types.SimpleNamespace(machine="x86_64"))
    assert map_noreserve() == 0x4000
    monkeypatch.setattr(os, "uname", lambda: types.SimpleNamespace(machine="mips"))
    assert map_noreserve() == 0
    monkeypatch.setattr(sys, "platform", "darwin")
    assert map_noreserve() == 0


@pytest.mark.parametrize("size", [0, -PAGE, True, float(PAGE), "4096", None])
def test_size_must_be_a_positive_integer(size: object) -> None:
    with pytest.raises(ConfigError, match="size must be a positive integer"):
        allocate_ram(size)  # type: ignore[arg-type]


def test_host_refusal_is_an_os_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> mmap.mmap:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(mmap, "mmap", refuse)
    with pytest.raises(OSError, match="Cannot allocate memory"):
        allocate_ram(PAGE)
