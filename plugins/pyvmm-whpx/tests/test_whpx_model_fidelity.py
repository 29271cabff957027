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


@pytest.mark.parametrize(("code", "value"), [(0x0001, struct.pack("<Q", 1 << 2)), (0x0004, b"\x01")])
def test_a_property_whose_effect_the_engine_cannot_show_is_a_gap(code: int, value: bytes) -> None:
    """ExtendedVmExits.ExceptionExit makes exceptions exits and NestedVirtualization
    changes what VMX instructions do; the software CPU would silently do neither."""
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


class _ScriptedCallbacks:
    """The five emulator callbacks as ctypes functions, with the translation
    answer under the test's control: a raw WHvEmulatorCreateEmulator caller."""

    IO = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p)
    MEMORY = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p)
    REGISTERS = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p)
    TRANSLATE = ctypes.CFUNCTYPE(
        ctypes.c_int32, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_void_p
    )

    def __init__(self, registers: dict[int, int], *, result_code: int = 0, gpa_offset: int = 0) -> None:
        self.registers = registers
        self.result_code = result_code
        self.gpa_offset = gpa_offset
        self.memory_accesses: list[tuple[int, int, int]] = []
        self.functions = (
            self.IO(lambda _c, _info: 0),
            self.MEMORY(self._memory),
            self.REGISTERS(self._get),
            self.REGISTERS(lambda _c, _names, _count, _values: 0),
            self.TRANSLATE(self._translate),
        )
        pointers = [ctypes.cast(f, ctypes.c_void_p).value for f in self.functions]
        self.table = ctypes.create_string_buffer(struct.pack("<II5Q", 48, 0, *pointers))

    def _memory(self, _context: Any, info: Any) -> int:
        gpa, direction, size = struct.unpack_from("<QBB", ctypes.string_at(info, 10))
        self.memory_accesses.append((gpa, direction, size))
        return 0

    def _get(self, _context: Any, names: Any, count: int, values: Any) -> int:
        wanted = struct.unpack(f"<{count}I", ctypes.string_at(names, 4 * count))
        raw = b"".join(struct.pack("<QQ", self.registers.get(n, 0), 0) for n in wanted)
        ctypes.memmove(values, raw, len(raw))
        return 0

    def _translate(self, _context: Any, gva: int, _flags: int, result: Any, gpa: Any) -> int:
        ctypes.memmove(result, struct.pack("<II", self.result_code, 0), 8)
        ctypes.memmove(gpa, struct.pack("<Q", gva + self.gpa_offset), 8)
        return 0


_MMIO_ADDRESS = 0xD000_0000


def _emulate_mmio_read(
    model: WhpxModel, callbacks: _ScriptedCallbacks, gpa: int = _MMIO_ADDRESS, code: str = "8b03"
) -> int:
    """``mov eax, [rbx]`` (8b 03) in 64-bit code, RBX at an MMIO page: the
    WHV_EMULATOR_STATUS of WHvEmulatorTryMmioEmulation."""
    out = ctypes.c_uint64()
    assert call(model, "WHvEmulatorCreateEmulator", ctypes.addressof(callbacks.table), ctypes.addressof(out)) == 0
    long_mode_cs = struct.pack("<QIHH", 0, 0xFFFF_FFFF, 0x8, 0x209B)
    vp_context = ctypes.create_string_buffer(struct.pack("<HBBI16sQQ", 0x14, 2, 0, 0, long_mode_cs, 0x1000, 2))
    instruction = bytes.fromhex(code)
    access = struct.pack("<B3x16sIQQ", len(instruction), instruction.ljust(16, b"\0"), 0x8, gpa, gpa)
    memory_context = ctypes.create_string_buffer(access)
    status = ctypes.c_uint32()
    model.try_mmio_emulation(
        out.value, 0, ctypes.addressof(vp_context), ctypes.addressof(memory_context), ctypes.addressof(status)
    )
    return status.value


def test_the_emulator_reads_mmio_through_the_callbacks() -> None:
    model = WhpxModel()
    callbacks = _ScriptedCallbacks({3: _MMIO_ADDRESS, 0x10: 0x1000})
    assert _emulate_mmio_read(model, callbacks) == 1, "EmulationSuccessful"
    assert callbacks.memory_accesses == [(_MMIO_ADDRESS, 0, 4)]


def test_a_translated_gpa_page_that_is_not_aligned_fails_the_emulation() -> None:
    """WHvEmulatorTranslateGVAPageCallback.md: "GpaPage must be 4K aligned or the
    current emulation call will fail, with extended status
    TranslateGvaPageCallbackGpaPageIsNotAligned bit set" (bit 5,
    WinHvEmulation.h WHV_EMULATOR_STATUS)."""
    model = WhpxModel()
    callbacks = _ScriptedCallbacks({3: _MMIO_ADDRESS, 0x10: 0x1000}, gpa_offset=0x10)
    status = _emulate_mmio_read(model, callbacks)
    assert status & 1 == 0 and status >> 5 & 1 == 1
    assert callbacks.memory_accesses == []


