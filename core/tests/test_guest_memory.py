"""Guest memory: bounds, overlap, slots, zero-copy views, MAP_NORESERVE, cleanup."""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import sys
import weakref
from collections.abc import Iterator

import pytest
from coretests_support import MakeBackend, RecordingBackend

from pyvmm.capabilities import Capability
from pyvmm.config import MemoryRegionSpec
from pyvmm.errors import ConfigError, GuestMemoryError, HypervisorError, VmStateError
from pyvmm.memory import GuestMemory, RamRegion
from pyvmm.vm import Vm

PAGE = 0x1000


@pytest.fixture
def vm_and_backend(make_backend: MakeBackend) -> Iterator[tuple[Vm, RecordingBackend]]:
    test_backend, backend = make_backend([Capability.MEMORY_REMOVAL])
    with backend.create_vm() as vm:
        yield vm, test_backend


@pytest.fixture
def vm(vm_and_backend: tuple[Vm, RecordingBackend]) -> Vm:
    return vm_and_backend[0]


# --- bounds -------------------------------------------------------------------------


@pytest.fixture
def laid_out(vm: Vm) -> Vm:
    """[0x1000, 0x3000) and, adjacent, [0x3000, 0x4000); a hole; [0x10000, 0x11000)."""
    vm.add_memory(0x1000, 0x2000)
    vm.add_memory(0x3000, 0x1000)
    vm.add_memory(0x1_0000, 0x1000)
    return vm


def test_access_exactly_up_to_the_end(laid_out: Vm) -> None:
    mem = laid_out.memory
    mem.write(0x2FF8, b"ABCDEFGH")
    assert mem.read(0x2FF8, 8) == b"ABCDEFGH"
    assert mem.view(0x2FF8, 8).tobytes() == b"ABCDEFGH"
    assert mem.read_u64(0x2FF8) == int.from_bytes(b"ABCDEFGH", "little")
    assert mem.read(0x1000, 0x2000)[-8:] == b"ABCDEFGH"  # the whole region at once
    mem.write_u8(0x10FFF, 0x5A)
    assert mem.read_u8(0x10FFF) == 0x5A
    assert mem.contains(0x1000, 0x2000)
    assert not mem.contains(0x1000, 0x2001)


@pytest.mark.parametrize(
    ("gpa", "size", "message"),
    [
        (0x2FF9, 8, "runs past the end"),
        (0x10FFF, 2, "runs past the end"),
        (0x0FFF, 1, "not in guest RAM"),
        (0x4000, 1, "not in guest RAM"),  # the hole after the adjacent pair
        (0x8000, 8, "not in guest RAM"),
        (0x11000, 1, "not in guest RAM"),
        (0x2FF8, 16, "runs past the end"),  # spans two adjacent regions
        (0x1000, 0x3000, "runs past the end"),  # covers both adjacent regions exactly
        (-8, 8, "invalid guest access"),
        (0x1000, -1, "invalid guest access"),
    ],
    ids=[
        "one_past_end",
        "one_past_last_region",
        "below_first",
        "hole_after_pair",
        "hole",
        "above_last",
        "span_adjacent",
        "cover_adjacent",
        "negative_gpa",
        "negative_size",
    ],
)
def test_out_of_bounds_accesses_raise(laid_out: Vm, gpa: int, size: int, message: str) -> None:
    mem = laid_out.memory
    before = [bytes(r.view()) for r in mem]
    with pytest.raises(GuestMemoryError, match=message):
        mem.read(gpa, size)
    with pytest.raises(GuestMemoryError, match=message):
        mem.view(gpa, size)
    if size >= 0:  # write() takes its size from the data
        with pytest.raises(GuestMemoryError, match=message):
            mem.write(gpa, b"\xff" * size)
    with pytest.raises(GuestMemoryError, match=message):
        mem.fill(gpa, size, 0xEE)
    assert [bytes(r.view()) for r in mem] == before  # nothing was written anywhere
    assert not mem.contains(gpa, size)


def test_guest_memory_error_is_raised_before_host_memory_is_touched(laid_out: Vm) -> None:
    mem = laid_out.memory
    with pytest.raises(GuestMemoryError):
        mem.write_u64(0x2FFC, 0xFFFF_FFFF_FFFF_FFFF)
    assert mem.read(0x2FF0, 0x10) == bytes(0x10)
    assert mem.read(0x3000, 0x10) == bytes(0x10)


# --- layout -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addr", "size"),
    [(0x2000, 0x1000), (0x0, 0x2000), (0x2000, 0x4000), (0x0, 0x10000), (0x1000, 0x2000)],
    ids=["inside", "tail_over_start", "head_over_end", "covering", "identical"],
)
def test_overlap_rejected_naming_both_ranges(vm_and_backend: tuple[Vm, RecordingBackend], addr: int, size: int) -> None:
    vm, test_backend = vm_and_backend
    vm.add_memory(0x1000, 0x2000)
    mark = len(test_backend.calls)
    with pytest.raises(GuestMemoryError) as info:
        vm.add_memory(addr, size)
    assert f"{addr:#x}..{addr + size:#x}" in str(info.value)
    assert "0x1000..0x3000" in str(info.value)
    assert test_backend.hooks_since(mark) == []
    assert len(vm.memory) == 1
    assert vm.add_memory(0x3000, 0x1000).slot == 1  # the refused one took no slot


