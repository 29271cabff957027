"""One negative test per rule of the WHPX model: a deliberately wrong call
through the DLL seam gets the rule's HRESULT, and the model records the rule.

The calls are made raw (ctypes buffers, integer addresses), the way the DLL
receives them, so each test breaks exactly one rule."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvmm.testing.driver_model import E_POINTER_RULE, Rule
from pyvmm_whpx import model as m
from pyvmm_whpx.model import WhpxModel

PAGE = 4096


def hresult(rule: Rule) -> int:
    code = rule.errno & 0xFFFF_FFFF
    return code - (1 << 32) if code & 0x8000_0000 else code


def refused(model: WhpxModel, rule: Rule, result: int) -> None:
    assert result == hresult(rule), f"{result:#x} != {rule}"
    assert model.last_rejection is not None and model.last_rejection.rule is rule


def call(model: WhpxModel, name: str, *args: Any) -> int:
    return int(model.function(name)(*args))


def new_partition(model: WhpxModel, *, count: int | None = 1, setup: bool = True) -> int:
    out = ctypes.c_uint64()
    assert call(model, "WHvCreatePartition", ctypes.addressof(out)) == 0
    handle = out.value
    if count is not None:
        value = ctypes.create_string_buffer(struct.pack("<I", count), 32)
        assert call(model, "WHvSetPartitionProperty", handle, 0x1FFF, ctypes.addressof(value), 32) == 0
    if setup:
        assert call(model, "WHvSetupPartition", handle) == 0
    return handle


@pytest.fixture
def page() -> Iterator[int]:
    area = mmap.mmap(-1, 2 * PAGE)
    anchor = ctypes.c_char.from_buffer(area)
    address = ctypes.addressof(anchor)
    del anchor
    yield address
    area.close()


def test_unknown_capability(model: WhpxModel) -> None:
    buffer = ctypes.create_string_buffer(8)
    refused(model, m.R_UNKNOWN_CAPABILITY, call(model, "WHvGetCapability", 0x7777, ctypes.addressof(buffer), 8, 0))


def test_capability_buffer_too_small(model: WhpxModel) -> None:
    buffer = ctypes.create_string_buffer(8)
    refused(model, m.R_INSUFFICIENT_BUFFER, call(model, "WHvGetCapability", 1, ctypes.addressof(buffer), 4, 0))


def test_a_known_capability_is_answered(model: WhpxModel) -> None:
    buffer = ctypes.create_string_buffer(8)
    written = ctypes.c_uint32()
    assert call(model, "WHvGetCapability", 1, ctypes.addressof(buffer), 8, ctypes.addressof(written)) == 0
    assert written.value == 8 and struct.unpack("<Q", buffer.raw)[0] & (1 << 3)
    assert model.rejections == []


def test_unknown_property(model: WhpxModel) -> None:
    handle = new_partition(model, setup=False)
    value = ctypes.create_string_buffer(32)
    refused(
        model, m.R_UNKNOWN_PROPERTY, call(model, "WHvSetPartitionProperty", handle, 0x4242, ctypes.addressof(value), 32)
    )


def test_setup_only_property_after_setup(model: WhpxModel) -> None:
    handle = new_partition(model)
    value = ctypes.create_string_buffer(struct.pack("<I", 2), 32)
    result = call(model, "WHvSetPartitionProperty", handle, 0x1FFF, ctypes.addressof(value), 32)
    refused(model, m.R_PROPERTY_AFTER_SETUP, result)


def test_a_property_settable_after_setup_is_accepted(model: WhpxModel) -> None:
    handle = new_partition(model)
    value = ctypes.create_string_buffer(32)  # ExtendedVmExits = 0
    assert call(model, "WHvSetPartitionProperty", handle, 0x0001, ctypes.addressof(value), 32) == 0
    assert model.rejections == []


def test_setup_without_processor_count(model: WhpxModel) -> None:
    handle = new_partition(model, count=None, setup=False)
    refused(model, m.R_SETUP_INCOMPLETE, call(model, "WHvSetupPartition", handle))


def test_setup_twice(model: WhpxModel) -> None:
    handle = new_partition(model)
    refused(model, m.R_SETUP_TWICE, call(model, "WHvSetupPartition", handle))


def test_map_before_setup(model: WhpxModel, page: int) -> None:
    handle = new_partition(model, setup=False)
    refused(model, m.R_NOT_SET_UP, call(model, "WHvMapGpaRange", handle, page, 0, PAGE, 7))


def test_vp_before_setup(model: WhpxModel) -> None:
    handle = new_partition(model, setup=False)
    refused(model, m.R_NOT_SET_UP, call(model, "WHvCreateVirtualProcessor", handle, 0, 0))


@pytest.mark.parametrize(("offset", "gpa", "size"), [(1, 0, PAGE), (0, 0x10, PAGE), (0, 0, 100)])
def test_map_alignment(model: WhpxModel, page: int, offset: int, gpa: int, size: int) -> None:
    handle = new_partition(model)
    refused(model, m.R_MAP_ALIGNMENT, call(model, "WHvMapGpaRange", handle, page + offset, gpa, size, 7))


def test_unmap_of_a_range_never_mapped(model: WhpxModel) -> None:
    handle = new_partition(model)
    refused(model, m.R_RANGE_NOT_FOUND, call(model, "WHvUnmapGpaRange", handle, 0x10000, PAGE))


def test_dirty_bitmap_of_an_untracked_range(model: WhpxModel, page: int) -> None:
    handle = new_partition(model)
    assert call(model, "WHvMapGpaRange", handle, page, 0, PAGE, 7) == 0
    bitmap = ctypes.c_uint64()
    result = call(model, "WHvQueryGpaRangeDirtyBitmap", handle, 0, PAGE, ctypes.addressof(bitmap), 8)
    refused(model, m.R_RANGE_NOT_FOUND, result)


def test_dirty_bitmap_of_a_range_never_mapped(model: WhpxModel) -> None:
    handle = new_partition(model)
    bitmap = ctypes.c_uint64()
    result = call(model, "WHvQueryGpaRangeDirtyBitmap", handle, 0x40000, PAGE, ctypes.addressof(bitmap), 8)
    refused(model, m.R_RANGE_NOT_FOUND, result)


def test_dirty_bitmap_too_small(model: WhpxModel, page: int) -> None:
    handle = new_partition(model)
    assert call(model, "WHvMapGpaRange", handle, page, 0, PAGE, 7 | 8) == 0
    bitmap = ctypes.c_uint64()
    result = call(model, "WHvQueryGpaRangeDirtyBitmap", handle, 0, PAGE, ctypes.addressof(bitmap), 4)
    refused(model, m.R_DIRTY_BITMAP_SIZE, result)


def test_create_vp_with_flags(model: WhpxModel) -> None:
    handle = new_partition(model)
    refused(model, m.R_FLAGS_NOT_ZERO, call(model, "WHvCreateVirtualProcessor", handle, 0, 1))


def test_cancel_with_flags(model: WhpxModel) -> None:
    handle = new_partition(model)
    assert call(model, "WHvCreateVirtualProcessor", handle, 0, 0) == 0
    refused(model, m.R_FLAGS_NOT_ZERO, call(model, "WHvCancelRunVirtualProcessor", handle, 0, 2))


def test_vp_index_beyond_processor_count(model: WhpxModel) -> None:
    handle = new_partition(model, count=2)
    refused(model, m.R_VP_INDEX, call(model, "WHvCreateVirtualProcessor", handle, 2, 0))


def test_vp_created_twice(model: WhpxModel) -> None:
    handle = new_partition(model)
    assert call(model, "WHvCreateVirtualProcessor", handle, 0, 0) == 0
    refused(model, m.R_VP_EXISTS, call(model, "WHvCreateVirtualProcessor", handle, 0, 0))


def test_run_of_a_vp_that_does_not_exist(model: WhpxModel) -> None:
    handle = new_partition(model, count=2)
    context = ctypes.create_string_buffer(224)
    refused(model, m.R_NO_VP, call(model, "WHvRunVirtualProcessor", handle, 1, ctypes.addressof(context), 224))


def test_exit_buffer_too_small(model: WhpxModel) -> None:
    handle = new_partition(model)
    assert call(model, "WHvCreateVirtualProcessor", handle, 0, 0) == 0
    context = ctypes.create_string_buffer(224)
    refused(model, m.R_EXIT_BUFFER, call(model, "WHvRunVirtualProcessor", handle, 0, ctypes.addressof(context), 200))


def test_unknown_register_name(model: WhpxModel) -> None:
    handle = new_partition(model)
    assert call(model, "WHvCreateVirtualProcessor", handle, 0, 0) == 0
    names = (ctypes.c_uint32 * 1)(0x7FFF)
    values = ctypes.create_string_buffer(16)
    result = call(model, "WHvGetVirtualProcessorRegisters", handle, 0, ctypes.addressof(names), 1, values)
    refused(model, m.R_REGISTER_NAME, result)
    result = call(model, "WHvSetVirtualProcessorRegisters", handle, 0, ctypes.addressof(names), 1, values)
    refused(model, m.R_REGISTER_NAME, result)


def test_registers_of_a_vp_another_thread_runs(model: WhpxModel) -> None:
    handle = new_partition(model)
    assert call(model, "WHvCreateVirtualProcessor", handle, 0, 0) == 0
    model.partitions[handle].vps[0].running_thread = -1  # another thread is inside WHvRunVirtualProcessor
    names = (ctypes.c_uint32 * 1)(0x10)
    values = ctypes.create_string_buffer(16)
    result = call(model, "WHvGetVirtualProcessorRegisters", handle, 0, ctypes.addressof(names), 1, values)
    refused(model, m.R_VP_RUNNING, result)


def test_emulator_callbacks_of_the_wrong_size(model: WhpxModel) -> None:
    table = ctypes.create_string_buffer(struct.pack("<II5Q", 40, 0, 1, 2, 3, 4, 5))
    out = ctypes.c_uint64()
    result = call(model, "WHvEmulatorCreateEmulator", ctypes.addressof(table), ctypes.addressof(out))
    refused(model, m.R_CALLBACKS_SIZE, result)


def test_emulator_with_a_null_callback(model: WhpxModel) -> None:
    table = ctypes.create_string_buffer(struct.pack("<II5Q", 48, 0, 1, 0, 3, 4, 5))
    out = ctypes.c_uint64()
    result = call(model, "WHvEmulatorCreateEmulator", ctypes.addressof(table), ctypes.addressof(out))
    refused(model, m.R_CALLBACKS_SIZE, result)


def test_bad_out_pointer(model: WhpxModel) -> None:
    refused(model, E_POINTER_RULE, call(model, "WHvCreatePartition", 0))


def test_every_rule_has_a_negative_test() -> None:
    """The rules of the model are exactly those this module breaks on purpose."""
    rules = {name for name, value in vars(m).items() if isinstance(value, Rule)}
    source = Path(__file__).read_text(encoding="utf-8")
    untested = sorted(name for name in rules if f"m.{name}" not in source)
    assert untested == []


def _doorbell(gpa: int, value: int, length: int, flags: int) -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(struct.pack("<QQII", gpa, value, length, flags))


@pytest.mark.parametrize(
    ("value", "length", "flags"),
    [(0, 3, 2), (0, 4, 0), (5, 0, 1), (5, 4, 2), (0, 4, 2 | 4)],
    ids=[
        "length-not-1-2-4-8",
        "length-without-match-on-length",
        "value-match-without-length",
        "value-without-match-on-value",
        "reserved-bit",
    ],
)
def test_malformed_doorbell_match_data(model: WhpxModel, value: int, length: int, flags: int) -> None:
    handle = new_partition(model)
    with os_eventfd() as event:
        match = _doorbell(0xD000_0000, value, length, flags)
        result = call(model, "WHvRegisterPartitionDoorbellEvent", handle, ctypes.addressof(match), event)
    refused(model, m.R_DOORBELL_MATCH, result)


@pytest.mark.parametrize(
    ("first", "second"),
    [((7, 4, 3), (7, 4, 3)), ((7, 4, 3), (8, 2, 3)), ((0, 4, 2), (8, 4, 3))],
    ids=["identical", "another-length", "any-value"],
)
def test_conflicting_doorbells(model: WhpxModel, first: tuple[int, int, int], second: tuple[int, int, int]) -> None:
    handle = new_partition(model)
    with os_eventfd() as event:
        match = _doorbell(0xD000_0000, *first)
        assert call(model, "WHvRegisterPartitionDoorbellEvent", handle, ctypes.addressof(match), event) == 0
        again = _doorbell(0xD000_0000, *second)
        result = call(model, "WHvRegisterPartitionDoorbellEvent", handle, ctypes.addressof(again), event)
    refused(model, m.R_DOORBELL_CONFLICT, result)


def test_doorbells_on_distinct_values_coexist(model: WhpxModel) -> None:
    handle = new_partition(model)
    with os_eventfd() as event:
        for value in (7, 8):
            match = _doorbell(0xD000_0000, value, 4, 3)
            assert call(model, "WHvRegisterPartitionDoorbellEvent", handle, ctypes.addressof(match), event) == 0
    assert model.rejections == []


def test_unregister_of_a_doorbell_never_registered(model: WhpxModel) -> None:
    handle = new_partition(model)
    match = _doorbell(0xD000_0000, 7, 4, 3)
    refused(
        model,
        m.R_DOORBELL_NOT_FOUND,
        call(model, "WHvUnregisterPartitionDoorbellEvent", handle, ctypes.addressof(match)),
    )


@contextlib.contextmanager
def os_eventfd() -> Iterator[int]:
    fd = os.eventfd(0)
    try:
        yield fd
    finally:
        os.close(fd)
