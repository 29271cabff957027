"""Fuzz the guest-memory API (hypothesis; see fuzz_support for the CI budget and
``PYVMM_FUZZ=long``).

Random sequences of reads, writes, fills, typed accesses and views, with
addresses near the regions' edges and values of every size and sign (and of the
wrong type), against a byte-for-byte shadow of guest RAM: each call either
raises a pyvmm error (nothing changed) or does exactly what the shadow says.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import fuzz_support  # noqa: F401 - selects the hypothesis profile
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.config import MemoryRegionSpec
from pyvmm.errors import PyvmmError
from pyvmm.memory import GuestMemory

#: Two regions with a hole between them, and a third right after the second.
REGIONS = [(0x0, 0x2000), (0x1_0000, 0x1000), (0x1_1000, 0x1000)]
EDGES = sorted({edge + delta for start, size in REGIONS for edge in (start, start + size) for delta in (-9, -1, 0, 1)})
WIDTHS = {"u8": 1, "u16": 2, "u32": 4, "u64": 8}

addresses = (
    st.sampled_from(EDGES)
    | st.integers(0, 0x1_3000)
    | st.sampled_from([-1, -(1 << 64), 1 << 64, (1 << 64) - 1, 1 << 52])
    | st.sampled_from([True, 1.0, "0x10", None])
)
sizes = st.integers(0, 0x40) | st.sampled_from([-1, 0x2000, 0x1_0001, 1 << 64, True, 2.5, None])
values = (
    st.integers(-(1 << 65), 1 << 65)
    | st.sampled_from([0, 0xFF, 0x100, 0xFFFF, 0x1_0000, 0xFFFF_FFFF, 1 << 32, (1 << 64) - 1, 1 << 64, -1])
    | st.sampled_from([True, 1.5, "7", None, b"\x01"])
)
operations = st.one_of(
    st.tuples(st.just("read"), addresses, sizes),
    st.tuples(st.just("write"), addresses, st.binary(max_size=0x30) | st.sampled_from(["text", 5, None])),
    st.tuples(st.just("fill"), addresses, sizes, values),
    st.tuples(st.sampled_from([f"read_{w}" for w in WIDTHS]), addresses),
    st.tuples(st.sampled_from([f"write_{w}" for w in WIDTHS]), addresses, values),
    st.tuples(st.just("view"), addresses, sizes),
    st.tuples(st.just("contains"), addresses, sizes),
)


class Shadow:
    """Guest RAM as a dict of bytearrays: what the memory must hold."""

    def __init__(self) -> None:
        self.regions = {start: bytearray(size) for start, size in REGIONS}

    def locate(self, gpa: Any, size: Any) -> tuple[bytearray, int] | None:
        """The region and offset for a valid access, None for one that must fail."""
        if isinstance(gpa, bool) or not isinstance(gpa, int) or isinstance(size, bool) or not isinstance(size, int):
            return None
        if gpa < 0 or size < 0:
            return None
        for start, data in self.regions.items():
            if start <= gpa < start + len(data):
                return (data, gpa - start) if gpa + size <= start + len(data) else None
        return None


def _is_int(value: Any, bits: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and 0 <= value < 1 << bits


@contextlib.contextmanager
def guest_memory() -> Iterator[GuestMemory]:
    memory = GuestMemory()
    try:
        for start, size in REGIONS:
            memory.insert(memory.allocate(MemoryRegionSpec(guest_phys_addr=start, size=size)))
        yield memory
    finally:
        memory.close()


def apply(memory: GuestMemory, shadow: Shadow, op: tuple[Any, ...]) -> None:
    """Run ``op`` on both; fail on an untyped error, a missing error or a wrong result."""
    name, gpa, *args = op
    width = WIDTHS.get(name.split("_")[-1], 0)
    if name == "read" or name == "view":
        where = shadow.locate(gpa, args[0])
        expected: Any = None if where is None else bytes(where[0][where[1] : where[1] + args[0]])
    elif name == "write":
        data = args[0]
        where = shadow.locate(gpa, len(data)) if isinstance(data, bytes) else None
        expected = None
    elif name == "fill":
        where = shadow.locate(gpa, args[0]) if _is_int(args[1], 8) else None
        expected = None
    elif name.startswith("read_"):
        where = shadow.locate(gpa, width)
        expected = None if where is None else int.from_bytes(where[0][where[1] : where[1] + width], "little")
    elif name.startswith("write_"):
        where = shadow.locate(gpa, width) if _is_int(args[0], 8 * width) else None
        expected = None
    else:  # contains: never raises for an int address and size
        result = memory.contains(gpa, args[0]) if isinstance(gpa, int) and isinstance(args[0], int) else None
        if result is not None:
            assert result == (shadow.locate(gpa, args[0]) is not None and not isinstance(gpa, bool)), op
        return
    try:
        result = getattr(memory, name)(gpa, *args)
    except PyvmmError:
        assert where is None, f"{op!r} was refused but is valid"
        return
    except Exception as exc:
        raise AssertionError(f"{op!r} raised an untyped {type(exc).__name__}: {exc}") from exc
    assert where is not None, f"{op!r} should have been refused"
    region, offset = where
    if name == "view":
        assert bytes(result) == expected, op
        result.release()
    elif name == "write":
        region[offset : offset + len(args[0])] = args[0]
    elif name == "fill":
        region[offset : offset + args[0]] = bytes([args[1]]) * args[0]
    elif name.startswith("write_"):
        region[offset : offset + width] = args[0].to_bytes(width, "little")
    else:
        assert result == expected, op


@given(ops=st.lists(operations, min_size=1, max_size=30))
def test_fuzz_guest_memory(ops: list[tuple[Any, ...]]) -> None:
    shadow = Shadow()
    with guest_memory() as memory:
        for op in ops:
            apply(memory, shadow, op)
        for start, data in shadow.regions.items():
            assert memory.read(start, len(data)) == bytes(data), f"region {start:#x} differs from its shadow"


def test_the_shadow_catches_a_wrong_result() -> None:
    shadow = Shadow()
    with guest_memory() as memory:
        memory.write(0x10, b"\x01")  # behind the shadow's back
        with pytest.raises(AssertionError):
            apply(memory, shadow, ("read", 0x10, 1))
        apply(memory, shadow, ("write_u8", 0x1FFF, 0xAB))
        apply(memory, shadow, ("read_u8", 0x1FFF))
        apply(memory, shadow, ("write_u8", 0x2000, 1))  # the hole: refused by both
