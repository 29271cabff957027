"""Vm.register_coalesced_io / take_coalesced_io: capability gates and bad zones
are refused by core before the backend is called."""

from __future__ import annotations

import pytest
from coretests_support import MakeBackend

from pyvmm.capabilities import Capability
from pyvmm.coalesced import CoalescedWrite
from pyvmm.errors import ConfigError, UnsupportedCapability
from pyvmm.vcpu_state import AddressSpace, IoEventAddress

MMIO = IoEventAddress.mmio(0xD000_0000)
PORT = IoEventAddress.pio(0x40)


def test_without_the_capability_nothing_reaches_the_backend(make_backend: MakeBackend) -> None:
    test_backend, backend = make_backend(())
    with backend.create_vm() as vm:
        mark = len(test_backend.calls)
        with pytest.raises(UnsupportedCapability, match=r"(?i)coalesced_io"):
            vm.register_coalesced_io(MMIO, 0x1000)
        with pytest.raises(UnsupportedCapability, match=r"(?i)coalesced_io"):
            vm.take_coalesced_io()
        assert test_backend.hooks_since(mark) == []


def test_a_port_zone_needs_coalesced_pio(make_backend: MakeBackend) -> None:
    test_backend, backend = make_backend((Capability.COALESCED_IO,))
    with backend.create_vm() as vm:
        with pytest.raises(UnsupportedCapability, match=r"(?i)coalesced_pio"):
            vm.register_coalesced_io(PORT, 4)
        vm.register_coalesced_io(MMIO, 0x1000)
        assert test_backend.calls_of("pyvmm_register_coalesced_io") == [("pyvmm_register_coalesced_io", MMIO, 0x1000)]
    _, with_pio = make_backend((Capability.COALESCED_IO, Capability.COALESCED_PIO), name="with-pio")
    with with_pio.create_vm() as vm:
        vm.register_coalesced_io(PORT, 4)
        vm.unregister_coalesced_io(PORT, 4)
        assert vm.take_coalesced_io() == []


@pytest.mark.parametrize(
    ("address", "size", "words"),
    [
        (MMIO, 0, "positive number of bytes"),
        (MMIO, -4, "positive number of bytes"),
        (MMIO, True, "positive number of bytes"),
        (IoEventAddress.mmio((1 << 52) - 4), 8, "leaves the mmio space"),
        (IoEventAddress.pio(0xFFFE), 4, "leaves the pio space"),
        (IoEventAddress.mmio(-8), 8, "leaves the mmio space"),
    ],
)
def test_bad_zones_are_config_errors(make_backend: MakeBackend, address: IoEventAddress, size: int, words: str) -> None:
    test_backend, backend = make_backend((Capability.COALESCED_IO, Capability.COALESCED_PIO))
    with backend.create_vm() as vm:
        mark = len(test_backend.calls)
        with pytest.raises(ConfigError, match=words):
            vm.register_coalesced_io(address, size)
        assert test_backend.hooks_since(mark) == []


def test_a_coalesced_write_reads_as_its_value() -> None:
    write = CoalescedWrite(AddressSpace.MMIO, 0x1000, b"\x34\x12")
    assert write.value == 0x1234
    assert write == CoalescedWrite(AddressSpace.MMIO, 0x1000, b"\x34\x12")
    assert write != CoalescedWrite(AddressSpace.PIO, 0x1000, b"\x34\x12")
    assert "mmio 0x1000 <- 3412" in repr(write)
