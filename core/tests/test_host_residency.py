"""Which pages were touched (pyvmm.host.residency, from /proc/self/pagemap), and
the snapshot's scan for the pages that are not zero, which skips the others."""

from __future__ import annotations

import mmap
import os

import pytest

from pyvmm import snapshot
from pyvmm.host.residency import PAGEMAP, touched_pages

PAGES = 256  # 1 MiB: several scan chunks


def _ram() -> mmap.mmap:
    return mmap.mmap(-1, PAGES * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


@pytest.mark.skipif(not os.path.exists(PAGEMAP), reason="no /proc/self/pagemap (not Linux)")
def test_written_pages_are_touched_and_untouched_ones_not() -> None:
    ram = _ram()
    view = memoryview(ram)
    try:
        view[7 * mmap.PAGESIZE] = 1
        touched = touched_pages(view)
        assert touched is not None and len(touched) == PAGES
        assert touched[7] == 1
        assert touched.count(1) < PAGES, "a fresh mapping is not all present"
    finally:
        view.release()
        ram.close()  # the export taken for the address was released: closing works


def test_a_read_only_view_or_no_pagemap_cannot_be_told(monkeypatch: pytest.MonkeyPatch) -> None:
    assert touched_pages(memoryview(bytes(mmap.PAGESIZE))) is None
    monkeypatch.setattr("pyvmm.host.residency.PAGEMAP", "/nonexistent/pagemap")
    ram = _ram()
    view = memoryview(ram)
    try:
        assert touched_pages(view) is None
    finally:
        view.release()
        ram.close()


@pytest.mark.parametrize("with_pagemap", [True, False])
def test_the_scan_finds_exactly_the_pages_that_are_not_zero(
    with_pagemap: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not with_pagemap:
        monkeypatch.setattr(snapshot, "touched_pages", lambda view: None)
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


def _written_ram(pages: dict[int, bytes]) -> tuple[mmap.mmap, memoryview]:
    ram = _ram()
    view = memoryview(ram)
    for page, data in pages.items():
        view[page * 4096 : page * 4096 + len(data)] = data
    return ram, view


@pytest.mark.parametrize("fake", ["/dev/zero", "/"], ids=["reports-nothing", "unreadable"])
def test_a_pagemap_that_does_not_report_writes_is_not_trusted(fake: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sandbox's pagemap whose entries are all zero would make every written
    page look untouched and the snapshot lose them: it is probed first."""
    monkeypatch.setattr("pyvmm.host.residency.PAGEMAP", fake)
    written = {3: b"kept", 130: b"also"}
    ram, view = _written_ram(written)
    try:
        assert touched_pages(view) is None
        assert sorted(snapshot._nonzero_pages(view)) == sorted(written)
    finally:
        view.release()
        ram.close()


@pytest.mark.skipif(not os.path.exists(PAGEMAP), reason="no /proc/self/pagemap (not Linux)")
def test_a_dropped_page_reads_zero_and_is_not_touched() -> None:
    ram, view = _written_ram({5: b"gone", 6: b"stays"})
    try:
        ram.madvise(mmap.MADV_DONTNEED, 5 * mmap.PAGESIZE, mmap.PAGESIZE)
        touched = touched_pages(view)
        assert touched is not None and (touched[5], touched[6]) == (0, 1)
        assert sorted(snapshot._nonzero_pages(view)) == [6]
    finally:
        view.release()
        ram.close()


@pytest.mark.skipif(not os.path.exists(PAGEMAP), reason="no /proc/self/pagemap (not Linux)")
def test_every_small_page_of_a_huge_page_is_seen() -> None:
    """With transparent huge pages, one write maps 2 MiB: the scan must still
    find the written 4 KiB page (and only it, the rest being zero)."""
    huge = 2 << 20
    ram = mmap.mmap(-1, 2 * huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = memoryview(ram)
    try:
        if hasattr(mmap, "MADV_HUGEPAGE"):
            ram.madvise(mmap.MADV_HUGEPAGE)
        page = 700
        view[page * 4096] = 0x5A
        touched = touched_pages(view)
        assert touched is not None and touched[page * 4096 // mmap.PAGESIZE] == 1
        assert list(snapshot._nonzero_pages(view)) == [page]
    finally:
        view.release()
        ram.close()


def _has_swap() -> bool:
    try:
        with open("/proc/swaps") as swaps:
            return len(swaps.read().splitlines()) > 1
    except OSError:
        return False


@pytest.mark.skipif(not _has_swap() or not hasattr(mmap, "MADV_PAGEOUT"), reason="no swap to page out to")
def test_a_swapped_out_page_is_still_touched() -> None:
    ram, view = _written_ram({9: b"swapped"})
    try:
        ram.madvise(mmap.MADV_PAGEOUT, 0, PAGES * mmap.PAGESIZE)
        touched = touched_pages(view)
        assert touched is not None and touched[9] == 1
        assert snapshot._nonzero_pages(view)[9].startswith(b"swapped")
    finally:
        view.release()
        ram.close()


@pytest.mark.skipif(not os.path.exists(PAGEMAP), reason="no /proc/self/pagemap (not Linux)")
def test_the_scan_leaves_no_file_open() -> None:
    ram, view = _written_ram({1: b"x"})
    try:
        touched_pages(view)  # the probe ran once already
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(5):
            assert touched_pages(view) is not None
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        view.release()
        ram.close()


@pytest.mark.skipif(not os.path.exists(PAGEMAP), reason="no /proc/self/pagemap (not Linux)")
def test_a_mapping_read_in_several_pieces_is_told_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pyvmm.host.residency._READ_ENTRIES", 7)  # pieces that end mid-scan-chunk
    written = {0: b"a", 6: b"b", 7: b"c", 100: b"d", 255: b"e"}
    ram, view = _written_ram(written)
    try:
        touched = touched_pages(view)
        assert touched is not None and len(touched) == PAGES
        assert {i for i, t in enumerate(touched) if t} >= set(written)
        assert sorted(snapshot._nonzero_pages(view)) == sorted(written)
    finally:
        view.release()
        ram.close()
