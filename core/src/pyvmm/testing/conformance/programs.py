"""Guest programs of the conformance suite, with their assembly.

Each program is 64-bit code (GNU as, Intel syntax) that the suite loads at
:data:`CODE_ADDRESS` and enters in long mode.  The bytes are checked against the
source by ``core/tests/test_guest_programs.py`` wherever ``as`` and ``objcopy``
exist, so the two cannot drift apart.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pyvmm.config import Arch

#: Where the suite loads programs, with RAM at 0..RAM_SIZE.
CODE_ADDRESS = 0x100000
RAM_SIZE = 0x200000
STACK_TOP = 0x80000
#: An address no RAM backs, for MMIO.
MMIO_BASE = 0xD0000000
#: The port the programs talk to (0x11 for input where both are used).
TEST_PORT = 0x10


@dataclass(frozen=True)
class GuestProgram:
    name: str
    arch: Arch
    source: str
    code: bytes
    directive: str = ".code64"

    def assembled(self) -> bytes | None:
        """The source assembled now (None without an assembler), to compare with ``code``."""
        return assemble_x86(self.source, self.directive)


def assemble_x86(source: str, directive: str = ".code64") -> bytes | None:
    """Assemble ``source`` with the host's GNU as (``directive`` picks 16-, 32- or
    64-bit code); None where as/objcopy are missing."""
    if shutil.which("as") is None or shutil.which("objcopy") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "p.S").write_text(f"{directive}\n.intel_syntax noprefix\n{source}")
        subprocess.run(["as", "--64", "p.S", "-o", "p.o"], cwd=work, check=True, capture_output=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", "p.o", "p.bin"], cwd=work, check=True)
        return (work / "p.bin").read_bytes()


def _x86(name: str, source: str, code_hex: str) -> GuestProgram:
    return GuestProgram(name, Arch.X86_64, source, bytes.fromhex(code_hex))


PIO_OUT = _x86(
    "pio_out",
    """
    mov dx, 0x10
    mov al, 0x5a
    out dx, al
    hlt
""",
    "66ba1000b05aeef4",
)

PIO_ROUND_TRIP = _x86(
    "pio_round_trip",
    """
    mov dx, 0x10
    in eax, dx
    add eax, 1
    out dx, eax
    hlt
""",
    "66ba1000ed83c001eff4",
)

MMIO_ROUND_TRIP = _x86(
    "mmio_round_trip",
    """
    mov ebx, 0xd0000000
    mov eax, [rbx]
    add eax, 1
    mov [rbx + 8], eax
    mov rax, 0x1122334455667788
    mov [rbx + 16], rax
    hlt
""",
    "bb000000d08b0383c00189430848b8887766554433221148894310f4",
)

REP_OUTSB = _x86(
    "rep_outsb",
    """
    lea rsi, [rip + message]
    mov ecx, 5
    mov dx, 0x10
    rep outsb
    hlt
message:
    .ascii "hello"
""",
    "488d350c000000b90500000066ba1000f36ef468656c6c6f",
)

REP_INSB = _x86(
    "rep_insb",
    """
    lea rdi, [rip + buffer]
    mov ecx, 4
    mov dx, 0x11
    rep insb
    lea rsi, [rip + buffer]
    mov ecx, 4
    mov dx, 0x10
    rep outsb
    hlt
buffer:
    .long 0
""",
    "488d3d1e000000b90400000066ba1100f36c488d350c000000b90400000066ba1000f36ef400000000",
)

READ_ONLY_WRITE = _x86(
    "read_only_write",
    """
    mov ebx, 0x200000
    mov byte ptr [rbx], 0x77
    mov al, [rbx]
    out 0x10, al
    hlt
""",
    "bb00002000c603778a03e610f4",
)

READ_TWICE = _x86(
    "read_twice",
    """
    mov ebx, 0x300000
    mov al, [rbx]
    out 0x10, al
    mov al, [rbx]
    out 0x10, al
    hlt
