"""The issue's x86 "done when", through pyvmm's public API on the unicorn backend:
a guest starts in real mode at the reset vector, switches to protected and long
mode itself, takes an injected interrupt through its IDT, and reads CPUID and an
MSR through exits.  Each program piece keeps its source (GNU as, Intel syntax)
next to its bytes; ``test_pieces_match_their_source`` re-assembles them where
``as`` exists."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from pyvmm.arch.x86_64 import Regs, Segment, Sregs
from pyvmm.exits import CpuidExit, ExitKind, IoExit, MmioExit, MsrAccessExit, VcpuExit
from pyvmm.softcpu import x86_emulate
from pyvmm.testing.conformance.programs import assemble_x86
from pyvmm.vm import Backend, Vcpu, Vm

#: (directive, address, source, bytes)
PIECES = {
    # F000:FFF0, linear FFFFFFF0: the reset vector jumps to low RAM.
    "reset": (".code16", 0xFFFFFFF0, "ljmp 0x0000, 0x1000", "ea00100000"),
    "real": (
        ".code16",
        0x1000,
        """
    cli
    lgdt [0x1830]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    ljmp 0x08, 0x1100
""",
        "fa0f011630180f20c06683c8010f22c0ea00110800",
    ),
    "protected": (
        ".code32",
        0x1100,
        """
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov esp, 0x80000
    mov al, 1
    out 0x10, al
    mov eax, cr4
    or eax, 0x20
    mov cr4, eax
    mov eax, 0x4000
    mov cr3, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    or eax, 0x80000000
    mov cr0, eax
    ljmp 0x18, 0x1200
""",
        "66b810008ed88ec08ed0bc00000800b001e6100f20e083c8200f22e0b8004000000f22d8b9800000c00f320d000100000f30"
        "0f20c00d000000800f22c0ea001200001800",
    ),
    "long": (
        ".code64",
        0x1200,
        """
    mov al, 2
    out 0x10, al
    lidt [0x1840]
    sti
    mov al, 3
    out 0x10, al
    xor eax, eax
    cpuid
    mov eax, ebx
    out 0x12, eax
    mov ecx, 0x4b564d00
    rdmsr
    out 0x13, eax
    mov eax, edx
    out 0x13, eax
    mov ebx, 0x200000
    mov eax, [rbx+8]
    out 0x14, eax
    mov [rbx+0x10], rax
    mov byte ptr [rbx+1], 0x5a
    movzx edx, word ptr [rbx+2]
    mov eax, edx
    out 0x14, eax
    hlt
""",
        "b002e6100f011c2540180000fbb003e61031c00fa289d8e712b9004d564b0f32e71389d0e713"
        "bb000020008b4308e71448894310c643015a0fb7530289d0e714f4",
    ),
    "handler": (
        ".code64",
        0x1300,
        """
    push rax
    mov al, 0x20
    out 0x11, al
    pop rax
    iretq
