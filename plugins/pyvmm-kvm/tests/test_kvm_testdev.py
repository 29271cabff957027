"""pc-testdev and the legacy firmware on real KVM: small guests that use the latch,
the MMIO buffer and an interrupt line (through the in-kernel IOAPIC), find the
8259s and the PIT as the boot stub left them, and suspend to RAM and resume."""

from __future__ import annotations

import struct
import time

import pytest

from pyvmm.boot import MULTIBOOT_BOOTLOADER_MAGIC, X86Mode
from pyvmm.config import Arch
from pyvmm.machine import GuestImage, Machine, MachineConfig, RunResult, StopReason
from pyvmm.machine import legacy_firmware as fw
from pyvmm.testing.conformance.programs import GuestProgram
from pyvmm.vm import Backend

LOAD = 0x100000
HANDLER = 0x101000
IDTR = 0x102000
IDT = 0x103000
STACK = 0x90000
RESUME = 0x8000
MULTIBOOT_REGISTERS = {"rax": MULTIBOOT_BOOTLOADER_MAGIC, "rbx": 0x9000}


def program(name: str, source: str, code: str, directive: str = ".code64") -> GuestProgram:
    return GuestProgram(name, Arch.X86_64, source, bytes.fromhex(code), directive)


#: Latch round trips at several widths, the byte alias, and ``rep insb`` (the same
#: port four times: byte 0 four times).  Exit 0x21 if all hold, else 0x3f.
LATCH = program(
    "testdev_latch",
    """
    mov eax, 0x12345678
    out 0xe0, eax
    mov al, 0xab
    out 0xe9, al
    in eax, 0xe0
    cmp eax, 0x1234ab78
    jne 1f
    in ax, 0xe2
    cmp ax, 0x1234
    jne 1f
    mov edi, 0x5000
    mov ecx, 4
    mov dx, 0xe0
    rep insb
    cmp dword ptr [0x5000], 0x78787878
    jne 1f
    mov eax, 0x21
    out 0xf4, eax
1:  mov eax, 0x3f
    out 0xf4, eax
""",
    "b878563412e7e0b0abe6e9e5e03d78ab3412752d66e5e2663d34127524bf00500000b90400000066bae000f36c813c2500500000"
    "787878787507b821000000e7f4b83f000000e7f4",
)

#: The MMIO buffer keeps a quadword and a byte near its end.  Exit 0x22, else 0x3f.
IOMEM = program(
    "testdev_iomem",
    """
    mov rbx, 0xff000000
    mov rax, 0x1122334455667788
    mov [rbx + 0x10], rax
    mov byte ptr [rbx + 0xfff0], 0x5a
    mov eax, [rbx + 0x14]
    cmp eax, 0x11223344
    jne 1f
    movzx eax, byte ptr [rbx + 0xfff0]
    cmp eax, 0x5a
    jne 1f
    mov eax, 0x22
    out 0xf4, eax
1:  mov eax, 0x3f
    out 0xf4, eax
""",
    "48bb000000ff0000000048b8887766554433221148894310c683f0ff00005a8b43143d4433221175130fb683f0ff000083f85a75"
    "07b822000000e7f4b83f000000e7f4",
)

#: Mask the 8259s, route IOAPIC pin 14 to vector 0x40, raise line 14 through
#: port 0x200e and wait: the handler (IRQ_HANDLER) exits with 0x23.
IRQ_LINE = program(
    "testdev_irq_line",
    """
    mov al, 0xff
    out 0x21, al
    out 0xa1, al
    lidt [0x102000]
    mov rbx, 0xfee00000
    mov dword ptr [rbx + 0xf0], 0x1ff
    mov rbx, 0xfec00000
    mov dword ptr [rbx], 0x2d
    mov dword ptr [rbx + 0x10], 0
    mov dword ptr [rbx], 0x2c
    mov dword ptr [rbx + 0x10], 0x40
    sti
    mov dx, 0x200e
    mov al, 1
    out dx, al
1:  hlt
    jmp 1b
""",
    "b0ffe621e6a10f011c250020100048bb0000e0fe00000000c783f0000000ff01000048bb0000c0fe00000000c7032d000000c74310"
    "00000000c7032c000000c7431040000000fb66ba0e20b001eef4ebfd",
)

IRQ_HANDLER = program("testdev_irq_handler", "    mov eax, 0x23\n    out 0xf4, eax\n", "b823000000e7f4")

#: A Multiboot-style 32-bit kernel: EAX still holds the magic after the stub, the
#: 8259 masks are SeaBIOS's, and with interrupts on the PIT's IRQ 0 arrives at
#: vector 8 (TIMER_HANDLER exits with 0x24).  Anything else exits with 0x3f.
TIMER = program(
    "firmware_timer",
    """
    cmp eax, 0x2badb002
    jne 1f
    in al, 0x21
    cmp al, 0xb8
    jne 1f
    in al, 0xa1
    cmp al, 0x8e
    jne 1f
    lidt [0x102000]
    sti
2:  hlt
    jmp 2b
1:  mov eax, 0x3f
    out 0xf4, eax
""",
    "3d02b0ad2b7517e4213cb87511e4a13c8e750b0f011d00201000fbf4ebfdb83f000000e7f4",
    ".code32",
)

TIMER_HANDLER = program("firmware_timer_handler", "    mov eax, 0x24\n    out 0xf4, eax\n", "b824000000e7f4", ".code32")

