"""The registers gdb sees, per guest architecture, and the target description
that tells gdb their layout (``qXfer:features:read:target.xml``).

x86_64: gdb's amd64 layout (features ``org.gnu.gdb.i386.core``, ``.sse`` and
``.segments``: RAX..R15, RIP, EFLAGS, the six selectors, ST0..ST7 and the x87
control registers, XMM0..XMM15, MXCSR, FS_BASE, GS_BASE) plus pyvmm's
``org.pyvmm.x86.sys`` feature: CR0, CR2, CR3, CR4, CR8 and EFER, so
``info registers cr3`` works.  The x87/SSE registers come from the vCPU's FPU
state where the backend has it (``StateKind.FPU``), and read as unavailable
otherwise.

aarch64: ``org.gnu.gdb.aarch64.core``: X0..X30, SP, PC, CPSR (the backend's
:class:`~pyvmm.arch.aarch64.CoreRegs`).  No FP/SIMD feature: gdb takes the core
feature alone.

Values go over the wire little-endian, as hex; a register the stub cannot
read is ``xx`` per byte, which gdb shows as ``<unavailable>``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from pyvmm.errors import PyvmmError
from pyvmm.vcpu_state import StateKind
from pyvmm.vm import Vcpu


class RegisterError(Exception):
    """A register gdb named does not exist or cannot be written."""


@dataclasses.dataclass(frozen=True)
class Reg:
    name: str
    bits: int
    type: str
    group: str = ""


def _xml(arch: str, features: list[tuple[str, str, list[Reg]]]) -> str:
    parts = ['<?xml version="1.0"?>', '<!DOCTYPE target SYSTEM "gdb-target.dtd">', "<target>"]
    parts.append(f"<architecture>{arch}</architecture>")
    for name, types, regs in features:
        parts.append(f'<feature name="{name}">')
        if types:
            parts.append(types)
        for reg in regs:
            group = f' group="{reg.group}"' if reg.group else ""
            parts.append(f'<reg name="{reg.name}" bitsize="{reg.bits}" type="{reg.type}"{group}/>')
        parts.append("</feature>")
    parts.append("</target>")
    return "\n".join(parts)


_EFLAGS_TYPE = (
    '<flags id="i386_eflags" size="4">'
    + "".join(
        f'<field name="{name}" start="{bit}" end="{bit}"/>'
        for name, bit in (("CF", 0), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7), ("TF", 8), ("IF", 9), ("DF", 10))
    )
    + '<field name="OF" start="11" end="11"/></flags>'
)
_VEC128_TYPE = (
    '<vector id="v4f" type="ieee_single" count="4"/><vector id="v2d" type="ieee_double" count="2"/>'
    '<vector id="v16i8" type="int8" count="16"/><vector id="v8i16" type="int16" count="8"/>'
    '<vector id="v4i32" type="int32" count="4"/><vector id="v2i64" type="int64" count="2"/>'
    '<union id="vec128"><field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/>'
    '<field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/>'
    '<field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/>'
    '<field name="uint128" type="uint128"/></union>'
)

_X86_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", *(f"r{n}" for n in range(8, 16)))
_X86_CORE = (
    [Reg(name, 64, "data_ptr" if name in ("rbp", "rsp") else "int64") for name in _X86_GPRS]
    + [Reg("rip", 64, "code_ptr"), Reg("eflags", 32, "i386_eflags")]
    + [Reg(name, 32, "int32") for name in ("cs", "ss", "ds", "es", "fs", "gs")]
    + [Reg(f"st{n}", 80, "i387_ext") for n in range(8)]
    + [Reg(name, 32, "int", "float") for name in ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")]
)
_X86_SSE = [Reg(f"xmm{n}", 128, "vec128") for n in range(16)] + [Reg("mxcsr", 32, "int", "vector")]
_X86_SEGMENTS = [Reg("fs_base", 64, "int"), Reg("gs_base", 64, "int")]
_X86_SYS = [Reg(name, 64, "int", "system") for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")]

X86_64_XML = _xml(
    "i386:x86-64",
    [
        ("org.gnu.gdb.i386.core", _EFLAGS_TYPE, _X86_CORE),
        ("org.gnu.gdb.i386.sse", _VEC128_TYPE, _X86_SSE),
        ("org.gnu.gdb.i386.segments", "", _X86_SEGMENTS),
        ("org.pyvmm.x86.sys", "", _X86_SYS),
    ],
)

_AARCH64_CORE = [Reg(f"x{n}", 64, "int") for n in range(31)] + [
    Reg("sp", 64, "data_ptr"),
    Reg("pc", 64, "code_ptr"),
    Reg("cpsr", 32, "int"),
]
AARCH64_XML = _xml("aarch64", [("org.gnu.gdb.aarch64.core", "", _AARCH64_CORE)])


class RegisterFile:
    """One architecture's registers: read and write them on a stopped vCPU (on
    its own thread) as gdb numbers them."""

    xml: str
    regs: list[Reg]

    def __init__(self) -> None:
        self.index = {reg.name: n for n, reg in enumerate(self.regs)}

    def read(self, vcpu: Vcpu) -> list[bytes | None]:
        """Every register's bytes (None: unavailable), in gdb's order."""
        raise NotImplementedError

    def write(self, vcpu: Vcpu, values: dict[int, bytes]) -> None:
        """Set the registers numbered in ``values``."""
        raise NotImplementedError

    def pc(self, vcpu: Vcpu) -> int:
        raise NotImplementedError

    def hex_all(self, vcpu: Vcpu) -> str:
        return "".join(_hex(value, reg) for value, reg in zip(self.read(vcpu), self.regs, strict=True))

    def hex_one(self, vcpu: Vcpu, number: int) -> str:
        if not 0 <= number < len(self.regs):
            raise RegisterError(f"no register {number}")
        return _hex(self.read(vcpu)[number], self.regs[number])

    def split(self, data: bytes) -> dict[int, bytes]:
        """A ``G`` packet's bytes, register by register (as far as they go)."""
        values: dict[int, bytes] = {}
        offset = 0
        for n, reg in enumerate(self.regs):
            size = reg.bits // 8
            if offset + size > len(data):
                break
            values[n] = data[offset : offset + size]
            offset += size
        return values

    def size(self, number: int) -> int:
        if not 0 <= number < len(self.regs):
            raise RegisterError(f"no register {number}")
        return self.regs[number].bits // 8


