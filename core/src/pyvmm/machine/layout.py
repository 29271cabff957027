"""Guest-physical layout of the x86_64 machine.

RAM starts at 0.  The 768 MiB below 4 GiB (3.25 GiB .. 4 GiB) stay free for
MMIO: the IOAPIC (0xfec00000), the local APICs (0xfee00000), the demo device,
and the hypervisor's own pages (e.g. the real-mode TSS an in-kernel hypervisor
puts at 0xfffbd000 on Intel hosts).  RAM that does not fit below the hole
continues at 4 GiB, as on a PC.
"""

from __future__ import annotations

from pyvmm.config import PAGE_SIZE
from pyvmm.lean_dataclass import lean_dataclass

#: Start of the MMIO hole below 4 GiB (3.25 GiB).
MMIO_HOLE_START = 0xD000_0000
FOUR_GIB = 1 << 32
IOAPIC_BASE = 0xFEC0_0000
LAPIC_BASE = 0xFEE0_0000
#: The smallest RAM the machine accepts: the boot tables, a stack and a small
#: image need well under this.
MIN_RAM = 2 << 20


@lean_dataclass(frozen=True)
class RamRange:
    start: int
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size


def ram_ranges(ram_size: int) -> list[RamRange]:
    """The RAM ranges of a machine with ``ram_size`` bytes of RAM."""
    if ram_size % PAGE_SIZE or ram_size <= 0:
        raise ValueError(f"RAM size {ram_size:#x} is not a positive multiple of {PAGE_SIZE}")
    low = min(ram_size, MMIO_HOLE_START)
    ranges = [RamRange(0, low)]
    if ram_size > low:
        ranges.append(RamRange(FOUR_GIB, ram_size - low))
    return ranges


def in_mmio_hole(address: int) -> bool:
    return MMIO_HOLE_START <= address < FOUR_GIB
