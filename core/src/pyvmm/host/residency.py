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
"""

from __future__ import annotations

import ctypes
import mmap
import os

_ENTRY = 8
#: The top byte of an entry (little-endian): bit 7 present, bit 6 swapped.
_PRESENT_OR_SWAPPED = 0xC0
#: Top byte -> 1 where the page is present or swapped, else 0.
_TOUCHED = bytes(1 if value & _PRESENT_OR_SWAPPED else 0 for value in range(256))
PAGEMAP = "/proc/self/pagemap"


def touched_pages(view: memoryview) -> bytes | None:
    """One byte per host page of ``view`` (writable, as guest RAM is): 1 where
    the page is present or swapped out, 0 where it was never touched; None when
    that cannot be told (then every page may hold data)."""
    if view.readonly or len(view) == 0 or not os.path.exists(PAGEMAP):
        return None
    page = mmap.PAGESIZE
    anchor = ctypes.c_char.from_buffer(view)  # an export of the buffer, released below
    try:
        address = ctypes.addressof(anchor)
    finally:
        del anchor
    if address % page:
        return None
    count = (len(view) + page - 1) // page
    try:
        with open(PAGEMAP, "rb", buffering=0) as pagemap:
            pagemap.seek(address // page * _ENTRY)
            raw = pagemap.read(count * _ENTRY)
    except OSError:
        return None
    if len(raw) != count * _ENTRY:
        return None
    return raw[_ENTRY - 1 :: _ENTRY].translate(_TOUCHED)