def _hex(value: bytes | None, reg: Reg) -> str:
    return value.hex() if value is not None else "xx" * (reg.bits // 8)


def _le(value: int, size: int) -> bytes:
    return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


def _int(data: bytes) -> int:
    return int.from_bytes(data, "little")


def _optional(read: Callable[[], Any]) -> Any:
    """A register set the backend may not have: None instead of an error."""
    try:
        return read()
    except (PyvmmError, NotImplementedError):
        return None


_SEGMENT_NAMES = ("cs", "ss", "ds", "es", "fs", "gs")
_X87_CONTROL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")


class X86Registers(RegisterFile):
    xml = X86_64_XML
    regs = _X86_CORE + _X86_SSE + _X86_SEGMENTS + _X86_SYS

    def pc(self, vcpu: Vcpu) -> int:
        return int(vcpu.get_regs().rip)

    def read(self, vcpu: Vcpu) -> list[bytes | None]:
        regs = vcpu.get_regs()
        sregs = _optional(vcpu.get_sregs)
        fpu = _optional(vcpu.get_fpu)
        out: list[bytes | None] = []
        for reg in self.regs:
            out.append(self._value(reg.name, regs, sregs, fpu))
        return out

    @staticmethod
    def _value(name: str, regs: Any, sregs: Any, fpu: Any) -> bytes | None:
        if name in _X86_GPRS or name == "rip":
            return _le(getattr(regs, name), 8)
        if name == "eflags":
            return _le(regs.rflags, 4)
        if name in _SEGMENT_NAMES:
            return None if sregs is None else _le(getattr(sregs, name).selector, 4)
        if name in ("fs_base", "gs_base"):
            return None if sregs is None else _le(getattr(sregs, name[:2]).base, 8)
        if name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer"):
            return None if sregs is None else _le(getattr(sregs, name), 8)
        if fpu is None:
            return None
        if name.startswith("st"):
            return bytes(fpu.fpr[int(name[2:])][:10])
        if name.startswith("xmm"):
            return bytes(fpu.xmm[int(name[3:])][:16])
        if name == "mxcsr":
            return _le(fpu.mxcsr, 4)
        values = {
            "fctrl": fpu.fcw,
            "fstat": fpu.fsw,
            "ftag": _full_tag(fpu.ftwx),
            "fiseg": 0,
            "fioff": fpu.last_ip & 0xFFFF_FFFF,
            "foseg": 0,
            "fooff": fpu.last_dp & 0xFFFF_FFFF,
            "fop": fpu.last_opcode,
        }
        return _le(values[name], 4)

    def write(self, vcpu: Vcpu, values: dict[int, bytes]) -> None:
        names = {self.regs[n].name: data for n, data in values.items()}
        regs_changes: dict[str, int] = {}
        sregs_changes: dict[str, Any] = {}
        fpu_changes: dict[str, Any] = {}
        sregs = None
        for name, data in names.items():
            value = _int(data)
            if name in _X86_GPRS or name == "rip":
                regs_changes[name] = value
            elif name == "eflags":
                regs_changes["rflags"] = value
            elif name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer"):
                sregs_changes[name] = value
            elif name in ("fs_base", "gs_base"):
                sregs = sregs or vcpu.get_sregs()
                sregs_changes[name[:2]] = dataclasses.replace(getattr(sregs, name[:2]), base=value)
            elif name in _SEGMENT_NAMES:
                sregs = sregs or vcpu.get_sregs()
                if getattr(sregs, name).selector != value:
                    raise RegisterError(f"{name}: a selector cannot be changed without its descriptor")
            elif name == "mxcsr":
                fpu_changes["mxcsr"] = value
            elif name == "fctrl":
                fpu_changes["fcw"] = value
            elif name == "fstat":
                fpu_changes["fsw"] = value
            elif name.startswith("st") or name.startswith("xmm"):
                fpu_changes[name] = data
            # fiseg, fioff, foseg, fooff, fop, ftag: written back as read, ignored otherwise
        if regs_changes:
            vcpu.set_regs(dataclasses.replace(vcpu.get_regs(), **regs_changes))
        if sregs_changes:
            vcpu.set_sregs(dataclasses.replace(sregs or vcpu.get_sregs(), **sregs_changes))
        if fpu_changes:
            self._write_fpu(vcpu, fpu_changes)

    @staticmethod
    def _write_fpu(vcpu: Vcpu, changes: dict[str, Any]) -> None:
        fpu = _optional(vcpu.get_fpu)
        if fpu is None:
            raise RegisterError("the backend has no FPU state to write")
        fpr = list(fpu.fpr)
        xmm = list(fpu.xmm)
        plain: dict[str, Any] = {}
        for name, value in changes.items():
            if name.startswith("st"):
                n = int(name[2:])
                fpr[n] = bytes(value[:10]) + bytes(fpr[n][10:])
            elif name.startswith("xmm"):
                xmm[int(name[3:])] = bytes(value[:16])
            else:
                plain[name] = value
        new = dataclasses.replace(fpu, fpr=fpr, xmm=xmm, **plain)
        if new != fpu:
            vcpu.set_state(StateKind.FPU, new)


def _full_tag(ftwx: int) -> int:
    """The abridged tag byte of FXSAVE as the full x87 tag word gdb shows: 11 for
    an empty register, 00 (valid) otherwise."""
    tag = 0
    for n in range(8):
        if not ftwx >> n & 1:
            tag |= 0b11 << (2 * n)
    return tag


class Aarch64Registers(RegisterFile):
    xml = AARCH64_XML
    regs = _AARCH64_CORE

    def _core(self, vcpu: Vcpu) -> Any:
        return vcpu.get_state(StateKind.CORE_REGS)

    def pc(self, vcpu: Vcpu) -> int:
        return int(self._core(vcpu).pc)

    def read(self, vcpu: Vcpu) -> list[bytes | None]:
        core = self._core(vcpu)
        values: list[bytes | None] = [_le(x, 8) for x in core.x]
        values += [_le(core.sp, 8), _le(core.pc, 8), _le(core.pstate, 4)]
        return values

    def write(self, vcpu: Vcpu, values: dict[int, bytes]) -> None:
        core = self._core(vcpu)
        x = list(core.x)
        changes: dict[str, Any] = {}
        for n, data in values.items():
            value = _int(data)
            if n < 31:
                x[n] = value
            else:
                changes[("sp", "pc", "pstate")[n - 31]] = value
        vcpu.set_state(StateKind.CORE_REGS, dataclasses.replace(core, x=x, **changes))


def register_file(arch: str) -> RegisterFile:
    return X86Registers() if arch == "x86_64" else Aarch64Registers()
