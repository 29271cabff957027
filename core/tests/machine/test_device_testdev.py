"""QEMU's pc-testdev: the latch, the flush-page port, the interrupt-line ports and
the MMIO buffer; and how the machine installs it (only with ``testdev``)."""

from __future__ import annotations

import logging

import pytest
from coretests_support import MakeBackend
from machinetests_support import IRQCHIP_CAPS, MACHINE_CAPS, TINY_IMAGE, io_exit, machine_config, mmio_exit, value_of

from pyvmm import cli
from pyvmm.devices import testdev
from pyvmm.devices.testdev import PcTestDev
from pyvmm.machine import Machine
from pyvmm.machine.bus import MmioBus, PortBus
from pyvmm.machine.pc import install_testdev
from pyvmm.vm import Backend


@pytest.fixture
def lines() -> list[tuple[int, bool]]:
    return []


@pytest.fixture
def buses(lines: list[tuple[int, bool]]) -> tuple[PortBus, MmioBus, PcTestDev]:
    pio, mmio = PortBus(), MmioBus()
    dev = install_testdev(pio, mmio, lambda line, level: lines.append((line, level)))
    return pio, mmio, dev


def test_the_latch_reads_back_at_any_width_and_offset(buses: tuple[PortBus, MmioBus, PcTestDev]) -> None:
    pio, _, _ = buses
    pio.write(0xE0, 4, 0x12345678)
    assert pio.read(0xE0, 4) == 0x12345678
    assert pio.read(0xE0, 1) == 0x78
    assert pio.read(0xE2, 2) == 0x1234
    assert pio.read(0xE3, 1) == 0x12
    pio.write(0xE1, 1, 0xAB)  # only that byte changes
    assert pio.read(0xE0, 4) == 0x1234AB78
    pio.write(0xE2, 4, 0xFFFFCDEF)  # bytes past the latch are dropped
    assert pio.read(0xE0, 4) == 0xCDEFAB78
    assert pio.read(0xE3, 4) == 0xCD  # ... and read as zero


def test_the_byte_ports_alias_the_latch(buses: tuple[PortBus, MmioBus, PcTestDev]) -> None:
    pio, _, _ = buses
    pio.write(0xE8, 4, 0x01020304)
    assert pio.read(0xE0, 4) == 0x01020304
    pio.write(0xE0, 2, 0xBEEF)
    assert pio.read(0xEA, 2) == 0x0102
    assert pio.read(0xE8, 1) == 0xEF


def test_the_flush_page_port_changes_nothing(buses: tuple[PortBus, MmioBus, PcTestDev]) -> None:
    pio, _, dev = buses
    pio.write(0xE0, 4, 0x55AA55AA)
    pio.write(0xE4, 4, 0x200000)
    assert pio.read(0xE4, 4) == 0
    assert pio.read(0xE0, 4) == 0x55AA55AA
    assert dev.latch == bytes.fromhex("aa55aa55")


def test_irq_ports_raise_and_lower_their_line(
    buses: tuple[PortBus, MmioBus, PcTestDev], lines: list[tuple[int, bool]]
) -> None:
    pio, _, _ = buses
    pio.write(0x200D, 1, 1)
    pio.write(0x200D, 1, 0)
    pio.write(0x2000, 1, 0x80)
    pio.write(0x2017, 1, 0xFF)
    assert lines == [(13, True), (13, False), (0, True), (23, True)]


def test_a_wide_irq_write_is_one_write_per_byte(
    buses: tuple[PortBus, MmioBus, PcTestDev], lines: list[tuple[int, bool]]
) -> None:
    pio, _, _ = buses
    pio.write(0x200B, 4, 1)  # realmode.flat's outl: line 11 up, 12-14 down
    assert lines == [(11, True), (12, False), (13, False), (14, False)]
    lines.clear()
    pio.write(0x2016, 4, 0x0101)  # lines past 23 do not exist
    assert lines == [(22, True), (23, True)]


def test_irq_writes_without_an_interrupt_controller_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    pio, mmio = PortBus(), MmioBus()
    install_testdev(pio, mmio, None)
    with caplog.at_level(logging.WARNING, logger="pyvmm"):
        pio.write(0x200B, 1, 1)
        pio.write(0x200C, 1, 1)
    assert len([r for r in caplog.records if "pc-testdev" in r.getMessage()]) == 1


