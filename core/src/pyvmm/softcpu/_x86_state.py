"""Where unicorn keeps the x86 state its register interface does not reach --
QEMU's mode flags (``hflags``), the segment descriptor caches, the exception
being raised -- and how segment descriptors map onto those caches.

Offsets into the engine's saved context are found by probing engines (a
register write that moves a known field, an exception with a known error
code), never assumed from a struct layout; when a probe fails, the x86 half
refuses what needs the field instead of guessing.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any

from pyvmm.arch.x86_64 import Segment
from pyvmm.softcpu import _uc

# QEMU's hidden CPU flags (``hflags``) the software CPU reads or sets in the
# engine's saved context: the current privilege level, the interrupt shadow,
# and the mode bits that decide how code is decoded.
HF_CPL = 3
HF_INHIBIT_IRQ = 1 << 3
HF_CS32 = 1 << 4
HF_SS32 = 1 << 5
HF_ADDSEG = 1 << 6
HF_PE = 1 << 7
HF_LMA = 1 << 14
HF_CS64 = 1 << 15
# QEMU's segment registers in its CPU state, in this order.
SEG_INDEX = {"es": 0, "cs": 1, "ss": 2, "ds": 3, "fs": 4, "gs": 5}
SEG_SIZE = 24  # SegmentCache: u32 selector, (pad), u64 base, u32 limit, u32 flags
#: mov ds, word ptr [0x2000]: a selector past the empty GDT of a fresh engine,
#: so #GP(selector), with the selector in no register.
PROBE_GP = bytes.fromhex("8e1c2500200000")
PROBE_INT = bytes.fromhex("cd0d")  # int 0x0d: vector 13 without an error code


def context_words(blob: bytes) -> dict[int, int]:
    return {offset: int.from_bytes(blob[offset : offset + 4], "little") for offset in range(0, len(blob) - 3, 4)}


def context_words_at_exception(code: bytes, selector: int) -> tuple[dict[int, int], dict[int, int]] | None:
    """Run ``code`` in a scratch engine (memory word at 0x2000 = ``selector``):
    its saved context, as 32-bit words by offset, before and at the exception."""
    u = _uc.unicorn()
    uc = u.Uc(u.UC_ARCH_X86, u.UC_MODE_64)
    uc.mem_map(0x1000, 0x2000)
    uc.mem_write(0x1000, code)
    uc.mem_write(0x2000, selector.to_bytes(2, "little"))
    before = bytes(uc.context_save())
    blobs: list[bytes] = []

    def on_interrupt(engine: Any, _intno: int, _data: Any) -> None:
        blobs.append(bytes(engine.context_save()))
        engine.emu_stop()

    uc.hook_add(u.UC_HOOK_INTR, on_interrupt)
    with contextlib.suppress(u.UcError):
        uc.emu_start(0x1000, 0x1000 + len(code), 0, 1)
    if not blobs:
        return None
    return context_words(before), context_words(blobs[0])


@dataclass(frozen=True, slots=True)
class ExceptionFields:
    """Offsets in unicorn's saved x86 context of QEMU's exception state."""

    #: The error code of the exception being raised.
    error_code: int
    #: Set for a software interrupt (INT n), which pushes no error code.
    soft: int
    #: The exception "in flight", -1 when none: QEMU clears it when it delivers
    #: an exception, which it never does under unicorn's interrupt hook -- so a
    #: second #GP would become a #DF unless the software CPU clears it.
    in_flight: int


@functools.cache
def exception_fields() -> ExceptionFields | None:
    """Find QEMU's exception state in the saved context (None if not found).

    UC_HOOK_INTR reports only the vector, so scratch engines raise known ones --
    #GP with two different selectors and ``INT 0x0d`` -- and the error code is
    the one word that follows the selector; the software-interrupt flag is the
    word after it (as QEMU keeps them), checked clear for #GP and set for INT;
    the in-flight exception the one word going from -1 to 13 with the #GP."""
    first = context_words_at_exception(PROBE_GP, 0x1234)
    second = context_words_at_exception(PROBE_GP, 0x5678)
    soft = context_words_at_exception(PROBE_INT, 0)
    if first is None or second is None or soft is None:
        return None
    (fresh, gp), (_, gp2), (_, soft_int) = first, second, soft
    found = [offset for offset, word in gp.items() if word == 0x1234 and gp2.get(offset) == 0x5678]
    in_flight = [offset for offset, word in gp.items() if word == 13 and fresh.get(offset) == 0xFFFFFFFF]
    if len(found) != 1 or len(in_flight) != 1:
        return None
    error, flag = found[0], found[0] + 4
    if (gp.get(flag), gp2.get(flag), soft_int.get(error), soft_int.get(flag)) != (0, 0, 0, 1):
        return None
    return ExceptionFields(error, flag, in_flight[0])


