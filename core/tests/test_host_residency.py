"""mincore-based residency (pyvmm.host.residency) and the snapshot's scan for
the pages that are not zero, which skips pages never touched."""

from __future__ import annotations

import mmap
import sys

import pytest

from pyvmm import snapshot
from pyvmm.host.residency import resident_pages

PAGES = 256  # 1 MiB: several scan chunks


def _ram() -> mmap.mmap:
    return mmap.mmap(-1, PAGES * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


@pytest.mark.skipif(sys.platform == "win32", reason="mincore is POSIX")
def test_a_written_page_is_resident() -> None:
    ram = _ram()
    view = memoryview(ram)
    try:
        view[7 * mmap.PAGESIZE] = 1
        resident = resident_pages(view)
        assert resident is not None and len(resident) == PAGES
        assert resident[7] & 1
    finally:
        view.release()
        ram.close()  # the export taken for mincore was released: closing works


def test_a_read_only_view_cannot_be_asked() -> None:
    assert resident_pages(memoryview(bytes(mmap.PAGESIZE))) is None


@pytest.mark.parametrize("with_mincore", [True, False])
def test_the_scan_finds_exactly_the_pages_that_are_not_zero(
    with_mincore: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not with_mincore:
        monkeypatch.setattr(snapshot, "resident_pages", lambda view: None)
    ram = _ram()
    view = memoryview(ram)
    try:
        written = {0: b"\x01", 63: b"\xff" * 10, 64: b"x", 200: b"last"}
        for page, data in written.items():
            view[page * 4096 : page * 4096 + len(data)] = data
        assert view[150 * 4096] == 0  # read, not written: a zero page that may be resident
        found = snapshot._nonzero_pages(view)
        assert sorted(found) == sorted(written)
        assert all(found[page].startswith(data) for page, data in written.items())
    finally:
        view.release()
        ram.close()
