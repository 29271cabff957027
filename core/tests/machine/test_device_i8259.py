"""The userspace 8259A pair: initialisation, priorities and nesting, EOIs, the
cascade, edge and level inputs, the ELCR, status reads, poll and automatic EOI."""

from __future__ import annotations

import pytest

from pyvmm.devices.i8259 import PicPair


def initialised(master_base: int = 0x20, slave_base: int = 0x28, *, icw4: int = 0x01) -> PicPair:
    """A pair as a PC BIOS or kernel leaves it: cascaded on IR2, every input open."""
    pic = PicPair()
    for chip, base, icw3 in ((pic.master, master_base, 0x04), (pic.slave, slave_base, 0x02)):
        pic.port_write(chip, 0, 0x11)  # ICW1: edge, cascade, ICW4 follows
        pic.port_write(chip, 1, base)  # ICW2
        pic.port_write(chip, 1, icw3)  # ICW3
        pic.port_write(chip, 1, icw4)  # ICW4
        pic.port_write(chip, 1, 0x00)  # OCW1: nothing masked
    return pic


def pulse(pic: PicPair, line: int) -> None:
    pic.set_irq(line, True)
    pic.set_irq(line, False)


def eoi(pic: PicPair, slave: bool = False) -> None:
    if slave:
        pic.port_write(pic.slave, 0, 0x20)
    pic.port_write(pic.master, 0, 0x20)


def test_nothing_is_delivered_before_the_guest_initialises_the_pair() -> None:
    pic = PicPair()
    pulse(pic, 4)
    assert not pic.has_interrupt()
    assert pic.acknowledge() is None


def test_an_edge_is_delivered_once_until_its_eoi() -> None:
    pic = initialised()
    pulse(pic, 4)
    assert pic.has_interrupt()
    assert pic.acknowledge() == 0x24
    assert not pic.has_interrupt()
    pulse(pic, 4)
    assert not pic.has_interrupt(), "the same input is in service: it waits for the EOI"
    eoi(pic)
    assert pic.acknowledge() == 0x24


def test_priorities_and_nesting() -> None:
    pic = initialised()
    pulse(pic, 3)
    pulse(pic, 0)
    assert pic.acknowledge() == 0x20, "IR0 has the highest priority"
    assert not pic.has_interrupt(), "IR3 is lower than IR0 in service"
    eoi(pic)
    assert pic.acknowledge() == 0x23
    pulse(pic, 1)
    assert pic.acknowledge() == 0x21, "a higher priority interrupts a lower one in service"
    pic.port_write(pic.master, 0, 0x0B)  # OCW3: read the ISR
    assert pic.port_read(pic.master, 0) == 0b1010
    eoi(pic)  # non-specific: the highest in service, IR1
    assert pic.port_read(pic.master, 0) == 0b1000


def test_masked_inputs_wait_and_unmasking_delivers_them() -> None:
    pic = initialised()
    pic.port_write(pic.master, 1, 0x10)
    pulse(pic, 4)
    assert not pic.has_interrupt() and pic.line_masked(4)
    assert pic.port_read(pic.master, 0) == 0x10, "the request is in the IRR"
    pic.port_write(pic.master, 1, 0x00)
    assert pic.acknowledge() == 0x24


def test_the_slave_cascades_through_ir2() -> None:
    pic = initialised()
    pulse(pic, 10)
    assert pic.acknowledge() == 0x2A
    pic.port_write(pic.master, 0, 0x0B)
    pic.port_write(pic.slave, 0, 0x0B)
    assert (pic.port_read(pic.master, 0), pic.port_read(pic.slave, 0)) == (0x04, 0x04)
    eoi(pic, slave=True)
    pulse(pic, 14)
    assert pic.acknowledge() == 0x2E
    pic.port_write(pic.master, 1, 0x04)  # the cascade masked: no slave input gets through
    pulse(pic, 9)
    assert not pic.has_interrupt() and pic.line_masked(9)


