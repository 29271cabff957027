"""The userspace 8254 on a clock the test moves: counts read back, latches and
read-back, the modes' outputs, counter 0's interrupt edges, and port 0x61."""

from __future__ import annotations

from pyvmm.devices.i8254 import MIN_IRQ_INTERVAL_NS, PIT_HZ, Pit8254

NS = 1_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now = 10 * NS

    def __call__(self) -> int:
        return self.now

    def advance_ticks(self, ticks: int) -> None:
        self.now += -(-ticks * NS // PIT_HZ)


def pit_with(clock: Clock) -> tuple[Pit8254, list[bool], list[str]]:
    irq: list[bool] = []
    programmed: list[str] = []
    pit = Pit8254(irq0=irq.append, on_reprogram=lambda: programmed.append("counter 0"), clock=clock)
    return pit, irq, programmed


def load(pit: Pit8254, counter: int, mode: int, count: int, *, access: int = 3, bcd: bool = False) -> None:
    pit.write(3, counter << 6 | access << 4 | mode << 1 | int(bcd))
    if access in (1, 3):
        pit.write(counter, count & 0xFF)
    if access in (2, 3):
        pit.write(counter, count >> 8 & 0xFF)


def read16(pit: Pit8254, counter: int) -> int:
    low = pit.read(counter)
    return low | pit.read(counter) << 8


def test_a_rate_generator_counts_down_and_interrupts_each_period() -> None:
    clock = Clock()
    pit, irq, programmed = pit_with(clock)
    load(pit, 0, 2, 1193)  # 1 kHz
    assert programmed == ["counter 0"] * 2, "the control word stops counter 0, the count starts it"
    assert read16(pit, 0) == 1193
    clock.advance_ticks(100)
    assert read16(pit, 0) == 1093
    assert pit.next_irq_deadline() == 10 * NS + -(-1193 * NS // PIT_HZ)
    assert not pit.expire() and irq == []
    clock.advance_ticks(1100)  # past the first period's end
    assert pit.expire() and irq == [True, False], "one pulse on IRQ 0"
    assert not pit.expire(), "each edge once"
    clock.advance_ticks(5 * 1193)
    assert pit.expire() and irq.count(True) == 2, "edges missed meanwhile are merged"
    assert pit.counting()


def test_the_latch_freezes_the_count_until_it_is_read() -> None:
    clock = Clock()
    pit, _, _ = pit_with(clock)
    load(pit, 1, 2, 1000)
    clock.advance_ticks(10)
    pit.write(3, 0x40)  # latch counter 1
    clock.advance_ticks(500)
    assert read16(pit, 1) == 990
    assert read16(pit, 1) == 490, "the latch is gone once read"


def test_read_back_latches_status_and_count() -> None:
    clock = Clock()
    pit, _, _ = pit_with(clock)
    load(pit, 0, 3, 0x1000)  # square wave, LSB then MSB, binary
    pit.write(3, 0xC2)  # read-back: count and status of counter 0
    status = pit.read(0)
    assert status == 0x80 | 0x30 | 3 << 1, "output high, count loaded, LSB/MSB, mode 3"
    assert read16(pit, 0) == 0x1000
    pit.write(3, 0x00 | 0x30 | 3 << 1)  # programmed again: null count until loaded
    pit.write(3, 0xE2)  # status only
    assert pit.read(0) & 0x40


def test_a_square_wave_is_high_for_half_the_period() -> None:
    clock = Clock()
    pit, _, _ = pit_with(clock)
    pit.write_port_b(0x01)  # gate 2 high
    load(pit, 2, 3, 1000)
    assert pit.read_port_b() & 0x20
    clock.advance_ticks(600)
    assert not pit.read_port_b() & 0x20
    clock.advance_ticks(500)
    assert pit.read_port_b() & 0x20


def test_mode_0_interrupts_once_at_the_terminal_count() -> None:
    clock = Clock()
    pit, irq, _ = pit_with(clock)
    load(pit, 0, 0, 500)
    pit.write(3, 0xE2)
    assert not pit.read(0) & 0x80, "output low while counting"
    clock.advance_ticks(501)
    assert pit.expire()
    assert pit.next_irq_deadline() is None and not pit.counting(), "one edge only"
    clock.advance_ticks(70000)
    assert not pit.expire() and irq == [True, False]


def test_the_gate_of_counter_2_pauses_mode_0() -> None:
    clock = Clock()
    pit, _, _ = pit_with(clock)
    load(pit, 2, 0, 1000)  # gate 2 is low: the count waits
    clock.advance_ticks(300)
    assert read16(pit, 2) == 1000
    pit.write_port_b(0x03)
    clock.advance_ticks(300)
    assert abs(read16(pit, 2) - 700) <= 1
    pit.write_port_b(0x02)
    clock.advance_ticks(300)
    assert abs(read16(pit, 2) - 700) <= 1
    assert pit.read_port_b() & 0x0F == 0x02


def test_bcd_and_single_byte_access() -> None:
    clock = Clock()
    pit, _, _ = pit_with(clock)
    load(pit, 1, 2, 0x0100, access=2, bcd=True)  # MSB only: BCD 0100 = 100
    clock.advance_ticks(1)
    assert pit.read(1) == 0x00, "MSB of BCD 0099"
    load(pit, 1, 2, 0x50, access=1)
    assert pit.read(1) == 0x50


def test_edges_closer_than_the_floor_are_merged() -> None:
    clock = Clock()
    pit, _, _ = pit_with(clock)
    load(pit, 0, 2, 2)  # 600 kHz
    clock.advance_ticks(2)
    assert pit.expire()
    deadline = pit.next_irq_deadline()
    assert deadline is not None and deadline - clock.now >= MIN_IRQ_INTERVAL_NS - 2000


def test_refresh_toggles_and_the_control_port_reads_ones() -> None:
    clock = Clock()
    pit, _, _ = pit_with(clock)
    first = pit.read_port_b() & 0x10
    clock.now += 15_085
    assert pit.read_port_b() & 0x10 != first
    assert pit.read(3) == 0xFF
