"""Conversions between KVM's register structs and pyvmm's register records."""

from __future__ import annotations

from typing import Any

from pyvmm.arch.x86_64 import GPR_NAMES, CpuidEntry, DebugRegs, DescriptorTable, Fpu, Regs, Segment, Sregs
from pyvmm_kvm.bindings import ffi

_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_SEGMENT_FIELDS = ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl", "unusable")
_CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")


def regs_from_kvm(raw: Any) -> Regs:
    return Regs(**{name: getattr(raw, name) for name in GPR_NAMES})


def regs_to_kvm(regs: Regs, raw: Any) -> None:
    for name in GPR_NAMES:
        setattr(raw, name, getattr(regs, name))


def sregs_from_kvm(raw: Any) -> Sregs:
    sregs = Sregs()
    for name in _SEGMENTS:
        seg = getattr(raw, name)
        setattr(sregs, name, Segment(**{f: getattr(seg, f) for f in _SEGMENT_FIELDS}))
    sregs.gdt = DescriptorTable(raw.gdt.base, raw.gdt.limit)
    sregs.idt = DescriptorTable(raw.idt.base, raw.idt.limit)
    for name in _CONTROL:
        setattr(sregs, name, getattr(raw, name))
    return sregs


def sregs_to_kvm(sregs: Sregs, raw: Any) -> None:
    """Write ``sregs`` into ``raw`` (a ``struct kvm_sregs`` read from the vCPU, so
    the pending-interrupt bitmap stays as KVM reported it)."""
    for name in _SEGMENTS:
        seg = getattr(raw, name)
        value = getattr(sregs, name)
        for f in _SEGMENT_FIELDS:
            setattr(seg, f, getattr(value, f))
    raw.gdt.base, raw.gdt.limit = sregs.gdt.base, sregs.gdt.limit
    raw.idt.base, raw.idt.limit = sregs.idt.base, sregs.idt.limit
    for name in _CONTROL:
        setattr(raw, name, getattr(sregs, name))


def fpu_from_kvm(raw: Any) -> Fpu:
    return Fpu(
        fpr=[bytes(ffi.buffer(raw.fpr[i])) for i in range(8)],
        fcw=raw.fcw,
        fsw=raw.fsw,
        ftwx=raw.ftwx,
        last_opcode=raw.last_opcode,
        last_ip=raw.last_ip,
        last_dp=raw.last_dp,
        xmm=[bytes(ffi.buffer(raw.xmm[i])) for i in range(16)],
        mxcsr=raw.mxcsr,
    )


def fpu_to_kvm(fpu: Fpu, raw: Any) -> None:
    for i, value in enumerate(fpu.fpr[:8]):
        ffi.buffer(raw.fpr[i])[:] = bytes(value).ljust(16, b"\0")[:16]
    for i, value in enumerate(fpu.xmm[:16]):
        ffi.buffer(raw.xmm[i])[:] = bytes(value).ljust(16, b"\0")[:16]
    raw.fcw, raw.fsw, raw.ftwx = fpu.fcw, fpu.fsw, fpu.ftwx
    raw.last_opcode, raw.last_ip, raw.last_dp, raw.mxcsr = fpu.last_opcode, fpu.last_ip, fpu.last_dp, fpu.mxcsr


def debugregs_from_kvm(raw: Any) -> DebugRegs:
    return DebugRegs(db=(raw.db[0], raw.db[1], raw.db[2], raw.db[3]), dr6=raw.dr6, dr7=raw.dr7)


def debugregs_to_kvm(regs: DebugRegs, raw: Any) -> None:
    for i, value in enumerate(regs.db):
        raw.db[i] = value
    raw.dr6, raw.dr7 = regs.dr6, regs.dr7


def cpuid_to_kvm(entries: list[CpuidEntry]) -> Any:
    buf = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
    for i, entry in enumerate(entries):
        out = buf.entries[i]
        out.function, out.index, out.flags = entry.function, entry.index, entry.flags
        out.eax, out.ebx, out.ecx, out.edx = entry.eax, entry.ebx, entry.ecx, entry.edx
    return buf