def test_a_level_input_follows_its_line_and_interrupts_again_after_the_eoi() -> None:
    pic = initialised()
    pic.elcr_write(1, 0x08)  # IRQ 11 level-triggered
    assert pic.elcr_read(1) == 0x08
    pic.set_irq(11, True)
    assert pic.acknowledge() == 0x2B
    eoi(pic, slave=True)
    assert pic.acknowledge() == 0x2B, "still high after the EOI: again"
    pic.set_irq(11, False)
    eoi(pic, slave=True)
    assert not pic.has_interrupt(), "low before the EOI: nothing more"


def test_a_request_that_vanishes_before_the_slave_answers_is_spurious() -> None:
    pic = initialised()
    pic.elcr_write(1, 0x08)
    pic.set_irq(11, True)
    assert pic.has_interrupt()
    pic.set_irq(11, False)  # dropped: the master's IR2 edge is still latched
    assert pic.acknowledge() == 0x2F, "the slave's IR7: spurious"
    pic.port_write(pic.slave, 0, 0x0B)
    assert pic.port_read(pic.slave, 0) == 0, "a spurious interrupt is not in service"


def test_the_elcr_cannot_make_the_timer_keyboard_or_cascade_level() -> None:
    pic = PicPair()
    pic.elcr_write(0, 0xFF)
    pic.elcr_write(1, 0xFF)
    assert (pic.elcr_read(0), pic.elcr_read(1)) == (0xF8, 0xDE)
    devices = pic.devices()
    devices[2].write(0, 2, 0x0000)
    assert devices[2].read(0, 2) == 0


def test_specific_eoi_rotation_and_set_priority() -> None:
    pic = initialised()
    pulse(pic, 5)
    assert pic.acknowledge() == 0x25
    pic.port_write(pic.master, 0, 0x60 | 5)  # specific EOI for IR5
    pic.port_write(pic.master, 0, 0x0B)
    assert pic.port_read(pic.master, 0) == 0
    pic.port_write(pic.master, 0, 0xC0 | 3)  # set priority: IR3 lowest, IR4 highest
    pulse(pic, 1)
    pulse(pic, 6)
    assert pic.acknowledge() == 0x26, "IR6 is above IR1 now"
    pic.port_write(pic.master, 0, 0xA0)  # rotate on non-specific EOI: IR6 becomes lowest
    assert pic.acknowledge() == 0x21


def test_poll_mode_reads_and_acknowledges() -> None:
    pic = initialised()
    pulse(pic, 6)
    pic.port_write(pic.master, 0, 0x0C)  # OCW3: poll
    assert pic.port_read(pic.master, 0) == 0x86
    assert not pic.has_interrupt(), "polled: in service"
    pic.port_write(pic.master, 0, 0x0C)
    assert pic.port_read(pic.master, 0) == 0


def test_automatic_eoi_leaves_nothing_in_service() -> None:
    pic = initialised(icw4=0x03)
    pulse(pic, 4)
    assert pic.acknowledge() == 0x24
    pulse(pic, 4)
    assert pic.acknowledge() == 0x24, "no EOI needed"


def test_icw1_forgets_edges_but_keeps_a_level_request() -> None:
    pic = initialised()
    pic.elcr_write(0, 0x20)  # IRQ 5 level
    pic.set_irq(5, True)
    pulse(pic, 4)
    pic.port_write(pic.master, 0, 0x11)
    for value in (0x20, 0x04, 0x01, 0x00):
        pic.port_write(pic.master, 1, value)
    assert pic.acknowledge() == 0x25
    eoi(pic)
    assert pic.acknowledge() == 0x25, "the line is still high"


def test_changes_are_reported_and_bad_lines_refused() -> None:
    seen: list[bool] = []
    pic = initialised()
    pic.on_change = lambda: seen.append(pic.has_interrupt())
    pulse(pic, 3)
    assert seen and seen[0] is True
    with pytest.raises(ValueError, match="0-15"):
        pic.set_irq(16, True)


def test_the_port_devices_use_the_low_address_bit() -> None:
    pic = PicPair()
    master = pic.devices()[0]
    for value, port in ((0x11, 0), (0x40, 1), (0x04, 1), (0x01, 1), (0xFE, 1)):
        master.write(port, 1, value)
    assert master.read(1, 1) == 0xFE
    pulse(pic, 0)
    assert pic.acknowledge() == 0x40
