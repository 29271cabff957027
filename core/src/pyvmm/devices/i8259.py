"""The PC's two 8259A interrupt controllers, in userspace: master at ports
0x20-0x21, slave at 0xa0-0xa1 cascaded on the master's IR2, and the PIIX
edge/level control registers (ELCR) at 0x4d0-0x4d1.

For machines whose hypervisor does not emulate the PC's interrupt controllers
(no ``IRQCHIP``, or ``--irqchip userspace``): devices drive its sixteen inputs
with :meth:`PicPair.set_irq`, and the machine's interrupt delivery
(:mod:`pyvmm.machine.userspace_irqchip`) reads the INT output
(:meth:`PicPair.has_interrupt`) and runs the interrupt-acknowledge cycle
(:meth:`PicPair.acknowledge`) to get the vector it injects.

What is modelled, as the 8259A data sheet describes the part:

* initialisation (ICW1-ICW4): vector base, single or cascaded, 8086 mode,
  automatic EOI, special fully nested mode; ICW1 clears the mask, the in-service
  register, the priority rotation and the edge detectors;
* the mask (OCW1), EOIs: non-specific, specific, with and without rotation, and
  set-priority (OCW2); reading the IRR or the ISR, poll mode and special mask
  mode (OCW3);
* edge-triggered inputs (a rising edge latches a request, which stays until it is
  acknowledged) and level-triggered ones (LTIM in ICW1, or the input's ELCR bit:
  the request follows the line);
* priorities, rotating or fixed, and nesting through the in-service register; an
  acknowledge with nothing to deliver gives the spurious IR7 vector.

Not modelled: the 8080/8085 call sequence (ICW4 bit 0 clear), buffered mode.

The pair is called from any thread (the vCPU's for port accesses, a timer's or
a device's for input lines); one lock keeps it consistent.  ``on_change`` is
called after any change that may have raised the INT output, outside the lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from pyvmm.devices.base import Device
from pyvmm.devices.state import DeviceState, DeviceStateError, Stateful, check_fields, take

MASTER_PORT = 0x20
SLAVE_PORT = 0xA0
PORT_COUNT = 2
ELCR_PORT = 0x4D0
ELCR_PORT_COUNT = 2
#: The master input the slave's INT output drives.
CASCADE_IRQ = 2
#: Inputs whose ELCR bits are fixed at 0 (edge): the timer, keyboard and cascade
#: on the master, the RTC and the FPU on the slave (PIIX).
ELCR_WRITABLE = (0xF8, 0xDE)
LINES = 16

# ICW1 / OCW2 / OCW3 bits.
ICW1_IC4 = 0x01
ICW1_SNGL = 0x02
ICW1_LTIM = 0x08
ICW1_INIT = 0x10
OCW3_SELECT = 0x08
ICW4_AEOI = 0x02
ICW4_SFNM = 0x10


class _Chip:
    """One 8259A."""

    def __init__(self, name: str, elcr_writable: int) -> None:
        self.name = name
        self.elcr_writable = elcr_writable
        self.elcr = 0
        self.irr = 0
        self.ltim = False
        self._reset()
        # Before the guest's ICW1 the part's state is undefined; every input
        # masked keeps a guest that never programs the 8259s from taking vectors
        # it did not ask for (what an un-initialised PC behind a local APIC sees).
        self.imr = 0xFF

    def _reset(self) -> None:
        """What ICW1 does besides the request register: forget the edges, clear
        the mask and the in-service register, IR0 highest priority, read the IRR,
        normal mask mode."""
        self.lines = 0  # the inputs' levels, for edge detection
        self.isr = 0
        self.imr = 0
        self.base = 0
        self.priority_add = 0  # the input with the highest priority
        self.read_isr = False
        self.poll = False
        self.special_mask = False
        self.auto_eoi = False
        self.rotate_on_auto_eoi = False
        self.special_fully_nested = False
        self.single = False
        self.needs_icw4 = False
        self.init_step = 0  # 0: initialised; 1, 2, 3: the next write to A0=1 is ICW2, ICW3, ICW4

    @property
    def level_mask(self) -> int:
        """The inputs that are level-triggered."""
        return 0xFF if self.ltim else self.elcr

    # --- inputs -----------------------------------------------------------------
    def set_line(self, irq: int, level: bool) -> None:
        bit = 1 << irq
        if self.level_mask & bit:
            if level:
                self.irr |= bit
            else:
                self.irr &= ~bit
        elif level and not self.lines & bit:
            self.irr |= bit  # a rising edge latches the request
        if level:
            self.lines |= bit
        else:
            self.lines &= ~bit

    # --- priorities -------------------------------------------------------------
    def _highest(self, bits: int) -> int | None:
        """The input of highest priority among ``bits``."""
        if not bits:
            return None
        for step in range(8):
            irq = (step + self.priority_add) & 7
            if bits & (1 << irq):
                return irq
        return None

    def _rank(self, irq: int) -> int:
        return (irq - self.priority_add) & 7

    def pending(self, cascade: int | None = None) -> int | None:
        """The input the chip would deliver now (its INT output), or None.

        ``cascade``: the master's input that carries the slave, for the special
        fully nested mode (the slave may interrupt its own in-service request)."""
        irq = self._highest(self.irr & ~self.imr)
        if irq is None:
            return None
        in_service = self.isr
        if self.special_mask:
            in_service &= ~self.imr
        if self.special_fully_nested and cascade is not None:
            in_service &= ~(1 << cascade)
        current = self._highest(in_service)
        if current is None or self._rank(irq) < self._rank(current):
            return irq
        return None

    def acknowledge(self, irq: int) -> None:
        """The INTA cycle for ``irq``: into service (unless automatic EOI); an edge
        request is consumed, a level one stays while the line is high."""
        bit = 1 << irq
        if not self.level_mask & bit:
            self.irr &= ~bit
        if self.auto_eoi:
            if self.rotate_on_auto_eoi:
                self.priority_add = (irq + 1) & 7
        else:
            self.isr |= bit

    # --- ports ------------------------------------------------------------------
    def write(self, offset: int, value: int) -> None:
        value &= 0xFF
        if offset == 0:
            if value & ICW1_INIT:
                lines = self.lines
                self._reset()
                self.ltim = bool(value & ICW1_LTIM)
                # Edge requests and edges are forgotten; a level request stays
                # while its line is high.
                self.irr &= self.level_mask
                self.lines = lines & self.level_mask
                self.single = bool(value & ICW1_SNGL)
                self.needs_icw4 = bool(value & ICW1_IC4)
                self.init_step = 1
            elif value & OCW3_SELECT:
                if value & 0x04:
                    self.poll = True
                if value & 0x02:
                    self.read_isr = bool(value & 0x01)
                if value & 0x40:
                    self.special_mask = bool(value & 0x20)
            else:
                self._ocw2(value)
            return
        if self.init_step == 0:
            self.imr = value
        elif self.init_step == 1:
            self.base = value & 0xF8
            if not self.single:
                self.init_step = 2  # ICW3 follows
            else:
                self.init_step = 3 if self.needs_icw4 else 0
        elif self.init_step == 2:
            self.init_step = 3 if self.needs_icw4 else 0
        else:
            self.auto_eoi = bool(value & ICW4_AEOI)
            self.special_fully_nested = bool(value & ICW4_SFNM)
            self.init_step = 0

    def _ocw2(self, value: int) -> None:
        command = value >> 5
        if command in (0, 4):  # rotate in automatic EOI mode: clear / set
            self.rotate_on_auto_eoi = command == 4
        elif command in (1, 5):  # non-specific EOI, with rotation for 5
            irq = self._highest(self.isr)
            if irq is not None:
                self.isr &= ~(1 << irq)
                if command == 5:
                    self.priority_add = (irq + 1) & 7
        elif command in (3, 7):  # specific EOI, with rotation for 7
            irq = value & 7
            self.isr &= ~(1 << irq)
            if command == 7:
                self.priority_add = (irq + 1) & 7
        elif command == 6:  # set priority: the input named gets the lowest
            self.priority_add = ((value & 7) + 1) & 7

    def read(self, offset: int) -> int:
        if offset == 1:
            return self.imr
        return self.isr if self.read_isr else self.irr


#: A chip's state fields: 8-bit registers, then flags.
_CHIP_BYTES = ("elcr", "irr", "lines", "isr", "imr", "base", "priority_add", "init_step")
_CHIP_FLAGS = (
    "ltim",
    "read_isr",
    "poll",
    "special_mask",
    "auto_eoi",
    "rotate_on_auto_eoi",
    "special_fully_nested",
    "single",
    "needs_icw4",
)


class PicPair:
    """The master and slave 8259A of the PC, and their ELCRs.

    :param on_change: called (outside the lock, from whichever thread made the
        change) after any change that may have raised the INT output.
    """

    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        self.master = _Chip("pic-master", ELCR_WRITABLE[0])
        self.slave = _Chip("pic-slave", ELCR_WRITABLE[1])
        self._lock = threading.Lock()
        self.on_change = on_change

    # --- snapshots (pyvmm.devices.state) ------------------------------------------
    name = "pic"
    state_version = 1

    def save_state(self) -> DeviceState:
        state: DeviceState = {}
        with self._lock:
            for chip in (self.master, self.slave):
                prefix = chip.name.removeprefix("pic-")
                for field in _CHIP_BYTES:
                    state[f"{prefix}_{field}"] = getattr(chip, field)
                for field in _CHIP_FLAGS:
                    state[f"{prefix}_{field}"] = getattr(chip, field)
        return state

    def load_state(self, state: DeviceState) -> None:
        chips = (self.master, self.slave)
        prefixes = [chip.name.removeprefix("pic-") for chip in chips]
        check_fields(self.name, state, {f"{p}_{f}" for p in prefixes for f in _CHIP_BYTES + _CHIP_FLAGS})
        values = {
            key: take(self.name, state, key, int, 8) for p in prefixes for key in (f"{p}_{f}" for f in _CHIP_BYTES)
        }
        values |= {
            key: take(self.name, state, key, bool) for p in prefixes for key in (f"{p}_{f}" for f in _CHIP_FLAGS)
        }
        for p in prefixes:
            if values[f"{p}_init_step"] > 3 or values[f"{p}_priority_add"] > 7:
                raise DeviceStateError(f"device {self.name}: {p}: init_step or priority_add out of range")
        with self._lock:
            for chip, p in zip(chips, prefixes, strict=True):
                for field in _CHIP_BYTES + _CHIP_FLAGS:
                    setattr(chip, field, values[f"{p}_{field}"])
        self._changed()  # the delivery looks at the restored output

    # --- what devices and the delivery use -------------------------------------
    def set_irq(self, line: int, level: bool) -> None:
        """Drive input ``line`` (0-15; 8-15 are the slave's) high or low."""
        if not 0 <= line < LINES:
            raise ValueError(f"the 8259 pair has inputs 0-15, not {line}")
        with self._lock:
            if line < 8:
                self.master.set_line(line, level)
            else:
                self.slave.set_line(line - 8, level)
                self._cascade()
        self._changed()

    def has_interrupt(self) -> bool:
        """The master's INT output: an interrupt waits for acknowledgement."""
        with self._lock:
            return self.master.pending(CASCADE_IRQ) is not None

    def acknowledge(self) -> int | None:
        """The interrupt-acknowledge cycle: the vector to deliver, and the request
        goes into service.  None when nothing is pending (then nothing changes;
        the CPU would not have run the cycle).  A request that vanished between
        the master's and the slave's answer gives the slave's spurious IR7 vector."""
        with self._lock:
            irq = self.master.pending(CASCADE_IRQ)
            if irq is None:
                return None
            self.master.acknowledge(irq)
            if irq == CASCADE_IRQ and not self.master.single:
                slave_irq = self.slave.pending()
                if slave_irq is None:
                    vector = self.slave.base + 7
                else:
                    self.slave.acknowledge(slave_irq)
                    vector = self.slave.base + slave_irq
                self._cascade()
            else:
                vector = self.master.base + irq
        self._changed()
        return vector

    def line_masked(self, line: int) -> bool:
        """Whether input ``line`` is masked (for a slave input: or its cascade)."""
        with self._lock:
            if line < 8:
                return bool(self.master.imr & (1 << line))
            return bool(self.slave.imr & (1 << (line - 8)) or self.master.imr & (1 << CASCADE_IRQ))

    def _cascade(self) -> None:
        # The slave's INT output is the master's IR2 (edge-triggered: a new edge
        # whenever the slave has something to deliver).
        if self.slave.pending() is not None:
            self.master.set_line(CASCADE_IRQ, False)
            self.master.set_line(CASCADE_IRQ, True)
        else:
            self.master.set_line(CASCADE_IRQ, False)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # --- ports --------------------------------------------------------------------
    def port_read(self, chip: _Chip, offset: int) -> int:
        with self._lock:
            if chip.poll:
                chip.poll = False
                return self._poll(chip)
            return chip.read(offset)

    def _poll(self, chip: _Chip) -> int:
        """A poll-mode read: bit 7 set with the highest request's number, which
        goes into service as if acknowledged; 0 when nothing is pending."""
        cascade = CASCADE_IRQ if chip is self.master else None
        irq = chip.pending(cascade)
        if irq is None:
            return 0
        chip.acknowledge(irq)
        if chip is self.slave:
            self._cascade()
        return 0x80 | irq

    def port_write(self, chip: _Chip, offset: int, value: int) -> None:
        with self._lock:
            chip.write(offset, value)
            self._cascade()
        self._changed()

    def elcr_read(self, offset: int) -> int:
        with self._lock:
            return (self.master, self.slave)[offset].elcr

    def elcr_write(self, offset: int, value: int) -> None:
        with self._lock:
            chip = (self.master, self.slave)[offset]
            chip.elcr = value & chip.elcr_writable
            # A level input that is low holds no request; an edge one keeps its latch.
            chip.irr &= ~(chip.elcr & ~chip.lines)
            self._cascade()
        self._changed()

    def devices(self) -> tuple[Device, Device, Device]:
        """The port devices: master (0x20), slave (0xa0), ELCR (0x4d0)."""
        return _PicPorts(self, self.master), _PicPorts(self, self.slave), _ElcrPorts(self)


class _PicPorts(Device):
    def __init__(self, pair: PicPair, chip: _Chip) -> None:
        self.name = chip.name
        self._pair = pair
        self._chip = chip

    def state_holder(self) -> Stateful:
        return self._pair

    def read(self, offset: int, size: int) -> int:
        return self._pair.port_read(self._chip, offset & 1)

    def write(self, offset: int, size: int, value: int) -> None:
        self._pair.port_write(self._chip, offset & 1, value)


class _ElcrPorts(Device):
    name = "elcr"

    def __init__(self, pair: PicPair) -> None:
        self._pair = pair

    def state_holder(self) -> Stateful:
        return self._pair

    def read(self, offset: int, size: int) -> int:
        value = 0
        for i in range(min(size, ELCR_PORT_COUNT - offset)):
            value |= self._pair.elcr_read(offset + i) << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(min(size, ELCR_PORT_COUNT - offset)):
            self._pair.elcr_write(offset + i, value >> (8 * i))
