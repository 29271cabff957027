"""The plugin's run loop on the model: what WHPX hands the VMM before an
instruction, how the emulator calls back into the plugin, and the state a new
virtual processor starts in."""

from __future__ import annotations

import struct
import threading
from typing import Any

import pytest

from pyvmm.config import Arch
from pyvmm.exits import ExitKind, InternalErrorExit, InterruptedExit, IoExit, MmioExit
from pyvmm.host import Event
from pyvmm.testing.conformance import programs as p
from pyvmm.testing.conformance.harness import booted, expect_io, expect_mmio
from pyvmm.testing.conformance.programs import GuestProgram
from pyvmm.vcpu_state import IoEventAddress
from pyvmm.vm import Backend
from pyvmm_whpx.model import WhpxModel


def test_an_mmio_read_exit_carries_the_instruction_gva_and_gpa(whpx: Backend, model: WhpxModel) -> None:
    with booted(whpx, p.MMIO_ROUND_TRIP) as (_, vcpu):
        read = expect_mmio(vcpu)
        assert isinstance(read, MmioExit)
        # mov eax, [rbx] with rbx = 0xd0000000: 8b 03, two bytes, identity-mapped.
        assert (read.address, read.size, read.is_write) == (p.MMIO_BASE, 4, False)
        assert read.instruction == bytes.fromhex("8b03")
        assert read.gva == p.MMIO_BASE
        regs = vcpu.get_regs()
        assert regs.rip == p.CODE_ADDRESS + 5, "WHPX exits before the instruction: RIP is still on it"
        read.data[:4] = struct.pack("<I", 41)
        write = expect_mmio(vcpu)
        assert (write.address, write.is_write, bytes(write.data)) == (p.MMIO_BASE + 8, True, struct.pack("<I", 42))
    assert model.rejections == []


def test_the_emulator_calls_back_into_the_plugin(whpx: Backend, model: WhpxModel) -> None:
    """TryMmioEmulation reads the registers, translates the GVA and makes the
    access through the plugin's callbacks, which call WinHvPlatform again."""
    with booted(whpx, p.MMIO_ROUND_TRIP) as (_, vcpu):
        expect_mmio(vcpu).data[:4] = bytes(4)
        expect_mmio(vcpu)
    emulations = [c for c in model.calls if c.name == "WHvEmulatorTryMmioEmulation"]
    assert len(emulations) >= 2, "the read is emulated at the exit (probe) and on the next run (complete)"
    nested = [c for c in model.calls if c.parent == emulations[0].seq]
    names = [c.name for c in nested]
    assert "WHvEmulatorGetVirtualProcessorRegisters" in names
    assert "WHvEmulatorTranslateGvaPage" in names
    assert "WHvEmulatorMemoryCallback" in names
    inner = {c.name for c in model.calls if c.parent in {n.seq for n in nested}}
    assert {"WHvGetVirtualProcessorRegisters", "WHvTranslateGva"} <= inner
    probe_sets = [c for c in model.calls if c.parent == emulations[0].seq and "SetVirtual" in c.name]
    assert not [c for c in model.calls if c.parent in {s.seq for s in probe_sets}], "the probe pass commits no register"


def test_a_port_exit_carries_the_instruction(whpx: Backend, model: WhpxModel) -> None:
    with booted(whpx, p.PIO_ROUND_TRIP) as (_, vcpu):
        read = expect_io(vcpu)
        assert isinstance(read, IoExit)
        assert read.instruction == bytes.fromhex("ed")  # in eax, dx
        read.data[:4] = struct.pack("<I", 0x1000)
        write = expect_io(vcpu)
        assert write.instruction == bytes.fromhex("ef")
        assert struct.unpack("<I", bytes(write.data[:4]))[0] == 0x1001
        assert vcpu.get_regs().rip == p.CODE_ADDRESS + 9, "an OUT is completed at its exit: RIP is past it"
    assert model.rejections == []


def test_a_string_output_is_one_exit_with_every_item(whpx: Backend) -> None:
    with booted(whpx, p.REP_OUTSB) as (_, vcpu):
        out = expect_io(vcpu)
        assert (out.count, out.size, bytes(out.data)) == (5, 1, b"hello")
        assert vcpu.run().kind is ExitKind.HLT


