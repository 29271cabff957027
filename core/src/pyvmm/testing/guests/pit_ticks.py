"""A long-mode guest woken from ``hlt`` by timer ticks the VMM's userspace 8259s
and 8254 raise (``--irqchip userspace``): the guest of that test on every x86
backend without an in-kernel interrupt controller (KVM without its irqchip,
HAXM, the software CPU).

:func:`pit_ticks_image` builds it; it exits through port 0xf4 with 0x21 after
:data:`TICKS` ticks.  The bytes of each program are checked against its assembly
where GNU as exists (``core/tests/test_softcpu_shared_guests.py``).
"""

from __future__ import annotations

import struct

from pyvmm.boot import X86Mode
from pyvmm.config import Arch
from pyvmm.machine import GuestImage
from pyvmm.testing.conformance import programs as p
from pyvmm.testing.conformance.harness import interrupt_gate
from pyvmm.testing.conformance.programs import GuestProgram
from pyvmm.testing.guests.pic_pit_setup import pic_pit_setup

#: The ticks the guest waits for, and the value it writes to port 0xf4 then.
TICKS = 10
EXIT_CODE = 0x21
#: Where the tick handler, the IDT and its IDTR go.
HANDLER, IDTR, IDT = 0x101000, 0x102000, 0x103000

#: Long mode, for ``--irqchip userspace``: the 8259s at vectors 0x20/0x28 with only
#: IRQ 0 open, PIT counter 0 at 1 kHz (mode 2, 1193 counts), the IDTR at 0x102000;
#: sleep in hlt until the tick handler counted 10 at 0x104000, then exit 0x21.
_SETUP_ASM, _SETUP_CODE = pic_pit_setup(master_mask=0xFE)

PIT_TICKS = GuestProgram(
    "pit_ticks",
    Arch.X86_64,
    """"""
    + _SETUP_ASM
    + """
    lidt [0x102000]
    sti
1:  hlt
    cmp dword ptr [0x104000], 10
    jb 1b
    mov eax, 0x21
    out 0xf4, eax
""",
    _SETUP_CODE + bytes.fromhex("0f011c2500201000fbf4833c25004010000a72f5b821000000e7f4"),
)

#: IRQ 0 at vector 0x20: count at 0x104000, non-specific EOI to the master 8259.
PIT_TICK_HANDLER = GuestProgram(
    "pit_tick_handler",
    Arch.X86_64,
    """
    push rax
    inc dword ptr [0x104000]
    mov al, 0x20
    out 0x20, al
    pop rax
    iretq
""",
    bytes.fromhex("50ff042500401000b020e6205848cf"),
)


PROGRAMS = (PIT_TICKS, PIT_TICK_HANDLER)


def pit_ticks_image() -> GuestImage:
    """The guest, its tick handler at vector 0x20 and its IDT, in long mode."""
    idt = bytes(16 * 0x20) + interrupt_gate(HANDLER)
    return GuestImage(
        "pit_ticks",
        ((p.CODE_ADDRESS, PIT_TICKS.code), (HANDLER, PIT_TICK_HANDLER.code), (IDT, idt),
         (IDTR, struct.pack("<HQ", len(idt) - 1, IDT))),
        p.CODE_ADDRESS,
        X86Mode.LONG,
        stack=0x90000,
    )  # fmt: skip
