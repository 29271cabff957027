"""Served registers (pyvmm.served_io): the records, Vm.serve_io's checks before
the backend is called, the ACPI PM timer's span, and the machine registering
the spans of its devices."""

from __future__ import annotations

import pytest
from coretests_support import MakeBackend

from pyvmm.capabilities import Capability
from pyvmm.devices.acpi_pm import PM_TMR_LEN, PM_TMR_OFFSET, AcpiPm, SleepEvents
from pyvmm.devices.base import Device
from pyvmm.errors import ConfigError
from pyvmm.machine.bus import MmioBus, PortBus
from pyvmm.machine.served_devices import serve_device_registers
from pyvmm.served_io import (
    ConstantRegister,
    LatchedBytes,
    PmTimerRegister,
    ServedSpan,
    pm_timer_count,
)
from pyvmm.vcpu_state import AddressSpace, IoEventAddress

PORT = IoEventAddress.pio(0x608)
MMIO = IoEventAddress.mmio(0xD000_0000)
SERVED = (Capability.SERVED_IO,)


def test_a_served_register_reaches_the_backend_as_given(make_backend: MakeBackend) -> None:
    test_backend, backend = make_backend(SERVED)
    with backend.create_vm() as vm:
        vm.serve_io(PORT, 4, PmTimerRegister(123))
        vm.serve_io(MMIO, 8, ConstantRegister(0xFFFF_FFFF_FFFF_FFFF))
        assert test_backend.calls_of("pyvmm_serve_io") == [
            ("pyvmm_serve_io", PORT, 4, PmTimerRegister(123)),
            ("pyvmm_serve_io", MMIO, 8, ConstantRegister(0xFFFF_FFFF_FFFF_FFFF)),
        ]


@pytest.mark.parametrize(
    ("address", "size", "register", "words"),
    [
        (MMIO, 0, ConstantRegister(0), "positive number of bytes"),
        (MMIO, True, ConstantRegister(0), "positive number of bytes"),
        (IoEventAddress.pio(0xFFFE), 4, ConstantRegister(0), "leaves the pio space"),
        (IoEventAddress.mmio((1 << 52) - 4), 8, ConstantRegister(0), "leaves the mmio space"),
        (PORT, 2, PmTimerRegister(0), "PM timer register is 4 bytes, not 2"),
        (PORT, 4, PmTimerRegister(-1), r"PmTimerRegister.start_ns: -1 is out of range"),
        (MMIO, 8, ConstantRegister(1 << 64), r"ConstantRegister.value: .* is out of range"),
        (PORT, 1, LatchedBytes(0x100), r"LatchedBytes.initial: 256 is out of range"),
        (PORT, 4, 0x1234, "not int"),
    ],
)
def test_bad_served_ranges_are_config_errors_before_the_backend(
    make_backend: MakeBackend, address: IoEventAddress, size: int, register: object, words: str
) -> None:
    test_backend, backend = make_backend(SERVED)
    with backend.create_vm() as vm:
        mark = len(test_backend.calls)
        with pytest.raises(ConfigError, match=words):
            vm.serve_io(address, size, register)  # type: ignore[arg-type]
        assert test_backend.hooks_since(mark) == []


@pytest.mark.parametrize("ticks_ns", [0, 1, 999_999_999, 10**9, 4_686_000_000, 7 * 24 * 3600 * 10**9])
def test_the_pm_timer_register_counts_as_the_device_reads(ticks_ns: int) -> None:
    now = [10**12]
    pm = AcpiPm(SleepEvents(suspend=lambda: None, poweroff=lambda: None), clock_ns=lambda: now[0])
    start = now[0]
    now[0] += ticks_ns
    assert pm_timer_count(start, now[0]) == pm.read(PM_TMR_OFFSET, PM_TMR_LEN)


def test_the_pm_timer_is_served_only_on_the_monotonic_clock() -> None:
    events = SleepEvents(suspend=lambda: None, poweroff=lambda: None)
    pm = AcpiPm(events)
    (span,) = pm.served_spans()
    assert (span.offset, span.size) == (PM_TMR_OFFSET, PM_TMR_LEN)
    assert span.register == PmTimerRegister(pm._start_ns)
    assert AcpiPm(events, clock_ns=lambda: 5).served_spans() == (), "a clock the backend cannot read is not served"


class TwoSpans(Device):
    name = "two spans"

    def served_spans(self) -> tuple[ServedSpan, ...]:
        return (ServedSpan(0, 1, LatchedBytes()), ServedSpan(4, 4, ConstantRegister(7)))


def test_the_machine_serves_each_span_at_its_device_base(make_backend: MakeBackend) -> None:
    test_backend, backend = make_backend(SERVED)
    pio, mmio = PortBus(), MmioBus()
    pio.register(0x100, 8, TwoSpans())
    mmio.register(0xE000_0000, 0x1000, TwoSpans())
    mmio.register(0xF000_0000, 0x1000, Device())
    with backend.create_vm() as vm:
        assert serve_device_registers(vm, pio, mmio) == 4
        calls = [(a.space, a.address, size) for _, a, size, _ in test_backend.calls_of("pyvmm_serve_io")]
    assert calls == [
        (AddressSpace.PIO, 0x100, 1),
        (AddressSpace.PIO, 0x104, 4),
        (AddressSpace.MMIO, 0xE000_0000, 1),
        (AddressSpace.MMIO, 0xE000_0004, 4),
    ]


def test_without_the_capability_the_machine_serves_nothing(make_backend: MakeBackend) -> None:
    test_backend, backend = make_backend(())
    pio = PortBus()
    pio.register(0x100, 8, TwoSpans())
    with backend.create_vm() as vm:
        assert serve_device_registers(vm, pio, MmioBus()) == 0
    assert test_backend.calls_of("pyvmm_serve_io") == []
