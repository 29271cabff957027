"""Guest memory under concurrency (issue 10, item 3).

Reads and writes race ``insert``/``remove``/``close`` on other threads.  Each
region is filled with words naming the slot address it was added at, so a read
that returns another region's bytes is caught, and every write stamps the slot it
addressed, so a write that lands in another region is caught when the regions are
checked afterwards (through views kept from before their removal, which keep
their memory mapped).  An access may fail only with a pyvmm error
(:class:`GuestMemoryError` or :class:`VmStateError`).

A deterministic test replays the reported interleaving: the lists change between
a lookup's bisect and its index.
"""

from __future__ import annotations

import random
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pyvmm import memory as memory_module
from pyvmm.config import MemoryRegionSpec
from pyvmm.errors import GuestMemoryError, VmStateError
from pyvmm.memory import GuestMemory, RamRegion

PAGE = 0x1000
STRIDE = 0x10_0000  # slot k's regions start at k * STRIDE and span 1..4 pages
SLOTS = 12
WORD = struct.Struct("<Q")
#: Stamped by a writer: the slot index with this bit, so reads can tell it from a fill.
WRITTEN = 1 << 40


def _word(slot: int, generation: int) -> int:
    return (generation << 16) | slot


def _slot_of(word: int) -> int:
    return word & 0xFFFF


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Switch threads every few bytecodes, so the races happen within the test's budget."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def _add(memory: GuestMemory, slot: int, pages: int, generation: int) -> RamRegion:
    region = memory.allocate(MemoryRegionSpec(guest_phys_addr=slot * STRIDE, size=pages * PAGE))
    region.view()[:] = WORD.pack(_word(slot, generation)) * (pages * PAGE // WORD.size)
    memory.insert(region)  # visible only once filled: a lookup never sees zeros
    return region


def _check_contents(slot: int, data: bytes, where: str) -> None:
    for (word,) in WORD.iter_unpack(data):
        assert _slot_of(word) == slot, f"{where}: slot {slot}'s region holds a word of slot {_slot_of(word)}"


def test_accesses_racing_add_and_remove(fast_switching: None) -> None:
    memory = GuestMemory()
    rng = random.Random(1)
    regions: dict[int, RamRegion] = {slot: _add(memory, slot, 1 + slot % 4, 0) for slot in range(SLOTS)}
    retired: list[tuple[int, memoryview]] = []  # views of removed regions: still mapped, checked at the end
    failures: list[str] = []
    typed_errors = 0
    stop = threading.Event()
    lock = threading.Lock()

    def note(message: str) -> None:
        with lock:
            failures.append(message)

    def reader(seed: int) -> None:
        nonlocal typed_errors
        rng = random.Random(seed)
        while not stop.is_set():
            slot = rng.randrange(SLOTS)
            offset = rng.randrange(0, 4 * PAGE, 8)
            size = rng.choice((8, 8, 64, PAGE))
            try:
                data = memory.read(slot * STRIDE + offset, size)
                if rng.random() < 0.1:
                    data += memory.view(slot * STRIDE + offset, 8).tobytes()
                    data += WORD.pack(memory.read_u64(slot * STRIDE + offset))
            except (GuestMemoryError, VmStateError):
                with lock:
                    typed_errors += 1
                continue
            except Exception as exc:  # noqa: BLE001 - the thread reports any untyped error
                note(f"read raised an untyped {type(exc).__name__}: {exc}")
                return
            for (word,) in WORD.iter_unpack(data):
                if _slot_of(word) != slot:
                    note(f"read at slot {slot} + {offset:#x} returned slot {_slot_of(word)}'s bytes")
                    return

    def writer(seed: int) -> None:
        nonlocal typed_errors
        rng = random.Random(seed)
        while not stop.is_set():
            slot = rng.randrange(SLOTS)
            offset = rng.randrange(0, 4 * PAGE, 8)
            try:
                if rng.random() < 0.5:
                    memory.write_u64(slot * STRIDE + offset, WRITTEN | slot)
                else:
                    memory.write(slot * STRIDE + offset, WORD.pack(WRITTEN | slot) * 2)
            except (GuestMemoryError, VmStateError):
                with lock:
                    typed_errors += 1
            except Exception as exc:  # noqa: BLE001 - the thread reports any untyped error
                note(f"write raised an untyped {type(exc).__name__}: {exc}")
                return

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(3)]
    threads += [threading.Thread(target=writer, args=(seed,)) for seed in range(10, 12)]
    for thread in threads:
        thread.start()
    try:
        for generation in range(1, 400):
            slot = rng.randrange(SLOTS)
            old = regions.pop(slot)
            retired.append((slot, old.view()))
            memory.remove(old)
            regions[slot] = _add(memory, slot, rng.randint(1, 4), generation)
            if failures:
                break
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert failures == []
    for slot, view in retired:
        _check_contents(slot, view.tobytes(), "a removed region")
    for slot, region in regions.items():
        _check_contents(slot, region.view().tobytes(), "a live region")
    assert typed_errors > 0  # some accesses missed (past a shorter region, or a slot between regions)
    memory.close()


