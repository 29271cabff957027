"""The layout of every structure the plugin passes, against Microsoft's numbers.

Three checks:

* cffi's sizes and offsets equal the documented ones (the SDK headers'
  ``C_ASSERT``\\ s and field positions, ``docs/backends/whpx.md`` §2);
* the same declarations compiled by gcc with ``-mms-bitfields`` (MSVC's
  layout rules) give the same numbers -- the declarations hold no bit-fields,
  so the ABI cannot move them;
* the helpers that pack the SDK's bit-field words (segment attributes, the
  pending interruption, the I/O access info, the execution state) agree with
  the SDK's bit-field declarations compiled with ``-mms-bitfields``.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pyvmm_whpx import bindings as w
from pyvmm_whpx.bindings import ffi

#: (structure, field, documented offset).
OFFSETS = [
    ("WHV_X64_SEGMENT_REGISTER", "Limit", 8),
    ("WHV_X64_SEGMENT_REGISTER", "Selector", 12),
    ("WHV_X64_SEGMENT_REGISTER", "Attributes", 14),
    ("WHV_X64_TABLE_REGISTER", "Limit", 6),
    ("WHV_X64_TABLE_REGISTER", "Base", 8),
    ("WHV_VP_EXIT_CONTEXT", "InstructionLengthCr8", 2),
    ("WHV_VP_EXIT_CONTEXT", "Cs", 8),
    ("WHV_VP_EXIT_CONTEXT", "Rip", 24),
    ("WHV_VP_EXIT_CONTEXT", "Rflags", 32),
    ("WHV_RUN_VP_EXIT_CONTEXT", "VpContext", 8),
    ("WHV_RUN_VP_EXIT_CONTEXT", "MemoryAccess", 48),
    ("WHV_RUN_VP_EXIT_CONTEXT", "IoPortAccess", 48),
    ("WHV_MEMORY_ACCESS_CONTEXT", "InstructionBytes", 4),
    ("WHV_MEMORY_ACCESS_CONTEXT", "AccessInfo", 20),
    ("WHV_MEMORY_ACCESS_CONTEXT", "Gpa", 24),
    ("WHV_MEMORY_ACCESS_CONTEXT", "Gva", 32),
    ("WHV_X64_IO_PORT_ACCESS_CONTEXT", "InstructionBytes", 4),
    ("WHV_X64_IO_PORT_ACCESS_CONTEXT", "AccessInfo", 20),
    ("WHV_X64_IO_PORT_ACCESS_CONTEXT", "PortNumber", 24),
    ("WHV_X64_IO_PORT_ACCESS_CONTEXT", "Rax", 32),
    ("WHV_X64_IO_PORT_ACCESS_CONTEXT", "Rcx", 40),
    ("WHV_X64_IO_PORT_ACCESS_CONTEXT", "Rsi", 48),
    ("WHV_X64_IO_PORT_ACCESS_CONTEXT", "Rdi", 56),
    ("WHV_X64_IO_PORT_ACCESS_CONTEXT", "Ds", 64),
    ("WHV_X64_IO_PORT_ACCESS_CONTEXT", "Es", 80),
    ("WHV_X64_MSR_ACCESS_CONTEXT", "MsrNumber", 4),
    ("WHV_X64_MSR_ACCESS_CONTEXT", "Rax", 8),
    ("WHV_X64_MSR_ACCESS_CONTEXT", "Rdx", 16),
    ("WHV_X64_CPUID_ACCESS_CONTEXT", "DefaultResultRax", 32),
    ("WHV_VP_EXCEPTION_CONTEXT", "ExceptionInfo", 20),
    ("WHV_VP_EXCEPTION_CONTEXT", "ExceptionType", 24),
    ("WHV_VP_EXCEPTION_CONTEXT", "ErrorCode", 28),
    ("WHV_VP_EXCEPTION_CONTEXT", "ExceptionParameter", 32),
    ("WHV_X64_CPUID_RESULT", "Eax", 16),
    ("WHV_INTERRUPT_CONTROL", "Destination", 8),
    ("WHV_INTERRUPT_CONTROL", "Vector", 12),
    ("WHV_DOORBELL_MATCH_DATA", "Length", 16),
    ("WHV_DOORBELL_MATCH_DATA", "MatchFlags", 20),
    ("WHV_EMULATOR_MEMORY_ACCESS_INFO", "Direction", 8),
    ("WHV_EMULATOR_MEMORY_ACCESS_INFO", "AccessSize", 9),
    ("WHV_EMULATOR_MEMORY_ACCESS_INFO", "Data", 10),
    ("WHV_EMULATOR_IO_ACCESS_INFO", "Port", 2),
    ("WHV_EMULATOR_IO_ACCESS_INFO", "AccessSize", 4),
    ("WHV_EMULATOR_IO_ACCESS_INFO", "Data", 8),
    ("WHV_EMULATOR_CALLBACKS", "WHvEmulatorIoPortCallback", 8),
    ("WHV_EMULATOR_CALLBACKS", "WHvEmulatorTranslateGvaPage", 40),
]


@pytest.mark.parametrize(("name", "size"), sorted(w.DOCUMENTED_SIZES.items()))
def test_cffi_sizes_are_the_documented_ones(name: str, size: int) -> None:
    assert ffi.sizeof(name) == size


@pytest.mark.parametrize(("name", "member", "offset"), OFFSETS)
def test_cffi_offsets_are_the_documented_ones(name: str, member: str, offset: int) -> None:
    assert ffi.offsetof(name, member) == offset


def test_the_exit_context_and_register_value_sizes() -> None:
    """The two sizes the issue names: 224 and 16."""
    assert ffi.sizeof("WHV_RUN_VP_EXIT_CONTEXT") == w.RUN_EXIT_CONTEXT_SIZE == 224
    assert ffi.sizeof("WHV_REGISTER_VALUE") == 16


# The SDK's bit-field words, declared as WinHvPlatformDefs.h declares their fields.
_BITFIELDS = """
typedef union { struct { uint16_t SegmentType:4; uint16_t NonSystemSegment:1; uint16_t Dpl:2;
    uint16_t Present:1; uint16_t Reserved:4; uint16_t Available:1; uint16_t Long:1; uint16_t Default:1;
    uint16_t Granularity:1; }; uint16_t AsUINT16; } ATTRIBUTES;