def test_the_mmio_buffer_reads_back_what_was_written(buses: tuple[PortBus, MmioBus, PcTestDev]) -> None:
    _, mmio, dev = buses
    base = testdev.IOMEM_BASE
    mmio.write(base + 0x10, 8, 0x1122334455667788)
    assert mmio.read(base + 0x10, 8) == 0x1122334455667788
    assert mmio.read(base + 0x14, 4) == 0x11223344
    assert mmio.read(base + 0x11, 2) == 0x6677
    mmio.write(base + 0x12, 1, 0xEE)
    assert mmio.read(base + 0x10, 4) == 0x55EE7788
    last = base + testdev.IOMEM_SIZE - 1
    mmio.write(last, 4, 0xDDCCBBAA)  # what would run past the end is dropped
    assert mmio.read(last, 1) == 0xAA
    assert len(dev.buffer) == testdev.IOMEM_SIZE
    assert mmio.find(base + testdev.IOMEM_SIZE) is None


def _build(backend: Backend, **settings: object) -> Machine:
    return Machine(machine_config(**settings), backend=backend, image=TINY_IMAGE)


def test_the_machine_has_it_only_when_asked(make_backend: MakeBackend) -> None:
    _, backend = make_backend(IRQCHIP_CAPS)
    with _build(backend) as plain, _build(backend, testdev=True) as with_dev:
        for machine, present in ((plain, False), (with_dev, True)):
            assert (machine.pio.find(0xE0) is not None) is present
            assert (machine.pio.find(0x2017) is not None) is present
            assert (machine.mmio.find(testdev.IOMEM_BASE) is not None) is present


def test_guest_accesses_reach_it_and_drive_the_hypervisors_lines(make_backend: MakeBackend) -> None:
    test_backend, backend = make_backend(IRQCHIP_CAPS)
    latch_read = io_exit(0xE2, 2)
    buffer_read = mmio_exit(testdev.IOMEM_BASE + 4, 4)
    test_backend.script_exits(
        io_exit(0xE0, 4, write=True, value=0xCAFEF00D),
        latch_read,
        io_exit(0x200B, 1, write=True, value=1),
        io_exit(0x200B, 1, write=True, value=0),
        mmio_exit(testdev.IOMEM_BASE + 4, 4, write=True, value=0x600DD00D),
        buffer_read,
        io_exit(0xF4, 1, write=True),
    )
    with _build(backend, testdev=True) as machine:
        machine.run()
    assert value_of(latch_read) == 0xCAFE
    assert value_of(buffer_read) == 0x600DD00D
    assert test_backend.calls_of("pyvmm_set_irq_line") == [
        ("pyvmm_set_irq_line", 11, True),
        ("pyvmm_set_irq_line", 11, False),
    ]


def test_without_an_irqchip_line_writes_reach_no_hypervisor(make_backend: MakeBackend) -> None:
    test_backend, backend = make_backend(MACHINE_CAPS)
    test_backend.script_exits(io_exit(0x200B, 1, write=True, value=1), io_exit(0xF4, 1, write=True))
    with _build(backend, testdev=True) as machine:
        result = machine.run()
    assert result.status == 1
    assert test_backend.calls_of("pyvmm_set_irq_line") == []


def test_the_cli_option(make_backend: MakeBackend) -> None:
    test_backend, _ = make_backend(IRQCHIP_CAPS, name="scripted")
    latch_read = io_exit(0xE0, 1)
    test_backend.script_exits(io_exit(0xE0, 1, write=True, value=0x5A), latch_read, io_exit(0xF4, 1, write=True))
    assert cli.main(["run", "--backend", "scripted", "--serial", "none", "--testdev"]) == 1
    assert value_of(latch_read) == 0x5A
    unclaimed_read = io_exit(0xE0, 1)
    test_backend.script_exits(unclaimed_read, io_exit(0xF4, 1, write=True))
    assert cli.main(["run", "--backend", "scripted", "--serial", "none"]) == 1
    assert value_of(unclaimed_read) == 0xFF  # no device: the bus floats high