#: Set the FACS waking vector to 0x8000, let the RTC alarm (every second) wake
#: the machine, suspend to RAM.  Falling through exits with 0x3e.
SUSPEND = program(
    "firmware_s3",
    """
    mov dword ptr [0xf004c], 0x8000
    mov dx, 0x602
    mov ax, 0x400
    out dx, ax
    mov al, 0x01
    out 0x70, al
    mov al, 0xc0
    out 0x71, al
    mov al, 0x03
    out 0x70, al
    mov al, 0xc0
    out 0x71, al
    mov al, 0x05
    out 0x70, al
    mov al, 0xc0
    out 0x71, al
    mov al, 0x0b
    out 0x70, al
    mov al, 0x22
    out 0x71, al
    mov dx, 0x604
    mov ax, 0x2400
    out dx, ax
    mov eax, 0x3e
    out 0xf4, eax
""",
    "c7054c000f000080000066ba020666b8000466efb001e670b0c0e671b003e670b0c0e671b005e670b0c0e671b00be670b022e671"
    "66ba040666b8002466efb83e000000e7f4",
    ".code32",
)

#: The waking vector's code: in real mode at 0800:0000, PM1_STS says WAK and RTC.
#: Exit 0x25, else 0x3d.
RESUMED = program(
    "firmware_s3_resume",
    """
    mov ax, cs
    cmp ax, 0x800
    jne 1f
    mov dx, 0x600
    in ax, dx
    cmp ax, 0x8400
    jne 1f
    mov al, 0x25
    out 0xf4, al
1:  mov al, 0x3d
    out 0xf4, al
""",
    "8cc83d0008750dba0006ed3d00847504b025e6f4b03de6f4",
    ".code16",
)

PROGRAMS = (LATCH, IOMEM, IRQ_LINE, IRQ_HANDLER, TIMER, TIMER_HANDLER, SUSPEND, RESUMED)


def idt_64(vector: int, handler: int) -> tuple[tuple[int, bytes], ...]:
    gate = struct.pack("<HHBBHII", handler & 0xFFFF, 0x08, 0, 0x8E, (handler >> 16) & 0xFFFF, handler >> 32, 0)
    table = bytes(16 * vector) + gate
    return ((IDTR, struct.pack("<HQ", len(table) - 1, IDT)), (IDT, table))


def idt_32(vector: int, handler: int) -> tuple[tuple[int, bytes], ...]:
    gate = struct.pack("<HHBBH", handler & 0xFFFF, 0x18, 0, 0x8E, handler >> 16)
    table = bytes(8 * vector) + gate
    return ((IDTR, struct.pack("<HI", len(table) - 1, IDT)), (IDT, table))


def run(kvm: Backend, image: GuestImage, **settings: object) -> RunResult:
    config = MachineConfig.from_mapping({"serial": "none", "timeout": 30, **settings})
    with Machine(config, backend=kvm, image=image) as machine:
        return machine.run()


def long_mode(prog: GuestProgram, *extra: tuple[int, bytes]) -> GuestImage:
    return GuestImage(prog.name, ((LOAD, prog.code), *extra), LOAD, X86Mode.LONG, stack=STACK)


def multiboot_style(prog: GuestProgram, *extra: tuple[int, bytes]) -> GuestImage:
    return GuestImage(
        prog.name, ((LOAD, prog.code), *extra), LOAD, X86Mode.PROTECTED, stack=STACK, registers=MULTIBOOT_REGISTERS
    )


@pytest.mark.parametrize("prog", PROGRAMS, ids=lambda p: p.name)
def test_program_bytes_match_their_source(prog: GuestProgram) -> None:
    assembled = prog.assembled()
    if assembled is None:
        pytest.skip("no GNU as/objcopy on this machine")
    assert assembled == prog.code


def test_the_latch(kvm: Backend) -> None:
    result = run(kvm, long_mode(LATCH), testdev=True)
    assert (result.reason, result.code) == (StopReason.DEBUG_EXIT, 0x21)


def test_the_latch_is_absent_without_the_option(kvm: Backend) -> None:
    assert run(kvm, long_mode(LATCH)).code == 0x3F


def test_the_mmio_buffer(kvm: Backend) -> None:
    result = run(kvm, long_mode(IOMEM), testdev=True)
    assert (result.reason, result.code) == (StopReason.DEBUG_EXIT, 0x22)


def test_an_irq_line_port_interrupts_through_the_ioapic(kvm: Backend) -> None:
    image = long_mode(IRQ_LINE, (HANDLER, IRQ_HANDLER.code), *idt_64(0x40, HANDLER))
    result = run(kvm, image, testdev=True, timeout=10)
    assert (result.reason, result.code) == (StopReason.DEBUG_EXIT, 0x23), result.detail


def test_the_boot_stub_leaves_the_8259s_and_a_ticking_pit(kvm: Backend) -> None:
    image = multiboot_style(TIMER, (HANDLER, TIMER_HANDLER.code), *idt_32(8, HANDLER))
    result = run(kvm, image, timeout=10)
    assert (result.reason, result.code) == (StopReason.DEBUG_EXIT, 0x24), result.detail


def test_without_the_firmware_the_timer_never_comes(kvm: Backend) -> None:
    image = multiboot_style(TIMER, (HANDLER, TIMER_HANDLER.code), *idt_32(8, HANDLER))
    result = run(kvm, image, legacy_bios=False, timeout=1)
    assert result.code == 0x3F  # the 8259 masks are not SeaBIOS's


def test_suspend_to_ram_resumes_at_the_waking_vector(kvm: Backend) -> None:
    assert fw.FACS_WAKING_VECTOR == 0xF004C  # where SUSPEND writes
    image = multiboot_style(SUSPEND, (RESUME, RESUMED.code))
    started = time.monotonic()
    result = run(kvm, image, timeout=10)
    assert (result.reason, result.code) == (StopReason.DEBUG_EXIT, 0x25), result.detail
    assert time.monotonic() - started < 5
