"""A 16550A UART: the serial console on COM1 (0x3f8, IRQ 4).

Transmission is instantaneous: the transmitter holding register is always
empty, so LSR has THRE | TEMT set and a guest polling THRE never waits.  When the
guest enables the THR-empty interrupt in IER the device raises its interrupt
line, if the machine gave it one; otherwise the guest has to poll.

Receiving: the host side (the console, :mod:`pyvmm.machine.console`) hands bytes
to :meth:`Uart16550.receive` from its own thread.  They wait in the receive
buffer, LSR.DR says so, and each read of RBR takes one.  With ERBFI set in IER
the device raises its interrupt while data waits: IIR reads "received data
available" (0x04) once the FIFO trigger level (FCR bits 7:6) is reached, or
with the FIFO off, and "character timeout" (0x0c) for fewer bytes, as a real
16550 does once the line has been idle.  The received-data interrupt outranks
THR-empty in IIR.  The buffer holds :data:`~pyvmm.devices.serial_line.RX_BUFFER` bytes: ``receive`` takes
what fits and the console waits for room (flow control) instead of overrunning.

In loopback mode (MCR.LOOP) written bytes go to the receiver, not the output,
as on the real part.

Output goes to a binary stream.  A stream that is a terminal or pipe is flushed
at each newline so the console stays interactive; everything is flushed at
:meth:`close`.

The device is called from vCPU threads and from the console's thread: a lock
keeps its state and its interrupt line consistent.
"""

from __future__ import annotations

from typing import BinaryIO

from pyvmm.devices.base import IrqLine
from pyvmm.devices.serial_line import SerialLine
from pyvmm.devices.state import DeviceState, DeviceStateError, check_fields, take

COM1_BASE = 0x3F8
COM1_IRQ = 4
PORT_COUNT = 8

# Register offsets (DLAB=0 meaning first).
RBR_THR = 0
IER = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

LCR_DLAB = 0x80
IER_RDA = 0x01
IER_THRE = 0x02
IIR_NONE = 0x01
IIR_THRE = 0x02
IIR_RDA = 0x04
IIR_TIMEOUT = 0x0C
IIR_FIFO_ENABLED = 0xC0
FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
LSR_DR = 0x01
LSR_THRE = 0x20
LSR_TEMT = 0x40
MCR_LOOP = 0x10
#: MSR with the modem "present": DCD, DSR and CTS asserted.
MSR_CONNECTED = 0xB0
#: Receive FIFO trigger levels, by FCR bits 7:6.
RX_TRIGGER = (1, 4, 8, 14)