typedef union { struct { uint64_t InterruptionPending:1; uint64_t InterruptionType:3; uint64_t DeliverErrorCode:1;
    uint64_t InstructionLength:4; uint64_t NestedEvent:1; uint64_t Reserved:6; uint64_t InterruptionVector:16;
    uint64_t ErrorCode:32; }; uint64_t AsUINT64; } PENDING_INTERRUPTION;
typedef union { struct { uint32_t IsWrite:1; uint32_t AccessSize:3; uint32_t StringOp:1; uint32_t RepPrefix:1;
    uint32_t Reserved:26; }; uint32_t AsUINT32; } IO_ACCESS_INFO;
typedef union { struct { uint16_t Cpl:2; uint16_t Cr0Pe:1; uint16_t Cr0Am:1; uint16_t EferLma:1;
    uint16_t DebugActive:1; uint16_t InterruptionPending:1; uint16_t Reserved0:5; uint16_t InterruptShadow:1;
    uint16_t Reserved1:3; }; uint16_t AsUINT16; } EXECUTION_STATE;
typedef union { struct { uint32_t AccessType:2; uint32_t GpaUnmapped:1; uint32_t GvaValid:1;
    uint32_t Reserved:28; }; uint32_t AsUINT32; } MEMORY_ACCESS_INFO;