""",
        "50b020e6115848cf",
    ),
}
GDT = 0x1800  # null, 0x08 32-bit code, 0x10 data, 0x18 64-bit code
GDTR = 0x1830
IDTR = 0x1840
PML4, PDPT, PD = 0x4000, 0x5000, 0x6000
IDT = 0x7000
MSR = 0x4B564D00
#: The long-mode piece's device: virtual 0x200000 maps to this MMIO page.
MMIO_GVA, MMIO_GPA = 0x200000, 0xD0000000


def test_pieces_match_their_source() -> None:
    for name, (directive, _, source, code) in PIECES.items():
        built = assemble_x86(source, directive)
        if built is None:
            pytest.skip("no GNU as here")
        assert built.hex() == code, name


def _memory(vm: Vm) -> None:
    vm.add_memory(0, 0x200000)
    vm.add_memory(0xFFFF0000, 0x10000)  # the reset vector's ROM
    write = vm.memory.write
    for _, address, _, code in PIECES.values():
        write(address, bytes.fromhex(code))
    write(GDT, struct.pack("<4Q", 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF, 0x00AF9A000000FFFF))
    write(GDTR, struct.pack("<HI", 0x1F, GDT))
    write(PML4, struct.pack("<Q", PDPT | 3))
    write(PDPT, struct.pack("<Q", PD | 3))
    write(PD, struct.pack("<QQ", 0x83, MMIO_GPA | 0x83))  # 2 MiB identity page, then the MMIO page
    gate = struct.pack("<HHBBHII", 0x1300, 0x18, 0, 0x8E, 0, 0, 0)
    write(IDT + 0x20 * 16, gate)
    write(IDTR, struct.pack("<HQ", 0x20 * 16 + 15, IDT))


def reset_state(vcpu: Vcpu) -> None:
    """The state an x86 CPU resets to: real mode, CS F000 with base FFFF0000, IP FFF0."""
    data = Segment(base=0, limit=0xFFFF, selector=0, type=3, present=1, s=1)
    sregs = Sregs(
        cs=Segment(base=0xFFFF0000, limit=0xFFFF, selector=0xF000, type=0xB, present=1, s=1),
        ds=data,
        es=data,
        fs=data,
        gs=data,
        ss=data,
        cr0=0x60000010,
    )
    vcpu.set_sregs(sregs)
    vcpu.set_regs(Regs(rip=0xFFF0, rflags=2, rdx=0x600))


def _port(vcpu: Vcpu, port: int) -> IoExit:
    exit_ = vcpu.run()
    assert isinstance(exit_, IoExit) and exit_.port == port and exit_.is_write, f"expected out {port:#x}, got {exit_!r}"
    return exit_


def _run(vcpu: Vcpu, kind: ExitKind) -> VcpuExit:
    exit_ = vcpu.run()
    assert exit_.kind is kind, f"expected {kind.name}, got {exit_!r}"
    return exit_


def test_reset_vector_to_long_mode_interrupt_cpuid_msr(pyvmm_backend: Backend) -> None:
    if pyvmm_backend.name != "unicorn":
        pytest.skip("the unicorn backend's system test")
    with pyvmm_backend.create_vm({"arch": "x86_64", "backend_options": {"intercept": ["cpuid", "msr"]}}) as vm:
        _memory(vm)
        vcpu = vm.create_vcpu()
        reset_state(vcpu)
        sregs = vcpu.get_sregs()
        assert (sregs.cs.selector, sregs.cs.base, sregs.cr0 & 1) == (0xF000, 0xFFFF0000, 0)
        assert _port(vcpu, 0x10).data[0] == 1  # 32-bit protected mode
        sregs = vcpu.get_sregs()
        assert sregs.cr0 & 1 and sregs.cs.selector == 0x08 and sregs.cs.db == 1
        assert _port(vcpu, 0x10).data[0] == 2  # long mode
        sregs = vcpu.get_sregs()
        assert sregs.efer & 0x400 and sregs.cs.selector == 0x18
        assert _port(vcpu, 0x10).data[0] == 3
        assert vcpu.ready_for_interrupt()
        vcpu.interrupt(0x20)
        assert _port(vcpu, 0x11).data[0] == 0x20  # the IDT's handler ran
        cpuid = _run(vcpu, ExitKind.CPUID)
        assert isinstance(cpuid, CpuidExit) and cpuid.function == 0  # ECX (index) still holds EFER's number
        cpuid.eax, cpuid.ebx, cpuid.ecx, cpuid.edx = 1, 0x796D7670, 0, 0  # "pvmy"
        assert bytes(_port(vcpu, 0x12).data) == b"pvmy"
        msr = _run(vcpu, ExitKind.MSR_ACCESS)
        assert isinstance(msr, MsrAccessExit) and (msr.index, msr.is_write) == (MSR, False)
        msr.value = 0x1122334455667788
        assert bytes(_port(vcpu, 0x13).data) == bytes.fromhex("88776655")
        assert bytes(_port(vcpu, 0x13).data) == bytes.fromhex("44332211")
        _device(vcpu, lambda exit_: None, lambda number: _port(vcpu, number))


def _mmio(vcpu: Vcpu) -> MmioExit:
    exit_ = _run(vcpu, ExitKind.MMIO)
    assert isinstance(exit_, MmioExit)
    return exit_


def _device(vcpu: Vcpu, finish: Callable[[MmioExit], None], port: Callable[[int], IoExit]) -> None:
    """The long-mode piece's MMIO tail: a 4-byte read, an 8-byte write, a 1-byte
    immediate write and a 2-byte movzx read, each shown to ``finish``; ``port``
    takes the OUTs in between."""
    read = _mmio(vcpu)
    assert (read.address, read.size, read.is_write) == (MMIO_GPA + 8, 4, False)
    read.data[:4] = bytes.fromhex("a1b2c3d4")
    finish(read)
    assert bytes(port(0x14).data) == bytes.fromhex("a1b2c3d4")
    write = _mmio(vcpu)
    assert (write.address, write.size, write.is_write) == (MMIO_GPA + 0x10, 8, True)
    assert bytes(write.data) == bytes.fromhex("a1b2c3d400000000")  # the 32-bit load cleared the top
    finish(write)
    byte = _mmio(vcpu)
    assert (byte.address, byte.size, byte.is_write, bytes(byte.data)) == (MMIO_GPA + 1, 1, True, b"\x5a")
    finish(byte)
    word = _mmio(vcpu)
    assert (word.address, word.size, word.is_write) == (MMIO_GPA + 2, 2, False)
    word.data[:2] = bytes.fromhex("beef")
    finish(word)
    assert bytes(port(0x14).data) == bytes.fromhex("beef0000")
    _run(vcpu, ExitKind.HLT)


#: The instructions of the MMIO tail and the guest-virtual addresses they touch.
BEFORE_MMIO = [
    ("8b4308", MMIO_GVA + 8),  # mov eax, [rbx+8]
    ("48894310", MMIO_GVA + 0x10),  # mov [rbx+0x10], rax
    ("c643015a", MMIO_GVA + 1),  # mov byte ptr [rbx+1], 0x5a
    ("0fb75302", MMIO_GVA + 2),  # movzx edx, word ptr [rbx+2]
]


def test_whpx_exit_timing_before_the_instruction(pyvmm_backend: Backend) -> None:
    """The same guest with exits before the instruction (WHPX): every port and
    MMIO exit carries the instruction's bytes (and the MMIO exit its GVA and
    GPA), RIP still on it; the VMM emulates it and advances RIP, and the guest
    goes on."""
    if pyvmm_backend.name != "unicorn":
        pytest.skip("the unicorn backend's system test")
    options = {"intercept": ["cpuid", "msr"], "exit_timing": "before"}
    with pyvmm_backend.create_vm({"arch": "x86_64", "backend_options": options}) as vm:
        _memory(vm)
        vcpu = vm.create_vcpu()
        reset_state(vcpu)
        expected = iter(BEFORE_MMIO)

        def bits() -> int:
            sregs = vcpu.get_sregs()
            return 64 if sregs.efer & 0x400 and sregs.cs.l else 32

        def finish_io(exit_: IoExit) -> None:
            rip = vcpu.get_regs().rip
            code = vm.memory.read(rip, len(exit_.instruction))  # identity-mapped code
            assert exit_.instruction == code and exit_.instruction[0] in (0xE4, 0xE5, 0xE6, 0xE7, 0xEC, 0xEF)
            vcpu.set_regs(x86_emulate.complete_io(vcpu.get_regs(), exit_, bits=bits()))
            assert vcpu.get_regs().rip == rip + len(exit_.instruction)

        def finish_mmio(exit_: MmioExit) -> None:
            code, gva = next(expected)
            rip = vcpu.get_regs().rip
            assert (exit_.instruction.hex(), exit_.gva, exit_.address & ~0xFFF) == (code, gva, MMIO_GPA)
            assert vm.memory.read(rip, len(exit_.instruction)) == exit_.instruction  # RIP is on it
            vcpu.set_regs(x86_emulate.complete_mmio(vcpu.get_regs(), exit_))
            assert vcpu.get_regs().rip == rip + len(exit_.instruction)

        def port(number: int) -> IoExit:
            exit_ = _port(vcpu, number)
            finish_io(exit_)
            return exit_

        assert port(0x10).data[0] == 1
        assert port(0x10).data[0] == 2
        assert port(0x10).data[0] == 3
        vcpu.interrupt(0x20)
        assert port(0x11).data[0] == 0x20
        cpuid = _run(vcpu, ExitKind.CPUID)
        assert isinstance(cpuid, CpuidExit)
        cpuid.eax, cpuid.ebx, cpuid.ecx, cpuid.edx = 1, 0x796D7670, 0, 0
        assert bytes(port(0x12).data) == b"pvmy"
        msr = _run(vcpu, ExitKind.MSR_ACCESS)
        assert isinstance(msr, MsrAccessExit)
        msr.value = 0x1122334455667788
        assert bytes(port(0x13).data) == bytes.fromhex("88776655")
        assert bytes(port(0x13).data) == bytes.fromhex("44332211")
        _device(vcpu, finish_mmio, port)
        assert next(expected, None) is None
        assert vcpu.get_regs().rdx == 0xEFBE  # the movzx the VMM emulated


def test_an_mmio_exit_not_completed_by_the_vmm_comes_again(pyvmm_backend: Backend) -> None:
    """Before-the-instruction exits leave the instruction undone: running on
    without advancing RIP repeats the exit."""
    if pyvmm_backend.name != "unicorn":
        pytest.skip("the unicorn backend's system test")
    with pyvmm_backend.create_vm({"arch": "x86_64", "backend_options": {"exit_timing": "before"}}) as vm:
        _memory(vm)
        vcpu = vm.create_vcpu()
        vcpu.set_sregs(_long_mode_sregs(vcpu))
        vcpu.set_regs(Regs(rip=0x1200 + 0x26, rflags=2, rsp=0x80000))  # mov ebx, 0x200000
        first = _mmio(vcpu)
        again = _mmio(vcpu)
        assert (again.address, again.instruction) == (MMIO_GPA + 8, bytes.fromhex("8b4308"))
        assert first is again


def _long_mode_sregs(vcpu: Vcpu) -> Sregs:
    code = Segment(base=0, limit=0xFFFFFFFF, selector=0x18, type=0xB, present=1, s=1, l=1, g=1)
    data = Segment(base=0, limit=0xFFFFFFFF, selector=0x10, type=3, present=1, s=1, db=1, g=1)
    sregs = vcpu.get_sregs()
    sregs.cs, sregs.ds, sregs.es, sregs.ss = code, data, data, data
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = 0x80000011, PML4, 0x20, 0x500
    return sregs
