"""The MC146818 RTC/CMOS at 0x70/0x71 on a fake clock: time registers in each
format, UIP, the alarm, register C's flags, and guest-set time."""

from __future__ import annotations

import calendar

import pytest

from pyvmm.devices import rtc
from pyvmm.devices.rtc import Rtc
from pyvmm.machine.bus import PortBus

#: Thursday 2024-02-29 23:59:58.5 UTC.
LEAP_NIGHT = calendar.timegm((2024, 2, 29, 23, 59, 58, 0, 0, 0)) + 0.5


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(LEAP_NIGHT)


@pytest.fixture
def pio(clock: Clock) -> PortBus:
    bus = PortBus()
    bus.register(rtc.INDEX_PORT, rtc.PORT_COUNT, Rtc(clock))
    return bus


def cmos_read(pio: PortBus, index: int) -> int:
    pio.write(0x70, 1, index)
    return pio.read(0x71, 1)


def cmos_write(pio: PortBus, index: int, value: int) -> None:
    pio.write(0x70, 1, index)
    pio.write(0x71, 1, value)


def test_time_reads_in_bcd_24_hour_by_default(pio: PortBus) -> None:
    fields = [cmos_read(pio, i) for i in (0, 2, 4, 6, 7, 8, 9, 0x32)]
    assert fields == [0x58, 0x59, 0x23, 5, 0x29, 0x02, 0x24, 0x20]
    assert cmos_read(pio, rtc.REG_B) == rtc.B_24H
    assert cmos_read(pio, rtc.REG_D) == rtc.D_VRT


def test_binary_and_12_hour_formats(pio: PortBus, clock: Clock) -> None:
    cmos_write(pio, rtc.REG_B, rtc.B_24H | rtc.B_BINARY)
    assert [cmos_read(pio, i) for i in (0, 2, 4, 9)] == [58, 59, 23, 24]
    cmos_write(pio, rtc.REG_B, 0)  # BCD, 12-hour
    assert cmos_read(pio, rtc.REG_HOURS) == rtc.HOUR_PM | 0x11
    clock.now += 2  # midnight: 12 AM
    assert cmos_read(pio, rtc.REG_HOURS) == 0x12
    assert cmos_read(pio, rtc.REG_DAY) == 0x01 and cmos_read(pio, rtc.REG_MONTH) == 0x03


def test_uip_shows_just_before_each_update(pio: PortBus, clock: Clock) -> None:
    assert cmos_read(pio, rtc.REG_A) == rtc.A_DEFAULT
    clock.now = LEAP_NIGHT + 0.5 - rtc.UIP_WINDOW / 2
    assert cmos_read(pio, rtc.REG_A) == rtc.A_DEFAULT | rtc.A_UIP
    cmos_write(pio, rtc.REG_A, 0x70 | 0x06)  # dividers held in reset: no updates
    assert cmos_read(pio, rtc.REG_A) & rtc.A_UIP == 0


def test_the_next_alarm_honours_dont_care_fields(clock: Clock) -> None:
    dev = Rtc(clock)
    for index in (rtc.REG_SECONDS_ALARM, rtc.REG_MINUTES_ALARM, rtc.REG_HOURS_ALARM):
        dev.cmos[index] = rtc.ALARM_DONT_CARE
    assert dev.next_alarm() is None  # AIE is off
    dev.cmos[rtc.REG_B] |= rtc.B_AIE
    alarm = dev.next_alarm()
    assert alarm == LEAP_NIGHT + 0.5
    assert dev.seconds_until(alarm) == pytest.approx(0.5)
    dev.cmos[rtc.REG_SECONDS_ALARM] = 0x10  # BCD, like the time registers
    assert dev.next_alarm() == LEAP_NIGHT + 11.5  # 00:00:10


