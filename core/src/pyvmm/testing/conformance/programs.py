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
)