def test_lowest_free_slot_is_reused(vm_and_backend: tuple[Vm, RecordingBackend]) -> None:
    vm, test_backend = vm_and_backend
    regions = [vm.add_memory(i * 0x10000, 0x1000) for i in range(4)]
    assert [r.slot for r in regions] == [0, 1, 2, 3]
    vm.remove_memory(regions[2])
    vm.remove_memory(regions[1])
    assert [r.slot for r in vm.memory] == [0, 3]
    assert vm.add_memory(0x100000, 0x1000).slot == 1
    assert vm.add_memory(0x200000, 0x1000).slot == 2
    assert vm.add_memory(0x300000, 0x1000).slot == 4
    assert [call[1] for call in test_backend.calls_of("pyvmm_map_memory")] == [0, 1, 2, 3, 1, 2, 4]
    assert [call[1] for call in test_backend.calls_of("pyvmm_unmap_memory")] == [2, 1]


def test_removed_region_is_gone(vm: Vm) -> None:
    region = vm.add_memory(0x1000, 0x1000)
    vm.memory.write(0x1000, b"x")
    vm.remove_memory(region)
    assert region.closed
    assert vm.memory.region_at(0x1000) is None
    with pytest.raises(GuestMemoryError):
        vm.memory.read(0x1000, 1)
    with pytest.raises(VmStateError, match="unmapped"):
        region.view()
    with pytest.raises(ConfigError, match="not mapped"):
        vm.remove_memory(region)
    # The range is free again, and comes back zeroed.
    assert vm.add_memory(0x1000, 0x1000).view().tobytes() == bytes(0x1000)


def test_regions_are_listed_in_address_order(vm: Vm) -> None:
    for addr in (0x30000, 0x10000, 0x20000):
        vm.add_memory(addr, 0x1000)
    assert [r.guest_phys_addr for r in vm.memory] == [0x10000, 0x20000, 0x30000]
    assert vm.memory.region_at(0x20FFF) is not None
    assert vm.memory.region_at(0x21000) is None


# --- zero-copy views ------------------------------------------------------------------


def test_views_are_zero_copy(vm: Vm) -> None:
    region = vm.add_memory(0x4000, 0x2000)
    view = vm.memory.view(0x4800, 16)
    view[0:4] = b"abcd"
    assert vm.memory.read(0x4800, 4) == b"abcd"
    vm.memory.write(0x4804, b"efgh")
    assert view[4:8].tobytes() == b"efgh"
    # host_addr is the address the hypervisor is given: the same bytes live there.
    assert ctypes.string_at(region.host_addr + 0x800, 8) == b"abcdefgh"
    ctypes.memmove(region.host_addr + 0x808, b"ijkl", 4)
    assert view[8:12].tobytes() == b"ijkl"
    assert not view.readonly
    view.release()


def test_live_view_keeps_the_mapping_after_removal(vm: Vm) -> None:
    region = vm.add_memory(0x4000, 0x2000)
    vm.memory.write(0x5000, b"still here")
    view = vm.memory.view(0x5000, 0x1000)
    assert region.mapping is not None
    mapping_ref = weakref.ref(region.mapping)
    vm.remove_memory(region)
    assert region.closed
    # No use-after-unmap: the view still reads and writes the old pages.
    assert view[:10].tobytes() == b"still here"
    view[:3] = b"new"
    assert view[:10].tobytes() == b"newll here"
    assert mapping_ref() is not None
    view.release()
    gc.collect()
    assert mapping_ref() is None  # released with the last view: unmapped


def test_live_view_survives_vm_close(make_backend: MakeBackend) -> None:
    _, backend = make_backend()
    vm = backend.create_vm()
    region = vm.add_memory(0, 0x1000)
    vm.memory.write(0, b"\x42")
    view = vm.memory.view(0, 0x1000)
    assert region.mapping is not None
    mapping_ref = weakref.ref(region.mapping)
    vm.close()
    assert region.closed
    assert len(vm.memory) == 0
    assert view[0] == 0x42
    view[1] = 0x43
    assert mapping_ref() is not None
    del view
    gc.collect()
    assert mapping_ref() is None


def test_close_without_views_unmaps_at_once() -> None:
    memory = GuestMemory()
    region = memory.allocate(MemoryRegionSpec(guest_phys_addr=0, size=PAGE))
    memory.insert(region)
    assert region.mapping is not None
    mapping = region.mapping
    memory.close()
    assert mapping.closed
    assert region.mapping is None


