"""The PC's MC146818 real-time clock and CMOS RAM at ports 0x70 (index) and 0x71
(data).

=========  =================================================================
index      register
=========  =================================================================
0 2 4      seconds, minutes, hours (BCD or binary, 12- or 24-hour, per B)
1 3 5      the alarm for each; a value with both top bits set matches any
6 7 8 9    day of week (1 = Sunday), day of month, month, year (two digits)
0x0a       A: bit 7 UIP, the update in progress; divider and rate (0x26)
0x0b       B: SET, PIE, AIE, UIE, SQWE, DM (binary), 24-hour, DSE
0x0c       C: IRQF, PF, AF, UF; reading clears it
0x0d       D: bit 7, the battery is good
0x32       century (as QEMU and the ACPI FADT's ``century`` field say)
others     battery-backed RAM
=========  =================================================================

The clock is the host's UTC time (QEMU's default ``-rtc base=utc``) plus
whatever the guest sets; while B.SET is 1 the time stands still, as the chip
stops updating.  Bit 7 of the index port (NMI disable) is kept and ignored.

Nothing ticks in the background: the registers are computed from the host clock
when read, and register C's flags from the updates (one a second) and periodic
ticks that passed since it was last read.  IRQ 8 is therefore never raised; a
guest polls C, or waits for the alarm while suspended (:meth:`Rtc.next_alarm`,
which the ACPI sleep code uses as the wake-up time).

UIP reads 1 during the last :data:`UIP_WINDOW` seconds before each update.  The
chip's window is 244 us, shorter than a round trip through pyvmm's port exits
on a slow host, and a guest that waits for UIP to rise (s3.flat does) would
then spin for seconds; a wider window only makes a guest that waits for UIP to
fall wait a little longer.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from pyvmm.devices.base import Device
from pyvmm.devices.state import DeviceState, DeviceStateError, check_fields, take

INDEX_PORT = 0x70
PORT_COUNT = 2
CMOS_SIZE = 128

REG_SECONDS, REG_SECONDS_ALARM = 0x00, 0x01
REG_MINUTES, REG_MINUTES_ALARM = 0x02, 0x03
REG_HOURS, REG_HOURS_ALARM = 0x04, 0x05
REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR = 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
REG_CENTURY = 0x32

A_UIP = 0x80
A_DIVIDER_MASK = 0x70
#: The 32.768 kHz time base, dividers running; rate 6 (1024 Hz).
A_DEFAULT = 0x26
_A_DIVIDER_RUNNING = 0x20

B_SET = 0x80
B_PIE = 0x40
B_AIE = 0x20
B_UIE = 0x10
B_BINARY = 0x04
B_24H = 0x02
B_DEFAULT = B_24H

C_IRQF = 0x80
C_PF = 0x40
C_AF = 0x20
C_UF = 0x10

D_VRT = 0x80
ALARM_DONT_CARE = 0xC0
HOUR_PM = 0x80

UIP_WINDOW = 0.01
#: An alarm with every field given recurs daily: no need to look further ahead.
_ALARM_HORIZON = 86400

_ALARMS = ((REG_SECONDS_ALARM, REG_SECONDS), (REG_MINUTES_ALARM, REG_MINUTES), (REG_HOURS_ALARM, REG_HOURS))
_TIME_REGISTERS = (REG_SECONDS, REG_MINUTES, REG_HOURS, REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR, REG_CENTURY)


class Rtc(Device):
    """The clock and its CMOS RAM.

    :param clock: the host's time in seconds since the epoch (UTC); tests pass
        their own.
    """

    name = "rtc"
    state_version = 1

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.cmos = bytearray(CMOS_SIZE)
        self.cmos[REG_A] = A_DEFAULT
        self.cmos[REG_B] = B_DEFAULT
        self.cmos[REG_D] = D_VRT
        self.index = 0
        self.nmi_disabled = False
        #: Guest time minus host time, in seconds.
        self._offset = 0.0
        #: The guest time while B.SET holds it still.
        self._held: float | None = None
        #: Guest time of the last read of register C: flags count from there.
        self._flags_since = self.guest_time()
        self._lock = threading.Lock()

    # --- time -------------------------------------------------------------------
    def guest_time(self) -> float:
        """The clock's time, in seconds since the epoch."""
        return self._held if self._held is not None else self._clock() + self._offset

    def seconds_until(self, guest_time: float) -> float:
        """How long until the clock shows ``guest_time`` (negative: it has)."""
        return guest_time - self.guest_time()

    def _binary(self) -> bool:
        return bool(self.cmos[REG_B] & B_BINARY)

    def _encode(self, value: int) -> int:
        return value if self._binary() else (value // 10) << 4 | value % 10

    def _decode(self, value: int) -> int:
        return value if self._binary() else (value >> 4) * 10 + (value & 0xF)

    def _encode_hour(self, hour: int) -> int:
        if self.cmos[REG_B] & B_24H:
            return self._encode(hour)
        twelve = hour % 12 or 12
        return self._encode(twelve) | (HOUR_PM if hour >= 12 else 0)

    def _decode_hour(self, value: int) -> int:
        if self.cmos[REG_B] & B_24H:
            return self._decode(value)
        hour = self._decode(value & ~HOUR_PM) % 12
        return hour + 12 if value & HOUR_PM else hour

    def _fields(self, seconds: int) -> dict[int, int]:
        tm = time.gmtime(seconds)
        return {
            REG_SECONDS: self._encode(tm.tm_sec),
            REG_MINUTES: self._encode(tm.tm_min),
            REG_HOURS: self._encode_hour(tm.tm_hour),
            REG_WEEKDAY: self._encode((tm.tm_wday + 1) % 7 + 1),
            REG_DAY: self._encode(tm.tm_mday),
            REG_MONTH: self._encode(tm.tm_mon),
            REG_YEAR: self._encode(tm.tm_year % 100),
            REG_CENTURY: self._encode(tm.tm_year // 100),
        }

    def _set_field(self, index: int, value: int) -> None:
        now = self.guest_time()
        whole = math.floor(now)
        tm = time.gmtime(whole)
        parts = [tm.tm_year, tm.tm_mon, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec]
        if index == REG_SECONDS:
            parts[5] = self._decode(value)
        elif index == REG_MINUTES:
            parts[4] = self._decode(value)
        elif index == REG_HOURS:
            parts[3] = self._decode_hour(value)
        elif index == REG_DAY:
            parts[2] = self._decode(value)
        elif index == REG_MONTH:
            parts[1] = self._decode(value)
        elif index == REG_YEAR:
            parts[0] = parts[0] // 100 * 100 + self._decode(value)
        elif index == REG_CENTURY:
            parts[0] = self._decode(value) * 100 + parts[0] % 100
        else:
            return  # the day of week follows from the date
        import calendar  # here: only a guest that sets the clock needs it

        wanted = calendar.timegm((*parts, 0, 0, 0)) + (now - whole)
        if self._held is not None:
            self._held = wanted
        else:
            self._offset += wanted - now

    # --- alarm and flags ------------------------------------------------------------
    def _alarm_matches(self, seconds: int) -> bool:
        fields = self._fields(seconds)
        for alarm, current in _ALARMS:
            wanted = self.cmos[alarm]
            if wanted & ALARM_DONT_CARE != ALARM_DONT_CARE and wanted != fields[current]:
                return False
        return True

    def _updating(self) -> bool:
        return self._held is None and self.cmos[REG_A] & A_DIVIDER_MASK == _A_DIVIDER_RUNNING

    def next_alarm(self) -> float | None:
        """The guest time of the next update that raises the alarm flag with the
        alarm interrupt enabled (B.AIE), or None if none will."""
        with self._lock:
            if not self.cmos[REG_B] & B_AIE or not self._updating():
                return None
            first = math.floor(self.guest_time()) + 1
            for second in range(first, first + _ALARM_HORIZON):
                if self._alarm_matches(second):
                    return float(second)
            return None

    def _periodic_seconds(self) -> float | None:
        rate = self.cmos[REG_A] & 0x0F
        if rate == 0:
            return None
        # Rates 1 and 2 repeat 8 and 9 (the 32.768 kHz base only divides from 3 up).
        return float(1 << (rate + 6 if rate <= 2 else rate - 1)) / 32768.0

    def _collect_flags(self) -> int:
        now = self.guest_time()
        since, self._flags_since = self._flags_since, now
        flags = 0
        if self._updating():
            first, last = math.floor(since) + 1, math.floor(now)
            if last >= first:
                flags |= C_UF
                if any(self._alarm_matches(s) for s in range(max(first, last - _ALARM_HORIZON + 1), last + 1)):
                    flags |= C_AF
            period = self._periodic_seconds()
            if period is not None and math.floor(now / period) > math.floor(since / period):
                flags |= C_PF
        if flags & self.cmos[REG_B] & (C_PF | C_AF | C_UF):
            flags |= C_IRQF
        return flags

    def set_alarm_flag(self) -> None:
        """Latch AF (and IRQF) in register C: the alarm woke the machine."""
        with self._lock:
            self.cmos[REG_C] |= C_AF | C_IRQF

    # --- ports ----------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset == 0:
            return self.index | (0x80 if self.nmi_disabled else 0)
        with self._lock:
            index = self.index
            if index in _TIME_REGISTERS:
                return self._fields(math.floor(self.guest_time()))[index]
            if index == REG_A:
                uip = self._updating() and self.guest_time() % 1.0 >= 1.0 - UIP_WINDOW
                return self.cmos[REG_A] | (A_UIP if uip else 0)
            if index == REG_C:
                value = self.cmos[REG_C] | self._collect_flags()
                self.cmos[REG_C] = 0
                return value
            return self.cmos[index]

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == 0:
            self.index = value & 0x7F
            self.nmi_disabled = bool(value & 0x80)
            return
        with self._lock:
            index = self.index
            if index in _TIME_REGISTERS:
                self._set_field(index, value)
            elif index == REG_A:
                self.cmos[REG_A] = value & ~A_UIP
            elif index == REG_B:
                self._write_b(value)
            elif index in (REG_C, REG_D):
                return  # read-only
            else:
                self.cmos[index] = value

    # --- snapshots ------------------------------------------------------------------
    def save_state(self) -> DeviceState:
        """The CMOS and the clock as the guest sees it.  Times are guest time in
        nanoseconds: a restored clock goes on from the time it showed, as the
        vCPUs' TSC and kvmclock do, not from the host's time now."""
        with self._lock:
            return {
                "cmos": bytes(self.cmos),
                "index": self.index,
                "nmi_disabled": self.nmi_disabled,
                "guest_time_ns": round(self.guest_time() * 1e9),
                "held": self._held is not None,
                "flags_since_ns": round(self._flags_since * 1e9),
            }

    def load_state(self, state: DeviceState) -> None:
        name = self.name
        check_fields(name, state, {"cmos", "index", "nmi_disabled", "guest_time_ns", "held", "flags_since_ns"})
        cmos = take(name, state, "cmos", bytes)
        if len(cmos) != CMOS_SIZE:
            raise DeviceStateError(f"device {name}: the CMOS is {CMOS_SIZE} bytes, not {len(cmos)}")
        index = take(name, state, "index", int, 7)
        nmi_disabled = take(name, state, "nmi_disabled", bool)
        guest_time = take(name, state, "guest_time_ns", int) / 1e9
        held = take(name, state, "held", bool)
        flags_since = take(name, state, "flags_since_ns", int) / 1e9
        with self._lock:
            self.cmos[:] = cmos
            self.index, self.nmi_disabled = index, nmi_disabled
            self._held = guest_time if held else None
            self._offset = guest_time - self._clock()
            self._flags_since = flags_since

    def _write_b(self, value: int) -> None:
        if value & B_SET and self._held is None:
            self._held = self.guest_time()
        elif not value & B_SET and self._held is not None:
            self._offset = self._held - self._clock()
            self._held = None
        if value & B_SET:
            value &= ~B_UIE  # the chip clears UIE while SET is 1
        self.cmos[REG_B] = value
