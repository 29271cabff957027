"""The device state protocol (pyvmm.devices.state): every stateful PC device
saves what the guest can see and takes it back into a fresh device; a state
that does not fit is a DeviceStateError and changes nothing."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest

from pyvmm.devices.acpi_pm import AcpiPm
from pyvmm.devices.base import Device
from pyvmm.devices.fw_cfg import FwCfg
from pyvmm.devices.i8042 import COMMAND_PORT, DATA_PORT, I8042
from pyvmm.devices.i8254 import Pit8254
from pyvmm.devices.i8259 import PicPair
from pyvmm.devices.pci import PciConfigSpace, PciHost
from pyvmm.devices.pl011 import CR, DR, FR, FR_RXFE, IBRD, IMSC, INT_RT, INT_TX, LCR_H, MIS, RIS, Pl011
from pyvmm.devices.poweroff import BochsPoweroff
from pyvmm.devices.rtc import Rtc
from pyvmm.devices.scratch import ScratchDevice
from pyvmm.devices.sinks import PortSink
from pyvmm.devices.state import DeviceImage, DeviceStateError, check_version
from pyvmm.devices.uart import Uart16550
from pyvmm.machine.bus import MmioBus, PortBus
from pyvmm.machine.snapshots import bus_devices, load_devices, save_devices
from pyvmm.snapshot import SnapshotError


class _Sleep:
    def suspend(self) -> None: ...

    def poweroff(self) -> None: ...


def _nothing() -> None:
    return None


def _pci() -> PciHost:
    config = PciConfigSpace()
    config.add_function(0, b"\x86\x80\x37\x12")
    return PciHost(config)


class _Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


#: A fresh device, and guest accesses that change its state: (is_write, offset, size, value).
DEVICES: dict[str, tuple[Callable[[], Device], list[tuple[bool, int, int, int]]]] = {
    "uart": (lambda: Uart16550(io.BytesIO()), [(True, 3, 1, 0x83), (True, 0, 1, 0x0C), (True, 3, 1, 0x03),
                                                (True, 1, 1, 0x02), (True, 7, 1, 0x5A), (True, 2, 1, 0xC1)]),
    "rtc": (lambda: Rtc(_Clock()), [(True, 0, 1, 0x0B), (True, 1, 1, 0x06), (True, 0, 1, 0x20), (True, 1, 1, 0x42)]),
    "fw_cfg": (lambda: FwCfg(ram_size=1 << 27, cpus=1), [(True, 0, 2, 0x0005), (False, 1, 1, 0)]),
    "pci-host": (_pci, [(True, 0, 4, 0x8000_0004), (True, 4, 2, 0x0007)]),
    "demo-device": (ScratchDevice, [(True, 8, 8, 0x1122_3344_5566_7788)]),
    "bochs-poweroff": (lambda: BochsPoweroff(_nothing), [(True, 0, 1, ord("S")), (True, 0, 1, ord("h"))]),
    "post": (lambda: PortSink("post", initial=0), [(True, 0, 1, 0x42)]),
    "acpi-pm": (lambda: AcpiPm(_Sleep(), clock_ns=lambda: 5_000_000), [(True, 2, 2, 0x0120), (True, 4, 1, 0x01)]),
    "pl011": (lambda: Pl011(io.BytesIO()), [(True, IBRD, 4, 0x1A), (True, LCR_H, 4, 0x70), (True, IMSC, 4, 0x50),
                                            (True, CR, 4, 0x301), (True, DR, 4, ord("x"))]),
}  # fmt: skip


def _changed(name: str) -> Device:
    make, accesses = DEVICES[name]
    device = make()
    for is_write, offset, size, value in accesses:
        if is_write:
            device.write(offset, size, value)
        else:
            device.read(offset, size)
    return device


@pytest.mark.parametrize("name", sorted(DEVICES))
def test_a_saved_state_loads_into_a_fresh_device(name: str) -> None:
    device = _changed(name)
    state = device.save_state()
    assert device.state_version == 1
    fresh = DEVICES[name][0]()
    assert fresh.save_state() != state, "the accesses changed something the state holds"
    fresh.load_state(state)
    assert fresh.save_state() == state


@pytest.mark.parametrize("name", sorted(DEVICES))
def test_a_state_that_does_not_fit_changes_nothing(name: str) -> None:
    state = _changed(name).save_state()
    fresh = DEVICES[name][0]()
    before = fresh.save_state()
    field = sorted(state)[0]
    wrong: list[dict[str, Any]] = [
        {k: v for k, v in state.items() if k != field},  # missing
        {**state, "extra": 1},  # unexpected
        {**state, field: "text"},  # not an integer, boolean or bytes
        {**state, field: -5 if not isinstance(state[field], bytes) else b"\xff" * 9999},  # out of range
    ]
    for bad in wrong:
        with pytest.raises(DeviceStateError, match=f"device {fresh.name}"):
            fresh.load_state(bad)
        assert fresh.save_state() == before


def test_the_uart_keeps_received_bytes_and_its_registers() -> None:
    uart = _changed("uart")
    uart.rx.put(b"hi")
    fresh = Uart16550(io.BytesIO())
    fresh.load_state(uart.save_state())
    assert (fresh.read(7, 1), fresh.read(1, 1), fresh.read(3, 1)) == (0x5A, 0x02, 0x03)
    assert (fresh.read(0, 1), fresh.read(0, 1)) == (ord("h"), ord("i"))


def test_the_pl011_keeps_received_bytes_its_registers_and_its_interrupt_status() -> None:
    uart = _changed("pl011")
    uart.rx.put(b"ok")
    fresh = Pl011(io.BytesIO())
    fresh.load_state(uart.save_state())
    assert (fresh.read(IBRD, 4), fresh.read(LCR_H, 4), fresh.read(CR, 4)) == (0x1A, 0x70, 0x301)
    # TX done (latched) and 2 bytes waiting under the FIFO's 8-byte trigger: a receive timeout.
    assert (fresh.read(RIS, 4), fresh.read(MIS, 4)) == (INT_TX | INT_RT, INT_RT)
    assert (fresh.read(DR, 4), fresh.read(DR, 4)) == (ord("o"), ord("k"))
    assert fresh.read(FR, 4) & FR_RXFE
    with pytest.raises(DeviceStateError, match="field ibrd must be a 16-bit"):
        fresh.load_state({**uart.save_state(), "ibrd": 0x10000})
    with pytest.raises(DeviceStateError, match="fbrd 0x40 has bits the register lacks"):
        fresh.load_state({**uart.save_state(), "fbrd": 0x40})
    with pytest.raises(DeviceStateError, match="interrupt bits beyond"):
        fresh.load_state({**uart.save_state(), "imsc": 0x800})


def test_the_rtc_goes_on_from_the_time_it_showed() -> None:
    clock = _Clock()
    rtc = Rtc(clock)
    state = rtc.save_state()
    later = _Clock()
    later.now = clock.now + 3600.0  # restored an hour later on the host
    restored = Rtc(later)
    restored.load_state(state)
    assert abs(restored.guest_time() - clock.now) < 1e-6


def test_the_i8042_keeps_a_pending_command_and_its_output() -> None:
    controller = I8042(_nothing)
    controller.write_port(COMMAND_PORT, 0xAA)  # self-test: 0x55 waits in the output buffer
    fresh = I8042(_nothing)
    fresh.load_state(controller.save_state())
    assert fresh.read_port(DATA_PORT) == 0x55
    with pytest.raises(DeviceStateError, match="not a command that waits for data"):
        fresh.load_state({**controller.save_state(), "pending_command": 0xAA})


def test_the_pci_host_refuses_another_set_of_functions() -> None:
    state = _changed("pci-host").save_state()
    with pytest.raises(DeviceStateError, match="PCI functions"):
        PciHost().load_state(state)


def test_versions_are_checked_and_a_device_without_one_is_refused() -> None:
    check_version("uart", 1, 1)
    with pytest.raises(DeviceStateError, match="version 2, this pyvmm reads version 1"):
        check_version("uart", 2, 1)
    with pytest.raises(DeviceStateError, match="does not support snapshots"):
        check_version("thing", 1, None)


def _buses() -> tuple[PortBus, MmioBus, I8042]:
    pio, mmio = PortBus(), MmioBus()
    controller = I8042(_nothing)
    pio.register(DATA_PORT, 1, controller.data_port())
    pio.register(COMMAND_PORT, 1, controller.command_port())
    pio.register(0x3F8, 8, Uart16550(io.BytesIO()))
    mmio.register(0xFEB0_0000, 0x1000, ScratchDevice())
    return pio, mmio, controller


def test_bus_devices_count_a_controller_once_and_key_by_address() -> None:
    pio, mmio, controller = _buses()
    devices = bus_devices(pio, mmio)
    assert sorted(devices) == ["mmio@0xfeb00000:demo-device", "pio@0x3f8:uart", "pio@0x60:i8042"]
    assert devices["pio@0x60:i8042"] is controller


def test_machine_device_sets_must_match() -> None:
    pio, mmio, _ = _buses()
    images = save_devices(bus_devices(pio, mmio))
    load_devices(bus_devices(pio, mmio), images)
    with pytest.raises(SnapshotError, match=r"only in the snapshot \['pio@0x2f8:uart'\]"):
        load_devices(bus_devices(pio, mmio), [*images, DeviceImage("pio@0x2f8:uart", 1, {})])
    pio.register(0x700, 1, Device())  # a device that declares no state
    with pytest.raises(SnapshotError, match=r"cannot be snapshotted: pio@0x700:device"):
        save_devices(bus_devices(pio, mmio))


def _programmed_pic() -> PicPair:
    pic = PicPair()
    master, slave, _ = pic.devices()
    for port_device, base in ((master, 0x20), (slave, 0x28)):
        port_device.write(0, 1, 0x11)  # ICW1: edge, cascade, ICW4
        port_device.write(1, 1, base)  # ICW2: vector base
        port_device.write(1, 1, 0x04 if base == 0x20 else 0x02)  # ICW3
        port_device.write(1, 1, 0x01)  # ICW4: 8086 mode
    master.write(1, 1, 0xFE)  # only IRQ 0 open
    pic.set_irq(0, True)
    return pic


def test_the_pic_pair_keeps_its_programming_and_a_pending_request() -> None:
    pic = _programmed_pic()
    changes: list[int] = []
    fresh = PicPair(on_change=lambda: changes.append(1))
    fresh.load_state(pic.save_state())
    assert fresh.save_state() == pic.save_state()
    assert changes == [1], "the delivery is told to look at the restored output"
    assert fresh.has_interrupt() and fresh.acknowledge() == 0x20
    with pytest.raises(DeviceStateError, match="out of range"):
        PicPair().load_state({**pic.save_state(), "master_init_step": 9})


def test_the_pit_counts_on_from_where_it_was() -> None:
    now = [1_000_000_000]
    pit = Pit8254(clock=lambda: now[0])
    ports, _ = pit.devices()
    ports.write(3, 1, 0x34)  # counter 0, LSB then MSB, mode 2
    ports.write(0, 1, 0xA9)
    ports.write(0, 1, 0x04)  # 1193 counts: 1 kHz
    now[0] += 300_000  # 0.3 ms into the period
    state = pit.save_state()
    later = [now[0] + 50 * 10**9]  # restored 50 s later on the host
    reprogrammed: list[int] = []
    restored = Pit8254(clock=lambda: later[0], on_reprogram=lambda: reprogrammed.append(1))
    restored.load_state(state)
    assert reprogrammed == [1]
    assert restored.save_state() == state
    deadline = restored.next_irq_deadline()
    assert deadline is not None and 0 < deadline - later[0] <= 1_000_000
    assert pit.next_irq_deadline() is not None
    assert deadline - later[0] == pit.next_irq_deadline() - now[0]  # type: ignore[operator]
    with pytest.raises(DeviceStateError, match="out of range"):
        Pit8254().load_state({**state, "counter0_latched": b"abc"})
    with pytest.raises(DeviceStateError, match="counter1_mode"):
        Pit8254().load_state({**state, "counter1_mode": 9})
