"""One memory slot, one host VMA.

``GZVM_SET_USER_MEMORY_REGION`` looks up the VMA holding the region's host address
and refuses the region (``EINVAL``) unless that VMA is exactly ``memory_size``
long (``gzvm_vm.c gzvm_vm_ioctl_set_memory_region``: ``vma_lookup``, then
``vm_end - vm_start != memory_size``; ``docs/backends/geniezone.md`` §4.2).
pyvmm's guest RAM is a private anonymous mapping per region, and the kernel
merges adjacent anonymous mappings with the same flags into one VMA -- so two
regions allocated next to each other would break the rule.

:func:`claim_own_vma` gives the region a VMA name of its own
(``PR_SET_VMA_ANON_NAME``, Android's anonymous-VMA names, which every Android
kernel has): the kernel then splits the VMA at the region's edges and never
merges it with a neighbour of another name.  Where the kernel lacks VMA names
the region keeps whatever VMA it has, and the check that follows says whether
that is exactly the region; if not, the region is refused with a
:class:`~pyvmm.errors.ConfigError` before the driver sees it.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import Any

from pyvmm.errors import ConfigError

PR_SET_VMA = 0x53564D41
PR_SET_VMA_ANON_NAME = 0

MAPS = "/proc/self/maps"


@functools.cache
def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def vma_holding(address: int) -> tuple[int, int] | None:
    """``(start, end)`` of the VMA of this process holding ``address`` (what the
    kernel's ``vma_lookup`` finds), or None."""
    with open(MAPS, encoding="ascii") as maps:
        for line in maps:
            span = line.split(maxsplit=1)[0]
            start_text, _, end_text = span.partition("-")
            start, end = int(start_text, 16), int(end_text, 16)
            if start <= address < end:
                return start, end
    return None


def name_vma(address: int, size: int, name: str) -> bool:
    """Name the anonymous memory ``[address, address + size)``; False where the
    kernel has no VMA names (``CONFIG_ANON_VMA_NAME`` off: ``EINVAL``)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = _libc()
    result = libc.prctl(
        ctypes.c_int(PR_SET_VMA),
        ctypes.c_ulong(PR_SET_VMA_ANON_NAME),
        ctypes.c_ulong(address),
        ctypes.c_ulong(size),
        ctypes.c_char_p(name.encode()),
    )
    return int(result) == 0


def claim_own_vma(address: int, size: int, name: str) -> None:
    """Make ``[address, address + size)`` one VMA of its own, or refuse it.

    :raises ConfigError: the range is not exactly one VMA (and the kernel cannot
        be asked to make it one).
    """
    name_vma(address, size, name)
    found = vma_holding(address)
    if found != (address, address + size):
        where = "no mapping" if found is None else f"the mapping {found[0]:#x}-{found[1]:#x}"
        raise ConfigError(
            f"memory: GenieZone needs each region's host memory to be exactly one mapping (VMA) of its size; "
            f"{address:#x}+{size:#x} lies in {where}, and this kernel cannot split it (no anonymous VMA names)"
        )