"""

_MAIN = """
#include <stdio.h>
#include <stddef.h>
int main(void) {
    ATTRIBUTES a = {0}; a.SegmentType = 0xB; a.NonSystemSegment = 1; a.Dpl = 2; a.Present = 1;
    a.Available = 1; a.Long = 1; a.Default = 0; a.Granularity = 1;
    PENDING_INTERRUPTION p = {0}; p.InterruptionPending = 1; p.InterruptionType = 2; p.InterruptionVector = 0xABCD;
    IO_ACCESS_INFO io = {0}; io.IsWrite = 1; io.AccessSize = 4; io.StringOp = 1; io.RepPrefix = 1;
    EXECUTION_STATE e = {0}; e.InterruptionPending = 1; e.InterruptShadow = 1;
    MEMORY_ACCESS_INFO m = {0}; m.AccessType = 1; m.GpaUnmapped = 1; m.GvaValid = 1;
    printf("attributes %u\\n", (unsigned) a.AsUINT16);
    printf("pending %llu\\n", (unsigned long long) p.AsUINT64);
    printf("io %u\\n", (unsigned) io.AsUINT32);
    printf("state %u\\n", (unsigned) e.AsUINT16);
    printf("memory %u\\n", (unsigned) m.AsUINT32);
    printf("bitfield-sizes %zu %zu %zu %zu %zu\\n", sizeof(ATTRIBUTES), sizeof(PENDING_INTERRUPTION),
           sizeof(IO_ACCESS_INFO), sizeof(EXECUTION_STATE), sizeof(MEMORY_ACCESS_INFO));
@PRINTS@
    return 0;
}
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[int]]:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: the -mms-bitfields layout check needs it")
    directory = Path(tmp_path_factory.mktemp("layout"))
    prints = [f'    printf("size {name} %zu\\n", sizeof({name}));' for name in w.DOCUMENTED_SIZES]
    prints += [
        f'    printf("offset {name}.{member} %zu\\n", offsetof({name}, {member}));' for name, member, _ in OFFSETS
    ]
    source = directory / "layout.c"
    source.write_text("#include <stdint.h>\n" + w.CDEF + _BITFIELDS + _MAIN.replace("@PRINTS@", "\n".join(prints)))
    binary = directory / "layout"
    subprocess.run([gcc, "-mms-bitfields", "-std=gnu11", "-o", str(binary), str(source)], check=True)
    output = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    results: dict[str, list[int]] = {}
    for line in output.splitlines():
        words = line.split()
        key_words = 2 if words[0] in ("size", "offset") else 1
        results[" ".join(words[:key_words])] = [int(v) for v in words[key_words:]]
    return results


def test_gcc_ms_bitfields_agrees_on_every_size_and_offset(compiled: dict[str, list[int]]) -> None:
    for name, size in w.DOCUMENTED_SIZES.items():
        assert compiled[f"size {name}"] == [size], name
    for name, member, offset in OFFSETS:
        assert compiled[f"offset {name}.{member}"] == [offset], f"{name}.{member}"


def test_bitfield_words_match_the_sdk_declarations(compiled: dict[str, list[int]]) -> None:
    assert compiled["bitfield-sizes"] == [2, 8, 4, 2, 4]
    assert compiled["attributes"] == [w.segment_attributes(type_=0xB, s=1, dpl=2, present=1, avl=1, long=1, db=0, g=1)]
    assert compiled["pending"] == [w.pending_interruption(0xABCD, w.PENDING_NMI)]
    io = compiled["io"][0]
    assert io & w.IO_IS_WRITE and io & w.IO_STRING_OP and io & w.IO_REP_PREFIX and w.io_access_size(io) == 4
    assert compiled["state"] == [w.EXECUTION_STATE_INTERRUPTION_PENDING | w.EXECUTION_STATE_INTERRUPT_SHADOW]
    assert compiled["memory"] == [w.MEMORY_ACCESS_WRITE | w.MEMORY_GPA_UNMAPPED | w.MEMORY_GVA_VALID]
