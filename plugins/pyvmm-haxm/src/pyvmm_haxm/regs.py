"""pyvmm's x86 register types to and from HAXM's ``vcpu_state_t`` and ``fx_layout``.

``vcpu_state_t`` carries the general-purpose registers, RIP, RFLAGS, every
segment with its full descriptor cache (``segment_desc_t``: selector, base,
limit and the VMX access-rights word ``ar``), GDTR/IDTR, CR0-CR4 and the debug
registers.  What it does not carry, and where pyvmm-haxm takes it from
(``docs/backends/haxm.md`` §6):

* **EFER**: ``_efer`` is in the struct but neither ``core/vcpu.c
  vcpu_get_regs`` nor ``vcpu_set_regs`` touches it (GET_REGS hands back
  whatever the buffer held: kernel stack on Linux, the caller's bytes on
  macOS); EFER is read and written with ``GET_MSRS``/``SET_MSRS(IA32_EFER)``
  (``handle_msr_read``/``handle_msr_write``);
* **CR8**: not in the state (HAXM keeps no TPR for userspace): read as 0;
* **APIC base**: read as ``IA32_APIC_BASE`` with GET_MSRS (the tunnel's copy is
  written only at the end of a RUN).
"""

from __future__ import annotations

from typing import Any

from pyvmm.arch.x86_64 import DebugRegs, DescriptorTable, Fpu, Regs, Segment, Sregs
from pyvmm_haxm import bindings as b

#: ``vcpu_state_t._regs`` order (hax_vcpu_state.h): rax rcx rdx rbx rsp rbp rsi rdi r8..r15.
HAX_GPR_ORDER = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", *(f"r{n}" for n in range(8, 16)))

_SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")


def regs_from_state(state: Any) -> Regs:
    values = {name: int(state._regs[i]) for i, name in enumerate(HAX_GPR_ORDER)}
    return Regs(**values, rip=int(state._rip), rflags=int(state._rflags))


def regs_to_state(regs: Regs, state: Any) -> None:
    for i, name in enumerate(HAX_GPR_ORDER):
        state._regs[i] = getattr(regs, name)
    state._rip = regs.rip
    state._rflags = regs.rflags


def segment_from_desc(desc: Any) -> Segment:
    ar = int(desc.ar)
    return Segment(
        base=int(desc.base),
        limit=int(desc.limit),
        selector=int(desc.selector),
        type=ar & b.AR_TYPE_MASK,
        present=int(bool(ar & b.AR_PRESENT)),
        dpl=(ar >> b.AR_DPL_SHIFT) & 3,
        db=int(bool(ar & b.AR_DB)),
        s=int(bool(ar & b.AR_S)),
        l=int(bool(ar & b.AR_L)),
        g=int(bool(ar & b.AR_G)),
        avl=int(bool(ar & b.AR_AVL)),
        unusable=int(bool(ar & b.AR_NULL)),
    )


def segment_ar(seg: Segment) -> int:
    """The VMX access-rights word of ``seg`` (``segment_desc_t.ar``)."""
    return (
        (seg.type & b.AR_TYPE_MASK)
        | (b.AR_S if seg.s else 0)
        | (seg.dpl & 3) << b.AR_DPL_SHIFT
        | (b.AR_PRESENT if seg.present else 0)
        | (b.AR_AVL if seg.avl else 0)
        | (b.AR_L if seg.l else 0)
        | (b.AR_DB if seg.db else 0)
        | (b.AR_G if seg.g else 0)
        | (b.AR_NULL if seg.unusable else 0)
    )


def segment_to_desc(seg: Segment, desc: Any) -> None:
    desc.selector = seg.selector
    desc.base = seg.base
    desc.limit = seg.limit
    desc.ar = segment_ar(seg)


