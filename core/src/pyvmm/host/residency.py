"""Which pages of a host mapping were ever touched: Linux's ``/proc/self/pagemap``.

Guest RAM is anonymous memory mapped on demand, so a page the guest and the
VMM never touched has no page behind it and reads as zero.  A snapshot that
looks for the pages that are not zero can skip those without reading them:
reading them would map every one (the zero page, but a page-table entry each)
and cost time proportional to all of guest RAM rather than to what it used.

pagemap gives one 64-bit entry per page (``Documentation/admin-guide/mm/
pagemap.rst``): bit 63 "page present", bit 62 "page swapped".  A page with
neither was never written (or was dropped and reads as zero again).  Not
``mincore(2)``: it reports a swapped-out page as not resident, and a snapshot
skipping it would lose what the guest wrote there.  Elsewhere than Linux, or if
the file cannot be read, :func:`touched_pages` returns None and the caller
reads everything.

The present and swapped bits need no privilege (only the PFNs are hidden
without ``CAP_SYS_ADMIN``), and they hold for what guest RAM is -- private
anonymous memory: a transparent huge page shows each of its small pages
present, a KSM-merged page is present, and a page being migrated shows as
swapped (a migration entry is a swap entry to pagemap).  They do not hold for
shared or file-backed mappings, whose pages may be written through another
mapping or stay in the page cache with no entry here: do not pass such a view.
A sandbox that offers a pagemap file but not the kernel's (all entries zero)
would make every written page look untouched, so the file is first shown a
page just written and is used only if it reports that page present
(:func:`pagemap_reports_writes`).
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os

_ENTRY = 8
#: The top byte of an entry (little-endian): bit 7 present, bit 6 swapped.
_PRESENT_OR_SWAPPED = 0xC0
#: Top byte -> 1 where the page is present or swapped, else 0.
_TOUCHED = bytes(1 if value & _PRESENT_OR_SWAPPED else 0 for value in range(256))
PAGEMAP = "/proc/self/pagemap"
#: Entries read at once (2 MiB of them, for 1 GiB of 4 KiB pages).
_READ_ENTRIES = 1 << 18


def touched_pages(view: memoryview) -> bytes | None:
    """One byte per host page of ``view`` (writable, as guest RAM is): 1 where
    the page is present or swapped out, 0 where it was never touched; None when
    that cannot be told (then every page may hold data)."""
    if view.readonly or len(view) == 0 or not pagemap_reports_writes(PAGEMAP):
        return None
    return _read_touched(PAGEMAP, view)


@functools.cache
def pagemap_reports_writes(path: str) -> bool:
    """Whether ``path`` is a working pagemap: it reports a page this process
    just wrote as present (checked once per path)."""
    if not os.path.exists(path):
        return False
    probe = mmap.mmap(-1, 2 * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        view = memoryview(probe)
        try:
            view[0] = 1  # the first page written, the second never touched
            touched = _read_touched(path, view)
        finally:
            view.release()
    finally:
        probe.close()
    return touched is not None and touched[0] == 1


def _read_touched(path: str, view: memoryview) -> bytes | None:
    page = mmap.PAGESIZE
    anchor = ctypes.c_char.from_buffer(view)  # an export of the buffer, released below
    try:
        address = ctypes.addressof(anchor)
    finally:
        del anchor
    if address % page:
        return None
    count = (len(view) + page - 1) // page
    touched = bytearray()
    try:
        with open(path, "rb", buffering=0) as pagemap:
            pagemap.seek(address // page * _ENTRY)
            # In pieces: a large guest's entries (8 bytes a page) would cost
            # eight times the one byte a page kept.
            for first in range(0, count, _READ_ENTRIES):
                wanted = min(_READ_ENTRIES, count - first) * _ENTRY
                raw = pagemap.read(wanted)
                if len(raw) != wanted:
                    return None
                touched += raw[_ENTRY - 1 :: _ENTRY].translate(_TOUCHED)
    except OSError:
        return None
    return bytes(touched)
