"""The model's extended exits: CPUID and MSR accesses exit before the
instruction when ``ExtendedVmExits`` enables them, with the contexts laid out
as WinHvPlatformDefs.h lays them out, and ``CpuidResultList`` answers its
leaves.  Raw calls through the DLL seam, so the model is checked without the
plugin in between; the guest runs in real mode from GPA 0."""

from __future__ import annotations

import ctypes
import mmap
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from pyvmm.testing.driver_model import ModelGap
from pyvmm_whpx.model import WhpxModel

PAGE = 4096
_RAX, _RCX, _RDX, _RBX, _RIP, _CS = 0x0, 0x1, 0x2, 0x3, 0x10, 0x13
_EXTENDED_EXITS, _CPUID_EXIT_LIST, _CPUID_RESULT_LIST = 0x0001, 0x1003, 0x1004
_CPUID_EXIT, _MSR_EXIT = 1 << 0, 1 << 1
#: WHV_RUN_VP_EXIT_CONTEXT: ExitReason, Reserved, then the 40-byte VpContext.
_BODY = 48
#: VpContext.Rip: after ExecutionState, InstructionLength/Cr8, Reserved and Cs.
_RIP_AT = 32

#: cpuid / cpuid with an operand-size prefix / out 0x10, al
CPUID_TWICE = bytes.fromhex("0fa2660fa2e610")
#: cpuid / out 0x10, al
CPUID_ONCE = bytes.fromhex("0fa2e610")
#: rdmsr / wrmsr / out 0x10, al
RDMSR_WRMSR = bytes.fromhex("0f320f30e610")


def call(model: WhpxModel, name: str, *args: Any) -> int:
    return int(model.function(name)(*args))


def set_property(model: WhpxModel, handle: int, code: int, value: bytes) -> int:
    buffer = ctypes.create_string_buffer(value, max(len(value), 8))
    return call(model, "WHvSetPartitionProperty", handle, code, ctypes.addressof(buffer), max(len(value), 8))


def set_registers(model: WhpxModel, handle: int, values: dict[int, bytes]) -> None:
    names = (ctypes.c_uint32 * len(values))(*values)
    raw = ctypes.create_string_buffer(b"".join(v.ljust(16, b"\0") for v in values.values()))
    assert call(model, "WHvSetVirtualProcessorRegisters", handle, 0, ctypes.addressof(names), len(values), raw) == 0


def get_registers(model: WhpxModel, handle: int, *wanted: int) -> list[int]:
    names = (ctypes.c_uint32 * len(wanted))(*wanted)
    raw = ctypes.create_string_buffer(16 * len(wanted))
    assert call(model, "WHvGetVirtualProcessorRegisters", handle, 0, ctypes.addressof(names), len(wanted), raw) == 0
    return [struct.unpack_from("<Q", raw.raw, 16 * i)[0] for i in range(len(wanted))]


def run(model: WhpxModel, handle: int) -> bytes:
    context = ctypes.create_string_buffer(224)
    assert call(model, "WHvRunVirtualProcessor", handle, 0, ctypes.addressof(context), 224) == 0
    return context.raw


def reason_and_length(context: bytes) -> tuple[int, int]:
    return struct.unpack_from("<I", context, 0)[0], context[10] & 0xF


@pytest.fixture
def guest() -> Iterator[mmap.mmap]:
    area = mmap.mmap(-1, PAGE)
    yield area
    area.close()


def partition(
    model: WhpxModel, area: mmap.mmap, code: bytes, *, exits: int = 0, results: bytes = b"", **gprs: int
) -> int:
    """A set-up partition with ``code`` at GPA 0 and VP 0 in real mode on it."""
    area[: len(code)] = code
    out = ctypes.c_uint64()
    assert call(model, "WHvCreatePartition", ctypes.addressof(out)) == 0
    handle = out.value
    assert set_property(model, handle, 0x1FFF, struct.pack("<I", 1)) == 0
    assert set_property(model, handle, _EXTENDED_EXITS, struct.pack("<Q", exits)) == 0
    if results:
        assert set_property(model, handle, _CPUID_RESULT_LIST, results) == 0
    assert call(model, "WHvSetupPartition", handle) == 0
    anchor = ctypes.c_char.from_buffer(area)
    assert call(model, "WHvMapGpaRange", handle, ctypes.addressof(anchor), 0, PAGE, 7) == 0
    del anchor
    assert call(model, "WHvCreateVirtualProcessor", handle, 0, 0) == 0
    registers = {_CS: struct.pack("<QIHH", 0, 0xFFFF, 0, 0x9B), _RIP: struct.pack("<Q", 0)}
    named = {"rax": _RAX, "rcx": _RCX, "rdx": _RDX, "rbx": _RBX}
    registers |= {named[name]: struct.pack("<Q", value) for name, value in gprs.items()}
    set_registers(model, handle, registers)
    return handle


