"""Bad values at the guest-memory API raise pyvmm errors naming the argument and its
range, before anything is written (issue 10, item 8)."""

from __future__ import annotations

import array
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pyvmm.config import MemoryRegionSpec
from pyvmm.errors import ConfigError, GuestMemoryError, PyvmmError, VmStateError
from pyvmm.memory import GuestMemory

SIZE = 0x2000


def bad(value: object) -> Any:
    """A value of the wrong type, passed on purpose."""
    return value


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    memory = GuestMemory()
    memory.insert(memory.allocate(MemoryRegionSpec(guest_phys_addr=0, size=SIZE)))
    yield memory
    memory.close()


BAD_CALLS: list[tuple[str, Callable[[GuestMemory], Any], type[PyvmmError], str]] = [
    (
        "write_u8 256",
        lambda m: m.write_u8(0, 256),
        ConfigError,
        r"write_u8: value 0x100 is out of range: .*0x0 to 0xff",
    ),
    ("write_u8 -1", lambda m: m.write_u8(0, -1), ConfigError, r"write_u8: value -0x1 is out of range"),
    ("write_u8 True", lambda m: m.write_u8(0, True), ConfigError, r"write_u8: value must be an integer .* not True"),
    (
        "write_u8 float",
        lambda m: m.write_u8(0, bad(1.0)),
        ConfigError,
        r"write_u8: value must be an integer .* not a float",
    ),
    ("write_u8 str", lambda m: m.write_u8(0, bad("1")), ConfigError, r"write_u8: value must be an integer .* not '1'"),
    ("write_u16 1<<16", lambda m: m.write_u16(0, 1 << 16), ConfigError, r"write_u16: value .* 0x0 to 0xffff$"),
    ("write_u32 -1", lambda m: m.write_u32(0, -1), ConfigError, r"write_u32: value .* 0x0 to 0xffffffff$"),
    ("write_u64 1<<64", lambda m: m.write_u64(0, 1 << 64), ConfigError, r"write_u64: value .* 0xffffffffffffffff$"),
    ("write_u64 None", lambda m: m.write_u64(0, bad(None)), ConfigError, r"write_u64: value must be an integer"),
    ("fill byte 256", lambda m: m.fill(0, 16, 256), ConfigError, r"fill: byte 0x100 is out of range: .*0x0 to 0xff"),
    ("fill byte -1", lambda m: m.fill(0, 16, -1), ConfigError, r"fill: byte -0x1 is out of range"),
    ("write str", lambda m: m.write(0, bad("text")), ConfigError, r"data must be a bytes-like object, not 'text'"),
    ("write None", lambda m: m.write(0, bad(None)), ConfigError, r"data must be a bytes-like object, not a NoneType"),
    (
        "read gpa str",
        lambda m: m.read(bad("0"), 8),
        GuestMemoryError,
        r"gpa must be an integer from 0x0 to 0xf{16}, not '0'",
    ),
    ("read gpa float", lambda m: m.read(bad(0.0), 8), GuestMemoryError, r"gpa must be an integer"),
    ("read gpa bool", lambda m: m.read(False, 8), GuestMemoryError, r"gpa must be an integer .* not False"),
    ("read gpa -1", lambda m: m.read(-1, 8), GuestMemoryError, r"invalid guest access: gpa -0x1 is out of range"),
    ("read gpa 1<<64", lambda m: m.read(1 << 64, 1), GuestMemoryError, r"gpa 0x10000000000000000 is out of range"),
    ("read size str", lambda m: m.read(0, bad("8")), GuestMemoryError, r"size must be an integer"),
    ("read size float", lambda m: m.read(0, bad(8.0)), GuestMemoryError, r"size must be an integer"),
    ("read size -1", lambda m: m.read(0, -1), GuestMemoryError, r"invalid guest access: size -0x1 is out of range"),
    ("view size -1", lambda m: m.view(0, -1), GuestMemoryError, r"size -0x1 is out of range"),
    ("fill size -1", lambda m: m.fill(0, -1), GuestMemoryError, r"size -0x1 is out of range"),
    ("read_u32 gpa str", lambda m: m.read_u32(bad("x")), GuestMemoryError, r"gpa must be an integer"),
    ("write_u32 gpa -4", lambda m: m.write_u32(-4, 1), GuestMemoryError, r"gpa -0x4 is out of range"),
    ("read huge size", lambda m: m.read(0, 1 << 70), GuestMemoryError, r"0x0\+0x400000000000000000 runs past the end"),
    ("past the end", lambda m: m.write_u64(SIZE - 4, 1), GuestMemoryError, r"runs past the end"),
]


