"""Completing x86 exits taken *before* the instruction (WHPX's exit timing).

A hypervisor that exits before an MMIO or port instruction (WHPX; the software
CPU with ``exit_timing="before"``) leaves the instruction undone: the exit
carries its bytes (:attr:`~pyvmm.exits.MmioExit.instruction`), and the VMM
emulates it -- writes the destination register of a read and advances RIP.
This module is that emulator for the instructions device drivers use: ``mov``
to and from memory of 1, 2, 4 and 8 bytes (``88``/``89``/``8A``/``8B``,
``C6``/``C7``, ``A0``..``A3``, ``movzx`` ``0F B6``/``0F B7``) and ``in``/``out``
(immediate and DX forms).  Anything else raises :class:`NotEmulated`.

Pure functions on :class:`~pyvmm.arch.x86_64.Regs`; no unicorn.  64-bit and
32-bit code (``bits``); 16-bit code is not decoded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pyvmm.arch.x86_64 import Regs
from pyvmm.errors import PyvmmError
from pyvmm.exits import IoExit, MmioExit

#: Register numbers as x86 encodes them (ModRM reg/rm, SIB, REX extended).
REGISTER_NAMES = (
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)  # fmt: skip
_SEGMENT_PREFIXES = {0x26: "es", 0x2E: "cs", 0x36: "ss", 0x3E: "ds", 0x64: "fs", 0x65: "gs"}
_OTHER_PREFIXES = frozenset((0x66, 0x67, 0xF0, 0xF2, 0xF3))
_MOV_MODRM = frozenset((0x88, 0x89, 0x8A, 0x8B, 0xC6, 0xC7, 0x0FB6, 0x0FB7))
_MOV_MOFFS = frozenset((0xA0, 0xA1, 0xA2, 0xA3))
_PORT = frozenset((0xE4, 0xE5, 0xE6, 0xE7, 0xEC, 0xED, 0xEE, 0xEF))
_MASK64 = (1 << 64) - 1


class NotEmulated(PyvmmError):
    """An instruction this emulator does not decode or complete."""


@dataclass(frozen=True, slots=True)
class Instruction:
    """One decoded instruction of the supported set."""

    opcode: int  # one byte, or 0x0Fxx for a two-byte opcode
    length: int
    operand_size: int  # bytes moved: 1, 2, 4 or 8
    address_size: int  # 4 or 8 (bytes)
    rex: int
    segment: str | None  # a segment-override prefix
    reg: int  # ModRM.reg with REX.R (the register operand), or -1
    mod: int  # ModRM.mod, or -1 without ModRM
    base: int | None  # memory operand: base register, None for none
    index: int | None
    scale: int
    displacement: int  # sign-extended; the absolute address for moffs
    rip_relative: bool
    immediate: int
    #: The register operand's width (differs from ``operand_size`` for movzx).
    register_size: int = 0


def _signed(value: int, size: int) -> int:
    bits = 8 * size
    return value - (1 << bits) if value >> (bits - 1) & 1 else value


def decode(code: bytes, *, bits: int = 64) -> Instruction:
    """Decode the instruction at the start of ``code``.

    :raises NotEmulated: not one of the supported instructions, or truncated.
    """
    if bits not in (32, 64):
        raise NotEmulated(f"{bits}-bit code is not decoded")
    at = 0
    operand16 = address_override = False
    segment: str | None = None
    rex = 0
    try:
        while code[at] in _SEGMENT_PREFIXES or code[at] in _OTHER_PREFIXES:
            byte = code[at]
            if byte == 0x66:
                operand16 = True
            elif byte == 0x67:
                address_override = True
            elif byte in _SEGMENT_PREFIXES:
                segment = _SEGMENT_PREFIXES[byte]
            elif byte in (0xF2, 0xF3, 0xF0):
                raise NotEmulated(f"prefix {byte:#04x} is not emulated")
            at += 1
        if bits == 64 and 0x40 <= code[at] <= 0x4F:
            rex = code[at]
            at += 1
        opcode = code[at]
        at += 1
        if opcode == 0x0F:
            opcode = 0x0F00 | code[at]
            at += 1
        if bits == 32 and address_override:
            raise NotEmulated("16-bit addressing is not decoded")
        address_size = 4 if address_override or bits == 32 else 8
        wide = 8 if rex & 8 else 2 if operand16 else 4
        if opcode in (0x88, 0x8A, 0xC6, 0xA0, 0xA2, 0x0FB6, 0xE4, 0xE6, 0xEC, 0xEE):
            size = 1
        elif opcode == 0x0FB7:
            size = 2
        elif opcode in _PORT:
            size = 2 if operand16 else 4
        else:
            size = wide
        if opcode in _PORT:
            immediate = 0
            if opcode in (0xE4, 0xE5, 0xE6, 0xE7):
                immediate = code[at]
                at += 1
            return Instruction(opcode, at, size, address_size, rex, segment, -1, -1, None, None, 1, 0, False, immediate)
        if opcode in _MOV_MOFFS:
            width = address_size
            displacement = int.from_bytes(code[at : at + width], "little")
            if len(code) < at + width:
                raise IndexError
            at += width
            return Instruction(
                opcode, at, size, address_size, rex, segment, 0, -1, None, None, 1, displacement, False, 0, size
            )
        if opcode not in _MOV_MODRM:
            raise NotEmulated(f"opcode {opcode:#x} is not emulated")
        modrm = code[at]
        at += 1
        mod, reg, rm = modrm >> 6, (modrm >> 3) & 7 | (rex & 4) << 1, modrm & 7
        if mod == 3:
            raise NotEmulated("a register-only operand makes no memory access")
        if opcode in (0xC6, 0xC7) and reg & 7:
            raise NotEmulated(f"opcode {opcode:#x} /{reg & 7} is not a mov")
        base: int | None = rm | (rex & 1) << 3
        index: int | None = None
        scale = 1
        rip_relative = False
        disp_size = {0: 0, 1: 1, 2: 4}[mod]
        if rm == 4:
            sib = code[at]
            at += 1
            scale = 1 << (sib >> 6)
            index = (sib >> 3) & 7 | (rex & 2) << 2
            if index == 4:
                index = None
            base = sib & 7 | (rex & 1) << 3
            if sib & 7 == 5 and mod == 0:
                base = None
                disp_size = 4
        elif rm == 5 and mod == 0:
            base = None
            disp_size = 4
            rip_relative = bits == 64
        displacement = _signed(int.from_bytes(code[at : at + disp_size], "little"), disp_size) if disp_size else 0
        if len(code) < at + disp_size:
            raise IndexError
        at += disp_size
        immediate = 0
        if opcode in (0xC6, 0xC7):
            imm_size = min(size, 4)
            if len(code) < at + imm_size:
                raise IndexError
            immediate = int.from_bytes(code[at : at + imm_size], "little")
            if size == 8:
                immediate = _signed(immediate, 4) & _MASK64
            at += imm_size
        register_size = wide if opcode in (0x0FB6, 0x0FB7) else size
        return Instruction(
            opcode,
            at,
            size,
            address_size,
            rex,
            segment,
            reg,
            mod,
            base,
            index,
            scale,
            displacement,
            rip_relative,
            immediate,
            register_size,
        )
    except IndexError:
        raise NotEmulated(f"truncated instruction {code.hex()}") from None


def _get(regs: Regs, number: int) -> int:
    value: int = getattr(regs, REGISTER_NAMES[number])
    return value


def effective_address(insn: Instruction, regs: Regs, segment_bases: dict[str, int] | None = None) -> int:
    """The guest-virtual (linear) address of ``insn``'s memory operand with
    ``regs`` as they were before it.  ``segment_bases`` gives the bases of the
    segments that count (FS/GS in 64-bit mode); others are 0 (flat)."""
    if insn.opcode in _PORT:
        raise NotEmulated("in/out has no memory operand")
    if insn.rip_relative:
        offset = regs.rip + insn.length + insn.displacement
    else:
        offset = insn.displacement
        if insn.base is not None:
            offset += _get(regs, insn.base)
        if insn.index is not None:
            offset += _get(regs, insn.index) * insn.scale
    offset &= (1 << (8 * insn.address_size)) - 1
    segment = insn.segment or "ds"
    base = (segment_bases or {}).get(segment, 0)
    return (base + offset) & _MASK64


def _write_register(regs: Regs, number: int, value: int, size: int, high_byte: bool = False) -> None:
    name = REGISTER_NAMES[number]
    old: int = getattr(regs, name)
    if high_byte:  # AH, CH, DH, BH
        new = old & ~0xFF00 | (value & 0xFF) << 8
    elif size == 4:
        new = value & 0xFFFFFFFF  # a 32-bit write clears the upper half
    elif size == 8:
        new = value & _MASK64
    else:
        mask = (1 << (8 * size)) - 1
        new = old & ~mask | value & mask
    setattr(regs, name, new & _MASK64)


def _register_operand(insn: Instruction, number: int, size: int) -> tuple[int, bool]:
    """(register number, is AH..BH) for a register operand of ``size`` bytes."""
    if size == 1 and not insn.rex and 4 <= number <= 7:
        return number - 4, True
    return number, False


def _read_register(regs: Regs, insn: Instruction, number: int, size: int) -> int:
    number, high = _register_operand(insn, number, size)
    value = _get(regs, number)
    if high:
        return (value >> 8) & 0xFF
    return value & ((1 << (8 * size)) - 1)


def _advance(regs: Regs, length: int) -> None:
    regs.rip = (regs.rip + length) & _MASK64


def write_value(insn: Instruction, regs: Regs) -> int:
    """The value a ``mov`` to memory stores (what the device sees)."""
    if insn.opcode in (0xC6, 0xC7):
        return insn.immediate & ((1 << (8 * insn.operand_size)) - 1)
    if insn.opcode in (0x88, 0x89):
        return _read_register(regs, insn, insn.reg, insn.operand_size)
    if insn.opcode in (0xA2, 0xA3):
        return _read_register(regs, insn, 0, insn.operand_size)
    raise NotEmulated(f"opcode {insn.opcode:#x} does not write memory")


def complete_mmio(regs: Regs, exit_: MmioExit, *, bits: int = 64) -> Regs:
    """The registers after the MMIO instruction of a before-the-instruction
    ``exit_`` (``regs`` as they are at the exit, RIP on the instruction).  For
    a read, ``exit_.data`` holds what the device answered.

    :raises NotEmulated: not a supported ``mov``, or the exit does not match it.
    """
    if not exit_.instruction:
        raise NotEmulated("the exit carries no instruction (it was taken after the access)")
    insn = decode(exit_.instruction, bits=bits)
    if insn.opcode in _PORT:
        raise NotEmulated("an in/out instruction in an MMIO exit")
    is_write = insn.opcode in (0x88, 0x89, 0xA2, 0xA3, 0xC6, 0xC7)
    size = insn.operand_size
    if is_write != exit_.is_write or size != exit_.size:
        kind = "write" if exit_.is_write else "read"
        raise NotEmulated(f"{exit_.instruction.hex()} does not make the {kind} of {exit_.size} bytes the exit reports")
    out = dataclasses.replace(regs)
    if not is_write:
        value = int.from_bytes(bytes(exit_.data[:size]), "little")
        if insn.opcode in (0x0FB6, 0x0FB7):
            _write_register(out, insn.reg, value, insn.register_size)
        else:
            number = 0 if insn.opcode in (0xA0, 0xA1) else insn.reg
            number, high = _register_operand(insn, number, size)
            _write_register(out, number, value, size, high)
    _advance(out, insn.length)
    return out


def complete_io(regs: Regs, exit_: IoExit, *, bits: int = 64) -> Regs:
    """The registers after the ``in``/``out`` of a before-the-instruction
    ``exit_``; for ``in``, ``exit_.data`` holds the device's answer.

    :raises NotEmulated: string I/O, or the exit does not match the instruction.
    """
    if not exit_.instruction:
        raise NotEmulated("the exit carries no instruction (it was taken after the access)")
    insn = decode(exit_.instruction, bits=bits)
    if insn.opcode not in _PORT:
        raise NotEmulated(f"{exit_.instruction.hex()} is not in/out")
    is_write = insn.opcode in (0xE6, 0xE7, 0xEE, 0xEF)
    port = insn.immediate if insn.opcode < 0xEC else regs.rdx & 0xFFFF
    if (is_write, insn.operand_size, port) != (exit_.is_write, exit_.size, exit_.port) or exit_.count != 1:
        raise NotEmulated(f"{exit_.instruction.hex()} does not make the port access the exit reports")
    out = dataclasses.replace(regs)
    if not is_write:
        _write_register(out, 0, int.from_bytes(bytes(exit_.data[: exit_.size]), "little"), exit_.size)
    _advance(out, insn.length)
    return out


__all__ = [
    "Instruction",
    "NotEmulated",
    "complete_io",
    "complete_mmio",
    "decode",
    "effective_address",
    "write_value",
]
