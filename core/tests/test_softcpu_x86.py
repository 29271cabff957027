"""The software CPU on x86_64 guests: exits, their completion, modes, kicks.

Guest code is given as bytes with its source (GNU as, Intel syntax) next to it;
the conformance suite covers the common scenarios, these the engine's corners.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("unicorn", reason="the software CPU needs unicorn (pip install 'pyvmm-core[softcpu]')")

from pyvmm.arch.x86_64 import CR0_PE, ExceptionEvent, InterruptShadow, Regs, Segment, Sregs
from pyvmm.arch.x86_64_boot import build_x86_boot_state
from pyvmm.boot import BootSpec, X86Mode
from pyvmm.config import Arch, MemoryRegionSpec
from pyvmm.errors import ConfigError
from pyvmm.exits import (
    CpuidExit,
    DebugExit,
    ExitKind,
    InternalErrorExit,
    InterruptedExit,
    IoExit,
    MmioExit,
    MsrAccessExit,
    ShutdownExit,
    ShutdownReason,
    VcpuExit,
)
from pyvmm.memory import GuestMemory, RamRegion
from pyvmm.softcpu import SoftCpu
from pyvmm.softcpu.exits import RdtscExit, StringIoExit
from pyvmm.testing.conformance import programs as conformance

CODE = 0x100000
RAM_SIZE = 0x200000
MMIO = 0xD0000000


class Machine:
    """Guest RAM at 0, a program at CODE, a SoftCpu booted into it."""

    def __init__(self, code: bytes, mode: X86Mode, coherent_code: bool, **options: Any) -> None:
        self.memory = GuestMemory()
        self.ram = self.add(0, RAM_SIZE)
        self.memory.write(CODE, code)
        self.cpu = SoftCpu("x86_64", coherent_code=coherent_code, **options)
        self.cpu.map_region(self.ram)
        spec = BootSpec(arch=Arch.X86_64, entry=CODE, stack=0x80000, x86_mode=mode)
        self.cpu.init(build_x86_boot_state(spec, self.memory))

    def add(self, gpa: int, size: int, **flags: bool) -> RamRegion:
        region = self.memory.allocate(MemoryRegionSpec(guest_phys_addr=gpa, size=size, **flags))
        self.memory.insert(region)
        return region

    def close(self) -> None:
        self.cpu.close()
        self.memory.close()


@pytest.fixture
def machines() -> Iterator[list[Machine]]:
    made: list[Machine] = []
    yield made
    for machine in made:
        machine.close()


def boot(
    machines: list[Machine],
    code_hex: str,
    mode: X86Mode = X86Mode.LONG,
    coherent_code: bool = True,
    **options: Any,
) -> Machine:
    machine = Machine(bytes.fromhex(code_hex), mode, coherent_code, **options)
    machines.append(machine)
    return machine


def run_to(cpu: SoftCpu, kind: ExitKind) -> VcpuExit:
    exit_ = cpu.run()
    assert exit_.kind is kind, f"expected {kind.name}, got {exit_!r}"
    return exit_


def mmio(cpu: SoftCpu) -> MmioExit:
    exit_ = run_to(cpu, ExitKind.MMIO)
    assert isinstance(exit_, MmioExit)
    return exit_


def io(cpu: SoftCpu) -> IoExit:
    exit_ = run_to(cpu, ExitKind.IO)
    assert isinstance(exit_, IoExit)
    return exit_


# --- MMIO ------------------------------------------------------------------------------


def test_read_modify_write_reports_the_read_then_the_write(machines: list[Machine]) -> None:
    # mov ebx, 0xd0000000 / add dword ptr [rbx], 5 / hlt
    m = boot(machines, "bb000000d0830305f4")
    read = mmio(m.cpu)
    assert (read.address, read.size, read.is_write) == (MMIO, 4, False)
    read.data[:4] = struct.pack("<I", 10)
    write = mmio(m.cpu)
    assert (write.address, write.size, write.is_write) == (MMIO, 4, True)
    assert struct.unpack("<I", write.data[:4])[0] == 15
    run_to(m.cpu, ExitKind.HLT)


def test_an_instruction_with_two_mmio_operands_gets_both_exits(machines: list[Machine]) -> None:
    # mov esi, 0xd0000000 / mov edi, 0xd0001000 / movsq / hlt
    m = boot(machines, "be000000d0bf001000d048a5f4")
    read = mmio(m.cpu)
    assert (read.address, read.size, read.is_write) == (MMIO, 8, False)
    read.data[:8] = struct.pack("<Q", 0xFEEDFACECAFEF00D)
    write = mmio(m.cpu)
    assert (write.address, write.size, write.is_write) == (MMIO + 0x1000, 8, True)
    assert struct.unpack("<Q", write.data[:8])[0] == 0xFEEDFACECAFEF00D
    run_to(m.cpu, ExitKind.HLT)
    regs = m.cpu.get_regs()
    assert (regs.rsi, regs.rdi) == (MMIO + 8, MMIO + 0x1008), "MOVSQ retired exactly once"


def test_read_only_memory_keeps_its_contents_through_a_read_modify_write(machines: list[Machine]) -> None:
    # mov ebx, 0x200000 / add byte ptr [rbx], 1 / mov al, [rbx] / out 0x10, al / hlt
    m = boot(machines, "bb000020008003018a03e610f4")
    ro = m.add(0x200000, 0x1000, read_only=True)
    m.memory.write_u8(0x200000, 0x41)
    m.cpu.map_region(ro)
    write = mmio(m.cpu)
    assert (write.address, write.size, write.is_write) == (0x200000, 1, True)
    assert write.data[0] == 0x42, "the add read the RAM behind the read-only mapping"
    assert io(m.cpu).data[0] == 0x41
    assert m.memory.read_u8(0x200000) == 0x41
    run_to(m.cpu, ExitKind.HLT)


def test_mmio_addresses_are_guest_physical(machines: list[Machine]) -> None:
    """With paging, the exit names the physical address the page tables map to."""
    # mov ebx, 0x400010 / mov eax, [rbx] / mov [rbx+8], eax / hlt
    m = boot(machines, "bb100040008b03894308f4")
    directory = 0x1000 + 3 * 0x1000  # the boot tables' first page directory
    m.memory.write_u64(directory + 2 * 8, MMIO | 0x83)  # VA 4 MiB -> MMIO, 2 MiB page
    m.cpu.invalidate_code()
    read = mmio(m.cpu)
    assert (read.address, read.is_write) == (MMIO + 0x10, False)
    read.data[:4] = struct.pack("<I", 7)
    write = mmio(m.cpu)
    assert (write.address, write.is_write) == (MMIO + 0x18, True)
    assert write.data[:4].tobytes() == struct.pack("<I", 7)


def test_instruction_fetch_from_unbacked_memory_is_an_internal_error(machines: list[Machine]) -> None:
    # mov eax, 0xd0000000 / jmp rax
    m = boot(machines, "b8000000d0ffe0")
    exit_ = run_to(m.cpu, ExitKind.INTERNAL_ERROR)
    assert isinstance(exit_, InternalErrorExit)
    assert "0xd0000000" in exit_.description


# --- port I/O ------------------------------------------------------------------------------


def test_port_reads_of_each_width_merge_like_the_cpu(machines: list[Machine]) -> None:
    # mov rax, 0x1122334455667788 / mov dx, 0x20 / in al, dx / mov rbx, rax
    # in ax, dx / mov rcx, rax / in eax, dx / hlt
    m = boot(machines, "48b8887766554433221166ba2000ec4889c366ed4889c1edf4")
    first = io(m.cpu)
    assert (first.port, first.size, first.count, first.is_write) == (0x20, 1, 1, False)
    assert m.cpu.get_regs().rip == CODE + 14, "between the exit and the next run RIP is at the IN"
    first.data[:1] = b"\x11"
    io(m.cpu).data[:2] = b"\x22\x22"
    io(m.cpu).data[:4] = b"\x33\x33\x33\x33"
    run_to(m.cpu, ExitKind.HLT)
    regs = m.cpu.get_regs()
    assert regs.rbx == 0x1122334455667711
    assert regs.rcx == 0x1122334455662222
    assert regs.rax == 0x33333333, "a 32-bit IN zero-extends into RAX"


def test_string_port_io_is_one_exit_per_item(machines: list[Machine]) -> None:
    m = boot(machines, conformance.REP_OUTSB.code.hex())
    items = []
    for _ in range(5):
        exit_ = io(m.cpu)
        assert exit_.count == 1
        items.append(bytes(exit_.data))
    assert b"".join(items) == b"hello"
    run_to(m.cpu, ExitKind.HLT)
    assert m.cpu.get_regs().rcx == 0


# --- halts, exceptions ---------------------------------------------------------------------------


def test_exception_without_a_handler_is_a_triple_fault(machines: list[Machine]) -> None:
    m = boot(machines, "cc")  # int3, and the boot IDT is empty
    exit_ = run_to(m.cpu, ExitKind.SHUTDOWN)
    assert isinstance(exit_, ShutdownExit)
    assert (exit_.reason, exit_.raw_error_code) == (ShutdownReason.TRIPLE_FAULT, 3)


def test_exception_with_a_handler_is_delivered(machines: list[Machine]) -> None:
    m = boot(machines, "ccf4")  # int3; hlt
    idt, handler = 0x8000, 0x9000
    m.memory.write(handler, bytes.fromhex("b033e61048cf"))  # mov al, 0x33; out 0x10, al; iretq
    gate = struct.pack("<HHBBHII", handler, 0x08, 0, 0x8E, 0, 0, 0)
    m.memory.write(idt + 3 * 16, gate)
    sregs = m.cpu.get_sregs()
    sregs.idt.base, sregs.idt.limit = idt, 0xFFF
    m.cpu.set_sregs(sregs)
    exit_ = run_to(m.cpu, ExitKind.IO)
    assert isinstance(exit_, IoExit) and exit_.data[0] == 0x33
    run_to(m.cpu, ExitKind.HLT)
    assert m.cpu.get_regs().rip == CODE + 2, "the handler returned after int3"


# --- code coherence ----------------------------------------------------------------------------


@pytest.mark.parametrize("coherent", [True, False])
def test_code_rewritten_by_the_host(machines: list[Machine], coherent: bool) -> None:
    m = boot(machines, "909090f4", coherent_code=coherent)  # nop; nop; nop; hlt
    run_to(m.cpu, ExitKind.HLT)
    m.memory.write(CODE, bytes.fromhex("48ffc0f4"))  # inc rax; hlt
    regs = m.cpu.get_regs()
    regs.rip = CODE
    m.cpu.set_regs(regs)
    if not coherent:
        run_to(m.cpu, ExitKind.HLT)
        assert m.cpu.get_regs().rax == 0, "the translation of the old code is used until invalidated"
        m.cpu.set_regs(regs)
        m.cpu.invalidate_code()
    run_to(m.cpu, ExitKind.HLT)
    assert m.cpu.get_regs().rax == 1


def test_a_guest_unicorn_cannot_advance_ends_the_run(machines: list[Machine]) -> None:
    """unicorn 2.1.4 stops executing a re-translated UD2 in this sequence; run()
    must still return (with the fault, or saying it made no progress)."""
    m = boot(machines, "909090f4", coherent_code=False)
    run_to(m.cpu, ExitKind.HLT)
    m.memory.write(CODE, bytes.fromhex("0f0b"))  # ud2
    regs = m.cpu.get_regs()
    regs.rip = CODE
    m.cpu.set_regs(regs)
    run_to(m.cpu, ExitKind.HLT)  # the stale translation
    m.cpu.set_regs(regs)
    m.cpu.invalidate_code()
    exit_ = m.cpu.run()
    if isinstance(exit_, InternalErrorExit):
        assert "without executing" in exit_.description
        assert exit_.instruction.startswith(bytes.fromhex("0f0b90f4"))
    else:
        assert exit_.kind is ExitKind.SHUTDOWN


def test_guest_self_modifying_code(machines: list[Machine]) -> None:
    # mov byte ptr [rip + target], 0xf4 / target: nop / ud2
    m = boot(machines, "c60500000000f4900f0b")
    run_to(m.cpu, ExitKind.HLT)


# --- modes and registers -------------------------------------------------------------------------


def test_flat_protected_mode(machines: list[Machine]) -> None:
    # .code32: mov eax, 0xd0000000 / mov dword ptr [eax], 0x12345678 / hlt
    m = boot(machines, "b8000000d0c70078563412f4", mode=X86Mode.PROTECTED)
    write = mmio(m.cpu)
    assert (write.address, write.size) == (MMIO, 4)
    assert struct.unpack("<I", write.data[:4])[0] == 0x12345678
    sregs = m.cpu.get_sregs()
    assert sregs.cs.db == 1 and sregs.cs.l == 0
    assert not sregs.efer & (1 << 10), "not in long mode"


def test_real_mode_runs_16_bit_code(machines: list[Machine]) -> None:
    # mov ax, 0x1234; mov bx, cs; out 0x10, ax; hlt -- at 0x1000:0x0100 (linear 0x10100)
    m = boot(machines, "f4")
    m.memory.write(0x10100, bytes.fromhex("b834128ccbe710f4"))
    sregs = Sregs()
    assert not sregs.cr0 & CR0_PE
    sregs.cs.selector, sregs.cs.base = 0x1000, 0x10000
    m.cpu.set_sregs(sregs)
    m.cpu.set_regs(Regs(rip=0x100, rflags=2))
    exit_ = run_to(m.cpu, ExitKind.IO)
    assert isinstance(exit_, IoExit) and exit_.size == 2 and bytes(exit_.data) == b"\x34\x12"
    run_to(m.cpu, ExitKind.HLT)
    assert m.cpu.get_regs().rbx == 0x1000
    assert m.cpu.get_sregs().cs.base == 0x10000


def test_protected_mode_has_the_32_bit_stack_and_gdt_the_boot_state_describes(machines: list[Machine]) -> None:
    """The flat protected mode of pyvmm.boot (a Multiboot entry): push/pop use all
    of ESP (SS.B set in SS's hidden cache, not just its selector), and a far
    return reloads CS from the boot GDT -- what the Multiboot PIC kernel's
    interrupt handlers do."""
    # push 0x18 / push 0x100010 / retf / (pad) / 0x100010: mov eax, esp / out 0x10, eax / hlt
    m = boot(machines, "6a186810001000cbcccccccccccccccc89e0e710f4", mode=X86Mode.PROTECTED)
    sregs = m.cpu.get_sregs()
    assert (sregs.ss.db, sregs.cs.db, sregs.cs.selector) == (1, 1, 0x18)
    exit_ = io(m.cpu)
    assert struct.unpack("<I", exit_.data[:4])[0] == 0x80000, "both pushes popped from the 32-bit stack"
    assert m.memory.read(0x80000 - 8, 8) == struct.pack("<II", 0x100010, 0x18)
    run_to(m.cpu, ExitKind.HLT)
    assert m.cpu.get_regs().rip == CODE + 0x15


def test_non_flat_data_segments_in_protected_mode(machines: list[Machine]) -> None:
    # mov eax, [0x100] / out 0x10, eax / hlt -- with DS based at 0x10000
    m = boot(machines, "a100010000e710f4", mode=X86Mode.PROTECTED)
    m.memory.write(0x100, struct.pack("<I", 0xBAD))
    m.memory.write(0x10100, struct.pack("<I", 0x12345678))
    sregs = m.cpu.get_sregs()
    sregs.ds.base = 0x10000
    m.cpu.set_sregs(sregs)
    assert m.cpu.get_sregs().ds == sregs.ds
    assert struct.unpack("<I", io(m.cpu).data[:4])[0] == 0x12345678


def test_16_bit_protected_mode_code(machines: list[Machine]) -> None:
    # mov ax, 0x1234 / out 0x10, ax / hlt -- in a 16-bit code segment
    m = boot(machines, "b83412e710f4", mode=X86Mode.PROTECTED)
    sregs = m.cpu.get_sregs()
    sregs.cs.db = 0
    m.cpu.set_sregs(sregs)
    exit_ = io(m.cpu)
    assert exit_.size == 2 and bytes(exit_.data) == b"\x34\x12"
    assert m.cpu.get_sregs().cs.db == 0


def test_long_mode_state_round_trips(machines: list[Machine]) -> None:
    m = boot(machines, conformance.SET_RAX.code.hex())
    sregs = m.cpu.get_sregs()
    assert (sregs.cs.selector, sregs.cs.l, sregs.ss.selector) == (0x08, 1, 0x10)
    assert sregs.cr3 == 0x2000 and sregs.efer & 0x500 == 0x500
    sregs.fs.base = 0x12345000
    m.cpu.set_sregs(sregs)
    again = m.cpu.get_sregs()
    assert again.fs.base == 0x12345000
    assert again.cs == sregs.cs
    run_to(m.cpu, ExitKind.HLT)
    assert m.cpu.get_regs().rax == 0x123456789ABCDEF0


def test_set_sregs_keeps_the_general_registers(machines: list[Machine]) -> None:
    m = boot(machines, "f4")
    m.cpu.set_regs(Regs(rax=1, rbx=2, r15=3, rip=CODE, rflags=0x202))
    m.cpu.set_sregs(m.cpu.get_sregs())
    regs = m.cpu.get_regs()
    assert (regs.rax, regs.rbx, regs.r15, regs.rip) == (1, 2, 3, CODE)


def test_aarch64_registers_are_refused_on_x86(machines: list[Machine]) -> None:
    m = boot(machines, "f4")
    with pytest.raises(ConfigError, match="aarch64"):
        m.cpu.get_core_regs()


# --- debugging -------------------------------------------------------------------------------------


def test_single_step(machines: list[Machine]) -> None:
    m = boot(machines, "909090f4")
    m.cpu.set_guest_debug(True, [])
    for offset in (1, 2, 3):
        exit_ = run_to(m.cpu, ExitKind.DEBUG)
        assert isinstance(exit_, DebugExit)
        assert exit_.pc == CODE + offset
    run_to(m.cpu, ExitKind.HLT)


def test_breakpoint_stops_before_the_instruction_and_resumes(machines: list[Machine]) -> None:
    m = boot(machines, "909090f4")
    m.cpu.set_guest_debug(False, [CODE + 2])
    exit_ = run_to(m.cpu, ExitKind.DEBUG)
    assert isinstance(exit_, DebugExit)
    assert exit_.pc == CODE + 2 == m.cpu.get_regs().rip
    run_to(m.cpu, ExitKind.HLT)


# --- dirty log ---------------------------------------------------------------------------------------


def test_dirty_log(machines: list[Machine]) -> None:
    m = boot(machines, conformance.DIRTY_PAGES.code.hex())
    logged = m.add(0x400000, 16 * 0x1000, log_dirty=True)
    m.cpu.map_region(logged)
    assert m.cpu.dirty_log(0x400000) == bytes(2)
    run_to(m.cpu, ExitKind.HLT)
    assert m.cpu.dirty_log(0x400000) == bytes([0b00100010, 0])
    assert m.cpu.dirty_log(0x400000) == bytes(2), "reading the log resets it"


# --- threads -------------------------------------------------------------------------------------------


def _run_in_thread(cpu: SoftCpu) -> tuple[threading.Thread, list[VcpuExit]]:
    result: list[VcpuExit] = []
    thread = threading.Thread(target=lambda: result.append(cpu.run()), daemon=True)
    thread.start()
    return thread, result


def test_kick_from_another_thread(machines: list[Machine]) -> None:
    m = boot(machines, "48ffc0ebfb")  # 1: inc rax / jmp 1b
    thread, result = _run_in_thread(m.cpu)
    time.sleep(0.1)
    m.cpu.kick()
    thread.join(10)
    assert not thread.is_alive()
    assert isinstance(result[0], InterruptedExit)
    assert m.cpu.get_regs().rax > 0, "the guest ran before the kick"


def test_kicks_landing_before_the_run_are_not_lost(machines: list[Machine]) -> None:
    m = boot(machines, "48ffc0ebfb")
    for _ in range(20):
        m.cpu.kick()
        m.cpu.kick()  # idempotent: one interrupted run
        assert m.cpu.run().kind is ExitKind.INTERRUPTED
        thread, result = _run_in_thread(m.cpu)
        m.cpu.kick()  # races with the start of the run on purpose
        thread.join(10)
        assert not thread.is_alive(), "a kick racing the start of run() was lost"
        assert result[0].kind is ExitKind.INTERRUPTED


def test_a_kicked_run_finishes_a_port_write_before_it_stops(machines: list[Machine]) -> None:
    # As KVM completes a pending I/O exit on a run that exits at once: the state
    # read after the kick is after the OUT, so a snapshot does not repeat it.
    m = boot(machines, conformance.COUNTER.code.hex())
    first = run_to(m.cpu, ExitKind.IO)
    assert isinstance(first, IoExit)
    assert first.data[0] == 1
    at_out = m.cpu.get_regs().rip
    m.cpu.kick()
    assert run_to(m.cpu, ExitKind.INTERRUPTED)
    assert m.cpu.get_regs().rip == at_out + 2, "out imm8, al is two bytes"
    second = run_to(m.cpu, ExitKind.IO)
    assert isinstance(second, IoExit)
    assert second.data[0] == 3, "the next write, not the first one again"


def test_a_kicked_run_finishes_an_mmio_read_with_the_data_given(machines: list[Machine]) -> None:
    m = boot(machines, conformance.MMIO_ROUND_TRIP.code.hex())
    read = mmio(m.cpu)
    assert not read.is_write
    read.data[:4] = struct.pack("<I", 41)
    m.cpu.kick()
    assert run_to(m.cpu, ExitKind.INTERRUPTED)
    assert m.cpu.get_regs().rax == 41, "the load retired with the VMM's data"
    write = mmio(m.cpu)
    assert (write.address, write.is_write) == (MMIO + 8, True)
    assert struct.unpack("<I", write.data[:4])[0] == 42


#: fld1; fldpi; hlt; fstp qword ptr [0x101000]; movdqu [0x101010], xmm1; hlt
X87_AND_SSE = "d9e8d9ebf4dd1c2500101000f30f7f0c2510101000f4"


def _x87(value: float) -> bytes:
    """``value`` as an FXSAVE register slot: the 80-bit extended format, padded to 16 bytes."""
    bits = struct.unpack("<Q", struct.pack("<d", value))[0]
    sign, exponent, fraction = bits >> 63, (bits >> 52) & 0x7FF, bits & ((1 << 52) - 1)
    significand = (1 << 63) | (fraction << 11)
    return struct.pack("<QH6x", significand, (sign << 15) | (exponent - 1023 + 16383))


def test_the_fpu_reads_in_fxsave_layout_and_writes_back_into_the_guest(machines: list[Machine]) -> None:
    m = boot(machines, X87_AND_SSE)
    run_to(m.cpu, ExitKind.HLT)
    fpu = m.cpu.get_fpu()
    assert (fpu.fsw >> 11) & 7 == 6, "two loads: TOP went 0 -> 7 -> 6"
    assert fpu.fpr[1] == _x87(1.0), "ST1 is the first value loaded"
    assert fpu.fpr[0][:10] == bytes.fromhex("35c26821a2da0fc90040"), "ST0 is pi, as the FPU holds it"
    assert fpu.ftwx == 0b1100_0000, "physical registers 6 and 7 are in use"
    fpu.fpr[0] = _x87(2.5)
    fpu.xmm[1] = bytes(range(16))
    m.cpu.set_fpu(fpu)
    assert m.cpu.get_fpu() == fpu
    sregs = m.cpu.get_sregs()
    sregs.cr4 |= 1 << 9  # CR4.OSFXSR, or movdqu is #UD
    m.cpu.set_sregs(sregs)
    assert m.cpu.get_fpu() == fpu, "a mode change keeps the FPU"
    run_to(m.cpu, ExitKind.HLT)
    assert struct.unpack("<d", m.memory.read(0x101000, 8))[0] == 2.5
    assert m.memory.read(0x101010, 16) == bytes(range(16))
    assert m.cpu.get_fpu().ftwx == 0b1000_0000, "the store popped ST0: register 6 is free again"


def test_debug_registers_are_kept(machines: list[Machine]) -> None:
    from pyvmm.arch.x86_64_extra_state import DebugRegs

    m = boot(machines, "f4")
    wanted = DebugRegs((0x1000, 0x2000, 0x3000, 0x4000), 0xFFFF0FF1, 0x401)
    m.cpu.set_debug_regs(wanted)
    assert m.cpu.get_debug_regs() == wanted


def test_memory_changes_while_the_vcpu_runs(machines: list[Machine]) -> None:
    m = boot(machines, "48ffc0ebfb")
    extra = m.add(0x800000, 0x1000)
    m.memory.write_u8(0x800000, 0x5A)
    thread, result = _run_in_thread(m.cpu)
    time.sleep(0.05)
    m.cpu.map_region(extra)  # handed to the vCPU thread and waited for
    assert m.cpu.read_physical(0x800000, 1) == b"\x5a"
    m.cpu.unmap_region(extra)
    assert m.cpu.read_physical(0x800000, 1) is None
    assert thread.is_alive(), "memory changes do not end the run"
    m.cpu.kick()
    thread.join(10)
    assert isinstance(result[0], InterruptedExit)


# --- RDTSC as an exit ------------------------------------------------------------------

#: mov ecx, 0xc0000103 / mov eax, 7 / xor edx, edx / wrmsr (IA32_TSC_AUX = 7) /
#: rdtsc / out 0x10, eax / mov eax, edx / out 0x10, eax /
#: rdtscp / mov eax, ecx / out 0x10, eax / hlt
RDTSC_GUEST = "b9030100c0b80700000031d20f300f31e71089d0e7100f01f989c8e710f4"


def test_rdtsc_and_rdtscp_are_exits_the_vmm_answers(machines: list[Machine]) -> None:
    m = boot(machines, RDTSC_GUEST, intercept=["rdtsc"])
    exit_ = m.cpu.run()
    assert isinstance(exit_, RdtscExit) and exit_.kind is ExitKind.OTHER and not exit_.rdtscp
    assert m.cpu.get_regs().rip == CODE + 16, "taken after the instruction"
    exit_.tsc = 0x1122334455667788
    assert struct.unpack("<I", io(m.cpu).data[:4])[0] == 0x55667788
    assert struct.unpack("<I", io(m.cpu).data[:4])[0] == 0x11223344
    exit_ = m.cpu.run()
    assert isinstance(exit_, RdtscExit) and exit_.rdtscp and exit_.aux == 7, "TSC_AUX prefilled"
    exit_.aux = 9
    assert struct.unpack("<I", io(m.cpu).data[:4])[0] == 9
    run_to(m.cpu, ExitKind.HLT)


def test_rdtsc_without_the_intercept_is_the_cpus_own(machines: list[Machine]) -> None:
    m = boot(machines, RDTSC_GUEST)
    low = struct.unpack("<I", io(m.cpu).data[:4])[0]
    high = struct.unpack("<I", io(m.cpu).data[:4])[0]
    assert high << 32 | low, "unicorn's TSC runs"
    assert struct.unpack("<I", io(m.cpu).data[:4])[0] == 7, "RDTSCP's ECX is IA32_TSC_AUX"


#: mov eax, 1 / xor ecx, ecx / cpuid (+7) / out 0x10, eax / mov eax, ebx / out 0x10, eax /
#: mov ecx, 0x1234 / rdmsr (+20) / out 0x10, eax /
#: mov eax, 0x55 / mov edx, 0x66 / wrmsr (+34) / hlt
CPUID_MSR_GUEST = "b80100000031c90fa2e71089d8e710b9341200000f32e710b855000000ba660000000f30f4"


def out_value(cpu: SoftCpu) -> int:
    return int(struct.unpack("<I", io(cpu).data[:4])[0])


def out_value_before(cpu: SoftCpu) -> int:
    """An OUT with exits before the instruction: the VMM moves RIP past it."""
    value = out_value(cpu)
    advance(cpu)
    return value


def advance(cpu: SoftCpu, **gprs: int) -> None:
    """What a WHPX VMM does after an exit before the instruction: write the
    results and move RIP past the 2-byte instruction."""
    regs = cpu.get_regs()
    for name, value in gprs.items():
        setattr(regs, name, value)
    regs.rip += 2
    cpu.set_regs(regs)


def test_cpuid_and_msr_exits_before_the_instruction(machines: list[Machine]) -> None:
    own = boot(machines, CPUID_MSR_GUEST)
    own_eax, own_ebx = out_value(own.cpu), out_value(own.cpu)
    m = boot(machines, CPUID_MSR_GUEST, intercept=["cpuid", "msr"], exit_timing="before", intercept_timing="before")
    exit_ = m.cpu.run()
    assert isinstance(exit_, CpuidExit) and (exit_.function, exit_.index) == (1, 0)
    regs = m.cpu.get_regs()
    assert regs.rip == CODE + 7, "RIP stays on the CPUID"
    assert (regs.rax, regs.rcx) == (1, 0), "the registers are the ones before it"
    assert (exit_.eax, exit_.ebx) == (own_eax, own_ebx), "the CPU model's own answer is the default"
    assert own_eax, "leaf 1 has a signature"
    again = m.cpu.run()
    assert again is exit_ and m.cpu.get_regs().rip == CODE + 7, "not advanced: it exits again"
    advance(m.cpu, rax=0xAAAA, rbx=0xBBBB)
    assert (out_value_before(m.cpu), out_value_before(m.cpu)) == (0xAAAA, 0xBBBB), "the VMM's registers stay"
    exit_ = m.cpu.run()
    assert isinstance(exit_, MsrAccessExit) and exit_.index == 0x1234 and not exit_.is_write
    assert m.cpu.get_regs().rip == CODE + 20
    advance(m.cpu, rax=0x77, rdx=0)
    assert out_value_before(m.cpu) == 0x77
    exit_ = m.cpu.run()
    assert isinstance(exit_, MsrAccessExit) and exit_.is_write and exit_.value == 0x66_0000_0055
    regs = m.cpu.get_regs()
    assert (regs.rip, regs.rax, regs.rdx) == (CODE + 34, 0x55, 0x66)
    advance(m.cpu)
    run_to(m.cpu, ExitKind.HLT)


@pytest.mark.parametrize("exit_timing", ["after", "before"])
def test_cpuid_and_msr_exits_after_the_instruction_stay_the_default(machines: list[Machine], exit_timing: str) -> None:
    """Port and MMIO exits before the instruction do not move CPUID/MSR exits:
    those follow intercept_timing, "after" unless asked (pyvmm's exit contract)."""
    m = boot(machines, CPUID_MSR_GUEST, intercept=["cpuid", "msr"], exit_timing=exit_timing)
    read = out_value_before if exit_timing == "before" else out_value
    exit_ = m.cpu.run()
    assert isinstance(exit_, CpuidExit) and m.cpu.get_regs().rip == CODE + 9, "taken after the instruction"
    exit_.eax, exit_.ebx = 0x1111, 0x2222
    assert (read(m.cpu), read(m.cpu)) == (0x1111, 0x2222), "the next run writes the answer"
    exit_ = m.cpu.run()
    assert isinstance(exit_, MsrAccessExit) and m.cpu.get_regs().rip == CODE + 22
    exit_.value = 0x33
    assert read(m.cpu) == 0x33


def test_unknown_intercepts_are_refused() -> None:
    with pytest.raises(ConfigError, match="rdtsc"):
        SoftCpu("x86_64", intercept=["rdtsx"])
    with pytest.raises(ConfigError, match="x86_64 guests"):
        SoftCpu("aarch64", intercept=["rdtsc"])


# --- string I/O in batches -------------------------------------------------------------

#: mov dx, 0x10 / mov rsi, 0x90000 / mov ecx, 6 / rep outsw /
#: std / mov rsi, 0x9000a / mov ecx, 6 / rep outsw / cld /
#: mov rdi, 0x91000 / mov ecx, 5 / rep insb /
#: std / mov rdi, 0x91104 / mov ecx, 5 / rep insb / cld / hlt
STRING_IO = (
    "66ba100048c7c600000900b90600000066f36ffd48c7c60a000900b90600000066f36ffc48c7c700100900b905000000f36c"
    "fd48c7c704110900b905000000f36cfcf4"
)
WORDS = bytes(range(0x41, 0x41 + 12))  # six words at 0x90000: "AB" "CD" ... "KL"


def string_io(cpu: SoftCpu) -> StringIoExit:
    exit_ = run_to(cpu, ExitKind.IO)
    assert isinstance(exit_, StringIoExit), f"expected a batch, got {exit_!r}"
    return exit_


def test_rep_outs_and_ins_in_batches_both_directions(machines: list[Machine]) -> None:
    m = boot(machines, STRING_IO, string_batch=4096)
    m.memory.write(0x90000, WORDS)
    up = string_io(m.cpu)
    assert (up.port, up.size, up.count, up.is_write, up.df) == (0x10, 2, 6, True, False)
    assert (up.gva, up.gpa, bytes(up.data)) == (0x90000, 0x90000, WORDS)
    down = string_io(m.cpu)
    assert (down.count, down.df, down.gva, down.gpa) == (6, True, 0x9000A, 0x9000A)
    assert bytes(down.data) == b"KLIJGHEFCDAB", "items in the order the instruction takes them"
    regs = m.cpu.get_regs()
    assert (regs.rsi, regs.rcx) == (0x9000A, 6), "nothing is done before the next run"
    into = string_io(m.cpu)
    assert (into.size, into.count, into.is_write, into.df, into.gva) == (1, 5, False, False, 0x91000)
    assert m.cpu.get_regs().rsi == 0x90000 - 2, "the descending batch moved RSI down by 12"
    into.data[:5] = b"abcde"
    back = string_io(m.cpu)
    assert m.memory.read(0x91000, 5) == b"abcde"
    assert (back.count, back.is_write, back.df, back.gva) == (5, False, True, 0x91104)
    back.data[:5] = b"vwxyz"
    run_to(m.cpu, ExitKind.HLT)
    assert m.memory.read(0x91100, 5) == b"zyxwv", "the first item at the highest address"
    regs = m.cpu.get_regs()
    assert (regs.rdi, regs.rcx, regs.rflags & 0x400) == (0x91104 - 5, 0, 0)


def test_a_batch_stops_at_the_byte_limit_and_the_page_end(machines: list[Machine]) -> None:
    # mov dx, 0x10 / mov rsi, 0x90ffc / mov ecx, 6 / rep outsw / outsb / hlt
    m = boot(machines, "66ba100048c7c6fc0f0900b90600000066f36f6ef4", string_batch=4096)
    m.memory.write(0x90FFC, WORDS + b"!")
    first = string_io(m.cpu)
    assert (first.count, bytes(first.data)) == (2, WORDS[:4]), "two words to the end of the page"
    rest = string_io(m.cpu)
    assert (rest.count, rest.gva, bytes(rest.data)) == (4, 0x91000, WORDS[4:])
    single = string_io(m.cpu)
    assert (single.count, single.size, bytes(single.data)) == (1, 1, b"!"), "OUTS without REP: one item"
    run_to(m.cpu, ExitKind.HLT)
    assert m.cpu.get_regs().rsi == 0x90FFC + 13

    small = boot(machines, "66ba100048c7c6fc0f0900b90600000066f36f6ef4", string_batch=4)
    small.memory.write(0x90FFC, WORDS + b"!")
    counts = []
    for _ in range(3):
        exit_ = string_io(small.cpu)
        counts.append(exit_.count)
        regs = small.cpu.get_regs()
        assert regs.rip == CODE + 16, "RIP stays on the REP instruction while items are left"
    assert counts == [2, 2, 2]
    assert small.cpu.get_regs().rcx == 2, "three batches of two words: two words left before the third completes"
    assert string_io(small.cpu).count == 1


def test_without_batches_string_io_is_one_plain_exit_per_item(machines: list[Machine]) -> None:
    m = boot(machines, STRING_IO)
    m.memory.write(0x90000, WORDS)
    items = []
    for _ in range(12):
        exit_ = io(m.cpu)
        assert not isinstance(exit_, StringIoExit) and exit_.count == 1
        items.append(bytes(exit_.data))
    assert b"".join(items) == WORDS + b"KLIJGHEFCDAB"


def test_string_batch_is_refused_where_it_cannot_apply() -> None:
    with pytest.raises(ConfigError, match="string_batch"):
        SoftCpu("x86_64", string_batch=-1)
    with pytest.raises(ConfigError, match="exit_timing 'after'"):
        SoftCpu("x86_64", string_batch=64, exit_timing="before")
    with pytest.raises(ConfigError, match="x86_64"):
        SoftCpu("aarch64", string_batch=64)


# --- exceptions with an error code -----------------------------------------------------

IDT = 0x150000
HANDLER = 0x160000
#: pop rax / out 0x10, eax / mov rax, cr2 / out 0x10, eax / mov rax, rsp / out 0x10, eax / hlt
REPORT_ERROR_64 = "58e7100f20d0e7104889e0e710f4"
#: pop eax / out 0x10, eax / mov eax, esp / out 0x10, eax / hlt
REPORT_ERROR_32 = "58e71089e0e710f4"
#: mov al, 1 / out 0x10, al / mov ax, 0x1234 / mov ds, ax (#GP(0x1234): no such GDT entry) /
#: movabs rax, [0x100000000] (#PF: the boot page tables map 4 GiB) / int 0x0d / hlt
FAULTS = "b001e61066b834128ed848a10000000001000000cd0df4"


def dword(cpu: SoftCpu) -> int:
    value: int = struct.unpack("<I", io(cpu).data[:4])[0]
    return value


def with_idt(m: Machine, gates: bytes, limit: int) -> None:
    m.memory.write(IDT, gates)
    sregs = m.cpu.get_sregs()
    sregs.idt.base, sregs.idt.limit = IDT, limit
    m.cpu.set_sregs(sregs)


def long_mode_handler(m: Machine, *vectors: int) -> None:
    m.memory.write(HANDLER, bytes.fromhex(REPORT_ERROR_64))
    gates = bytearray(16 * 32)
    for vector in vectors:
        gates[16 * vector : 16 * vector + 16] = struct.pack(
            "<HHBBHII", HANDLER & 0xFFFF, 0x08, 0, 0x8E, HANDLER >> 16, 0, 0
        )
    with_idt(m, bytes(gates), len(gates) - 1)


def report(m: Machine) -> tuple[int, int, int]:
    """(error code, CR2, RSP after popping the error code) from REPORT_ERROR_64."""
    error, cr2, rsp = dword(m.cpu), dword(m.cpu), dword(m.cpu)
    run_to(m.cpu, ExitKind.HLT)
    return error, cr2, rsp


def frame(m: Machine, rsp: int) -> tuple[int, ...]:
    """RIP, CS, RFLAGS, RSP, SS of a long-mode interrupt frame."""
    return struct.unpack("<5Q", m.memory.read(rsp, 40))


def resume(m: Machine, rip: int) -> None:
    m.cpu.set_regs(Regs(rip=rip, rsp=0x80000, rflags=2))


def test_an_injected_exception_pushes_its_error_code(machines: list[Machine]) -> None:
    m = boot(machines, FAULTS)
    long_mode_handler(m, 13, 14)
    assert io(m.cpu).data[0] == 1
    m.cpu.inject_exception(13, 0xBEE0)
    assert m.cpu.get_vcpu_events().exception.error_code == 0xBEE0
    error, _, rsp = report(m)
    assert (error, rsp) == (0xBEE0, 0x80000 - 40), "five frame words below the error code"
    assert frame(m, rsp)[:2] == (CODE + 4, 0x08), "returns to RIP as it was at the injection"
    assert not m.cpu.get_vcpu_events().exception.injected
    resume(m, CODE)
    assert io(m.cpu).data[0] == 1
    m.cpu.inject_exception(14, 2, cr2=0xDEAD000)
    assert report(m)[:2] == (2, 0xDEAD000), "a #PF's address is in CR2 when its handler runs"


def test_cpu_faults_with_an_error_code_reach_the_guests_handler(machines: list[Machine]) -> None:
    m = boot(machines, FAULTS)
    long_mode_handler(m, 13, 14)
    resume(m, CODE + 4)
    error, _, rsp = report(m)
    assert error == 0x1234, "#GP(selector) for a selector past the GDT"
    assert frame(m, rsp)[0] == CODE + 8, "a fault returns to the faulting instruction"
    resume(m, CODE + 4)
    assert report(m)[0] == 0x1234, "the second #GP is a #GP again, not a double fault"
    resume(m, CODE + 10)
    error, cr2, rsp = report(m)
    assert (error, cr2) == (0, 0), "#PF: a read of a page that is not present; CR2's low half"
    assert m.cpu.get_sregs().cr2 == 0x100000000
    assert frame(m, rsp)[0] == CODE + 10
    resume(m, CODE + 20)
    assert dword(m.cpu) == CODE + 22, "INT 0x0d pushes no error code: the handler popped the return RIP"


def test_an_injected_exception_in_32_bit_protected_mode(machines: list[Machine]) -> None:
    # mov al, 1 / out 0x10, al / hlt -- flat 32-bit protected mode, gates to selector 0x18
    m = boot(machines, "b001e610f4", mode=X86Mode.PROTECTED)
    m.memory.write(HANDLER, bytes.fromhex(REPORT_ERROR_32))
    gates = bytearray(8 * 32)
    gates[8 * 13 : 8 * 14] = struct.pack("<HHBBH", HANDLER & 0xFFFF, 0x18, 0, 0x8E, HANDLER >> 16)
    with_idt(m, bytes(gates), len(gates) - 1)
    assert io(m.cpu).data[0] == 1
    m.cpu.inject_exception(13, 0x18)
    assert (dword(m.cpu), dword(m.cpu)) == (0x18, 0x80000 - 12), "EIP, CS, EFLAGS left after the error code"
    assert struct.unpack("<II", m.memory.read(0x80000 - 12, 8)) == (CODE + 4, 0x18)


def test_injected_exceptions_are_checked(machines: list[Machine]) -> None:
    m = boot(machines, "f4")
    for vector, code, cr2, message in (
        (32, None, None, "not 0-31"),
        (2, None, None, "inject_nmi"),
        (13, 1 << 32, None, "32-bit"),
        (13, 0, 0x1000, "#PF"),
    ):
        with pytest.raises(ConfigError, match=message):
            m.cpu.inject_exception(vector, code, cr2=cr2)
    assert not m.cpu.get_vcpu_events().exception.injected, "nothing was queued"


def test_vcpu_events_round_trip_and_refuse_what_is_not_modelled(machines: list[Machine]) -> None:
    m = boot(machines, FAULTS)
    long_mode_handler(m, 13)
    io(m.cpu)
    events = m.cpu.get_vcpu_events()
    assert events.interrupt.shadow is InterruptShadow.NONE and not events.nmi.pending
    events.exception = ExceptionEvent(injected=True, vector=13, has_error_code=True, error_code=0x42)
    m.cpu.set_vcpu_events(events)
    assert m.cpu.get_vcpu_events() == events
    assert report(m)[0] == 0x42
    for field, value in (("triple_fault_pending", True), ("sipi_vector", 3)):
        refused = m.cpu.get_vcpu_events()
        setattr(refused, field, value)
        with pytest.raises(ConfigError, match=field):
            m.cpu.set_vcpu_events(refused)


# --- interrupts from user mode: the TSS's stack, the IST ------------------------------

#: mov al, 1 / 1: out 0x10, al / jmp 1b -- at CPL 3 (IOPL 3 lets it use ports)
USER_LOOP = "b001e610ebfc"
#: mov rax, rsp / out 0x11, eax / mov ax, cs / out 0x12, ax / iretq
KERNEL_HANDLER = "4889e0e711668cc866e71248cf"
GDT, TSS = 0x120000, 0x121000  # clear of the boot tables at 0x1000-0x7fff
RSP0, IST1, USER_STACK = 0x70000, 0x60000, 0x50000


def _gdt_entry(access: int, flags: int) -> bytes:
    return struct.pack("<HHBBBB", 0xFFFF, 0, 0, access, 0x0F | flags << 4, 0) if access else bytes(8)


def enter_user_mode(m: Machine) -> None:
    """Ring 3 in long mode: a GDT with kernel and user segments and a 64-bit
    TSS (RSP0, IST1), user-accessible page tables, and gates to a ring-0
    handler for vector 0x20 (no IST) and 0x21 (IST 1)."""
    gdt = b"".join(_gdt_entry(a, f) for a, f in ((0, 0), (0x9B, 0xA), (0x93, 0xC), (0xFB, 0xA), (0xF3, 0xC)))
    gdt += struct.pack("<HHBBBBII", 0x67, TSS & 0xFFFF, TSS >> 16 & 0xFF, 0x89, 0, TSS >> 24, 0, 0)
    m.memory.write(GDT, gdt)
    m.memory.write(TSS, bytes(4) + struct.pack("<Q", RSP0) + bytes(0x24 - 12) + struct.pack("<Q", IST1))
    m.memory.write(HANDLER, bytes.fromhex(KERNEL_HANDLER))
    gates = bytearray(16 * 0x22)
    for vector, ist in ((0x20, 0), (0x21, 1)):
        gates[16 * vector : 16 * vector + 16] = struct.pack(
            "<HHBBHII", HANDLER & 0xFFFF, 0x08, ist, 0x8E, HANDLER >> 16, 0, 0
        )
    m.memory.write(IDT, bytes(gates))
    sregs = m.cpu.get_sregs()
    pml4 = sregs.cr3
    for table, entries in ((pml4, 1), (pml4 + 0x1000, 4), (pml4 + 0x2000, 4 * 512)):
        raw = bytearray(m.memory.read(table, 8 * entries))
        for i in range(entries):
            raw[8 * i] |= 4  # U/S: user pages
        m.memory.write(table, bytes(raw))
    user_code = Segment(selector=0x1B, limit=0xFFFFFFFF, type=0xB, dpl=3, s=1, l=1, g=1)
    user_data = Segment(selector=0x23, limit=0xFFFFFFFF, type=0x3, dpl=3, db=1, s=1, g=1)
    sregs.cs, sregs.ss, sregs.ds, sregs.es = user_code, user_data, user_data, user_data
    sregs.gdt.base, sregs.gdt.limit = GDT, len(gdt) - 1
    sregs.idt.base, sregs.idt.limit = IDT, len(gates) - 1
    sregs.tr = Segment(selector=0x28, base=TSS, limit=0x67, type=0xB, s=0)
    m.cpu.set_sregs(sregs)
    m.cpu.set_regs(Regs(rip=CODE, rsp=USER_STACK, rflags=0x3202))


def test_an_interrupt_in_user_mode_switches_to_rsp0_and_iretq_returns(machines: list[Machine]) -> None:
    m = boot(machines, USER_LOOP)
    enter_user_mode(m)
    assert io(m.cpu).port == 0x10
    assert m.cpu.get_sregs().cs.dpl == 3
    m.cpu.inject_interrupt(0x20)
    exit_ = io(m.cpu)
    assert (exit_.port, struct.unpack("<I", exit_.data[:4])[0]) == (0x11, RSP0 - 40), "on the TSS's RSP0"
    rip, cs, rflags, rsp, ss = frame(m, RSP0 - 40)
    assert (rip, cs, rsp, ss, rflags & 0x3200) == (CODE + 4, 0x1B, USER_STACK, 0x23, 0x3200)
    sregs = m.cpu.get_sregs()
    assert (sregs.cs.selector, sregs.cs.dpl, sregs.ss.selector) == (0x08, 0, 0), "ring 0, a null SS"
    exit_ = io(m.cpu)
    assert (exit_.port, bytes(exit_.data)) == (0x12, b"\x08\x00")
    assert io(m.cpu).port == 0x10, "iretq went back to the user loop"
    sregs = m.cpu.get_sregs()
    assert (sregs.cs.selector, sregs.ss.selector, m.cpu.get_regs().rsp) == (0x1B, 0x23, USER_STACK)


def test_an_ist_gate_takes_its_own_stack(machines: list[Machine]) -> None:
    m = boot(machines, USER_LOOP)
    enter_user_mode(m)
    io(m.cpu)
    m.cpu.inject_interrupt(0x21)
    exit_ = io(m.cpu)
    assert (exit_.port, struct.unpack("<I", exit_.data[:4])[0]) == (0x11, IST1 - 40)


def test_a_gate_into_a_missing_code_segment_is_an_internal_error_naming_it(machines: list[Machine]) -> None:
    m = boot(machines, USER_LOOP)
    enter_user_mode(m)
    m.memory.write(IDT + 16 * 0x20 + 2, struct.pack("<H", 0x80))  # past the GDT's limit
    io(m.cpu)
    m.cpu.inject_interrupt(0x20)
    exit_ = run_to(m.cpu, ExitKind.INTERNAL_ERROR)
    assert isinstance(exit_, InternalErrorExit) and "outside the GDT" in exit_.description


#: mov eax, esp / out 0x11, eax / mov ax, ss / out 0x12, ax / iretd
KERNEL_HANDLER_32 = "89e0e711668cd066e712cf"


def test_32_bit_user_mode_takes_ss0_esp0_from_the_tss(machines: list[Machine]) -> None:
    m = boot(machines, USER_LOOP, mode=X86Mode.PROTECTED)
    entries = ((0, 0), (0x9B, 0xC), (0x93, 0xC), (0xFB, 0xC), (0xF3, 0xC))
    gdt = b"".join(_gdt_entry(a, f) for a, f in entries)
    gdt += struct.pack("<HHBBBB", 0x67, TSS & 0xFFFF, TSS >> 16 & 0xFF, 0x89, 0, TSS >> 24)
    m.memory.write(GDT, gdt)
    m.memory.write(TSS, bytes(4) + struct.pack("<II", RSP0, 0x10))  # ESP0, SS0
    m.memory.write(HANDLER, bytes.fromhex(KERNEL_HANDLER_32))
    gates = bytearray(8 * 0x21)
    gates[8 * 0x20 :] = struct.pack("<HHBBH", HANDLER & 0xFFFF, 0x08, 0, 0x8E, HANDLER >> 16)
    m.memory.write(IDT, bytes(gates))
    sregs = m.cpu.get_sregs()
    user_data = Segment(selector=0x23, limit=0xFFFFFFFF, type=0x3, dpl=3, db=1, s=1, g=1)
    sregs.cs = Segment(selector=0x1B, limit=0xFFFFFFFF, type=0xB, dpl=3, db=1, s=1, g=1)
    sregs.ss = sregs.ds = sregs.es = user_data
    sregs.gdt.base, sregs.gdt.limit = GDT, len(gdt) - 1
    sregs.idt.base, sregs.idt.limit = IDT, len(gates) - 1
    sregs.tr = Segment(selector=0x28, base=TSS, limit=0x67, type=0xB, s=0)
    m.cpu.set_sregs(sregs)
    m.cpu.set_regs(Regs(rip=CODE, rsp=USER_STACK, rflags=0x3202))
    assert io(m.cpu).port == 0x10
    m.cpu.inject_interrupt(0x20)
    assert dword(m.cpu) == RSP0 - 20, "SS, ESP, EFLAGS, CS, EIP on the ring-0 stack"
    assert struct.unpack("<5I", m.memory.read(RSP0 - 20, 20))[:2] == (CODE + 4, 0x1B)
    assert struct.unpack("<5I", m.memory.read(RSP0 - 20, 20))[3:] == (USER_STACK, 0x23)
    exit_ = io(m.cpu)
    assert (exit_.port, bytes(exit_.data)) == (0x12, b"\x10\x00"), "SS0 from the TSS"
    assert io(m.cpu).port == 0x10, "iretd went back to ring 3"
    assert (m.cpu.get_sregs().ss.selector, m.cpu.get_regs().rsp) == (0x23, USER_STACK)


def test_real_mode_exceptions_push_no_error_code(machines: list[Machine]) -> None:
    """Through the vector table: FLAGS, CS, IP only, whatever error code was given."""
    m = boot(machines, "f4")
    m.memory.write(0x10100, bytes.fromhex("b001e610f4"))  # mov al, 1 / out 0x10, al / hlt
    # mov bp, sp / mov ax, [bp] / out 0x10, ax / mov ax, [bp + 2] / out 0x10, ax / hlt
    m.memory.write(0x500, bytes.fromhex("89e58b4600e7108b4602e710f4"))
    m.memory.write(4 * 13, struct.pack("<HH", 0x500, 0))
    sregs = Sregs()
    sregs.cs.selector, sregs.cs.base = 0x1000, 0x10000
    m.cpu.set_sregs(sregs)
    m.cpu.set_regs(Regs(rip=0x100, rsp=0x7000, rflags=2))
    assert io(m.cpu).data[0] == 1
    m.cpu.inject_exception(13, 0x1234)
    ip, cs = (struct.unpack("<H", io(m.cpu).data[:2])[0] for _ in range(2))
    assert (ip, cs) == (0x104, 0x1000)


def test_a_string_batch_into_a_logged_region_marks_its_pages(machines: list[Machine]) -> None:
    # mov dx, 0x10 / mov rdi, 0x400010 / mov ecx, 3 / rep insb / hlt
    m = boot(machines, "66ba100048c7c710004000b903000000f36cf4", string_batch=64)
    logged = m.add(0x400000, 0x2000, log_dirty=True)
    m.cpu.map_region(logged)
    assert m.cpu.dirty_log(0x400000) == b"\x00"
    batch = string_io(m.cpu)
    batch.data[:3] = b"xyz"
    m.cpu.dirty_log(0x400000)  # forget what the exit itself may have written
    run_to(m.cpu, ExitKind.HLT)
    assert m.memory.read(0x400010, 3) == b"xyz"
    assert m.cpu.dirty_log(0x400000) == b"\x01", "completing the batch marks its page, as a guest write would"
