"""A Multiboot kernel that needs the 8259 PICs and the 8254 PIT: the guest of
``pyvmm run --irqchip userspace`` tests on every x86 backend (KVM without its
in-kernel irqchip, the software CPU).

:func:`multiboot_pic_kernel` builds the file; it exits through the debug-exit
port with 0x10 (status ``0x21``) after 20 timer ticks and one COM1 interrupt.
The bytes of each program are checked against its assembly where GNU as exists.
"""

from __future__ import annotations

import struct

from pyvmm.arch.x86_64_boot import CODE32_SELECTOR
from pyvmm.config import Arch
from pyvmm.testing.conformance.programs import GuestProgram
from pyvmm.testing.guests.pic_pit_setup import pic_pit_setup

#: The debug-exit status the kernel ends with when it saw both interrupts.
EXPECTED_STATUS = (0x10 << 1) | 1

#: A Multiboot kernel (32-bit, loaded at 0x100000 with the a.out kludge) that
#: uses the PIC: its own stack (Multiboot leaves ESP undefined), then, after the
#: legacy firmware's boot stub, it remaps the 8259s to
#: 0x20/0x28 with IRQs 0 and 4 open, runs PIT counter 0 at 1 kHz, loads its IDT
#: (IDTR at 0x100a00), turns on COM1's transmitter-empty interrupt and sleeps in
#: hlt until 20 timer ticks (counted at 0x100900); exit 0x10 if COM1 interrupted
#: too (counted at 0x100904), else 0x3f.
_SETUP_ASM, _SETUP_CODE = pic_pit_setup(master_mask=0xEE)

MULTIBOOT_PIC_KERNEL = GuestProgram(
    "multiboot_pic_kernel",
    Arch.X86_64,
    """
    mov esp, 0x100f00
    cmp eax, 0x2badb002
    jne 2f"""
    + _SETUP_ASM
    + """
    lidt [0x100a00]
    mov dx, 0x3f9
    mov al, 0x02
    out dx, al
    sti
1:  hlt
    cmp dword ptr [0x100900], 20
    jb 1b
    cmp dword ptr [0x100904], 0
    je 2f
    mov eax, 0x10
    out 0xf4, eax
2:  mov eax, 0x3f
    out 0xf4, eax
""",
    bytes.fromhex("bc000f10003d02b0ad2b7559")
    + _SETUP_CODE
    + bytes.fromhex("0f011d000a100066baf903b002eefbf4833d000910001472f6833d04091000007407b810000000e7f4b83f000000e7f4"),
    ".code32",
)

#: The kernel's IRQ 0 handler (vector 0x20): count, EOI.  It returns with ``sti;
#: retf 4`` (IF was set when the interrupt came; the shadow of sti covers the
#: retf; retf 4 drops EFLAGS) instead of ``iretd``: this machine's software KVM
#: fails to emulate a 32-bit iret (docs/backends/kvm.md §6.5).
MULTIBOOT_TIMER_HANDLER = GuestProgram(
    "multiboot_timer_handler",
    Arch.X86_64,
    """
    push eax
    inc dword ptr [0x100900]
    mov al, 0x20
    out 0x20, al
    pop eax
    sti
    retf 4
""",
    bytes.fromhex("50ff0500091000b020e62058fbca0400"),
    ".code32",
)

#: The kernel's IRQ 4 handler (vector 0x24): read COM1's IIR (acknowledges the
#: transmitter-empty interrupt), count, EOI; returns as the IRQ 0 handler does.
MULTIBOOT_SERIAL_HANDLER = GuestProgram(
    "multiboot_serial_handler",
    Arch.X86_64,
    """
    push eax
    push edx
    mov dx, 0x3fa
    in al, dx
    inc dword ptr [0x100904]
    mov al, 0x20
    out 0x20, al
    pop edx
    pop eax
    sti
    retf 4
""",
    bytes.fromhex("505266bafa03ecff0504091000b020e6205a58fbca0400"),
    ".code32",
)

PROGRAMS = (MULTIBOOT_PIC_KERNEL, MULTIBOOT_TIMER_HANDLER, MULTIBOOT_SERIAL_HANDLER)


def multiboot_pic_kernel() -> bytes:
    """MULTIBOOT_PIC_KERNEL as a file: a Multiboot header with the a.out kludge
    (load at 0x100000, enter at +0x30), the handlers, counters, IDTR and IDT.
    The IDT's gates name the code segment the Multiboot boot state loads
    (:data:`~pyvmm.arch.x86_64_boot.CODE32_SELECTOR`, in the GDT pyvmm writes)."""
    base, entry = 0x100000, 0x100030
    flags = 1 << 16
    image = bytearray(0x1200)
    header = struct.pack("<3I", 0x1BADB002, flags, -(0x1BADB002 + flags) & 0xFFFFFFFF)
    image[0:32] = header + struct.pack("<5I", base, base, 0, 0, entry)
    image[0x30 : 0x30 + len(MULTIBOOT_PIC_KERNEL.code)] = MULTIBOOT_PIC_KERNEL.code
    image[0x800 : 0x800 + len(MULTIBOOT_TIMER_HANDLER.code)] = MULTIBOOT_TIMER_HANDLER.code
    image[0x840 : 0x840 + len(MULTIBOOT_SERIAL_HANDLER.code)] = MULTIBOOT_SERIAL_HANDLER.code
    idt = bytearray(8 * 0x30)
    for vector, handler in ((0x20, base + 0x800), (0x24, base + 0x840)):
        idt[8 * vector : 8 * vector + 8] = struct.pack(
            "<HHBBH", handler & 0xFFFF, CODE32_SELECTOR, 0, 0x8E, handler >> 16
        )
    image[0xA00:0xA06] = struct.pack("<HI", len(idt) - 1, base + 0x1000)
    image[0x1000 : 0x1000 + len(idt)] = idt
    return bytes(image)