""",
    "bb000030008a03e6108a03e610f4",
)

DIRTY_PAGES = _x86(
    "dirty_pages",
    """
    mov ebx, 0x401000
    mov byte ptr [rbx], 1
    mov byte ptr [rbx + 0x4000], 1
    hlt
""",
    "bb00104000c60301c6830040000001f4",
)

HLT = _x86(
    "hlt",
    """
    hlt
""",
    "f4",
)

TRIPLE_FAULT = _x86(
    "triple_fault",
    """
    ud2
""",
    "0f0b",
)

SPIN = _x86(
    "spin",
    """
1:  jmp 1b
""",
    "ebfe",
)

#: Where COUNTER keeps its count (in the page after the code's).
COUNTER_ADDRESS = 0x107000

COUNTER = _x86(
    "counter",
    """
1:  mov eax, dword ptr [0x107000]
    inc eax
    mov dword ptr [0x107000], eax
    add ebx, eax
    mov al, bl
    out 0x10, al
    jmp 1b
""",
    "8b042500701000ffc08904250070100001c388d8e610ebe8",
)
"""Each port write reports the running sum of a counter kept in memory: what
comes out next depends on guest memory and on a register both."""

SET_RAX = _x86(
    "set_rax",
    """
    mov rax, 0x123456789abcdef0
    hlt
""",
    "48b8f0debc9a78563412f4",
)

ADD_REGS = _x86(
    "add_regs",
    """
    add rax, rbx
    hlt
""",
    "4801d8f4",
)


# --- interrupts ----------------------------------------------------------------
#
# The interrupt scenarios load an IDT: IDTR at IDTR_ADDRESS, 256 gates at
# IDT_ADDRESS, each pointing at a copy of REPORT_VECTOR (patched with the gate's
# vector) at VECTOR_STUBS + 16 * vector, so whichever vector arrives says its
# number on port 0x11.  ``harness.install_idt`` writes them.

IDTR_ADDRESS = 0x103000
IDT_ADDRESS = 0x104000
VECTOR_STUBS = 0x105000
#: Where a handler of more than 16 bytes goes (LAPIC_HANDLER).
HANDLER_ADDRESS = 0x106000
#: The port the interrupt handlers report on.
REPORT_PORT = 0x11

#: The vector's handler: says the vector on port 0x11, returns.  The byte at
#: REPORT_VECTOR_OFFSET (0x20 here) is patched with each gate's vector.
REPORT_VECTOR = _x86(
    "report_vector",
    """
    push rax
    mov al, 0x20
    out 0x11, al
    pop rax
    iretq
""",
    "50b020e6115848cf",
)
REPORT_VECTOR_OFFSET = 2

#: Interrupts on: four writes to port 0x10 (4, 3, 2, 1), each a point where the
#: vCPU can take an interrupt, then hlt.
INTERRUPTS_ON = _x86(
    "interrupts_on",
    """
    lidt [0x103000]
    sti
    mov ecx, 4
1:  mov al, cl
    out 0x10, al
    loop 1b
    hlt
""",
    "0f011c2500301000fbb90400000088c8e610e2faf4",
)

#: Interrupts off for two writes (1, 2), then on (after sti and a nop, past its
#: shadow) for a third (3), then hlt.
INTERRUPTS_OFF_THEN_ON = _x86(
    "interrupts_off_then_on",
    """
    lidt [0x103000]
    cli
    mov al, 1
    out 0x10, al
    mov al, 2
    out 0x10, al
    sti
    nop
    mov al, 3
    out 0x10, al
    hlt
""",
    "0f011c2500301000fab001e610b002e610fb90b003e610f4",
)

#: Interrupts off for two writes (1, 2); then sti, one instruction in its shadow,
#: and the third write (3) at WINDOW_OFFSET: where an interrupt window requested
#: while interrupts were off opens.
WINDOW_AFTER_STI = _x86(
    "window_after_sti",
    """
    lidt [0x103000]
    cli
    mov al, 1
    out 0x10, al
    mov al, 2
    out 0x10, al
    sti
    mov al, 3
    out 0x10, al
    hlt