def test_register_c_collects_flags_since_it_was_read(pio: PortBus, clock: Clock) -> None:
    assert cmos_read(pio, rtc.REG_C) == 0
    clock.now += 1  # one update, one periodic tick (or many)
    assert cmos_read(pio, rtc.REG_C) == rtc.C_UF | rtc.C_PF
    assert cmos_read(pio, rtc.REG_C) == 0  # reading cleared it
    cmos_write(pio, rtc.REG_SECONDS_ALARM, 0x01)
    cmos_write(pio, rtc.REG_B, rtc.B_24H | rtc.B_AIE)
    clock.now += 2  # 00:00:00.5 -> the 00:00:01 update matches
    assert cmos_read(pio, rtc.REG_C) == rtc.C_IRQF | rtc.C_AF | rtc.C_UF | rtc.C_PF
    clock.now += 1  # 00:00:02: no match
    assert cmos_read(pio, rtc.REG_C) == rtc.C_UF | rtc.C_PF


def test_the_periodic_flag_follows_the_rate(pio: PortBus, clock: Clock) -> None:
    clock.now = LEAP_NIGHT - 0.45  # 23:59:58.05
    cmos_read(pio, rtc.REG_C)
    cmos_write(pio, rtc.REG_A, 0x20 | 15)  # 2 Hz
    clock.now += 0.2
    assert cmos_read(pio, rtc.REG_C) == 0
    clock.now += 0.3  # past .5: a tick, but no update
    assert cmos_read(pio, rtc.REG_C) == rtc.C_PF
    cmos_write(pio, rtc.REG_A, 0x20)  # rate 0: no periodic ticks
    clock.now += 0.6
    assert cmos_read(pio, rtc.REG_C) == rtc.C_UF


def test_the_guest_sets_the_time(pio: PortBus, clock: Clock) -> None:
    cmos_write(pio, rtc.REG_SECONDS, 0x30)
    cmos_write(pio, rtc.REG_YEAR, 0x25)
    assert cmos_read(pio, rtc.REG_SECONDS) == 0x30
    assert cmos_read(pio, rtc.REG_YEAR) == 0x25
    assert cmos_read(pio, rtc.REG_MONTH) == 0x03  # 2025 has no 29 February: it rolls over
    clock.now += 1
    assert cmos_read(pio, rtc.REG_SECONDS) == 0x31


def test_set_holds_the_clock_until_cleared(pio: PortBus, clock: Clock) -> None:
    cmos_write(pio, rtc.REG_B, rtc.B_24H | rtc.B_SET | rtc.B_UIE)
    assert cmos_read(pio, rtc.REG_B) == rtc.B_24H | rtc.B_SET  # SET clears UIE
    cmos_write(pio, rtc.REG_MINUTES, 0x10)
    clock.now += 30
    assert cmos_read(pio, rtc.REG_MINUTES) == 0x10 and cmos_read(pio, rtc.REG_SECONDS) == 0x58
    cmos_write(pio, rtc.REG_B, rtc.B_24H)
    clock.now += 1
    assert cmos_read(pio, rtc.REG_SECONDS) == 0x59 and cmos_read(pio, rtc.REG_MINUTES) == 0x10


def test_index_port_and_cmos_ram(pio: PortBus) -> None:
    pio.write(0x70, 1, 0x80 | 0x40)
    assert pio.read(0x70, 1) == 0xC0  # NMI-disable bit kept
    pio.write(0x71, 1, 0x77)
    assert pio.read(0x71, 1) == 0x77
    cmos_write(pio, rtc.REG_D, 0)
    cmos_write(pio, rtc.REG_WEEKDAY, 1)
    assert cmos_read(pio, rtc.REG_D) == rtc.D_VRT  # read-only
    assert cmos_read(pio, rtc.REG_WEEKDAY) == 5  # follows the date


def test_set_alarm_flag_is_reported_once(clock: Clock) -> None:
    dev = Rtc(clock)
    dev.set_alarm_flag()
    dev.index = rtc.REG_C
    assert dev.read(1, 1) == rtc.C_IRQF | rtc.C_AF
    assert dev.read(1, 1) == 0
