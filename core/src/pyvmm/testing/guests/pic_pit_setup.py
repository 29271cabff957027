"""The 8259 pair and the 8254 as the PC guests of this package program them,
shared so that the three guests that wait for timer ticks (``pit_ticks``,
``snapshot_counter``, ``multiboot_pic``) say it once.

:func:`pic_pit_setup` gives the assembly and its bytes; each guest puts them in
its own source and code, whose assembly is checked against GNU as where it exists
(``core/tests/test_softcpu_shared_guests.py``).  The instructions (``mov al``,
``out imm8``) encode the same in 32- and 64-bit code.
"""

from __future__ import annotations

_TEMPLATE = """
    mov al, 0x11
    out 0x20, al
    out 0xa0, al
    mov al, 0x20
    out 0x21, al
    mov al, 0x28
    out 0xa1, al
    mov al, 0x04
    out 0x21, al
    mov al, 0x02
    out 0xa1, al
    mov al, 0x01
    out 0x21, al
    out 0xa1, al
    mov al, {mask:#04x}
    out 0x21, al
    mov al, 0xff
    out 0xa1, al
    mov al, 0x34
    out 0x43, al
    mov al, 0xa9
    out 0x40, al
    mov al, 0x04
    out 0x40, al"""

_BEFORE_MASK = bytes.fromhex("b011e620e6a0b020e621b028e6a1b004e621b002e6a1b001e621e6a1b0")
_AFTER_MASK = bytes.fromhex("e621b0ffe6a1b034e643b0a9e640b004e640")


def pic_pit_setup(master_mask: int) -> tuple[str, bytes]:
    """Assembly and bytes that initialise both 8259s (edge-triggered, cascaded,
    8086 mode, vectors 0x20 and 0x28), mask the master's lines with
    ``master_mask`` and all of the slave's, and start PIT counter 0 at ~1 kHz
    (mode 2, 1193 counts).  The assembly starts with a newline and ends without one."""
    if not 0 <= master_mask <= 0xFF:
        raise ValueError(f"an 8259 mask is one byte, not {master_mask:#x}")
    return _TEMPLATE.format(mask=master_mask), _BEFORE_MASK + bytes((master_mask,)) + _AFTER_MASK