def test_a_new_virtual_processor_starts_in_real_mode_at_the_reset_vector(whpx: Backend) -> None:
    with whpx.create_vm({"arch": "x86_64"}) as vm:
        vcpu = vm.create_vcpu()
        regs = vcpu.get_regs()
        sregs = vcpu.get_sregs()
        assert regs.rip == 0xFFF0
        assert (sregs.cs.selector, sregs.cs.base) == (0xF000, 0xFFFF0000)
        assert sregs.cr0 & 1 == 0, "protection is off"


def test_a_kick_cancels_the_run_under_way(whpx: Backend, model: WhpxModel) -> None:
    with booted(whpx, p.SPIN) as (_, vcpu):
        timer = threading.Timer(0.2, vcpu.kick)
        timer.start()
        try:
            assert isinstance(vcpu.run(), InterruptedExit)
        finally:
            timer.join()
        cancels = [c for c in model.calls if c.name == "WHvCancelRunVirtualProcessor"]
        assert cancels, "the kick is a WHvCancelRunVirtualProcessor"
        assert cancels[0].thread != model.calls_named("WHvRunVirtualProcessor")[-1].thread
    assert model.rejections == []


def test_a_vm_whose_setup_fails_is_deleted(whpx: Backend, model: WhpxModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed create leaves no partition behind (WHvDeletePartition is called)."""
    from pyvmm.errors import HypervisorError

    failed = 0x8037_0304 - (1 << 32)  # WHV_E_INVALID_PARTITION_CONFIG
    monkeypatch.setitem(model._exports, "WHvSetupPartition", lambda handle: failed)
    with pytest.raises(HypervisorError, match="WHvSetupPartition") as info:
        whpx.create_vm({"arch": "x86_64"})
    assert info.value.code == 0x8037_0304
    assert model.partitions == {}, "the partition object was deleted again"
    assert model.calls[-1].name == "WHvDeletePartition"


#: An MMIO instruction the emulator does not emulate (a read-modify-write).
MMIO_ADD = GuestProgram(
    "mmio_add",
    Arch.X86_64,
    """
    mov ebx, 0xd0000000
    add dword ptr [rbx], 1
    hlt
""",
    bytes.fromhex("bb000000d0830301f4"),
)


def test_an_instruction_the_emulator_cannot_do_is_an_internal_error(
    whpx: Backend, model: WhpxModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WHV_EMULATOR_STATUS without EmulationSuccessful: the exit says so and
    carries the instruction's bytes; nothing is half-done.  Which instructions
    Windows' emulator refuses is not documented, so this Windows is scripted to
    answer ``InternalEmulationFailure`` (WinHvEmulation.h) for every one."""
    from pyvmm_whpx import model as model_module

    monkeypatch.setattr(model_module._Emulation, "outcome", lambda _self, _emulate: 1 << 1)
    assert MMIO_ADD.assembled() in (None, MMIO_ADD.code)
    with booted(whpx, MMIO_ADD) as (_, vcpu):
        exit_ = vcpu.run()
        assert isinstance(exit_, InternalErrorExit)
        assert exit_.instruction == bytes.fromhex("830301")
        assert "could not emulate" in exit_.description
        assert vcpu.get_regs().rip == p.CODE_ADDRESS + 5, "RIP stays on the instruction"
    assert model.rejections == []


#: Two stores to the doorbell address: the first matches (7), the second not (8).
DOORBELL_WRITES = GuestProgram(
    "doorbell_writes",
    Arch.X86_64,
    """
    mov ebx, 0xd0000000
    mov dword ptr [rbx], 7
    mov dword ptr [rbx], 8
    hlt
""",
    bytes.fromhex("bb000000d0c70307000000c70308000000f4"),
)


def test_an_ioevent_is_a_doorbell_that_signals_without_an_exit(whpx: Backend, model: WhpxModel) -> None:
    assert DOORBELL_WRITES.assembled() in (None, DOORBELL_WRITES.code)
    with booted(whpx, DOORBELL_WRITES) as (vm, vcpu), Event() as event:
        vm.register_ioevent(event, IoEventAddress.mmio(p.MMIO_BASE), datamatch=7, length=4)
        write = expect_mmio(vcpu)
        assert (write.address, bytes(write.data)) == (p.MMIO_BASE, struct.pack("<I", 8)), "only the 8 exits"
        assert event.consume() == 1, "the matching store signalled the event"
        vm.unregister_ioevent(event, IoEventAddress.mmio(p.MMIO_BASE), datamatch=7, length=4)
        assert vcpu.run().kind is ExitKind.HLT
    assert model.rejections == []
    assert model.calls_named("WHvRegisterPartitionDoorbellEvent")[0].result == 0


def test_an_unregistered_doorbell_no_longer_rings(whpx: Backend, model: WhpxModel) -> None:
    with booted(whpx, DOORBELL_WRITES) as (vm, vcpu), Event() as event:
        vm.register_ioevent(event, IoEventAddress.mmio(p.MMIO_BASE), datamatch=7, length=4)
        vm.unregister_ioevent(event, IoEventAddress.mmio(p.MMIO_BASE), datamatch=7, length=4)
        assert bytes(expect_mmio(vcpu).data) == struct.pack("<I", 7)
        assert event.consume() == 0


def test_a_real_mode_string_output_counts_cx_and_keeps_the_upper_bits(whpx: Backend) -> None:
    """In 16-bit code ``rep outsb`` counts CX and steps SI (Intel SDM vol. 2,
    OUTS/REP: the address size picks the registers): RCX's bits above 16 are no
    part of the count and stay as they were."""
    from dataclasses import replace

    with whpx.create_vm({"arch": "x86_64"}) as vm:
        vm.add_memory(0, 0x10_0000)
        vm.memory.write(0x7C00, bytes.fromhex("f36e f4"))  # rep outsb; hlt
        vm.memory.write(0x500, b"abc")
        vcpu = vm.create_vcpu()
        sregs = vcpu.get_sregs()
        vcpu.set_sregs(replace(sregs, cs=replace(sregs.cs, selector=0, base=0), ds=replace(sregs.ds, base=0)))
        regs = vcpu.get_regs()
        vcpu.set_regs(replace(regs, rip=0x7C00, rcx=0x1_0000_0003, rsi=0xABCD_0000_0500, rdx=0x3F8))
        out = expect_io(vcpu)
        assert (out.port, out.count, bytes(out.data)) == (0x3F8, 3, b"abc")
        assert vcpu.run().kind is ExitKind.HLT
        regs = vcpu.get_regs()
        assert (regs.rcx, regs.rsi) == (0x1_0000_0000, 0xABCD_0000_0503)


@pytest.mark.parametrize("program", [p.MMIO_ROUND_TRIP, p.PIO_ROUND_TRIP])
def test_the_instruction_is_its_own_bytes_when_the_hypervisor_hands_more(
    whpx: Backend, model: WhpxModel, monkeypatch: pytest.MonkeyPatch, program: GuestProgram
) -> None:
    """``InstructionBytes`` are what the hypervisor fetched: the emulator pages say
    it may not hand them all, and nothing promises it stops at the instruction's
    end.  Here the model hands all 16 bytes at RIP; the exit's ``instruction``
    is still that instruction (pyvmm: its length is ``len(instruction)``)."""
    exit_context = model._exit_context

    def with_the_whole_window(vp: Any, exit_: Any) -> bytes:
        raw = bytearray(exit_context(vp, exit_))
        if struct.unpack_from("<I", raw)[0] in (1, 2):  # MemoryAccess, X64IoPortAccess
            rip = struct.unpack_from("<Q", raw, 8 + 24)[0]
            window = vp.engine.read_virtual(rip, 16)
            assert window is not None
            raw[48] = 16
            raw[52:68] = window
        return bytes(raw)

    monkeypatch.setattr(model, "_exit_context", with_the_whole_window)
    with booted(whpx, program) as (_, vcpu):
        first = vcpu.run()
        assert isinstance(first, (IoExit, MmioExit))
        expected = bytes.fromhex("8b03") if isinstance(first, MmioExit) else bytes.fromhex("ed")
        assert first.instruction == expected


def test_an_instruction_fetch_from_unbacked_memory_is_an_internal_error(whpx: Backend) -> None:
    """A memory-access exit whose AccessType is Execute is the guest running where
    no memory is: no device access to hand the VMM, and nothing the emulator can
    decode (its bytes are not there)."""
    jump = GuestProgram("jump_to_mmio", Arch.X86_64, "mov eax, 0xd0000000; jmp rax", bytes.fromhex("b8000000d0ffe0"))
    with booted(whpx, jump) as (_, vcpu):
        exit_ = vcpu.run()
        assert isinstance(exit_, InternalErrorExit)
        assert "0xd0000000" in exit_.description
        assert vcpu.get_regs().rip == p.MMIO_BASE