def cpuid_result(function: int, eax: int, ebx: int, ecx: int, edx: int) -> bytes:
    """WHV_X64_CPUID_RESULT: Function, Reserved[3], Eax, Ebx, Ecx, Edx."""
    return struct.pack("<I12xIIII", function, eax, ebx, ecx, edx)


def test_the_model_offers_cpuid_and_msr_exits_only(model: WhpxModel) -> None:
    """WHvGetCapability(ExtendedVmExits): WHV_EXTENDED_VM_EXITS, X64CpuidExit bit 0
    and X64MsrExit bit 1 -- the exits the model can give."""
    buffer = ctypes.create_string_buffer(8)
    assert call(model, "WHvGetCapability", 0x0002, ctypes.addressof(buffer), 8, 0) == 0
    assert struct.unpack("<Q", buffer.raw)[0] == _CPUID_EXIT | _MSR_EXIT


def test_a_cpuid_exit_comes_before_the_instruction_with_the_default_answer(model: WhpxModel, guest: mmap.mmap) -> None:
    """CPUIDAccess.md: WHV_X64_CPUID_ACCESS_CONTEXT holds Rax, Rcx, Rdx, Rbx and
    the DefaultResult* the hypervisor would return; the VMM writes the result
    and moves RIP by VpContext.InstructionLength."""
    handle = partition(model, guest, CPUID_TWICE, exits=_CPUID_EXIT, rax=1, rcx=0, rdx=0x77, rbx=0x1234)
    context = run(model, handle)
    assert reason_and_length(context) == (0x1001, 2)
    assert struct.unpack_from("<Q", context, _RIP_AT)[0] == 0, "VpContext.Rip: on the CPUID"
    rax, rcx, rdx, rbx, default_rax, _, _, _ = struct.unpack_from("<8Q", context, _BODY)
    assert (rax, rcx, rdx, rbx) == (1, 0, 0x77, 0x1234)
    assert default_rax & 0xF00, "leaf 1's default EAX: a processor signature with a family"
    assert get_registers(model, handle, _RAX, _RIP) == [1, 0], "nothing executed"
    set_registers(model, handle, {_RAX: struct.pack("<Q", 1), _RIP: struct.pack("<Q", 2)})
    assert reason_and_length(run(model, handle)) == (0x1001, 3), "a prefixed CPUID is 3 bytes"
    assert model.rejections == []


def test_without_cpuid_exits_the_guest_gets_the_default_answer(model: WhpxModel, guest: mmap.mmap) -> None:
    """CPUIDAccess.md: CPUID exits are "only generated if they are enabled"."""
    handle = partition(model, guest, CPUID_ONCE, exits=_MSR_EXIT, rax=1, rcx=0)
    context = run(model, handle)
    assert struct.unpack_from("<I", context, 0)[0] == 2, "the OUT after the CPUID is the first exit"
    eax, rip = get_registers(model, handle, _RAX, _RIP)
    assert eax & 0xF00 and rip == 2


def test_cpuid_result_list_answers_its_leaves(model: WhpxModel, guest: mmap.mmap) -> None:
    """WHvPartitionPropertyDataTypes.md: CpuidResultList is WHV_X64_CPUID_RESULTs;
    CPUIDAccess.md: the hypervisor answers "based on the partition properties"."""
    listed = cpuid_result(1, 0xCAFE, 0xBEEF, 0xF00D, 0xD00D)
    handle = partition(model, guest, CPUID_ONCE, results=listed, rax=1, rcx=5)
    assert struct.unpack_from("<I", run(model, handle), 0)[0] == 2
    assert get_registers(model, handle, _RAX, _RBX, _RCX, _RDX) == [0xCAFE, 0xBEEF, 0xF00D, 0xD00D]


