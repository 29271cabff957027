"""A long-mode guest that counts timer ticks across a snapshot point: the guest
of the machine snapshot tests (``--irqchip kernel``: the hypervisor's 8259s,
8254 and local APIC deliver the ticks, so a restore that lost any of them
would never wake it again).

After 5 ticks it writes port 0x5f0 (a snapshot request, ignored unless the
machine saves one); after 10 it checksums its own memory (0x100000-0x105000:
code, handler, IDT and the counter page) and writes, to the debug-exit port,
the checksum plus ``rbx`` and ``r12``, set before the snapshot point: the
registers and memory must both cross it.  It sets its own stack (0x90000), so
it also runs as a flat binary (:func:`snapshot_counter_flat`).  :func:`expected_code`
computes the value from the image alone.
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

#: Where the tick handler, the IDT and its IDTR go; the tick count, and the
#: word the guest sets before its snapshot request.
HANDLER, IDTR, IDT, COUNT, FLAG = 0x101000, 0x102000, 0x103000, 0x104000, 0x104004
TICKS = 10
#: What the guest keeps in rbx and r12 across the snapshot point.
RBX, R12 = 0x600D, 0x5EED
CHECKSUM_RANGE = (0x100000, 0x105000)

_SETUP_ASM, _SETUP_CODE = pic_pit_setup(master_mask=0xFE)

SNAPSHOT_COUNTER = GuestProgram(
    "snapshot_counter",
    Arch.X86_64,
    """
    mov esp, 0x90000"""
    + _SETUP_ASM
    + """
    lidt [0x102000]
    mov ebx, 0x5eed
    mov r12, rbx
    mov ebx, 0x600d
    sti
1:  hlt
    cmp dword ptr [0x104000], 5
    jb 1b
    mov dword ptr [0x104004], 1
    mov dx, 0x5f0
    out dx, al
2:  hlt
    cmp dword ptr [0x104000], 10
    jb 2b
    cli
    mov esi, 0x100000
    xor eax, eax
3:  rol eax, 5
    xor eax, dword ptr [rsi]
    add rsi, 4
    cmp rsi, 0x105000
    jb 3b
    mov rcx, r12
    add eax, ecx
    add eax, ebx
    out 0xf4, eax
""",
    bytes.fromhex("bc00000900")
    + _SETUP_CODE
    + bytes.fromhex(
        "0f011c2500201000bbed5e00004989dcbb0d600000fbf4833c25004010000572f5c70425044010000100000066baf005eef4"
        "833c25004010000a72f5fabe0000100031c0c1c00533064883c6044881fe0050100072ee4c89e101c801d8e7f4"
    ),
)

#: IRQ 0 at vector 0x20: count up to 10 at 0x104000 (no further: the final
#: memory is the same however late the guest sees the tenth tick), EOI.
SNAPSHOT_TICK_HANDLER = GuestProgram(
    "snapshot_tick_handler",
    Arch.X86_64,
    """
    push rax
    cmp dword ptr [0x104000], 10
    jae 1f
    inc dword ptr [0x104000]
1:  mov al, 0x20
    out 0x20, al
    pop rax
    iretq
""",
    bytes.fromhex("50833c25004010000a7307ff042500401000b020e6205848cf"),
)

PROGRAMS = (SNAPSHOT_COUNTER, SNAPSHOT_TICK_HANDLER)


def _idt() -> bytes:
    return bytes(16 * 0x20) + interrupt_gate(HANDLER)


def snapshot_counter_image() -> GuestImage:
    """The guest, its tick handler at vector 0x20 and its IDT, in long mode."""
    idt = _idt()
    return GuestImage(
        "snapshot_counter",
        ((p.CODE_ADDRESS, SNAPSHOT_COUNTER.code), (HANDLER, SNAPSHOT_TICK_HANDLER.code), (IDT, idt),
         (IDTR, struct.pack("<HQ", len(idt) - 1, IDT))),
        p.CODE_ADDRESS,
        X86Mode.LONG,
        stack=0x90000,
    )  # fmt: skip


def expected_code() -> int:
    """The debug-exit code of a run that went through: the guest's checksum of
    its memory as it ends (the image, 10 ticks counted, the flag set) plus
    ``r12`` and ``rbx``, in 32 bits."""
    start, end = CHECKSUM_RANGE
    memory = bytearray(end - start)
    for address, data in snapshot_counter_image().segments:
        memory[address - start : address - start + len(data)] = data
    memory[COUNT - start : COUNT - start + 8] = struct.pack("<II", TICKS, 1)
    value = 0
    for (word,) in struct.iter_unpack("<I", memory):
        value = ((value << 5 | value >> 27) & 0xFFFF_FFFF) ^ word
    return (value + R12 + RBX) & 0xFFFF_FFFF


def snapshot_counter_flat() -> bytes:
    """The image as one flat binary to load at 0x100000 (``pyvmm run --kernel
    FILE --load-address 0x100000``): the segments at their offsets, zeros between."""
    start = p.CODE_ADDRESS
    image = bytearray(COUNT - start)
    for address, data in snapshot_counter_image().segments:
        image[address - start : address - start + len(data)] = data
    return bytes(image)