class Layout:
    """Where the hidden state sits in unicorn's saved x86 context, found by
    probing a fresh engine (so no struct layout is assumed): ``hflags`` moves
    with CR0.TS, the segment caches hold the FS/GS base written through the
    register interface.  ``ok`` is False when the probe failed; real mode and
    the interrupt shadow are then refused rather than guessed."""

    def __init__(self, u: Any, uc: Any) -> None:
        c = u.x86_const
        self.hflags = -1
        self.segs = -1
        saved = uc.context_save()
        try:
            fs_mark, gs_mark = 0x1122334455667788, 0x0123456789ABCDEF
            uc.reg_write(c.UC_X86_REG_FS_BASE, fs_mark)
            uc.reg_write(c.UC_X86_REG_GS_BASE, gs_mark)
            blob = bytes(uc.context_save())
            fs = blob.find(fs_mark.to_bytes(8, "little"))
            gs = blob.find(gs_mark.to_bytes(8, "little"))
            if fs > 0 and gs == fs + SEG_SIZE:
                self.segs = fs - 8 - SEG_INDEX["fs"] * SEG_SIZE
            cr0 = int(uc.reg_read(c.UC_X86_REG_CR0))
            uc.reg_write(c.UC_X86_REG_CR0, cr0 & ~8)
            before = bytes(uc.context_save())
            uc.reg_write(c.UC_X86_REG_CR0, cr0 | 8)  # CR0.TS: QEMU's HF_TS, bit 11
            after = bytes(uc.context_save())
            uc.reg_write(c.UC_X86_REG_CR0, cr0)
            hits = [
                offset
                for offset in range(0, min(len(before), self.segs if self.segs > 0 else 512), 4)
                if int.from_bytes(before[offset : offset + 4], "little")
                ^ int.from_bytes(after[offset : offset + 4], "little")
                == 1 << 11
            ]
            if len(hits) == 1:
                self.hflags = hits[0]
        finally:
            uc.context_restore(saved)

    @property
    def ok(self) -> bool:
        return self.hflags >= 0 and self.segs >= 0


def decode_descriptor(raw: int, selector: int) -> Segment:
    """A segment register's hidden state as loading this GDT/LDT entry sets it."""
    limit = (raw & 0xFFFF) | ((raw >> 48) & 0xF) << 16
    base = ((raw >> 16) & 0xFFFFFF) | ((raw >> 56) & 0xFF) << 24
    access = (raw >> 40) & 0xFF
    flags = (raw >> 52) & 0xF
    granular = flags >> 3 & 1
    if granular:
        limit = (limit << 12) | 0xFFF
    return Segment(
        base=base,
        limit=limit,
        selector=selector,
        type=access & 0xF,
        present=access >> 7 & 1,
        dpl=access >> 5 & 3,
        db=flags >> 2 & 1,
        s=access >> 4 & 1,
        l=flags >> 1 & 1,
        g=granular,
        avl=flags & 1,
        unusable=0,
    )


def segment_from_cache(selector: int, base: int, limit: int, flags: int) -> Segment:
    """Decode the attribute word unicorn uses for TR/LDTR (the descriptor's high
    dword: type at bit 8, S 12, DPL 13, P 15, AVL 20, L 21, D/B 22, G 23)."""
    return Segment(
        base=base,
        limit=limit,
        selector=selector,
        type=flags >> 8 & 0xF,
        present=flags >> 15 & 1,
        dpl=flags >> 13 & 3,
        db=flags >> 22 & 1,
        s=flags >> 12 & 1,
        l=flags >> 21 & 1,
        g=flags >> 23 & 1,
        avl=flags >> 20 & 1,
        unusable=0 if flags >> 15 & 1 else 1,
    )


def cache_flags(seg: Segment) -> int:
    present = seg.present & 1 and not seg.unusable  # QEMU has no "unusable": a segment not present
    return (
        (seg.type & 0xF) << 8
        | (seg.s & 1) << 12
        | (seg.dpl & 3) << 13
        | present << 15
        | (seg.avl & 1) << 20
        | (seg.l & 1) << 21
        | (seg.db & 1) << 22
        | (seg.g & 1) << 23
    )


def cache_of(seg: Segment) -> tuple[int, int, int, int]:
    """``seg`` as QEMU's segment cache holds it: (selector, base, limit, flags)."""
    return seg.selector, seg.base, seg.limit, cache_flags(seg)
