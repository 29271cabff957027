"""The ACPI fixed power-management registers: PM1a event and control blocks and
the PM timer, at the ports the firmware's FADT names (:data:`PM_BASE`).

=======  ====  ===============================================================
offset   size  register
=======  ====  ===============================================================
0        2     PM1_STS: write 1 to clear; WAK_STS and RTC_STS after a wake-up
2        2     PM1_EN: RTC_EN lets the RTC alarm wake the machine from S3
4        2     PM1_CNT: SCI_EN stays 1 (always in ACPI mode: the FADT has no
               SMI command port); SLP_TYP with SLP_EN enters a sleep state
8        4     PM_TMR: 24-bit count of a 3.579545 MHz clock, read-only
=======  ====  ===============================================================

The sleep types are PIIX4's, which QEMU and the firmware's ``\\_S3``/``\\_S5``
objects use: 1 suspends to RAM (S3), 0 powers off (S5); others are ignored.
The registers may be read or written at any width; a write that sets SLP_EN
acts once the byte holding it is stored.

What it does not do: raise the SCI (it has no interrupt line), or set TMR_STS
when the timer's top bit flips.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pyvmm.devices.base import Device
from pyvmm.devices.state import DeviceState, check_fields, take
from pyvmm.lazy_logging import LazyLogger
from pyvmm.served_io import PmTimerRegister, ServedSpan

# Loads logging only when a record goes out (start-up time).
log = LazyLogger("pyvmm.devices")

PM_BASE = 0x600
PM1_EVT_OFFSET = 0
PM1_EVT_LEN = 4
PM1_CNT_OFFSET = 4
PM1_CNT_LEN = 2
PM_TMR_OFFSET = 8
PM_TMR_LEN = 4
PORT_COUNT = 12

STS_TMR = 1 << 0
STS_PWRBTN = 1 << 8
STS_RTC = 1 << 10
STS_WAK = 1 << 15
EN_RTC = 1 << 10
CNT_SCI_EN = 1 << 0
CNT_SLP_TYP_SHIFT = 10
CNT_SLP_TYP_MASK = 0x7 << CNT_SLP_TYP_SHIFT
CNT_SLP_EN = 1 << 13

SLP_TYP_S5 = 0
SLP_TYP_S3 = 1

PM_TIMER_HZ = 3_579_545
_TIMER_MASK = 0xFF_FFFF


@dataclass(frozen=True)
class SleepEvents:
    """What a sleep request asks of the machine; each runs on the vCPU thread
    that wrote PM1_CNT and returns when the guest may go on."""

    suspend: Callable[[], None]
    poweroff: Callable[[], None]


class AcpiPm(Device):
    name = "acpi-pm"
    state_version = 1

    def __init__(self, events: SleepEvents, clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self._events = events
        self._clock_ns = clock_ns
        self._start_ns = clock_ns()
        self.status = 0
        self.enable = 0
        self.control = CNT_SCI_EN
        self._lock = threading.Lock()

    def served_spans(self) -> tuple[ServedSpan, ...]:
        """The timer, a pure function of the monotonic clock: the backend may
        answer it without an exit (``vmexit_inl_from_pmtimer``'s port read).
        Not with another clock, which the backend cannot read."""
        if self._clock_ns is not time.monotonic_ns:
            return ()
        return (ServedSpan(PM_TMR_OFFSET, PM_TMR_LEN, PmTimerRegister(self._start_ns)),)

    def timer(self) -> int:
        ticks = (self._clock_ns() - self._start_ns) * PM_TIMER_HZ // 1_000_000_000
        return ticks & _TIMER_MASK

    def save_state(self) -> DeviceState:
        # The timer as elapsed time: a restored one counts on from where it was.
        with self._lock:
            return {
                "status": self.status,
                "enable": self.enable,
                "control": self.control,
                "elapsed_ns": self._clock_ns() - self._start_ns,
            }

    def load_state(self, state: DeviceState) -> None:
        check_fields(self.name, state, {"status", "enable", "control", "elapsed_ns"})
        status = take(self.name, state, "status", int, 16)
        enable = take(self.name, state, "enable", int, 16)
        control = take(self.name, state, "control", int, 16)
        elapsed = take(self.name, state, "elapsed_ns", int)
        with self._lock:
            self.status, self.enable, self.control = status, enable, control
            self._start_ns = self._clock_ns() - elapsed

    def wake(self, by_rtc: bool) -> None:
        """The machine woke from a sleep state (by the RTC alarm if ``by_rtc``)."""
        with self._lock:
            self.status |= STS_WAK | (STS_RTC if by_rtc else 0)

    @property
    def rtc_wakes(self) -> bool:
        return bool(self.enable & EN_RTC)

    def read(self, offset: int, size: int) -> int:
        if offset == PM_TMR_OFFSET and size == PM_TMR_LEN:
            # The timer alone, as guests read it (an ``inl`` in a busy loop,
            # kvm-unit-tests' vmexit_inl_from_pmtimer): no lock (it reads no
            # register the guest writes) and no register file built per read.
            return (self._clock_ns() - self._start_ns) * PM_TIMER_HZ // 1_000_000_000 & _TIMER_MASK
        with self._lock:
            registers = (
                self.status.to_bytes(2, "little")
                + self.enable.to_bytes(2, "little")
                + self.control.to_bytes(2, "little")
                + bytes(2)
                + self.timer().to_bytes(4, "little")
            )
        return int.from_bytes(registers[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        sleep_type: int | None = None
        with self._lock:
            for i in range(size):
                where, byte = offset + i, (value >> (8 * i)) & 0xFF
                shift = 8 * (where % 2)
                if where in (0, 1):
                    self.status &= ~(byte << shift)
                elif where in (2, 3):
                    self.enable = (self.enable & ~(0xFF << shift)) | byte << shift
                elif where in (4, 5):
                    control = (self.control & ~(0xFF << shift)) | byte << shift
                    # SLP_EN always reads 0; SCI_EN 1, as there is no legacy mode to switch to.
                    self.control = (control & ~CNT_SLP_EN) | CNT_SCI_EN
                    if control & CNT_SLP_EN and where == 5:
                        sleep_type = (control & CNT_SLP_TYP_MASK) >> CNT_SLP_TYP_SHIFT
        # Outside the lock: a suspended guest's registers stay readable by other vCPUs.
        if sleep_type == SLP_TYP_S3:
            self._events.suspend()
        elif sleep_type == SLP_TYP_S5:
            self._events.poweroff()
        elif sleep_type is not None:
            log.warning("acpi-pm: sleep type %d is not supported (ignored)", sleep_type)