def test_a_leaf_not_in_the_result_list_gets_the_cpus_answer(model: WhpxModel, guest: mmap.mmap) -> None:
    listed = cpuid_result(0x4000_0000, 1, 2, 3, 4)
    handle = partition(model, guest, CPUID_ONCE, results=listed, rax=1, rcx=0)
    run(model, handle)
    eax, ebx = get_registers(model, handle, _RAX, _RBX)
    assert eax & 0xF00 and (eax, ebx) != (1, 2)


def test_msr_exits_carry_the_msr_the_direction_and_edx_eax(model: WhpxModel, guest: mmap.mmap) -> None:
    """MSRAccess.md: WHV_X64_MSR_ACCESS_CONTEXT is AccessInfo (IsWrite bit 0),
    MsrNumber, Rax, Rdx; the exit comes before the instruction."""
    handle = partition(model, guest, RDMSR_WRMSR, exits=_MSR_EXIT, rax=0x55, rcx=0x1234, rdx=0x66)
    context = run(model, handle)
    assert reason_and_length(context) == (0x1000, 2)
    assert struct.unpack_from("<IIQQ", context, _BODY) == (0, 0x1234, 0x55, 0x66)
    set_registers(model, handle, {_RIP: struct.pack("<Q", 2)})
    context = run(model, handle)
    assert reason_and_length(context) == (0x1000, 2)
    assert struct.unpack_from("<IIQQ", context, _BODY) == (1, 0x1234, 0x55, 0x66)
    assert struct.unpack_from("<Q", context, _RIP_AT)[0] == 2, "VpContext.Rip: on the WRMSR"
    set_registers(model, handle, {_RIP: struct.pack("<Q", 4)})
    assert struct.unpack_from("<I", run(model, handle), 0)[0] == 2


def test_without_msr_exits_an_msr_access_does_not_exit(model: WhpxModel, guest: mmap.mmap) -> None:
    handle = partition(model, guest, RDMSR_WRMSR, exits=_CPUID_EXIT, rcx=0x1234)
    assert struct.unpack_from("<I", run(model, handle), 0)[0] == 2


def gap(model: WhpxModel, handle: int, code: int, value: bytes) -> None:
    buffer = ctypes.create_string_buffer(value, max(len(value), 8))
    with pytest.raises(ModelGap):
        model.set_partition_property(handle, code, ctypes.addressof(buffer), len(value))


def test_what_the_model_cannot_give_is_a_gap(model: WhpxModel, guest: mmap.mmap) -> None:
    handle = partition(model, guest, CPUID_TWICE, exits=_CPUID_EXIT)
    gap(model, handle, _EXTENDED_EXITS, struct.pack("<Q", _CPUID_EXIT | 1 << 2))  # exception exits
    gap(model, handle, _EXTENDED_EXITS, struct.pack("<Q", _MSR_EXIT))  # changed under a VP
    gap(model, handle, _CPUID_EXIT_LIST, struct.pack("<I", 1))  # which leaves exit then
    other = partition(model, guest, CPUID_TWICE)
    assert set_property(model, other, _CPUID_EXIT_LIST, struct.pack("<I", 1)) == 0
    other_fresh = ctypes.c_uint64()
    assert call(model, "WHvCreatePartition", ctypes.addressof(other_fresh)) == 0
    assert set_property(model, other_fresh.value, _CPUID_EXIT_LIST, struct.pack("<I", 1)) == 0
    gap(model, other_fresh.value, _EXTENDED_EXITS, struct.pack("<Q", _CPUID_EXIT))
    gap(model, other_fresh.value, _CPUID_RESULT_LIST, bytes(31))  # not whole results


def test_a_listed_leaf_with_cpuid_exits_on_is_a_gap(model: WhpxModel, guest: mmap.mmap) -> None:
    """Whether a CpuidResultList leaf still exits is not documented."""
    handle = partition(model, guest, CPUID_TWICE, exits=_CPUID_EXIT, results=cpuid_result(1, 1, 2, 3, 4), rax=1)
    with pytest.raises(ModelGap):
        model.run_vp(handle, 0, ctypes.addressof(ctypes.create_string_buffer(224)), 224)
