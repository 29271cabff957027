"""x86_64 boot states: real mode, 32-bit flat protected mode, 64-bit long mode.

Long mode needs a GDT and page tables in guest memory.  They go into seven pages
at ``BootSpec.boot_tables``:

====== ============================================================
page   contents
====== ============================================================
0      GDT: null, 64-bit code (0x08), data (0x10), 32-bit code (0x18)
1      PML4: one entry -> page 2
2      PDPT: four entries -> pages 3..6
3..6   page directories: 2 MiB pages identity-mapping 0..4 GiB
====== ============================================================

The GDT is written in protected mode too, so a guest that reloads a segment
register finds the descriptor its hidden state came from.
"""

from __future__ import annotations

import struct

from pyvmm.arch.x86_64 import (
    CR0_ET,
    CR0_NE,
    CR0_PE,
    CR0_PG,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    GPR_NAMES,
    DescriptorTable,
    Regs,
    Segment,
    Sregs,
)
from pyvmm.boot import BootSpec, X86Mode, X86VcpuInit
from pyvmm.errors import ConfigError
from pyvmm.memory import GuestMemory

BOOT_TABLE_PAGES = 7
CODE64_SELECTOR = 0x08
DATA_SELECTOR = 0x10
CODE32_SELECTOR = 0x18

_PAGE = 4096
_PTE_PRESENT_RW = 0x3
_PDE_LARGE = 0x80


def _descriptor(base: int, limit: int, access: int, flags: int) -> int:
    """Pack a GDT descriptor; ``flags`` is the G/DB/L/AVL nibble."""
    return (
        (limit & 0xFFFF)
        | (base & 0xFFFFFF) << 16
        | (access & 0xFF) << 40
        | ((limit >> 16) & 0xF) << 48
        | (flags & 0xF) << 52
        | ((base >> 24) & 0xFF) << 56
    )


def _gdt_bytes() -> bytes:
    return struct.pack(
        "<4Q",
        0,
        _descriptor(0, 0xFFFFF, 0x9B, 0xA),  # code64: P, S, exec/read, accessed; G, L
        _descriptor(0, 0xFFFFF, 0x93, 0xC),  # data: P, S, read/write, accessed; G, DB
        _descriptor(0, 0xFFFFF, 0x9B, 0xC),  # code32: G, DB
    )


def _flat(selector: int, code: bool, long: bool = False) -> Segment:
    return Segment(
        base=0,
        limit=0xFFFFFFFF,
        selector=selector,
        type=0xB if code else 0x3,
        present=1,
        dpl=0,
        db=0 if long and code else 1,
        s=1,
        l=1 if long and code else 0,
        g=1,
    )


def write_boot_tables(memory: GuestMemory, base: int, long_mode: bool) -> None:
    """Write the GDT (and, for long mode, the identity page tables) at ``base``."""
    size = BOOT_TABLE_PAGES * _PAGE if long_mode else _PAGE
    if not memory.contains(base, size):
        raise ConfigError(f"boot tables at {base:#x}+{size:#x} do not lie in guest RAM")
    memory.write(base, _gdt_bytes().ljust(_PAGE, b"\0"))
    if not long_mode:
        return
    pml4, pdpt, pd0 = base + _PAGE, base + 2 * _PAGE, base + 3 * _PAGE
    memory.write(pml4, struct.pack("<Q", pdpt | _PTE_PRESENT_RW).ljust(_PAGE, b"\0"))
    directories = b"".join(struct.pack("<Q", (pd0 + i * _PAGE) | _PTE_PRESENT_RW) for i in range(4))
    memory.write(pdpt, directories.ljust(_PAGE, b"\0"))
    two_mib = 1 << 21
    entries = (i * two_mib | _PTE_PRESENT_RW | _PDE_LARGE for i in range(4 * 512))
    memory.write(pd0, struct.pack("<2048Q", *entries))


def _apply_registers(regs: Regs, registers: dict[str, int]) -> None:
    for name, value in registers.items():
        key = name.lower()
        if key.startswith("e") and "r" + key[1:] in GPR_NAMES:
            key = "r" + key[1:]
        if key not in GPR_NAMES:
            raise ConfigError(f"boot register {name!r} is not an x86_64 general-purpose register")
        setattr(regs, key, value)


def build_x86_boot_state(spec: BootSpec, memory: GuestMemory | None) -> X86VcpuInit:
    """Registers for the boot vCPU; writes the boot tables into ``memory`` when the
    mode needs them (protected and long mode)."""
    regs = Regs(rip=spec.entry, rflags=0x2)
    sregs = Sregs()
    if spec.stack is not None:
        regs.rsp = spec.stack
    _apply_registers(regs, spec.registers)  # before touching guest memory: a bad name writes nothing
    if spec.x86_mode is X86Mode.REAL:
        code_base = spec.entry & ~0xFFFF
        sregs.cs = Segment(base=code_base, selector=(code_base >> 4) & 0xFFFF, type=0xB)
        regs.rip = spec.entry & 0xFFFF
        sregs.cr0 = CR0_ET
    else:
        if memory is None:
            raise ConfigError(f"{spec.x86_mode.value} mode needs guest memory for its boot tables")
        long_mode = spec.x86_mode is X86Mode.LONG
        write_boot_tables(memory, spec.boot_tables, long_mode)
        sregs.gdt = DescriptorTable(base=spec.boot_tables, limit=4 * 8 - 1)
        sregs.idt = DescriptorTable(base=0, limit=0)
        code_selector = CODE64_SELECTOR if long_mode else CODE32_SELECTOR
        sregs.cs = _flat(code_selector, code=True, long=long_mode)
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(sregs, name, _flat(DATA_SELECTOR, code=False))
        sregs.tr = Segment(base=0, limit=0xFFFF, selector=0, type=0xB, s=0)
        sregs.cr0 = CR0_PE | CR0_ET | CR0_NE
        if long_mode:
            sregs.cr0 |= CR0_PG
            sregs.cr3 = spec.boot_tables + _PAGE
            sregs.cr4 = CR4_PAE
            sregs.efer = EFER_LME | EFER_LMA
    return X86VcpuInit(regs=regs, sregs=sregs, boot_cpu=True)
