"""Guest programs of the KVM tests, with their assembly (checked by test_kvm_guest_sources)."""

from __future__ import annotations

from pyvmm.config import Arch
from pyvmm.testing.conformance.programs import GuestProgram

REAL_MODE_ROUND_TRIP = GuestProgram(
    "real_mode_round_trip",
    Arch.X86_64,
    """
    mov dx, 0x10
    in al, dx
    inc al
    out dx, al
    mov ax, 0xa000
    mov ds, ax
    mov al, [0]
    inc al
    mov [1], al
    hlt
""",
    bytes.fromhex("ba1000ecfec0eeb800a08ed8a00000fec0a20100f4"),
    ".code16",
)

PROTECTED_MODE_ROUND_TRIP = GuestProgram(
    "protected_mode_round_trip",
    Arch.X86_64,
    """
    mov dx, 0x10
    in al, dx
    inc al
    out dx, al
    mov ebx, 0xd0000000
    mov eax, [ebx]
    inc eax
    mov [ebx + 4], eax
    hlt
""",
    bytes.fromhex("66ba1000ecfec0eebb000000d08b0340894304f4"),
    ".code32",
)

LONG_MODE_ROUND_TRIP = GuestProgram(
    "long_mode_round_trip",
    Arch.X86_64,
    """
    mov dx, 0x10
    in al, dx
    inc al
    out dx, al
    mov rbx, 0xd0000000
    mov rax, [rbx]
    inc rax
    mov [rbx + 8], rax
    hlt
""",
    bytes.fromhex("66ba1000ecfec0ee48bb000000d000000000488b0348ffc048894308f4"),
)

#: Fetching instructions from MMIO is something KVM cannot emulate on any host.
JUMP_TO_MMIO = GuestProgram(
    "jump_to_mmio",
    Arch.X86_64,
    """
    mov eax, 0xd0000000
    jmp rax
""",
    bytes.fromhex("b8000000d0ffe0"),
)

#: XGETBV in kernel mode is one of the instructions this machine's software KVM
#: (kvm_pvm) fails to emulate; hardware KVM executes it (#UD: CR4.OSXSAVE is clear).
XGETBV = GuestProgram(
    "xgetbv",
    Arch.X86_64,
    """
    xor ecx, ecx
    xgetbv
    hlt
""",
    bytes.fromhex("31c90f01d0f4"),
)

COUNT_TO_THREE = GuestProgram(
    "count_to_three",
    Arch.X86_64,
    """
    xor eax, eax
    inc eax
    inc eax
    inc eax
    hlt
""",
    bytes.fromhex("31c0ffc0ffc0ffc0f4"),
)

#: Each vCPU writes its own AL (set per vCPU by the test) to port 0x10.
SAY_AL = GuestProgram(
    "say_al",
    Arch.X86_64,
    """
    mov dx, 0x10
    out dx, al
    hlt
""",
    bytes.fromhex("66ba1000eef4"),
)

# --- interrupts from userspace (test_kvm_interrupts.py) -----------------------------

#: Real mode, interrupts on: three writes to port 0x10 (3, 2, 1), then hlt.
REAL_MODE_INTERRUPTS = GuestProgram(
    "real_mode_interrupts",
    Arch.X86_64,
    """
    sti
    mov cx, 3
1:  mov al, cl
    out 0x10, al
    loop 1b
    hlt
""",
    bytes.fromhex("fbb9030088c8e610e2faf4"),
    ".code16",
)

#: A real-mode handler that says its vector (the byte at offset 2) on port 0x11.
REAL_MODE_REPORT_VECTOR = GuestProgram(
    "real_mode_report_vector",
    Arch.X86_64,
    """
    push ax
    mov al, 0x20
    out 0x11, al
    pop ax
    iret
""",
    bytes.fromhex("50b020e61158cf"),
    ".code16",
)

#: Interrupts off for one write (1), then sti and two nops (the first in its
#: shadow), hlt.  The IDT is the conformance suite's (``install_idt``).
STI_THEN_NOPS = GuestProgram(
    "sti_then_nops",
    Arch.X86_64,
    """
    lidt [0x103000]
    cli
    mov al, 1
    out 0x10, al
    sti
    nop
    nop
    hlt
""",
    bytes.fromhex("0f011c2500301000fab001e610fb9090f4"),
)
#: Offsets in STI_THEN_NOPS: after sti (in its shadow), after the first nop.
STI_DONE, SHADOW_DONE = 14, 15

#: The escape-hatch test's guest: rdmsr of an MSR KVM does not know, AL to port 0x10.
UNKNOWN_MSR = 0x4B564D99
READ_UNKNOWN_MSR = GuestProgram(
    "read_unknown_msr",
    Arch.X86_64,
    """
    mov ecx, 0x4b564d99
    rdmsr
    out 0x10, al
    hlt
""",
    bytes.fromhex("b9994d564b0f32e610f4"),
)

ALL = (
    REAL_MODE_ROUND_TRIP,
    PROTECTED_MODE_ROUND_TRIP,
    LONG_MODE_ROUND_TRIP,
    JUMP_TO_MMIO,
    XGETBV,
    COUNT_TO_THREE,
    SAY_AL,
    REAL_MODE_INTERRUPTS,
    REAL_MODE_REPORT_VECTOR,
    STI_THEN_NOPS,
    READ_UNKNOWN_MSR,
)