def test_accesses_racing_close(fast_switching: None) -> None:
    for attempt in range(20):
        memory = GuestMemory()
        for slot in range(SLOTS):
            _add(memory, slot, 2, 0)
        errors: list[BaseException] = []
        started = threading.Barrier(3)

        def access(
            seed: int,
            memory: GuestMemory = memory,
            errors: list[BaseException] = errors,
            started: threading.Barrier = started,
        ) -> None:
            rng = random.Random(seed)
            started.wait()
            for _ in range(300):
                slot = rng.randrange(SLOTS)
                try:
                    data = memory.read(slot * STRIDE + rng.randrange(0, 2 * PAGE, 8), 8)
                    memory.write_u64(slot * STRIDE + rng.randrange(0, 2 * PAGE, 8), WRITTEN | slot)
                except (GuestMemoryError, VmStateError):
                    continue
                except BaseException as exc:  # noqa: BLE001 - the thread reports whatever it raised
                    errors.append(exc)
                    return
                if _slot_of(WORD.unpack(data)[0]) != slot:
                    errors.append(AssertionError(f"slot {slot} read another region's bytes"))
                    return

        threads = [threading.Thread(target=access, args=(attempt * 10 + n,)) for n in range(2)]
        for thread in threads:
            thread.start()
        started.wait()
        memory.close()
        for thread in threads:
            thread.join(30)
        assert errors == []
        with pytest.raises(VmStateError, match="closed"):
            memory.read(0, 8)


def _tear(memory: GuestMemory, change: Callable[[], object]) -> list[bool]:
    """Make ``change`` happen inside the next lookup, between its bisect over the
    start addresses and its indexing of the region list (what another thread can do
    when the interpreter switches there).  Returns a flag that says it happened."""
    happened: list[bool] = []

    class TornList(list):  # type: ignore[type-arg]
        def __getitem__(self, index: Any) -> Any:
            if not happened:
                happened.append(True)
                change()
            return super().__getitem__(index)

    index = memory._index
    for chunk, regions in enumerate(index.regions):
        index.regions[chunk] = TornList(regions)
    return happened


def _region(memory: GuestMemory, slot: int) -> RamRegion:
    region = memory.region_at(slot * STRIDE)
    assert region is not None
    return region


@pytest.mark.parametrize("change", ["remove below", "add below", "split the chunk", "close"])
def test_a_lookup_torn_by_a_layout_change_never_returns_another_region(change: str) -> None:
    """The reported bug, replayed deterministically: the region list shifts between
    a lookup's bisect and its indexing, so the index names a neighbour; the old
    lookup returned it with a negative offset (its bytes, read from its end)."""
    memory = GuestMemory()
    for slot in (1, 2, 3):
        _add(memory, slot, 1, 0)
    if change == "split the chunk":
        # Fill the chunk to one below its split point, above the slots read here.
        for n in range(2 * memory_module._CHUNK - 4):
            _add(memory, 100 + n, 1, 0)
    actions: dict[str, Callable[[], object]] = {
        "remove below": lambda: memory.remove(_region(memory, 1)),
        "add below": lambda: _add(memory, 0, 1, 1),
        "split the chunk": lambda: _add(memory, 0, 1, 1),
        "close": memory.close,
    }
    happened = _tear(memory, actions[change])
    if change == "close":
        with pytest.raises(VmStateError):
            memory.read(2 * STRIDE + 8, 8)
    else:
        assert memory.read(2 * STRIDE + 8, 8) == WORD.pack(_word(2, 0))
        assert memory.read_u64(3 * STRIDE) == _word(3, 0)
    assert happened == [True]
    if change == "split the chunk":
        assert len(memory._index.regions) == 2


def test_concurrent_adds_of_overlapping_ranges_cannot_both_succeed() -> None:
    """The overlap check covers regions still being added (allocated, being mapped
    by the backend, not yet inserted), not only inserted ones."""
    memory = GuestMemory()
    first = memory.allocate(MemoryRegionSpec(guest_phys_addr=0x10000, size=0x4000))
    with pytest.raises(GuestMemoryError, match=r"overlaps 0x10000\.\.0x14000"):
        memory.allocate(MemoryRegionSpec(guest_phys_addr=0x12000, size=0x4000))
    results: list[BaseException | RamRegion] = []
    barrier = threading.Barrier(8)

    def add() -> None:
        barrier.wait()
        try:
            results.append(memory.allocate(MemoryRegionSpec(guest_phys_addr=0x20000, size=0x1000)))
        except GuestMemoryError as exc:
            results.append(exc)

    threads = [threading.Thread(target=add) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    winners = [r for r in results if isinstance(r, RamRegion)]
    assert len(winners) == 1 and len(results) == 8
    memory.release_slot(first)
    memory.release_slot(winners[0])
