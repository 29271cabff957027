"""pyvmm's x86 register records <-> ``WHV_REGISTER_VALUE`` arrays.

``WHvGet/SetVirtualProcessorRegisters`` take an array of ``WHV_REGISTER_NAME``
and an array of 16-byte ``WHV_REGISTER_VALUE`` unions (Microsoft,
``WinHvPlatformDefs.h``): a general register is the union's ``Reg64``, a
segment its ``WHV_X64_SEGMENT_REGISTER`` view, a descriptor table its
``WHV_X64_TABLE_REGISTER`` view.
"""

from __future__ import annotations

from typing import Any

from pyvmm.arch.x86_64 import DescriptorTable, Regs, Segment, Sregs
from pyvmm_whpx import bindings as w
from pyvmm_whpx.bindings import ffi

#: :class:`Regs` fields in the order of :data:`REGS_NAMES`.
REGS_FIELDS = (*w.GPR_NAMES, "rip", "rflags")
REGS_NAMES = (*range(16), w.RIP, w.RFLAGS)

_CONTROL = (("cr0", w.CR0), ("cr2", w.CR2), ("cr3", w.CR3), ("cr4", w.CR4), ("cr8", w.CR8))
_MSRS = (("efer", w.EFER), ("apic_base", w.APIC_BASE))
SREGS_NAMES = (
    *range(w.ES, w.TR + 1),
    w.IDTR,
    w.GDTR,
    *(name for _, name in _CONTROL),
    *(name for _, name in _MSRS),
)


def names_array(names: tuple[int, ...]) -> Any:
    return ffi.new("uint32_t[]", list(names))


def values_array(count: int) -> Any:
    return ffi.new("WHV_REGISTER_VALUE[]", count)


def regs_to_values(regs: Regs, values: Any) -> None:
    for i, name in enumerate(REGS_FIELDS):
        values[i].Low64 = getattr(regs, name)
        values[i].High64 = 0


def regs_from_values(values: Any) -> Regs:
    return Regs(**{name: int(values[i].Low64) for i, name in enumerate(REGS_FIELDS)})


def _segment_to(value: Any, seg: Segment) -> None:
    view = ffi.cast("WHV_X64_SEGMENT_REGISTER *", ffi.addressof(value))
    view.Base = seg.base
    view.Limit = seg.limit
    view.Selector = seg.selector
    view.Attributes = w.segment_attributes(
        type_=seg.type,
        s=seg.s,
        dpl=seg.dpl,
        present=0 if seg.unusable else seg.present,
        avl=seg.avl,
        long=seg.l,
        db=seg.db,
        g=seg.g,
    )


def _segment_from(value: Any) -> Segment:
    view = ffi.cast("WHV_X64_SEGMENT_REGISTER *", ffi.addressof(value))
    attributes = int(view.Attributes)
    present = attributes >> 7 & 1
    return Segment(
        base=int(view.Base),
        limit=int(view.Limit),
        selector=int(view.Selector),
        type=attributes & 0xF,
        s=attributes >> 4 & 1,
        dpl=attributes >> 5 & 3,
        present=present,
        avl=attributes >> 12 & 1,
        l=attributes >> 13 & 1,
        db=attributes >> 14 & 1,
        g=attributes >> 15 & 1,
        unusable=0 if present else 1,
    )


def _table_to(value: Any, table: DescriptorTable) -> None:
    view = ffi.cast("WHV_X64_TABLE_REGISTER *", ffi.addressof(value))
    view.Pad = [0, 0, 0]
    view.Limit = table.limit
    view.Base = table.base


def _table_from(value: Any) -> DescriptorTable:
    view = ffi.cast("WHV_X64_TABLE_REGISTER *", ffi.addressof(value))
    return DescriptorTable(base=int(view.Base), limit=int(view.Limit))


def sregs_to_values(sregs: Sregs, values: Any) -> None:
    at = 0
    for name in w.SEGMENT_NAMES:
        _segment_to(values[at], getattr(sregs, name))
        at += 1
    _table_to(values[at], sregs.idt)
    _table_to(values[at + 1], sregs.gdt)
    at += 2
    for field_name, _ in (*_CONTROL, *_MSRS):
        values[at].Low64 = getattr(sregs, field_name)
        values[at].High64 = 0
        at += 1


def sregs_from_values(values: Any) -> Sregs:
    sregs = Sregs()
    for i, name in enumerate(w.SEGMENT_NAMES):
        setattr(sregs, name, _segment_from(values[i]))
    at = len(w.SEGMENT_NAMES)
    sregs.idt = _table_from(values[at])
    sregs.gdt = _table_from(values[at + 1])
    at += 2
    for field_name, _ in (*_CONTROL, *_MSRS):
        setattr(sregs, field_name, int(values[at].Low64))
        at += 1
    return sregs
