"""The PC's 8254 programmable interval timer, in userspace: counters 0-2 at
ports 0x40-0x42, the control word at 0x43, and the counter-2 gate and output in
port 0x61 (the PC's "port B").

For machines without the hypervisor's PIT (no ``IRQCHIP``, or ``--irqchip
userspace``).  Counter 0's output is IRQ 0: each rising edge is a pulse on the
``irq0`` line, from the timer thread of :mod:`pyvmm.machine.userspace_irqchip`,
which asks :meth:`Pit8254.next_irq_deadline` when the next edge is due and calls
:meth:`Pit8254.expire` then.  Counter 2's gate and output are what guests use to
calibrate their clocks (port 0x61 bits 0 and 5).  Counter 1 (DRAM refresh on
the PC) counts but drives nothing; port 0x61 bit 4 toggles as refresh does.

The counters run at 1.193182 MHz of the host's monotonic clock: a count read
back is where a real 8254 would be now.  What is modelled, as the 8254 data
sheet describes the part:

* the six modes (0 interrupt on terminal count, 1 retriggerable one-shot, 2 rate
  generator, 3 square wave, 4 and 5 software/hardware triggered strobe), binary
  or BCD counts, a count of 0 meaning the largest (65536, or 10000 in BCD);
* LSB-only, MSB-only and LSB-then-MSB access, the counter-latch command and the
  read-back command (count and status), the null-count status bit;
* the gate: counter 2's from port 0x61 (counters 0 and 1 have theirs tied high);
  low pauses modes 0 and 4, stops modes 2 and 3 (output high), a rising edge
  (re)triggers modes 1, 2, 3 and 5.

Timing is the host's: counter 0 edges closer together than
:data:`MIN_IRQ_INTERVAL_NS` are merged into one interrupt, as are edges the
machine could not deliver in time (the 8259 latches one request per input).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from pyvmm.devices.base import Device, IrqLine
from pyvmm.devices.state import DeviceState, DeviceStateError, Stateful, check_fields, take

PIT_HZ = 1_193_182
COUNTER_PORT = 0x40
PORT_COUNT = 4
PORT_B = 0x61
#: Counter 0 interrupts faster than this (10 kHz) are merged.
MIN_IRQ_INTERVAL_NS = 100_000
#: Port 0x61 bit 4 toggles at the DRAM refresh rate: every 15.085 us.
REFRESH_NS = 15_085

_CONTROL = 3
_NS = 1_000_000_000


def _ticks(ns: int) -> int:
    return ns * PIT_HZ // _NS


def _ns(ticks: int) -> int:
    return -(-ticks * _NS // PIT_HZ)  # rounded up: the edge has happened by then


def _from_bcd(value: int) -> int:
    return sum(((value >> (4 * digit)) & 0xF) * 10**digit for digit in range(4))


def _to_bcd(value: int) -> int:
    return sum(((value // 10**digit) % 10) << (4 * digit) for digit in range(4))


class _Counter:
    def __init__(self, index: int) -> None:
        self.index = index
        self.mode = 0
        self.access = 3  # 1: LSB, 2: MSB, 3: LSB then MSB
        self.bcd = False
        #: The count loaded, in ticks (0 written means the largest).
        self.count = 0x10000
        #: Counting: a count was loaded (and, for modes 1 and 5, the gate triggered).
        self.running = False
        self.loaded = False
        self.null_count = True
        #: Host time (ns) at which the current count started.
        self.start_ns = 0
        #: Ticks already counted when the gate paused a mode 0 or 4 count.
        self.paused_ticks: int | None = None
        self.gate = index != 2
        self.out_initial = True
        self.latched: list[int] = []
        self.status: int | None = None
        self.low_written: int | None = None
        self.read_msb_next = False
        #: How many counter-0 rising edges have already been signalled.
        self.edges_done = 0

    # --- counting -------------------------------------------------------------------
    def elapsed(self, now: int) -> int:
        """Ticks counted since the count started."""
        if self.paused_ticks is not None:
            return self.paused_ticks
        return _ticks(max(now - self.start_ns, 0))

    def value(self, now: int) -> int:
        """The counting element now (what a latch captures), binary."""
        if not self.running:
            return self.count & 0xFFFF
        d = self.elapsed(now)
        count = self.count
        if self.mode in (2, 3) and not self.gate:
            return count & 0xFFFF
        if self.mode == 2:
            return (count - d % count) & 0xFFFF
        if self.mode == 3:
            return (count - (2 * d) % count) & 0xFFFF
        return (count - d) & 0xFFFF

    def output(self, now: int) -> bool:
        if not self.running:
            return self.out_initial
        d = self.elapsed(now)
        count = self.count
        if self.mode == 0:
            return d >= count
        if self.mode == 1:
            return d >= count
        if self.mode == 2:
            return not self.gate or (d + 1) % count != 0 or d == 0
        if self.mode == 3:
            return not self.gate or d % count < (count + 1) // 2
        return d != count  # modes 4 and 5: one tick low at the terminal count

    def edges(self, now: int) -> int:
        """Rising edges of the output since the count started (counter 0's IRQs)."""
        if not self.running or (self.mode in (2, 3) and not self.gate):
            return 0
        d = self.elapsed(now)
        if self.mode in (2, 3):
            return d // self.count
        if self.mode == 0:
            return 1 if d >= self.count else 0
        if self.mode in (4, 5):
            return 1 if d >= self.count + 1 else 0
        return 0  # mode 1's output rises at the end of its one shot, but IRQ 0 never triggers it

    def edge_time(self, number: int) -> int | None:
        """Host time of rising edge ``number`` (1-based), or None if there is none."""
        if not self.running or self.paused_ticks is not None or (self.mode in (2, 3) and not self.gate):
            return None
        if self.mode in (2, 3):
            return self.start_ns + _ns(number * self.count)
        if number != 1:
            return None
        if self.mode == 0:
            return self.start_ns + _ns(self.count)
        if self.mode in (4, 5):
            return self.start_ns + _ns(self.count + 1)
        return None

    # --- programming ----------------------------------------------------------------
    def program(self, access: int, mode: int, bcd: bool) -> None:
        self.access, self.mode, self.bcd = access, mode if mode < 6 else mode - 4, bcd
        self.running = self.loaded = False
        self.paused_ticks = None
        self.null_count = True
        self.low_written = None
        self.read_msb_next = False
        self.latched.clear()
        self.status = None
        self.out_initial = self.mode != 0
        self.edges_done = 0

    def load(self, raw: int, now: int) -> None:
        # A count of 0 is the largest: 10000 in BCD, 65536 in binary.
        self.count = (_from_bcd(raw) or 10000) if self.bcd else (raw or 0x10000)
        self.loaded = True
        self.null_count = False
        self.edges_done = 0
        self.paused_ticks = None
        if self.mode in (1, 5):
            self.running = False  # waits for a rising gate edge
            self.out_initial = True
            return
        self.running = True
        self.start_ns = now
        if self.mode in (0, 4) and not self.gate:
            self.paused_ticks = 0

    def set_gate(self, gate: bool, now: int) -> None:
        if gate == self.gate:
            return
        self.gate = gate
        if not self.loaded:
            return
        if self.mode in (0, 4):
            if not gate:
                self.paused_ticks = self.elapsed(now)
            elif self.paused_ticks is not None:
                self.start_ns = now - _ns(self.paused_ticks)
                self.paused_ticks = None
        elif gate:  # modes 1, 2, 3, 5: a rising edge (re)starts the count
            self.running = True
            self.start_ns = now
            self.edges_done = 0

    def status_byte(self, now: int) -> int:
        mode = self.mode
        return int(self.output(now)) << 7 | int(self.null_count) << 6 | self.access << 4 | mode << 1 | int(self.bcd)

    def latch_count(self, now: int) -> None:
        if self.latched:
            return  # a latched count stays until read
        value = self.value(now)
        if self.bcd:
            value = _to_bcd(value % 10000)
        if self.access == 1:
            self.latched = [value & 0xFF]
        elif self.access == 2:
            self.latched = [value >> 8]
        else:
            self.latched = [value & 0xFF, value >> 8]


#: A counter's state fields and their widths in bits (0: a flag); -1 stands for
#: None in the optional ones.
_COUNTER_FIELDS = {
    "mode": 3,
    "access": 2,
    "bcd": 0,
    "count": 17,
    "running": 0,
    "loaded": 0,
    "null_count": 0,
    "gate": 0,
    "out_initial": 0,
    "read_msb_next": 0,
    "edges_done": 64,
}
_COUNTER_OPTIONAL = {"paused_ticks": 64, "status": 8, "low_written": 8}


def _optional(device: str, state: DeviceState, key: str, bits: int) -> int | None:
    value = state.get(key)
    if value == -1 and not isinstance(value, bool):
        return None
    return take(device, state, key, int, bits)


class Pit8254:
    """The 8254 and port 0x61.

    :param irq0: counter 0's output: pulsed (raised, then lowered) at each rising edge.
    :param on_reprogram: called (outside the lock) when counter 0's timing
        changed, so the timer thread asks :meth:`next_irq_deadline` again.
    :param clock: host time in ns (monotonic).
    """

    def __init__(
        self,
        irq0: IrqLine | None = None,
        on_reprogram: Callable[[], None] | None = None,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.counters = (_Counter(0), _Counter(1), _Counter(2))
        self.irq0 = irq0
        self.on_reprogram = on_reprogram
        self.clock = clock
        self._lock = threading.Lock()
        self.port_b = 0  # bits 0-3 as written: gate 2, speaker data, parity and I/O-check enables

    # --- counter 0 and the timer thread ------------------------------------------
    def next_irq_deadline(self) -> int | None:
        """Host time (ns) of counter 0's next rising edge not yet signalled, or None."""
        with self._lock:
            counter = self.counters[0]
            when = counter.edge_time(counter.edges_done + 1)
            if when is None or counter.edges_done == 0:
                return when
            # Edges closer together than the floor are merged into the next one.
            previous = counter.edge_time(counter.edges_done)
            return when if previous is None else max(when, previous + MIN_IRQ_INTERVAL_NS)

    def expire(self) -> bool:
        """Signal counter 0's rising edges that have happened since the last call:
        one IRQ 0 pulse however many (the 8259 latches one request).  True if it
        pulsed."""
        with self._lock:
            counter = self.counters[0]
            edges = counter.edges(self.clock())
            fire = edges > counter.edges_done
            if fire:
                counter.edges_done = edges
        if fire and self.irq0 is not None:
            self.irq0(True)
            self.irq0(False)
        return fire

    def counting(self) -> bool:
        """Whether counter 0 will raise IRQ 0 again (it runs, in a periodic mode or
        before its one edge)."""
        return self.next_irq_deadline() is not None

    # --- ports -------------------------------------------------------------------
    def read(self, offset: int) -> int:
        with self._lock:
            if offset == _CONTROL:
                return 0xFF  # the control word is write-only
            counter = self.counters[offset]
            if counter.status is not None:
                status, counter.status = counter.status, None
                return status
            if counter.latched:
                return counter.latched.pop(0)
            now = self.clock()
            value = counter.value(now)
            if counter.bcd:
                value = _to_bcd(value % 10000)
            if counter.access == 1:
                return value & 0xFF
            if counter.access == 2:
                return value >> 8
            msb, counter.read_msb_next = counter.read_msb_next, not counter.read_msb_next
            return value >> 8 if msb else value & 0xFF

    def write(self, offset: int, value: int) -> None:
        value &= 0xFF
        reprogrammed = False
        with self._lock:
            now = self.clock()
            if offset == _CONTROL:
                reprogrammed = self._control(value, now)
            else:
                counter = self.counters[offset]
                if counter.access == 1:
                    counter.load(value, now)
                elif counter.access == 2:
                    counter.load(value << 8, now)
                elif counter.low_written is None:
                    counter.low_written = value
                    if counter.mode == 0:
                        # Mode 0: writing the first byte stops the count (output low).
                        counter.running = False
                        counter.out_initial = False
                else:
                    counter.load(counter.low_written | value << 8, now)
                    counter.low_written = None
                reprogrammed = offset == 0 and counter.low_written is None
        if reprogrammed and self.on_reprogram is not None:
            self.on_reprogram()

    def _control(self, value: int, now: int) -> bool:
        select = value >> 6
        if select == 3:  # read-back: D5 clear latches counts, D4 clear latches status
            for index in range(3):
                if value & (2 << index):
                    counter = self.counters[index]
                    if not value & 0x20:
                        counter.latch_count(now)
                    if not value & 0x10 and counter.status is None:
                        counter.status = counter.status_byte(now)
            return False
        counter = self.counters[select]
        access = (value >> 4) & 3
        if access == 0:
            counter.latch_count(now)
            return False
        counter.program(access, (value >> 1) & 7, bool(value & 1))
        return select == 0

    def read_port_b(self) -> int:
        with self._lock:
            now = self.clock()
            refresh = (now // REFRESH_NS) & 1
            out2 = self.counters[2].output(now)
            return (self.port_b & 0x0F) | refresh << 4 | int(out2) << 5

    def write_port_b(self, value: int) -> None:
        with self._lock:
            self.port_b = value & 0x0F
            self.counters[2].set_gate(bool(value & 1), self.clock())

    # --- snapshots (pyvmm.devices.state) ------------------------------------------
    name = "pit"
    state_version = 1

    def save_state(self) -> DeviceState:
        """Every counter as the guest sees it; a count's start as the time
        elapsed since, so a restored counter goes on from where it was."""
        state: DeviceState = {"port_b": self.port_b}
        with self._lock:
            now = self.clock()
            for counter in self.counters:
                prefix = f"counter{counter.index}_"
                for field in _COUNTER_FIELDS:
                    state[prefix + field] = getattr(counter, field)
                for field in _COUNTER_OPTIONAL:
                    value = getattr(counter, field)
                    state[prefix + field] = -1 if value is None else value
                state[prefix + "elapsed_ns"] = max(0, now - counter.start_ns)
                state[prefix + "latched"] = bytes(counter.latched)
        return state

    def load_state(self, state: DeviceState) -> None:
        prefixes = [f"counter{counter.index}_" for counter in self.counters]
        names = {"port_b"} | {
            p + f for p in prefixes for f in [*_COUNTER_FIELDS, *_COUNTER_OPTIONAL, "elapsed_ns", "latched"]
        }
        check_fields(self.name, state, names)
        port_b = take(self.name, state, "port_b", int, 4)
        fields: dict[str, int | bool | None] = {}
        latched: dict[str, list[int]] = {}
        elapsed: dict[str, int] = {}
        for p in prefixes:
            for field, bits in _COUNTER_FIELDS.items():
                key = p + field
                fields[key] = take(self.name, state, key, bool) if bits == 0 else take(self.name, state, key, int, bits)
            for field, bits in _COUNTER_OPTIONAL.items():
                fields[p + field] = _optional(self.name, state, p + field, bits)
            elapsed[p] = take(self.name, state, p + "elapsed_ns", int)
            latched[p] = list(take(self.name, state, p + "latched", bytes))
            if len(latched[p]) > 2 or fields[p + "mode"] not in range(6):
                raise DeviceStateError(f"device {self.name}: {p[:-1]}: latched bytes or mode out of range")
        with self._lock:
            now = self.clock()
            self.port_b = port_b
            for counter, p in zip(self.counters, prefixes, strict=True):
                for field in [*_COUNTER_FIELDS, *_COUNTER_OPTIONAL]:
                    setattr(counter, field, fields[p + field])
                counter.latched = latched[p]
                counter.start_ns = now - elapsed[p]
        if self.on_reprogram is not None:
            self.on_reprogram()  # the timer thread looks at the restored deadline

    def devices(self) -> tuple[_PitPorts, _PortB]:
        """The port devices: the counters and control word (0x40), port B (0x61)."""
        return _PitPorts(self), _PortB(self)


class _PitPorts(Device):
    name = "pit"

    def __init__(self, pit: Pit8254) -> None:
        self._pit = pit
        #: Called when the machine stops (the timer thread goes with it).
        self.on_close: Callable[[], None] | None = None

    def state_holder(self) -> Stateful:
        return self._pit

    def read(self, offset: int, size: int) -> int:
        return self._pit.read(offset)

    def write(self, offset: int, size: int, value: int) -> None:
        self._pit.write(offset, value)

    def close(self) -> None:
        if self.on_close is not None:
            self.on_close()


class _PortB(Device):
    name = "port-b"

    def __init__(self, pit: Pit8254) -> None:
        self._pit = pit

    def state_holder(self) -> Stateful:
        return self._pit

    def read(self, offset: int, size: int) -> int:
        return self._pit.read_port_b()

    def write(self, offset: int, size: int, value: int) -> None:
        self._pit.write_port_b(value)