def test_a_failed_translation_result_is_a_gap() -> None:
    """The callback hands back "exactly what WHvTranslateGva returned"; what the
    emulator then does with a page fault (inject it?) is not documented --
    TranslateGvaPageCallbackFailed is for a callback that did not return S_OK."""
    model = WhpxModel()
    callbacks = _ScriptedCallbacks({3: _MMIO_ADDRESS, 0x10: 0x1000}, result_code=1)
    with pytest.raises(ModelGap):
        _emulate_mmio_read(model, callbacks)


def test_an_mmio_operand_crossing_a_page_is_a_gap() -> None:
    """WhvEmulatorMemoryCallback.md: an access spanning a page boundary is two
    memory callbacks (``movq [0xffe], rax``: 2 bytes and 6); the model's decoder
    makes one, so it refuses rather than answer differently."""
    model = WhpxModel()
    callbacks = _ScriptedCallbacks({3: _MMIO_ADDRESS + 0xFFE, 0x10: 0x1000})
    with pytest.raises(ModelGap):
        _emulate_mmio_read(model, callbacks, _MMIO_ADDRESS + 0xFFE)


@pytest.mark.parametrize("code", [0x0003, 0x0006, 0x1001, 0x1004, 0x100A, 0x2000, 0x2010])
def test_a_capability_the_header_defines_but_the_model_does_not_answer_is_a_gap(code: int) -> None:
    """WHvGetCapability.md: WHV_E_UNKNOWN_CAPABILITY means "not available on the
    system"; for a capability WinHvPlatformDefs.h defines (processor features,
    clock frequency, the VMX capabilities...) that depends on the build and the
    processor, which the model does not pretend to know."""
    model = WhpxModel()
    buffer = ctypes.create_string_buffer(64)
    with pytest.raises(ModelGap):
        model.get_capability(code, ctypes.addressof(buffer), 64, 0)


def test_a_capability_the_header_does_not_define_is_unknown() -> None:
    model = WhpxModel()
    buffer = ctypes.create_string_buffer(8)
    result = call(model, "WHvGetCapability", 0x2011, ctypes.addressof(buffer), 8, 0)
    assert unsigned(result) == m.WHV_E_UNKNOWN_CAPABILITY, "0x2011 is an Arm64 capability"


@pytest.mark.parametrize(
    ("function", "name"),
    [
        ("WHvGetVirtualProcessorRegisters", 0x1000),  # WHvX64RegisterXmm0
        ("WHvGetVirtualProcessorRegisters", 0x2002),  # WHvX64RegisterKernelGsBase
        ("WHvSetVirtualProcessorRegisters", 0x80000001),  # WHvRegisterInterruptState
        ("WHvSetVirtualProcessorRegisters", 0x2008),  # WHvX64RegisterStar
    ],
)
def test_a_register_the_header_names_but_the_model_does_not_hold_is_a_gap(function: str, name: int) -> None:
    """WHV_E_INVALID_VP_REGISTER_NAME says the platform has no such register; for a
    name WinHvPlatformDefs.h defines (XMM, FP, MSRs, the interrupt state...) that
    is false, so the model refuses rather than answer it."""
    model = WhpxModel()
    handle = new_partition(model)
    assert call(model, "WHvCreateVirtualProcessor", handle, 0, 0) == 0
    names = (ctypes.c_uint32 * 1)(name)
    values = ctypes.create_string_buffer(16)
    method = model.get_registers if function.startswith("WHvGet") else model.set_registers
    with pytest.raises(ModelGap):
        method(handle, 0, ctypes.addressof(names), 1, ctypes.addressof(values))


def test_a_doorbell_straddling_a_page_is_a_gap() -> None:
    """WHvRegisterPartitionDoorbellEvent.md: "The registered write must not
    straddle a page boundary" -- with no code named for one that does."""
    import os

    model = WhpxModel()
    handle = new_partition(model)
    match = ctypes.create_string_buffer(struct.pack("<QQII", 0xD000_0FFE, 0, 4, 2))
    event = os.eventfd(0)
    try:
        with pytest.raises(ModelGap):
            model.register_doorbell(handle, ctypes.addressof(match), event)
    finally:
        os.close(event)


@pytest.fixture
def tracked(model: WhpxModel) -> Iterator[tuple[int, int]]:
    """A set-up partition with 4 pages at GPA 0x10000 mapped with TrackDirtyPages."""
    area = mmap.mmap(-1, 4 * PAGE)
    anchor = ctypes.c_char.from_buffer(area)
    address = ctypes.addressof(anchor)
    del anchor
    handle = new_partition(model)
    assert call(model, "WHvMapGpaRange", handle, address, 0x10000, 4 * PAGE, 7 | 8) == 0
    yield handle, address
    area.close()


