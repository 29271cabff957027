"""One memory slot, one host VMA.

``GZVM_SET_USER_MEMORY_REGION`` looks up the VMA holding the region's host address
and refuses the region (``EINVAL``) unless that VMA is exactly ``memory_size``
long (``gzvm_vm.c gzvm_vm_ioctl_set_memory_region``: ``vma_lookup``, then
``vm_end - vm_start != memory_size``; ``docs/backends/geniezone.md`` §4.2).
pyvmm's guest RAM is a private anonymous mapping per region, and the kernel
merges adjacent anonymous mappings with the same flags into one VMA -- so two
regions allocated next to each other would break the rule.

:func:`claim_own_vma` makes the region a VMA of its own before the driver
sees it.  The kernel splits a VMA wherever an attribute changes inside it and
merges neighbours only when all their attributes agree, so:

1. it names the region (``PR_SET_VMA_ANON_NAME``, Android's anonymous-VMA
   names, which Android kernels have): a name of its own splits the VMA at the
   region's edges and no neighbour shares it;
2. where the kernel has no VMA names, it gives the region a combination of two
   ``madvise`` flags -- ``MADV_DONTDUMP`` (guest RAM out of core dumps) and
   ``MADV_DONTFORK`` (not copied into a forked child) -- that neither neighbour
   has (``VmFlags`` ``dd``/``dc`` in ``/proc/self/smaps``): four combinations,
   at most two neighbours, so one always differs from both.

Then it checks ``/proc/self/maps``; a range that is still not exactly one VMA
is refused with a :class:`~pyvmm.errors.ConfigError`, before any ioctl.
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


#: ``madvise`` advice values (asm-generic/mman-common.h).
MADV_DONTFORK, MADV_DOFORK, MADV_DONTDUMP, MADV_DODUMP = 10, 11, 16, 17

#: The flag combinations a region may take, ``(dontdump, dontfork)``, in order of
#: preference: keeping guest RAM out of core dumps is welcome, not copying it
#: into a child less so.
_COMBINATIONS = ((True, False), (True, True), (False, True), (False, False))


def _smaps_flags() -> dict[tuple[int, int], frozenset[str]]:
    """Every VMA's ``VmFlags`` by ``(start, end)``."""
    flags: dict[tuple[int, int], frozenset[str]] = {}
    span: tuple[int, int] | None = None
    with open("/proc/self/smaps", encoding="ascii") as smaps:
        for line in smaps:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                start_text, _, end_text = head.partition("-")
                span = (int(start_text, 16), int(end_text, 16))
            elif head == "VmFlags:" and span is not None:
                flags[span] = frozenset(line.split()[1:])
    return flags


def _combination(vma_flags: frozenset[str]) -> tuple[bool, bool]:
    return "dd" in vma_flags, "dc" in vma_flags


def _madvise(address: int, size: int, advice: int) -> bool:
    return int(_libc().madvise(ctypes.c_void_p(address), ctypes.c_size_t(size), ctypes.c_int(advice))) == 0


def split_by_flags(address: int, size: int) -> bool:
    """Give ``[address, address + size)`` a dump/fork flag combination neither
    neighbouring VMA has (module docstring, step 2).  False if madvise failed."""
    if not sys.platform.startswith("linux"):
        return False
    end = address + size
    taken = {
        _combination(vma_flags)
        for (start, stop), vma_flags in _smaps_flags().items()
        if stop == address or start == end or (start < address < stop) or (start < end < stop)
    }
    # A VMA reaching into the range from outside is split by the advice; its
    # outer part keeps its flags, so it counts as a neighbour too.
    dontdump, dontfork = next(c for c in _COMBINATIONS if c not in taken)
    return _madvise(address, size, MADV_DONTDUMP if dontdump else MADV_DODUMP) and _madvise(
        address, size, MADV_DONTFORK if dontfork else MADV_DOFORK
    )


def claim_own_vma(address: int, size: int, name: str) -> None:
    """Make ``[address, address + size)`` one VMA of its own, or refuse it.

    :raises ConfigError: the range could not be made exactly one VMA.
    """
    if name_vma(address, size, name) and vma_holding(address) == (address, address + size):
        return
    split_by_flags(address, size)
    found = vma_holding(address)
    if found != (address, address + size):
        where = "no mapping" if found is None else f"the mapping {found[0]:#x}-{found[1]:#x}"
        raise ConfigError(
            f"memory: GenieZone needs each region's host memory to be exactly one mapping (VMA) of its size; "
            f"{address:#x}+{size:#x} lies in {where} and could not be split from it"
        )
