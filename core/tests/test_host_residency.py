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