def sregs_from_state(state: Any, apic_base: int, efer: int) -> Sregs:
    """``state``'s segments, tables and control registers; EFER and the APIC base
    come from GET_MSRS (GET_REGS does not write ``_efer``)."""
    segments = {name: segment_from_desc(getattr(state, f"_{name}")) for name in _SEGMENTS}
    return Sregs(
        **segments,
        tr=segment_from_desc(state._tr),
        ldt=segment_from_desc(state._ldt),
        gdt=DescriptorTable(base=int(state._gdt.base), limit=int(state._gdt.limit)),
        idt=DescriptorTable(base=int(state._idt.base), limit=int(state._idt.limit)),
        cr0=int(state._cr0),
        cr2=int(state._cr2),
        cr3=int(state._cr3),
        cr4=int(state._cr4),
        cr8=0,
        efer=efer,
        apic_base=apic_base,
    )


def sregs_to_state(sregs: Sregs, state: Any) -> None:
    """Everything of ``sregs`` that SET_REGS takes (not EFER, CR8, APIC base)."""
    for name in (*_SEGMENTS, "tr", "ldt"):
        segment_to_desc(getattr(sregs, name), getattr(state, f"_{name}"))
    for name in ("gdt", "idt"):
        table: DescriptorTable = getattr(sregs, name)
        desc = getattr(state, f"_{name}")
        desc.base, desc.limit = table.base, table.limit
    state._cr0, state._cr2, state._cr3, state._cr4 = sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4


def fpu_from_fx(fx: Any, raw: bytes) -> Fpu:
    """``fx_layout`` (an FXSAVE image) as :class:`Fpu`; ``raw`` is its 512 bytes."""
    return Fpu(
        fpr=[raw[32 + 16 * i : 48 + 16 * i] for i in range(8)],
        fcw=int(fx.fcw),
        fsw=int(fx.fsw),
        ftwx=int(fx.ftw),
        last_opcode=int(fx.fop),
        last_ip=int.from_bytes(raw[8:16], "little"),
        last_dp=int.from_bytes(raw[16:24], "little"),
        xmm=[raw[160 + 16 * i : 176 + 16 * i] for i in range(16)],
        mxcsr=int(fx.mxcsr),
    )


def fpu_to_fx(fpu: Fpu, raw: bytearray) -> None:
    """Write ``fpu`` into the 512-byte ``fx_layout`` image ``raw`` (MXCSR_MASK and
    the reserved tail keep what GET_FPU read)."""
    raw[0:2] = fpu.fcw.to_bytes(2, "little")
    raw[2:4] = fpu.fsw.to_bytes(2, "little")
    raw[4] = fpu.ftwx & 0xFF
    raw[6:8] = fpu.last_opcode.to_bytes(2, "little")
    raw[8:16] = fpu.last_ip.to_bytes(8, "little")
    raw[16:24] = fpu.last_dp.to_bytes(8, "little")
    raw[24:28] = fpu.mxcsr.to_bytes(4, "little")
    for i, value in enumerate(fpu.fpr[:8]):
        raw[32 + 16 * i : 48 + 16 * i] = bytes(value).ljust(16, b"\0")[:16]
    for i, value in enumerate(fpu.xmm[:16]):
        raw[160 + 16 * i : 176 + 16 * i] = bytes(value).ljust(16, b"\0")[:16]


def debugregs_from_state(state: Any) -> DebugRegs:
    return DebugRegs(
        db=(int(state._dr0), int(state._dr1), int(state._dr2), int(state._dr3)),
        dr6=int(state._dr6),
        dr7=int(state._dr7),
    )


def debugregs_to_state(debug: DebugRegs, state: Any) -> None:
    """DR0-3, DR6, DR7 into ``vcpu_state_t`` (the driver forces DR6's and DR7's
    reserved bits, ``fix_dr6``/``fix_dr7``, and ignores them while its own guest
    debugging is on)."""
    state._dr0, state._dr1, state._dr2, state._dr3 = debug.db
    state._dr6, state._dr7 = debug.dr6, debug.dr7
