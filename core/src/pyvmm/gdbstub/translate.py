"""Guest-virtual to guest-physical addresses, for the debugger's memory access.

gdb asks for memory at the addresses the guest's code uses.  On x86_64 this
module walks the guest's page tables in guest RAM, as the MMU would: no paging
(CR0.PG clear: the address is physical), 32-bit paging, PAE, and 4- or 5-level
long-mode paging (CR4.LA57), with 4 KiB, 2 MiB, 4 MiB and 1 GiB pages.  On
aarch64 the address is taken as physical: the stub cannot read the
translation registers through the backend API (the demo guest runs with the
MMU off, where that is exact).  A page that is not present, or a table outside
guest RAM, is an error: gdb shows "Cannot access memory at address ...".
"""

from __future__ import annotations

from pyvmm.errors import PyvmmError
from pyvmm.memory import GuestMemory

CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
EFER_LMA = 1 << 10
PRESENT = 1
LARGE = 1 << 7
_ADDRESS = ((1 << 52) - 1) & ~0xFFF


class TranslationError(PyvmmError):
    """The guest's page tables do not map the address."""


def x86_translate(memory: GuestMemory, address: int, *, cr0: int, cr3: int, cr4: int, efer: int) -> tuple[int, int]:
    """(physical address, bytes left in its page) of guest-virtual ``address``.

    :raises TranslationError: not mapped, or a table entry outside guest RAM.
    """
    if not cr0 & CR0_PG:
        return address & 0xFFFF_FFFF_FFFF_FFFF, 0x1000 - (address & 0xFFF)
    try:
        if efer & EFER_LMA:
            levels = 5 if cr4 & CR4_LA57 else 4
            return _walk(memory, address, cr3 & _ADDRESS, levels=levels, entry_size=8, bits=9)
        if cr4 & CR4_PAE:
            pdpte = memory.read_u64((cr3 & 0xFFFF_FFE0) + ((address >> 30) & 3) * 8)
            if not pdpte & PRESENT:
                raise TranslationError(f"{address:#x} is not mapped (PDPTE not present)")
            return _walk(memory, address, pdpte & _ADDRESS, levels=2, entry_size=8, bits=9)
        large_ok = bool(cr4 & CR4_PSE)
        return _walk(
            memory, address & 0xFFFF_FFFF, cr3 & 0xFFFF_F000, levels=2, entry_size=4, bits=10, large_ok=large_ok
        )
    except TranslationError:
        raise
    except PyvmmError as exc:
        raise TranslationError(f"{address:#x}: a page table lies outside guest RAM ({exc})") from None


def _walk(
    memory: GuestMemory, address: int, table: int, *, levels: int, entry_size: int, bits: int, large_ok: bool = True
) -> tuple[int, int]:
    for level in range(levels, 0, -1):
        shift = 12 + bits * (level - 1)
        index = (address >> shift) & ((1 << bits) - 1)
        where = table + index * entry_size
        entry = memory.read_u64(where) if entry_size == 8 else memory.read_u32(where)
        if not entry & PRESENT:
            raise TranslationError(f"{address:#x} is not mapped (level-{level} entry not present)")
        if level == 1 or (entry & LARGE and level <= 3 and large_ok):
            page = 1 << shift
            if entry_size == 4 and level == 2:  # a 4 MiB page: bits 21:13 hold address bits 39:32
                base = (entry & 0xFFC0_0000) | ((entry >> 13) & 0xFF) << 32
            else:
                base = entry & _ADDRESS & ~(page - 1)
            offset = address & (page - 1)
            return base + offset, page - offset
        table = entry & (_ADDRESS if entry_size == 8 else 0xFFFF_F000)
    raise AssertionError("unreachable")
