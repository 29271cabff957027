"""Which pages of a host mapping have ever been touched: ``mincore(2)``.

Guest RAM is anonymous memory mapped on demand, so a page the guest and the
VMM never touched is not resident and reads as zero.  A snapshot that looks for
the pages that are not zero can skip those without reading them: reading them
would map every one (the zero page, but a page-table entry each) and cost time
proportional to all of guest RAM rather than to what the guest used.

Only where the C library has ``mincore`` (Linux and the BSDs); elsewhere
:func:`resident_pages` returns None and the caller reads everything.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
from functools import cache


@cache
def _mincore() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if sys.platform == "win32":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        function = libc.mincore
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    function.restype = ctypes.c_int
    return function


def resident_pages(view: memoryview) -> bytes | None:
    """One byte per host page of ``view`` (page-aligned, writable, as guest RAM
    is), its low bit set where the page is resident; None where that cannot be
    told (no ``mincore``, or it failed): then every page may hold data."""
    mincore = _mincore()
    if mincore is None or view.readonly or len(view) == 0:
        return None
    page = mmap.PAGESIZE
    anchor = ctypes.c_char.from_buffer(view)  # holds an export of the buffer: released below
    try:
        address = ctypes.addressof(anchor)
        if address % page:
            return None
        vector = (ctypes.c_ubyte * ((len(view) + page - 1) // page))()
        if mincore(address, len(view), vector) != 0:
            return None
        return bytes(vector)
    finally:
        del anchor