class Uart16550(SerialLine):
    name = "uart"
    state_version = 1

    def __init__(self, output: BinaryIO | None, *, irq: IrqLine | None = None, flush_lines: bool = True) -> None:
        super().__init__(output, irq=irq, flush_lines=flush_lines)
        self.ier = 0
        self.lcr = 0x03
        self.mcr = 0
        self.fcr = 0
        self.scratch = 0
        self.divisor = 0x0001
        #: Whether a THR-empty interrupt is pending (set by a transmit or by
        #: enabling it, cleared by reading IIR or writing THR).
        self._thre_pending = False

    # --- registers --------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        with self._lock:
            dlab = self.lcr & LCR_DLAB
            if offset == LSR:
                return LSR_THRE | LSR_TEMT | (LSR_DR if len(self.rx) else 0)
            if offset == RBR_THR:
                if dlab:
                    return self.divisor & 0xFF
                return self._take()
            if offset == IER:
                return self.divisor >> 8 if dlab else self.ier
            if offset == IIR_FCR:
                return self._read_iir()
            if offset == LCR:
                return self.lcr
            if offset == MCR:
                return self.mcr
            if offset == MSR:
                return self._modem_status()
            if offset == SCR:
                return self.scratch
            return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        with self._lock:
            dlab = self.lcr & LCR_DLAB
            if offset == RBR_THR:
                if dlab:
                    self.divisor = (self.divisor & 0xFF00) | value
                else:
                    self._transmit(value)
            elif offset == IER:
                if dlab:
                    self.divisor = (self.divisor & 0x00FF) | value << 8
                else:
                    enabling = value & IER_THRE and not self.ier & IER_THRE
                    self.ier = value & 0x0F
                    if enabling:
                        self._thre_pending = True  # THR is empty: the 16550 interrupts at once
                    self._update_irq()
            elif offset == IIR_FCR:
                if value & FCR_CLEAR_RX:
                    self.rx.clear()
                self.fcr = value & ~0x06  # the clear bits are self-clearing
                self._update_irq()
            elif offset == LCR:
                self.lcr = value
            elif offset == MCR:
                self.mcr = value & 0x1F
            elif offset == SCR:
                self.scratch = value

    def _take(self) -> int:
        byte = self.rx.take()
        if byte is None:
            return 0
        self._update_irq()
        return byte

    def _transmit(self, byte: int) -> None:
        self._send(byte, loopback=bool(self.mcr & MCR_LOOP))
        # Writing THR clears the THRE interrupt and the (instant) transmission sets
        # it again: lower the line first so an edge-triggered controller sees a
        # new edge for every byte.
        self._thre_pending = False
        self._update_irq()
        self._thre_pending = True
        self._update_irq()

    def _rx_interrupt(self) -> int:
        """The receive interrupt IIR reports now, or 0."""
        count = len(self.rx)
        if not count or not self.ier & IER_RDA:
            return 0
        if not self.fcr & FCR_ENABLE or count >= RX_TRIGGER[self.fcr >> 6]:
            return IIR_RDA
        return IIR_TIMEOUT

    def _read_iir(self) -> int:
        fifo = IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE else 0
        rx = self._rx_interrupt()
        if rx:
            return rx | fifo  # cleared by reading RBR, not by reading IIR
        if self._thre_pending and self.ier & IER_THRE:
            self._thre_pending = False  # reading IIR acknowledges a THRE interrupt
            self._update_irq()
            return IIR_THRE | fifo
        return IIR_NONE | fifo

    def _modem_status(self) -> int:
        if not self.mcr & MCR_LOOP:
            return MSR_CONNECTED
        # Loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD (what drivers probe with).
        mcr = self.mcr
        return (mcr & 0x01) << 5 | (mcr & 0x02) << 3 | (mcr & 0x04) << 4 | (mcr & 0x08) << 4

    def _update_irq(self) -> None:
        if self._irq is None:
            return
        level = bool(self._thre_pending and self.ier & IER_THRE) or bool(len(self.rx) and self.ier & IER_RDA)
        if level != self._irq_level:
            self._irq_level = level
            self._irq(level)

    def save_state(self) -> DeviceState:
        with self._lock:
            return {
                "ier": self.ier,
                "lcr": self.lcr,
                "mcr": self.mcr,
                "fcr": self.fcr,
                "scratch": self.scratch,
                "divisor": self.divisor,
                "thre_pending": self._thre_pending,
                "irq_level": self._irq_level,
                "rx": self.rx.peek(),
            }

    def load_state(self, state: DeviceState) -> None:
        name = self.name
        check_fields(name, state, {"ier", "lcr", "mcr", "fcr", "scratch", "divisor", "thre_pending", "irq_level", "rx"})
        registers = {field: take(name, state, field, int, 8) for field in ("ier", "lcr", "mcr", "fcr", "scratch")}
        divisor = take(name, state, "divisor", int, 16)
        thre_pending = take(name, state, "thre_pending", bool)
        irq_level = take(name, state, "irq_level", bool)
        rx = take(name, state, "rx", bytes)
        if len(rx) > self.rx.capacity:
            raise DeviceStateError(f"device {name}: {len(rx)} received bytes exceed the {self.rx.capacity}-byte buffer")
        with self._lock:
            self.ier, self.lcr, self.mcr = registers["ier"], registers["lcr"], registers["mcr"]
            self.fcr, self.scratch, self.divisor = registers["fcr"], registers["scratch"], divisor
            # The line's level is in the interrupt controller's saved state too:
            # taken as it was, not driven again.
            self._thre_pending, self._irq_level = thre_pending, irq_level
            self.rx.clear()
            self.rx.put(rx)

    def close(self) -> None:
        if self._output is not None:
            self._output.flush()