def mark_dirty(model: WhpxModel, handle: int, code_page: tuple[mmap.mmap, int], *pages: int) -> None:
    """The guest writes one byte into each of ``pages`` of the tracked range:
    real-mode ``mov byte [page * 0x1000], 1`` with DS at 0x10000, then ``hlt``."""
    area, address = code_page
    code = b"".join(bytes.fromhex("c606") + struct.pack("<H", page * PAGE) + b"\x01" for page in pages) + b"\xf4"
    area[: len(code)] = code
    assert call(model, "WHvMapGpaRange", handle, address, 0, PAGE, 7) == 0
    assert call(model, "WHvCreateVirtualProcessor", handle, 0, 0) == 0
    segment = struct.pack("<QIHH", 0, 0xFFFF, 0, 0x9B)
    data_segment = struct.pack("<QIHH", 0x10000, 0xFFFF, 0x1000, 0x93)
    set_registers(model, handle, {_CS: segment, 0x15: data_segment, _RIP: struct.pack("<Q", 0)})
    assert struct.unpack_from("<I", run(model, handle))[0] == 8, "the guest halted"


def query(model: WhpxModel, handle: int, gpa: int, size: int, bitmap_size: int = 8) -> tuple[int, int]:
    bitmap = ctypes.c_uint64()
    address = ctypes.addressof(bitmap) if bitmap_size else 0
    result = call(model, "WHvQueryGpaRangeDirtyBitmap", handle, gpa, size, address, bitmap_size)
    return result, bitmap.value


def test_a_dirty_query_of_part_of_a_tracked_range_answers_for_that_part(
    model: WhpxModel, tracked: tuple[int, int], guest_page: tuple[mmap.mmap, int]
) -> None:
    """WHvQueryGpaRangeDirtyBitmap.md: WHV_E_GPA_RANGE_NOT_FOUND is for a range
    "not mapped or not registered for dirty range tracking"; two pages inside a
    tracked mapping are both.  Bit n is page n of the queried range."""
    handle, _ = tracked
    mark_dirty(model, handle, guest_page, 1, 3)
    assert query(model, handle, 0x10000 + 2 * PAGE, 2 * PAGE) == (0, 0b10)
    assert query(model, handle, 0x10000, 4 * PAGE) == (0, 0b0010), "the query cleared pages 2-3 only"
    assert model.rejections == []


def test_a_dirty_query_of_no_bitmap_clears_without_reading(
    model: WhpxModel, tracked: tuple[int, int], guest_page: tuple[mmap.mmap, int]
) -> None:
    """WHvQueryGpaRangeDirtyBitmap.md: "If zero, then Bitmap can be NULL. This
    indicates that the range's dirty state should be cleared without querying
    the current state."""
    handle, _ = tracked
    mark_dirty(model, handle, guest_page, 0, 2)
    assert query(model, handle, 0x10000, 4 * PAGE, bitmap_size=0)[0] == 0
    assert query(model, handle, 0x10000, 4 * PAGE) == (0, 0)
    assert model.rejections == []


def test_a_dirty_query_at_an_unaligned_address_is_a_gap(model: WhpxModel, tracked: tuple[int, int]) -> None:
    """The page says GuestAddress "must be page-aligned" and names no code."""
    handle, _ = tracked
    bitmap = ctypes.c_uint64()
    with pytest.raises(ModelGap):
        model.query_dirty_bitmap(handle, 0x10010, PAGE, ctypes.addressof(bitmap), 8)


def test_unmapping_part_of_a_mapping_is_a_gap(model: WhpxModel, tracked: tuple[int, int]) -> None:
    """Partial unmapping is an optional feature (WHV_CAPABILITY_FEATURES.PartialUnmap)
    whose absence the pages give no code for: the range is mapped, so "not
    found" would be wrong, and the model does not split mappings."""
    handle, _ = tracked
    with pytest.raises(ModelGap):
        model.unmap_gpa_range(handle, 0x10000 + PAGE, PAGE)


def test_an_instruction_the_models_decoder_does_not_know_is_a_gap() -> None:
    """Windows' emulator handles far more than the model's decoder (``add
    [rbx], 1`` here, a read-modify-write of MMIO); which instructions it refuses
    is not documented, so the model may not answer InternalEmulationFailure."""
    model = WhpxModel()
    callbacks = _ScriptedCallbacks({3: _MMIO_ADDRESS, 0x10: 0x1000})
    with pytest.raises(ModelGap):
        _emulate_mmio_read(model, callbacks, code="830301")


def test_a_new_vp_with_nothing_mapped_exits_with_an_execute_memory_access(model: WhpxModel) -> None:
    """libwhp's ``test_run_vcpu`` (run on Windows): a new virtual processor of a
    partition with no memory exits with ``WHvRunVpExitReasonMemoryAccess`` --
    its first fetch, at the reset vector 0xFFFFFFF0, finds no memory.  The access
    is an Execute (WHV_MEMORY_ACCESS_TYPE 2) of an unmapped GPA."""
    handle = new_partition(model)
    assert call(model, "WHvCreateVirtualProcessor", handle, 0, 0) == 0
    context = run(model, handle)
    assert struct.unpack_from("<I", context)[0] == 1
    access_info, gpa, gva = struct.unpack_from("<IQQ", context, 48 + 20)
    assert access_info & 3 == 2, "AccessType Execute"
    assert access_info >> 2 & 1 == 1, "GpaUnmapped"
    assert (gpa, gva) == (0xFFFF_FFF0, 0xFFFF_FFF0)
    assert model.rejections == []
