"""What the WHPX model answers where an independent audit checked it against
Microsoft's headers and against code that ran on real Windows.

Each test names its source.  The calls are raw, through the DLL seam, the way
the DLL receives them, so the model is checked without the plugin in between."""

from __future__ import annotations

import ctypes
import mmap
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from pyvmm.testing.driver_model import ModelGap
from pyvmm_whpx import model as m
from pyvmm_whpx.model import WhpxModel

PAGE = 4096
_CS, _RIP, _CR0, _CR8 = 0x13, 0x10, 0x1C, 0x20


def call(model: WhpxModel, name: str, *args: Any) -> int:
    return int(model.function(name)(*args))


def unsigned(result: int) -> int:
    return result & 0xFFFF_FFFF


def new_partition(model: WhpxModel, *, setup: bool = True) -> int:
    out = ctypes.c_uint64()
    assert call(model, "WHvCreatePartition", ctypes.addressof(out)) == 0
    value = ctypes.create_string_buffer(struct.pack("<I", 1), 32)
    assert call(model, "WHvSetPartitionProperty", out.value, 0x1FFF, ctypes.addressof(value), 32) == 0
    if setup:
        assert call(model, "WHvSetupPartition", out.value) == 0
    return out.value


@pytest.fixture
def guest_page() -> Iterator[tuple[mmap.mmap, int]]:
    area = mmap.mmap(-1, PAGE)
    anchor = ctypes.c_char.from_buffer(area)
    address = ctypes.addressof(anchor)
    del anchor
    yield area, address
    area.close()


def set_registers(model: WhpxModel, handle: int, values: dict[int, bytes]) -> None:
    names = (ctypes.c_uint32 * len(values))(*values)
    raw = ctypes.create_string_buffer(b"".join(v.ljust(16, b"\0") for v in values.values()))
    assert call(model, "WHvSetVirtualProcessorRegisters", handle, 0, ctypes.addressof(names), len(values), raw) == 0


def run(model: WhpxModel, handle: int) -> bytes:
    context = ctypes.create_string_buffer(224)
    assert call(model, "WHvRunVirtualProcessor", handle, 0, ctypes.addressof(context), 224) == 0
    return context.raw


def test_the_exit_context_reports_cr8_and_cr0_am(model: WhpxModel, guest_page: tuple[mmap.mmap, int]) -> None:
    """WinHvPlatformDefs.h WHV_X64_VP_EXIT_CONTEXT: ``InstructionLength:4`` then
    ``Cr8:4`` in the byte at offset 2; WHV_X64_VP_EXECUTION_STATE bit 3 is
    ``Cr0Am``.  An ``out 0x10, al`` (2 bytes) at GPA 0 in real mode."""
    area, address = guest_page
    area[:2] = bytes.fromhex("e610")
    handle = new_partition(model)
    assert call(model, "WHvMapGpaRange", handle, address, 0, PAGE, 7) == 0
    assert call(model, "WHvCreateVirtualProcessor", handle, 0, 0) == 0
    real_mode_cs = struct.pack("<QIHH", 0, 0xFFFF, 0, 0x9B)
    set_registers(
        model,
        handle,
        {
            _CS: real_mode_cs,
            _RIP: struct.pack("<Q", 0),
            _CR0: struct.pack("<Q", 1 << 18 | 1 << 4),
            _CR8: struct.pack("<Q", 5),
        },
    )
    context = run(model, handle)
    assert struct.unpack_from("<I", context, 0)[0] == 2, "an I/O port exit"
    state, length_and_cr8 = struct.unpack_from("<HB", context, 8)
    assert length_and_cr8 & 0xF == 2, "InstructionLength"
    assert length_and_cr8 >> 4 == 5, "Cr8"
    assert state >> 3 & 1 == 1, "Cr0Am"
    assert state >> 2 & 1 == 0, "Cr0Pe: real mode"
    assert model.rejections == []


def test_unmap_before_setup_is_a_gap() -> None:
    """libwhp's ``test_unmap_gpa_range`` saw WHV_E_GPA_RANGE_NOT_FOUND for
    WHvUnmapGpaRange on a partition never set up, on early Windows 10 builds;
    its later versions mark that test ignored.  The model does not guess."""
    model = WhpxModel()
    handle = new_partition(model, setup=False)
    with pytest.raises(ModelGap):
        model.unmap_gpa_range(handle, 0, 1024)


def test_an_unaligned_map_before_setup_is_invalid_argument(guest_page: tuple[mmap.mmap, int]) -> None:
    """libwhp's ``test_map_gpa_range`` (run on Windows): WHvMapGpaRange of 1024
    bytes on a partition never set up answers E_INVALIDARG, not a partition
    configuration error."""
    model = WhpxModel()
    handle = new_partition(model, setup=False)
    result = call(model, "WHvMapGpaRange", handle, guest_page[1], 0, 1024, 1)
    assert unsigned(result) == m.E_INVALIDARG
    assert model.last_rejection is not None and model.last_rejection.rule is m.R_MAP_ALIGNMENT


@pytest.mark.parametrize("code", [0x0006, 0x000D, 0x1001, 0x1006, 0x100F, 0x1011])
def test_a_property_the_header_defines_but_the_model_does_not_know_is_a_gap(code: int) -> None:
    """WHvSetPartitionProperty.md: WHV_E_UNKNOWN_PROPERTY is for a property "not
    available on the current system".  Whether a property WinHvPlatformDefs.h
    defines is available depends on the Windows build, and what it does to the
    guest the model cannot show: it refuses to guess."""
    model = WhpxModel()
    handle = new_partition(model, setup=False)
    value = ctypes.create_string_buffer(32)
    with pytest.raises(ModelGap):
        model.set_partition_property(handle, code, ctypes.addressof(value), 32)


@pytest.mark.parametrize(("code", "value"), [(0x1004, bytes(32)), (0x0004, b"\x01")])
def test_a_property_whose_effect_the_engine_cannot_show_is_a_gap(code: int, value: bytes) -> None:
    """CpuidResultList changes what CPUID answers and NestedVirtualization what
    VMX instructions do; the software CPU would silently do neither."""
    model = WhpxModel()
    handle = new_partition(model, setup=False)
    buffer = ctypes.create_string_buffer(value, 32)
    with pytest.raises(ModelGap):
        model.set_partition_property(handle, code, ctypes.addressof(buffer), len(value))


def test_a_property_the_header_does_not_define_is_unknown() -> None:
    model = WhpxModel()
    handle = new_partition(model, setup=False)
    value = ctypes.create_string_buffer(32)
    result = call(model, "WHvSetPartitionProperty", handle, 0x1012, ctypes.addressof(value), 32)
    assert unsigned(result) == m.WHV_E_UNKNOWN_PROPERTY, "0x1012 is Arm64's interrupt-controller property"
