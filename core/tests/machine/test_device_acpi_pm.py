"""The ACPI PM1 event/control registers and the PM timer."""

from __future__ import annotations

import logging

import pytest

from pyvmm.devices import acpi_pm
from pyvmm.devices.acpi_pm import AcpiPm, SleepEvents


class Nanoseconds:
    def __init__(self) -> None:
        self.now = 5_000_000_000

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def calls() -> list[str]:
    return []


@pytest.fixture
def clock() -> Nanoseconds:
    return Nanoseconds()


@pytest.fixture
def pm(calls: list[str], clock: Nanoseconds) -> AcpiPm:
    events = SleepEvents(suspend=lambda: calls.append("S3"), poweroff=lambda: calls.append("S5"))
    return AcpiPm(events, clock)


def test_status_bits_clear_when_written_with_one(pm: AcpiPm) -> None:
    assert pm.read(0, 2) == 0
    pm.wake(by_rtc=True)
    assert pm.read(0, 2) == acpi_pm.STS_WAK | acpi_pm.STS_RTC
    pm.write(0, 2, acpi_pm.STS_RTC)
    assert pm.read(0, 2) == acpi_pm.STS_WAK
    pm.write(1, 1, acpi_pm.STS_WAK >> 8)
    assert pm.read(0, 2) == 0


def test_enable_bits_are_plain_registers(pm: AcpiPm) -> None:
    assert not pm.rtc_wakes
    pm.write(2, 2, acpi_pm.EN_RTC)  # s3.flat: outw 0x400 to PM1a_EVT + 2
    assert pm.rtc_wakes
    pm.wake(by_rtc=False)
    assert pm.read(0, 4) == acpi_pm.EN_RTC << 16 | acpi_pm.STS_WAK


def test_sleep_types(pm: AcpiPm, calls: list[str], caplog: pytest.LogCaptureFixture) -> None:
    pm.write(4, 2, 0x2400)  # s3.flat: SLP_TYP 1 | SLP_EN
    assert calls == ["S3"]
    assert pm.read(4, 2) == 0x0400 | acpi_pm.CNT_SCI_EN  # SLP_EN reads 0, SCI_EN stays
    pm.write(4, 2, 0x2000)
    assert calls == ["S3", "S5"]
    with caplog.at_level(logging.WARNING, logger="pyvmm"):
        pm.write(4, 2, 5 << 10 | acpi_pm.CNT_SLP_EN)
    assert calls == ["S3", "S5"]
    assert "sleep type 5" in caplog.text


def test_sleep_type_without_slp_en_only_stores_it(pm: AcpiPm, calls: list[str]) -> None:
    pm.write(4, 2, 0x0400)
    assert calls == []
    pm.write(5, 1, 0x24)  # a byte write of the high half is enough
    assert calls == ["S3"]


def test_the_pm_timer_counts_at_3_58_mhz_in_24_bits(pm: AcpiPm, clock: Nanoseconds) -> None:
    assert pm.read(acpi_pm.PM_TMR_OFFSET, 4) == 0
    clock.now += 1_000_000_000
    assert pm.read(acpi_pm.PM_TMR_OFFSET, 4) == acpi_pm.PM_TIMER_HZ
    assert pm.read(acpi_pm.PM_TMR_OFFSET + 1, 1) == (acpi_pm.PM_TIMER_HZ >> 8) & 0xFF
    clock.now += 5_000_000_000  # 21.5 M ticks: wrapped past 2**24
    assert pm.read(acpi_pm.PM_TMR_OFFSET, 4) == (6 * acpi_pm.PM_TIMER_HZ) & 0xFFFFFF
    pm.write(acpi_pm.PM_TMR_OFFSET, 4, 0)  # read-only
    assert pm.read(acpi_pm.PM_TMR_OFFSET, 4) == (6 * acpi_pm.PM_TIMER_HZ) & 0xFFFFFF


def test_the_timer_read_whole_agrees_with_its_bytes_read_apart(pm: AcpiPm, clock: Nanoseconds) -> None:
    # A 4-byte read of PM_TMR takes a shortcut; 1- and 2-byte reads go through
    # the register file: both must see the same count.
    clock.now += 1_234_567_891
    whole = pm.read(8, 4)
    assert whole == pm.timer() != 0
    assert pm.read(8, 2) | pm.read(10, 2) << 16 == whole
    assert [pm.read(8 + i, 1) for i in range(4)] == list(whole.to_bytes(4, "little"))