""",
    "0f011c2500301000fab001e610b002e610fbb003e610f4",
)
#: Offset in WINDOW_AFTER_STI of the ``out`` after the instruction sti shadows.
WINDOW_OFFSET = 20

#: Interrupts off: two writes (1, 2) and hlt; an NMI arrives anyway.
NMI_WITH_INTERRUPTS_OFF = _x86(
    "nmi_with_interrupts_off",
    """
    lidt [0x103000]
    cli
    mov al, 1
    out 0x10, al
    mov al, 2
    out 0x10, al
    hlt
""",
    "0f011c2500301000fab001e610b002e610f4",
)

#: A handler for the hypervisor's local APIC: says its vector (patched at
#: LAPIC_HANDLER_VECTOR_OFFSET) on port 0x11, writes the local APIC's EOI
#: register, then says it again on port 0x12 (after the EOI), returns.
LAPIC_HANDLER = _x86(
    "lapic_handler",
    """
    push rax
    push rbx
    mov al, 0x31
    out 0x11, al
    mov rbx, 0xfee00000
    mov dword ptr [rbx + 0xb0], 0
    out 0x12, al
    pop rbx
    pop rax
    iretq
""",
    "5053b031e61148bb0000e0fe00000000c783b000000000000000e6125b5848cf",
)
LAPIC_HANDLER_VECTOR_OFFSET = 3
#: The vector the in-hypervisor interrupt scenarios use.
LAPIC_VECTOR = 0x31

#: With the hypervisor's interrupt controllers: 8259s masked, the local APIC
#: enabled, one write to port 0x10 (1), then interrupts on and hlt forever.
LAPIC_WAIT = _x86(
    "lapic_wait",
    """
    mov al, 0xff
    out 0x21, al
    out 0xa1, al
    lidt [0x103000]
    mov rbx, 0xfee00000
    mov dword ptr [rbx + 0xf0], 0x1ff
    mov al, 1
    out 0x10, al
    sti
1:  hlt
    jmp 1b
""",
    "b0ffe621e6a10f011c250030100048bb0000e0fe00000000c783f0000000ff010000b001e610fbf4ebfd",
)

#: As LAPIC_WAIT, and IOAPIC pin IOAPIC_PIN routed to vector 0x31,
#: level-triggered, to APIC 0.
IOAPIC_LEVEL_WAIT = _x86(
    "ioapic_level_wait",
    """
    mov al, 0xff
    out 0x21, al
    out 0xa1, al
    lidt [0x103000]
    mov rbx, 0xfee00000
    mov dword ptr [rbx + 0xf0], 0x1ff
    mov rbx, 0xfec00000
    mov dword ptr [rbx], 0x24
    mov dword ptr [rbx + 0x10], 0x8031
    mov dword ptr [rbx], 0x25
    mov dword ptr [rbx + 0x10], 0
    mov al, 1
    out 0x10, al
    sti
1:  hlt
    jmp 1b
""",
    "b0ffe621e6a10f011c250030100048bb0000e0fe00000000c783f0000000ff01000048bb0000c0fe00000000c70324000000c7431031"
    "800000c70325000000c7431000000000b001e610fbf4ebfd",
)
#: The IOAPIC input IOAPIC_LEVEL_WAIT programs (redirection registers 0x24/0x25),
#: which the PC's GSI of the same number drives.
IOAPIC_PIN = 10


X86_64_PROGRAMS = (
    PIO_OUT,
    PIO_ROUND_TRIP,
    MMIO_ROUND_TRIP,
    REP_OUTSB,
    REP_INSB,
    READ_ONLY_WRITE,
    READ_TWICE,
    DIRTY_PAGES,
    HLT,
    TRIPLE_FAULT,
    SPIN,
    SET_RAX,
    ADD_REGS,
    REPORT_VECTOR,
    INTERRUPTS_ON,
    INTERRUPTS_OFF_THEN_ON,
    WINDOW_AFTER_STI,
    NMI_WITH_INTERRUPTS_OFF,
    LAPIC_HANDLER,
    LAPIC_WAIT,
    IOAPIC_LEVEL_WAIT,
)
