"""A 16550A UART, transmit side: the serial console on COM1 (0x3f8, IRQ 4).

Transmission is instantaneous: the transmitter holding register is always
empty, so LSR reads 0x60 (THRE | TEMT) and a guest polling THRE never waits.
There is no receive path (the x86 guests pyvmm targets only print).  When the
guest enables the THR-empty interrupt in IER the device raises its interrupt
line, if the machine gave it one; otherwise the guest has to poll.

Output goes to a binary stream.  A stream that is a terminal or pipe is flushed
at each newline so the console stays interactive; everything is flushed at
:meth:`close`.
"""

from __future__ import annotations

from typing import BinaryIO

from pyvmm.devices.base import Device, IrqLine

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
IER_THRE = 0x02
IIR_NONE = 0x01
IIR_THRE = 0x02
IIR_FIFO_ENABLED = 0xC0
FCR_ENABLE = 0x01
LSR_THRE = 0x20
LSR_TEMT = 0x40
MCR_LOOP = 0x10
#: MSR with the modem "present": DCD, DSR and CTS asserted.
MSR_CONNECTED = 0xB0


class Uart16550(Device):
    name = "uart"

    def __init__(self, output: BinaryIO | None, *, irq: IrqLine | None = None, flush_lines: bool = True) -> None:
        self._output = output
        self._irq = irq
        self._flush_lines = flush_lines
        self.ier = 0
        self.lcr = 0x03
        self.mcr = 0
        self.fcr = 0
        self.scratch = 0
        self.divisor = 0x0001
        #: Whether a THR-empty interrupt is pending (set by a transmit or by
        #: enabling it, cleared by reading IIR or writing THR).
        self._thre_pending = False
        self._irq_level = False
        self.transmitted = 0

    # --- registers --------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if offset == LSR:
            return LSR_THRE | LSR_TEMT
        if offset == RBR_THR:
            return self.divisor & 0xFF if dlab else 0
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
            self.fcr = value
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self.mcr = value & 0x1F
        elif offset == SCR:
            self.scratch = value

    def _transmit(self, byte: int) -> None:
        self.transmitted += 1
        output = self._output
        if output is not None:
            output.write(bytes((byte,)))
            if byte == 0x0A and self._flush_lines:
                output.flush()
        # Writing THR clears the THRE interrupt and the (instant) transmission sets
        # it again: lower the line first so an edge-triggered controller sees a
        # new edge for every byte.
        self._thre_pending = False
        self._update_irq()
        self._thre_pending = True
        self._update_irq()

    def _read_iir(self) -> int:
        fifo = IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE else 0
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
        level = bool(self._thre_pending and self.ier & IER_THRE)
        if level != self._irq_level:
            self._irq_level = level
            self._irq(level)

    def close(self) -> None:
        if self._output is not None:
            self._output.flush()
