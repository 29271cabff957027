"""Exit reasons the model never produces (exception and RDTSC exits are not
modelled, APIC and feature exits need a real hypervisor; CPUID and MSR exits
are also run on the model in ``test_whpx_extended_exits.py``): the plugin's decoding of
each, from a ``WHV_RUN_VP_EXIT_CONTEXT`` packed here with :mod:`struct` at the
header's offsets, and the completion of CPUID and MSR exits (registers written
and RIP moved past the instruction, through the model's register calls)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import pytest

from pyvmm.errors import UnknownExitError
from pyvmm.exits import (
    CpuidExit,
    ExceptionExit,
    ExitKind,
    FailEntryExit,
    GenericExit,
    IoapicEoiExit,
    MsrAccessExit,
    OtherExit,
)
from pyvmm.testing.conformance import programs as p
from pyvmm.testing.conformance.harness import booted
from pyvmm.vcpu_state import StateKind
from pyvmm.vm import Backend
from pyvmm_whpx.bindings import ffi
from pyvmm_whpx.vcpu import WhpxVcpu

RIP = p.CODE_ADDRESS


def pack(vcpu: WhpxVcpu, reason: int, body: bytes, *, instruction_length: int = 2) -> None:
    """Write an exit context into the vCPU's buffer: ExitReason@0, VpContext@8
    (InstructionLength in the low nibble of byte 2, Rip@24, Rflags@32), the
    reason's context at @48."""
    vp = struct.pack("<HBBI16sQQ", 0, instruction_length, 0, 0, bytes(16), RIP, 0x2)
    raw = struct.pack("<II", reason, 0) + vp + body
    ffi.memmove(vcpu.context, raw.ljust(224, b"\0"), 224)


@pytest.fixture
def vcpu(whpx: Backend) -> Iterator[WhpxVcpu]:
    with booted(whpx, p.HLT) as (_, core_vcpu):
        handle: Any = core_vcpu.handle
        assert isinstance(handle, WhpxVcpu)
        yield handle


def test_cpuid_exit_and_completion(vcpu: WhpxVcpu) -> None:
    # Rax, Rcx, Rdx, Rbx at the exit, then the hypervisor's default answer.
    pack(vcpu, 0x1001, struct.pack("<8Q", 0x4000_0000, 0, 0, 0, 0x11, 0x33, 0x44, 0x22))
    exit_ = vcpu._exit()
    assert isinstance(exit_, CpuidExit)
    assert (exit_.function, exit_.index) == (0x4000_0000, 0)
    assert (exit_.eax, exit_.ebx, exit_.ecx, exit_.edx) == (0x11, 0x22, 0x33, 0x44), "the default answer"
    exit_.eax, exit_.ebx, exit_.ecx, exit_.edx = 0x5A, 0x6B, 0x7C, 0x8D
    assert vcpu._complete() is None
    regs = vcpu.get_state(StateKind.REGS)
    assert (regs.rax, regs.rbx, regs.rcx, regs.rdx) == (0x5A, 0x6B, 0x7C, 0x8D)
    assert regs.rip == RIP + 2, "RIP moved past CPUID by VpContext.InstructionLength"


def test_msr_read_exit_and_completion(vcpu: WhpxVcpu) -> None:
    pack(vcpu, 0x1000, struct.pack("<IIQQ", 0, 0xC000_0080, 0, 0))
    exit_ = vcpu._exit()
    assert isinstance(exit_, MsrAccessExit)
    assert (exit_.index, exit_.is_write) == (0xC000_0080, False)
    exit_.value = 0x1122_3344_5566_7788
    vcpu._complete()
    regs = vcpu.get_state(StateKind.REGS)
    assert (regs.rax, regs.rdx, regs.rip) == (0x5566_7788, 0x1122_3344, RIP + 2)


def test_msr_write_exit_carries_edx_eax(vcpu: WhpxVcpu) -> None:
    pack(vcpu, 0x1000, struct.pack("<IIQQ", 1, 0x174, 0xFFFF_FFFF_0000_0001, 0x2))
    exit_ = vcpu._exit()
    assert isinstance(exit_, MsrAccessExit)
    assert (exit_.is_write, exit_.value) == (True, 0x2_0000_0001), "the upper halves of RAX/RDX are ignored"
    vcpu._complete()
    assert vcpu.get_state(StateKind.REGS).rip == RIP + 2


@pytest.mark.parametrize(
    ("reason", "body", "expected"),
    [
        (0x9, struct.pack("<I", 0x31), (IoapicEoiExit, "vector", 0x31)),
        (0x1002, struct.pack("<B3x16sIB3xIQ", 0, bytes(16), 1, 14, 0x6, 0xDEAD), (ExceptionExit, "vector", 14)),
        (0x5, b"", (FailEntryExit, "reason", 0x5)),
        (0x6, struct.pack("<IIQ", 1, 0, 0x99), (GenericExit, "which", OtherExit.UNSUPPORTED_FEATURE)),
        (0x1003, b"", (GenericExit, "which", OtherExit.RDTSC)),
        (0x1004, b"", (GenericExit, "which", OtherExit.APIC_SMI_TRAP)),
        (0x1006, b"", (GenericExit, "which", OtherExit.APIC_INIT_SIPI_TRAP)),
        (0x4, b"", (None, "kind", ExitKind.SHUTDOWN)),
        (0x8, b"", (None, "kind", ExitKind.HLT)),
        (0x7, struct.pack("<I", 0), (None, "kind", ExitKind.IRQ_WINDOW_OPEN)),
        (0x2001, struct.pack("<I", 0), (None, "kind", ExitKind.INTERRUPTED)),
    ],
    ids=lambda v: hex(v) if isinstance(v, int) else "",
)
def test_exit_reasons(vcpu: WhpxVcpu, reason: int, body: bytes, expected: tuple[Any, str, Any]) -> None:
    kind, attribute, value = expected
    pack(vcpu, reason, body)
    exit_ = vcpu._exit()
    if kind is not None:
        assert isinstance(exit_, kind)
    assert getattr(exit_, attribute) == value


def test_an_exception_exit_carries_its_error_code(vcpu: WhpxVcpu) -> None:
    pack(vcpu, 0x1002, struct.pack("<B3x16sIB3xIQ", 0, bytes(16), 1, 13, 0x18, 0))
    exit_ = vcpu._exit()
    assert isinstance(exit_, ExceptionExit)
    assert (exit_.vector, exit_.error_code) == (13, 0x18)


def test_an_unknown_exit_reason_is_refused_with_its_number(vcpu: WhpxVcpu) -> None:
    pack(vcpu, 0x3333, b"")
    with pytest.raises(UnknownExitError) as info:
        vcpu._exit()
    assert info.value.reason == 0x3333
