"""Port and MMIO buses: registration, refusal of overlaps, lookup, and what an
empty address answers."""

from __future__ import annotations

import logging

import pytest

from pyvmm.devices.base import ALL_ONES, Device
from pyvmm.errors import ConfigError
from pyvmm.machine.bus import BusConflict, MmioBus, PortBus


class Latch(Device):
    def __init__(self, name: str) -> None:
        self.name = name
        self.accesses: list[tuple[str, int, int, int]] = []
        self.value = 0

    def read(self, offset: int, size: int) -> int:
        self.accesses.append(("r", offset, size, 0))
        return self.value

    def write(self, offset: int, size: int, value: int) -> None:
        self.accesses.append(("w", offset, size, value))
        self.value = value


def test_port_devices_see_offsets_from_their_base() -> None:
    bus = PortBus()
    a, b = Latch("a"), Latch("b")
    bus.register(0x3F8, 8, a)
    bus.register(0x400, 1, b)  # adjacent ranges are fine
    bus.write(0x3FB, 1, 0x83)
    bus.write(0x400, 2, 0x1234)
    assert a.accesses == [("w", 3, 1, 0x83)]
    assert b.accesses == [("w", 0, 2, 0x1234)]
    assert bus.find(0x3FF) is a
    assert bus.find(0x400) is b
    assert bus.find(0x3F7) is None


def test_reads_are_cut_to_the_access_size() -> None:
    bus = PortBus()
    dev = Latch("dev")
    dev.value = 0x1122_3344
    bus.register(0x10, 4, dev)
    assert bus.read(0x10, 1) == 0x44
    assert bus.read(0x10, 2) == 0x3344


@pytest.mark.parametrize("bus_type", [PortBus, MmioBus])
def test_overlap_is_refused_naming_both_devices(bus_type: type[PortBus] | type[MmioBus]) -> None:
    bus = bus_type()
    bus.register(0x100, 0x10, Latch("first"))
    with pytest.raises(BusConflict, match=r"second: .*0x10f.*overlaps first at 0x100\.\.0x10f"):
        bus.register(0x10F, 4, Latch("second"))
    with pytest.raises(BusConflict):
        bus.register(0xF0, 0x100, Latch("around"))
    assert [d.name for d in bus.devices()] == ["first"]


def test_ranges_outside_the_space_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"port range 0xfffe\+0x4"):
        PortBus().register(0xFFFE, 4, Latch("x"))
    with pytest.raises(ConfigError):
        MmioBus().register(0x1000, 0, Latch("empty"))


def test_mmio_lookup_by_range() -> None:
    bus = MmioBus()
    low, high = Latch("low"), Latch("high")
    bus.register(0xFEB0_0000, 0x1000, high)
    bus.register(0xD000_0000, 0x100, low)
    bus.write(0xFEB0_0FF8, 8, 0xDEAD_BEEF_0000_0001)
    assert high.accesses == [("w", 0xFF8, 8, 0xDEAD_BEEF_0000_0001)]
    assert bus.find(0xD000_00FF) is low
    assert bus.find(0xD000_0100) is None
    assert bus.find(0xFEB0_1000) is None
    assert bus.find(0) is None
    assert [base for base, _, _ in bus.ranges] == [0xD000_0000, 0xFEB0_0000]


def test_unhandled_reads_all_ones_and_logs_once_per_address(caplog: pytest.LogCaptureFixture) -> None:
    bus = PortBus()
    with caplog.at_level(logging.WARNING, logger="pyvmm.machine"):
        assert bus.read(0x1234, 4) == 0xFFFF_FFFF
        assert bus.read(0x1234, 1) == 0xFF
        bus.write(0x1234, 1, 0)
        assert bus.read(0x1235, 2) == 0xFFFF
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "4-byte port read at 0x1234" in messages[0]
    assert "0x1235" in messages[1]
    assert bus.unhandled.read(0x1234, 8) == ALL_ONES


def test_unhandled_mmio_write_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    bus = MmioBus()
    with caplog.at_level(logging.WARNING, logger="pyvmm.machine"):
        bus.write(0xFED0_0000, 4, 1)
    assert "4-byte MMIO write at 0xfed00000" in caplog.text
