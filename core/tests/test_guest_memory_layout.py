"""Guest memory layout: costs that do not grow with the number of regions (issue 10,
item 7: adding N regions was O(N²), 65,534 of them took over two minutes), slot
reuse, and the life-cycle rules of allocate/insert/release/remove/close.

The cost test counts operations instead of timing them: how often the region
objects' range attributes are read and how often two regions are compared.  The
old overlap check read every region's range on every insertion, and removal
searched the list by equality; ``benchmarks/bench_guest_memory.py`` prints the
times.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from pyvmm import memory as memory_module
from pyvmm.config import MemoryRegionSpec
from pyvmm.errors import GuestMemoryError, VmStateError
from pyvmm.memory import GuestMemory, RamRegion

PAGE = 0x1000
COUNTS: Counter[str] = Counter()


def _counted(name: str) -> property:
    def get(self: Any) -> Any:
        COUNTS[name] += 1
        if name in self.__dict__:
            return self.__dict__[name]
        return getattr(super(CountingRegion, self), name)  # a property of RamRegion's

    def set_(self: Any, value: Any) -> None:
        self.__dict__[name] = value

    return property(get, set_)


class CountingRegion(RamRegion):
    """A RamRegion that counts reads of its range and comparisons with others."""

    guest_phys_addr = _counted("guest_phys_addr")
    end = _counted("end")
    size = _counted("size")
    spec = _counted("spec")

    def __eq__(self, other: object) -> bool:
        COUNTS["=="] += 1
        return self is other

    __hash__ = RamRegion.__hash__


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    monkeypatch.setattr(memory_module, "RamRegion", CountingRegion)
    COUNTS.clear()
    yield COUNTS
    COUNTS.clear()


def _cost_of_adding_and_removing(count: int, counts: Counter[str]) -> tuple[int, int, int]:
    memory = GuestMemory()
    addresses = [n * 2 * PAGE for n in range(count)]
    random.Random(count).shuffle(addresses)  # random order: neither append nor prepend
    counts.clear()
    regions = []
    for address in addresses:
        region = memory.allocate(MemoryRegionSpec(guest_phys_addr=address, size=PAGE))
        memory.insert(region)
        regions.append(region)
    added = sum(counts.values())
    counts.clear()
    for address in addresses:
        memory.read_u8(address)
    looked_up = sum(counts.values())
    random.Random(count + 1).shuffle(regions)
    counts.clear()
    for region in regions:
        memory.remove(region)
    removed = sum(counts.values())
    assert len(memory) == 0
    return added, looked_up, removed


def test_adding_looking_up_and_removing_cost_a_constant_per_region(counting: Counter[str]) -> None:
    small = _cost_of_adding_and_removing(256, counting)
    large = _cost_of_adding_and_removing(2048, counting)
    for what, few, many in zip(("add", "lookup", "remove"), small, large, strict=True):
        per_region_few, per_region_many = few / 256, many / 2048
        # O(1) attribute reads per region (O(log N) would be bisect's, which reads
        # plain ints): the per-region cost must not grow with N.
        assert per_region_many <= per_region_few + 1, (what, per_region_few, per_region_many)
        assert per_region_many < 16, (what, per_region_many)
    assert counting["=="] == 0  # regions are found by address, never by an equality scan


def test_the_lowest_free_slot_is_reused_first() -> None:
    memory = GuestMemory()
    regions = [memory.allocate(MemoryRegionSpec(guest_phys_addr=n * PAGE, size=PAGE)) for n in range(8)]
    for region in regions:
        memory.insert(region)
    for index in (5, 2, 7, 3):
        memory.remove(regions[index])
    slots = [memory.allocate(MemoryRegionSpec(guest_phys_addr=(100 + n) * PAGE, size=PAGE)).slot for n in range(5)]
    assert slots == [2, 3, 5, 7, 8]


def test_a_refused_allocation_takes_no_slot_and_no_range(monkeypatch: pytest.MonkeyPatch) -> None:
    memory = GuestMemory()

    def refuse(size: int) -> Any:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(memory_module, "allocate_ram", refuse)
    with pytest.raises(GuestMemoryError, match="cannot reserve 0x1000 bytes of host memory"):
        memory.allocate(MemoryRegionSpec(guest_phys_addr=0, size=PAGE))
    monkeypatch.undo()
    region = memory.allocate(MemoryRegionSpec(guest_phys_addr=0, size=PAGE))
    assert region.slot == 0
    memory.release_slot(region)


def test_release_slot_frees_range_and_slot_once() -> None:
    memory = GuestMemory()
    region = memory.allocate(MemoryRegionSpec(guest_phys_addr=0, size=PAGE))
    memory.release_slot(region)
    memory.release_slot(region)  # idempotent: the slot is not freed twice
    assert region.closed
    first = memory.allocate(MemoryRegionSpec(guest_phys_addr=0, size=PAGE))
    second = memory.allocate(MemoryRegionSpec(guest_phys_addr=PAGE, size=PAGE))
    assert (first.slot, second.slot) == (0, 1)


def test_insert_and_remove_refuse_foreign_or_repeated_regions() -> None:
    memory, other = GuestMemory(), GuestMemory()
    foreign = other.allocate(MemoryRegionSpec(guest_phys_addr=0, size=PAGE))
    with pytest.raises(VmStateError, match="not allocated by this guest memory"):
        memory.insert(foreign)
    with pytest.raises(GuestMemoryError, match="not mapped in this guest memory"):
        memory.remove(foreign)
    assert foreign not in memory
    region = memory.allocate(MemoryRegionSpec(guest_phys_addr=0, size=PAGE))
    memory.insert(region)
    assert region in memory
    assert "not a region" not in memory
    with pytest.raises(VmStateError, match="already inserted"):
        memory.insert(region)
    with pytest.raises(VmStateError, match="remove it instead"):
        memory.release_slot(region)
    memory.remove(region)
    assert region not in memory
    with pytest.raises(GuestMemoryError, match="not mapped"):
        memory.remove(region)


def test_close_refuses_a_region_still_being_added() -> None:
    """A region allocated before close() and inserted after (another thread was
    mapping it) is closed, not published into a closed guest memory."""
    memory = GuestMemory()
    pending = memory.allocate(MemoryRegionSpec(guest_phys_addr=0, size=PAGE))
    inserted = memory.allocate(MemoryRegionSpec(guest_phys_addr=PAGE, size=PAGE))
    memory.insert(inserted)
    memory.close()
    assert (memory.closed, inserted.closed, pending.closed) == (True, True, False)
    with pytest.raises(VmStateError, match="closed while the region was being added"):
        memory.insert(pending)
    assert pending.closed
    with pytest.raises(VmStateError, match="closed"):
        memory.allocate(MemoryRegionSpec(guest_phys_addr=4 * PAGE, size=PAGE))
    memory.close()  # idempotent


def test_regions_iterate_in_address_order_as_a_snapshot() -> None:
    memory = GuestMemory()
    for address in (0x30000, 0x10000, 0x20000):
        memory.insert(memory.allocate(MemoryRegionSpec(guest_phys_addr=address, size=PAGE)))
    snapshot = iter(memory)
    memory.remove(memory.region_at(0x20000))  # type: ignore[arg-type]
    assert [r.guest_phys_addr for r in snapshot] == [0x10000, 0x20000, 0x30000]
    assert [r.guest_phys_addr for r in memory] == [0x10000, 0x30000]
    assert len(memory) == 2


def test_region_mapping_is_the_host_ram_owner() -> None:
    memory = GuestMemory()
    region = memory.allocate(MemoryRegionSpec(guest_phys_addr=0, size=PAGE))
    assert region.mapping is region.ram.mapping is not None
    assert region.host_addr == region.ram.address
    memory.release_slot(region)
    assert region.mapping is None