@pytest.mark.parametrize(("call", "error", "message"), [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_values_raise_typed_errors_before_writing(
    memory: GuestMemory, call: Callable[[GuestMemory], Any], error: type[PyvmmError], message: str
) -> None:
    with pytest.raises(error, match=message):
        call(memory)
    assert memory.read(0, SIZE) == bytes(SIZE)  # nothing was written anywhere


def test_the_errors_are_value_errors_too(memory: GuestMemory) -> None:
    """Code that caught ValueError (struct.error is not one) keeps working."""
    with pytest.raises(ValueError):
        memory.write_u8(0, 256)
    with pytest.raises(ValueError):
        memory.read(-1, 1)


def test_good_values_at_the_edges(memory: GuestMemory) -> None:
    memory.write_u8(0, 0xFF)
    memory.write_u16(2, 0xFFFF)
    memory.write_u32(4, 0xFFFF_FFFF)
    memory.write_u64(8, 0xFFFF_FFFF_FFFF_FFFF)
    memory.write_u64(16, 0)
    assert memory.read(0, 24) == b"\xff\x00" + b"\xff" * 14 + bytes(8)
    assert (memory.read_u8(0), memory.read_u16(2), memory.read_u32(4), memory.read_u64(8)) == (
        0xFF,
        0xFFFF,
        0xFFFF_FFFF,
        0xFFFF_FFFF_FFFF_FFFF,
    )
    memory.fill(SIZE - 16, 16, 0xFF)
    assert memory.read(SIZE - 16, 16) == b"\xff" * 16
    assert memory.read(SIZE - 1, 0) == b""


def test_write_takes_any_bytes_like_object(memory: GuestMemory) -> None:
    memory.write(0, bytearray(b"ab"))
    memory.write(2, memoryview(b"cd"))
    memory.write(4, bad(array.array("I", [0x64636265])))  # its bytes, whatever its format
    memory.write(8, memoryview(b"w_x_y_z_")[::2])  # not contiguous: copied
    memory.write(12, memoryview(bytes(range(8))).cast("B", (2, 4)))  # two dimensions
    assert memory.read(0, 20) == b"abcdebcd" + b"wxyz" + bytes(range(8))


def test_region_views_check_their_range(memory: GuestMemory) -> None:
    """A negative offset used to slice from the region's end: other bytes, no error."""
    region = memory.region_at(0)
    assert region is not None
    memory.write(SIZE - 8, b"TAILTAIL")
    with pytest.raises(GuestMemoryError, match="not inside the region"):
        region.view(-8, 8)
    with pytest.raises(GuestMemoryError, match="not inside the region"):
        region.view(SIZE - 4, 8)
    with pytest.raises(GuestMemoryError, match="not inside the region"):
        region.view(0, -1)
    assert region.view(SIZE - 8, 8).tobytes() == b"TAILTAIL"
    assert region.view(SIZE).nbytes == 0


def test_access_after_close_is_a_state_error(memory: GuestMemory) -> None:
    memory.close()
    with pytest.raises(VmStateError, match="guest memory is closed"):
        memory.read(0, 1)
    with pytest.raises(VmStateError, match="guest memory is closed"):
        memory.write_u8(0, 1)
    assert not memory.contains(0)


def test_lookups_refuse_what_is_not_an_address(memory: GuestMemory) -> None:
    with pytest.raises(GuestMemoryError, match="region_at: gpa must be an integer, not '0'"):
        memory.region_at(bad("0"))
    assert memory.region_at(-1) is None
    assert not memory.contains(bad("0"))
    assert not memory.contains(0, bad(1.0))
    assert memory.contains(0, SIZE)
