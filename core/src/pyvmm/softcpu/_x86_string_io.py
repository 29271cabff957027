"""String port I/O (``INS``/``OUTS``, with or without REP) in batches: which
instruction it is, and how many of its items one exit can carry.

The x86 half asks :func:`decode` about the instruction whose port access its
hook just saw; :func:`batch_count` bounds the batch: the REP count, the items
left before the index register wraps at its address size, the items inside the
buffer's current page (one translation serves the whole batch, as KVM's and
HAXM's batches stay inside a page), and the owner's byte limit.
"""

from __future__ import annotations

from dataclasses import dataclass

_PAGE = 4096
_SEGMENT_PREFIXES = {0x26: "es", 0x2E: "cs", 0x36: "ss", 0x3E: "ds", 0x64: "fs", 0x65: "gs"}
_OTHER_PREFIXES = frozenset((0x66, 0x67, 0xF0, 0xF2, 0xF3))


@dataclass(frozen=True, slots=True)
class StringOp:
    """An ``INS`` or ``OUTS`` as decoded from its bytes."""

    is_write: bool  # OUTS: memory to port
    rep: bool
    #: Bits of RCX/RSI/RDI the instruction uses: 16, 32 or 64.
    address_bits: int
    #: The segment of the memory operand: ES for INS (fixed), DS or the override for OUTS.
    segment: str
    length: int

    @property
    def address_mask(self) -> int:
        return (1 << self.address_bits) - 1


def decode(code: bytes, bits: int) -> StringOp | None:
    """The string I/O instruction at the start of ``code`` in ``bits``-bit code
    (16, 32, 64), or None when it is not one (a plain ``IN``/``OUT``)."""
    at = 0
    rep = False
    address_override = False
    segment = "ds"
    while at < len(code) and (code[at] in _SEGMENT_PREFIXES or code[at] in _OTHER_PREFIXES):
        prefix = code[at]
        if prefix in (0xF2, 0xF3):
            rep = True  # REPNE acts as REP on INS/OUTS
        elif prefix == 0x67:
            address_override = True
        elif prefix in _SEGMENT_PREFIXES:
            segment = _SEGMENT_PREFIXES[prefix]
        at += 1
    if bits == 64 and at < len(code) and 0x40 <= code[at] <= 0x4F:
        at += 1  # REX: no effect on INS/OUTS operands
    if at >= len(code) or code[at] not in (0x6C, 0x6D, 0x6E, 0x6F):
        return None
    is_write = code[at] >= 0x6E
    if bits == 64:
        address_bits = 32 if address_override else 64
    elif bits == 32:
        address_bits = 16 if address_override else 32
    else:
        address_bits = 32 if address_override else 16
    return StringOp(is_write, rep, address_bits, segment if is_write else "es", at + 1)


def batch_count(op: StringOp, *, rcx: int, offset: int, linear: int, size: int, df: bool, limit: int) -> int:
    """How many items one exit carries: at most ``limit`` bytes' worth (at least
    one item), the REP count ``rcx``, and no item beyond the page of ``linear``
    (the first item's address) or past the wrap of ``offset`` (RSI/RDI at the
    address size).  0 when even the first item crosses a page."""
    mask = op.address_mask
    in_page = linear & (_PAGE - 1)
    if in_page + size > _PAGE:
        return 0
    count = min((rcx & mask) if op.rep else 1, max(1, limit // size))
    if df:
        return min(count, in_page // size + 1, (offset & mask) // size + 1)
    return min(count, (_PAGE - in_page) // size, (mask - (offset & mask) + 1) // size)


def advance(op: StringOp, value: int, delta: int) -> int:
    """Register ``value`` after the instruction moved it by ``delta`` at its
    address size: 16-bit keeps the upper bits, 32-bit clears them (as a 32-bit
    register write does), 64-bit wraps."""
    if op.address_bits == 16:
        return (value & ~0xFFFF) | ((value + delta) & 0xFFFF)
    return (value + delta) & op.address_mask