# --- MAP_NORESERVE --------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_huge_region_costs_nothing_until_touched() -> None:
    memory = GuestMemory()
    size = 64 << 30
    rss_before = _rss_bytes()
    try:
        region = memory.allocate(MemoryRegionSpec(guest_phys_addr=0, size=size))
    except GuestMemoryError as exc:
        with open("/proc/sys/vm/overcommit_memory") as policy:
            mode = policy.read().strip()
        pytest.skip(f"host refuses a 64 GiB MAP_NORESERVE mapping (vm.overcommit_memory={mode}): {exc}")
    memory.insert(region)
    try:
        assert _rss_bytes() - rss_before < 32 << 20
        memory.write_u64(size - 8, 0x1122_3344_5566_7788)  # touch the very last page
        memory.write_u64(size // 2, 1)
        assert memory.read_u64(size - 8) == 0x1122_3344_5566_7788
        assert memory.read_u64(0) == 0
        assert _rss_bytes() - rss_before < 32 << 20
    finally:
        memory.close()


# --- nothing half-made ----------------------------------------------------------------


def test_failed_map_leaves_nothing(vm_and_backend: tuple[Vm, RecordingBackend]) -> None:
    vm, test_backend = vm_and_backend
    kept = vm.add_memory(0, PAGE)
    test_backend.fail("pyvmm_map_memory", HypervisorError("KVM_SET_USER_MEMORY_REGION", 12))
    with pytest.raises(HypervisorError, match="KVM_SET_USER_MEMORY_REGION failed: \\[ENOMEM\\]"):
        vm.add_memory(0x10000, 0x4000)
    failed = test_backend.mapped[-1]
    assert failed.slot == 1
    assert failed.closed
    assert failed.mapping is None
    assert list(vm.memory) == [kept]
    assert vm.memory.region_at(0x10000) is None
    with pytest.raises(GuestMemoryError):
        vm.memory.read(0x10000, 1)
    # The slot and the range are free again.
    again = vm.add_memory(0x10000, 0x4000)
    assert again.slot == 1
    assert again is not failed


def test_failed_map_with_a_base_exception_also_cleans_up(vm_and_backend: tuple[Vm, RecordingBackend]) -> None:
    vm, test_backend = vm_and_backend
    test_backend.fail("pyvmm_map_memory", KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        vm.add_memory(0, PAGE)
    assert test_backend.mapped[-1].closed
    assert len(vm.memory) == 0
    assert vm.add_memory(0, PAGE).slot == 0


def test_host_mmap_failure_is_a_guest_memory_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> mmap.mmap:
        raise OSError(12, "Cannot allocate memory")

    memory = GuestMemory()
    monkeypatch.setattr(mmap, "mmap", refuse)  # the module pyvmm.memory maps with
    with pytest.raises(GuestMemoryError, match="cannot reserve 0x1000 bytes"):
        memory.allocate(MemoryRegionSpec(guest_phys_addr=0, size=PAGE))
    monkeypatch.undo()
    region = memory.allocate(MemoryRegionSpec(guest_phys_addr=0, size=PAGE))
    assert region.slot == 0  # the failed attempt consumed no slot
    region.close()


def test_region_repr_shows_slot_range_and_flags() -> None:
    region = RamRegion(MemoryRegionSpec(guest_phys_addr=0x1000, size=PAGE, read_only=True, log_dirty=True), 3)
    assert repr(region) == "RamRegion(slot=3, 0x1000..0x2000, rd)"
    region.close()
    region.close()  # idempotent


def test_dirty_log_only_for_a_region_of_this_vm(make_backend: MakeBackend) -> None:
    """After removal the slot is reused: reading the old region's log would read
    another region's bitmap, so core refuses it without asking the backend."""
    test_backend, backend = make_backend([Capability.DIRTY_LOG, Capability.MEMORY_REMOVAL])
    with backend.create_vm() as vm, backend.create_vm() as other:
        old = vm.add_memory(0, 0x8000, log_dirty=True)
        vm.remove_memory(old)
        new = vm.add_memory(0x10000, 0x8000, log_dirty=True)
        assert new.slot == old.slot
        foreign = other.add_memory(0, 0x8000, log_dirty=True)
        plain = vm.add_memory(0x20000, 0x1000)
        mark = len(test_backend.calls)
        for region in (old, foreign):
            with pytest.raises(ConfigError, match="not mapped in this VM"):
                vm.dirty_log(region)
        with pytest.raises(ConfigError, match="log_dirty"):
            vm.dirty_log(plain)
        assert test_backend.hooks_since(mark) == []
        assert vm.dirty_pages(new) == []
        assert test_backend.hooks_since(mark) == ["pyvmm_get_dirty_log"]


def test_dirty_pages_decodes_the_bitmap(make_backend: MakeBackend) -> None:
    _, backend = make_backend([Capability.DIRTY_LOG])
    backend.hooks.get_dirty_log = lambda vm, region: bytearray(b"\x05\x80")
    with backend.create_vm() as vm:
        region = vm.add_memory(0x40000, 0x10000, log_dirty=True)
        assert vm.dirty_log(region) == b"\x05\x80"
        assert vm.dirty_pages(region) == [0x40000, 0x42000, 0x4F000]  # pages 0, 2 and 15
