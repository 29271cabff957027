"""PCI configuration mechanism #1: "no device", the address latch, unaligned
offsets, and the reset control register."""

from __future__ import annotations

import struct

import pytest

from pyvmm.devices.base import ALL_ONES
from pyvmm.devices.pci import CONFIG_ENABLE, PciConfigSpace, PciHost

DATA = 4  # 0xcfc relative to 0xcf8
#: 1b36:0005 (pci-testdev), class 0xff, at 00:03.0.
TESTDEV = struct.pack("<HHHH", 0x1B36, 0x0005, 0x0007, 0) + bytes([0, 0, 0, 0xFF])
DEVFN = 3 << 3


def address(devfn: int, register: int, bus: int = 0) -> int:
    return CONFIG_ENABLE | bus << 16 | devfn << 8 | register


def test_no_device_reads_all_ones_at_every_width_and_offset() -> None:
    host = PciHost()
    host.write(0, 4, address(0, 0))
    for offset in range(4):
        for size in (1, 2, 4):
            if offset + size <= 4:
                assert host.read(DATA + offset, size) & ((1 << 8 * size) - 1) == (1 << 8 * size) - 1


def test_the_address_register_latches_32_bit_writes_only() -> None:
    host = PciHost()
    host.write(0, 4, 0x8000_1234)
    assert host.read(0, 4) == 0x8000_1234
    host.write(0, 2, 0xFFFF)  # not the address register
    assert host.read(0, 4) == 0x8000_1234


@pytest.fixture
def host() -> PciHost:
    space = PciConfigSpace()
    space.add_function(DEVFN, TESTDEV)
    return PciHost(space)


def test_unaligned_register_in_the_address_with_a_read_at_0xcfc(host: PciHost) -> None:
    host.write(0, 4, address(DEVFN, 2))  # kvm-unit-tests: reg 2, then inw 0xcfc
    assert host.read(DATA, 2) == 0x0005
    host.write(0, 4, address(DEVFN, 0))
    assert host.read(DATA, 2) == 0x1B36


def test_aligned_address_with_reads_at_0xcfc_plus_n(host: PciHost) -> None:
    host.write(0, 4, address(DEVFN, 0))
    assert host.read(DATA, 4) == 0x0005_1B36
    assert host.read(DATA + 2, 2) == 0x0005
    assert host.read(DATA + 1, 1) == 0x1B
    host.write(0, 4, address(DEVFN, 8))
    assert host.read(DATA + 3, 1) == 0xFF  # class code byte


def test_other_functions_buses_and_disabled_cycles_read_all_ones(host: PciHost) -> None:
    host.write(0, 4, address(DEVFN + 1, 0))
    assert host.read(DATA, 4) == ALL_ONES
    host.write(0, 4, address(DEVFN, 0, bus=1))
    assert host.read(DATA, 4) == ALL_ONES
    host.write(0, 4, address(DEVFN, 0) & ~CONFIG_ENABLE)
    assert host.read(DATA, 4) == ALL_ONES


def test_config_writes_reach_the_function(host: PciHost) -> None:
    host.write(0, 4, address(DEVFN, 4))
    host.write(DATA, 2, 0x0006)
    assert host.read(DATA, 2) == 0x0006
    assert host.config.functions[DEVFN][4:6] == b"\x06\x00"


def test_reset_control_register() -> None:
    resets: list[None] = []
    host = PciHost(on_reset=lambda: resets.append(None))
    host.write(1, 1, 0x02)  # select hard reset: nothing yet
    assert resets == []
    assert host.read(1, 1) == 0x02
    host.write(1, 1, 0x06)
    assert len(resets) == 1


def test_duplicate_function_is_refused() -> None:
    space = PciConfigSpace()
    space.add_function(8, b"")
    with pytest.raises(ValueError, match="already exists"):
        space.add_function(8, b"")
