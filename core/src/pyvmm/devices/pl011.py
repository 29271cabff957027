"""An Arm PL011 UART (PrimeCell r1p5), transmit side: the serial console of the
aarch64 machine.

Like :class:`~pyvmm.devices.uart.Uart16550`, transmission is instantaneous: the
transmit FIFO is always empty, so FR reads TXFE | RXFE with TXFF and BUSY clear
and a guest polling FR never waits.  There is no receive path.  The baud-rate,
line-control, control, FIFO-level, interrupt-mask and DMA registers are latches:
they read back what was written and change nothing else.

The PrimeCell identification registers at 0xfe0..0xffc hold the values of an
Arm PL011 r1p5 (QEMU's), which is what Linux's AMBA bus reads to match the
``arm,primecell`` node to the pl011 driver: without them the device is never
probed.

Interrupts: only the transmit interrupt exists.  Writing DR clears TXRIS and the
(instant) transmission sets it again, so the line -- the masked status, MIS -- is
lowered and raised once per byte while TXIM is enabled: an edge-triggered
controller (a Gunyah doorbell) sees a new edge for every byte, as Linux's
interrupt-driven transmit path needs.  ICR clears TXRIS.

With CR.LBE (loopback) set, written bytes go to the receiver, which does not
exist here, not to the output: Linux's driver writes a byte in loopback mode at
start-up to make the transmit interrupt assert.
"""

from __future__ import annotations

from typing import BinaryIO

from pyvmm.devices.base import Device, IrqLine

#: One 4 KiB page of registers.
PL011_SIZE = 0x1000
#: The reference clock the device tree gives the UART (QEMU's virt: 24 MHz).
PL011_CLOCK_HZ = 24_000_000

# Register offsets.
DR = 0x000
RSR_ECR = 0x004
FR = 0x018
ILPR = 0x020
IBRD = 0x024
FBRD = 0x028
LCR_H = 0x02C
CR = 0x030
IFLS = 0x034
IMSC = 0x038
RIS = 0x03C
MIS = 0x040
ICR = 0x044
DMACR = 0x048
PERIPH_ID0 = 0xFE0

FR_BUSY = 1 << 3
FR_RXFE = 1 << 4
FR_TXFF = 1 << 5
FR_RXFF = 1 << 6
FR_TXFE = 1 << 7
CR_UARTEN = 1 << 0
CR_LBE = 1 << 7
CR_TXE = 1 << 8
CR_RXE = 1 << 9
INT_TX = 1 << 5
INT_ALL = 0x7FF

#: PeriphID0..3 then PCellID0..3, one byte per 32-bit register at 0xfe0..0xffc:
#: part 0x011, designer Arm (0x41), revision 1; the PrimeCell id 0xb105f00d.
IDENTIFICATION = (0x11, 0x10, 0x14, 0x00, 0x0D, 0xF0, 0x05, 0xB1)
#: CR after reset: transmit and receive enabled, the UART itself not.
CR_RESET = CR_TXE | CR_RXE
#: IFLS after reset: both FIFO triggers at half full.
IFLS_RESET = 0x12

# Latched registers and the bits each keeps.
_LATCHES = {ILPR: 0xFF, IBRD: 0xFFFF, FBRD: 0x3F, LCR_H: 0xFF, CR: 0xFFFF, IFLS: 0x3F, DMACR: 0x7}


class Pl011(Device):
    name = "pl011"

    def __init__(self, output: BinaryIO | None, *, irq: IrqLine | None = None, flush_lines: bool = True) -> None:
        self._output = output
        self._irq = irq
        self._flush_lines = flush_lines
        self.registers = {ILPR: 0, IBRD: 0, FBRD: 0, LCR_H: 0, CR: CR_RESET, IFLS: IFLS_RESET, DMACR: 0}
        self.imsc = 0
        self.ris = 0
        self._irq_level = False
        self.transmitted = 0

    def read(self, offset: int, size: int) -> int:
        if offset == FR:
            return FR_TXFE | FR_RXFE
        latch = self.registers.get(offset)
        if latch is not None:
            return latch
        if offset == IMSC:
            return self.imsc
        if offset == RIS:
            return self.ris
        if offset == MIS:
            return self.ris & self.imsc
        if PERIPH_ID0 <= offset < PL011_SIZE and offset % 4 == 0:
            return IDENTIFICATION[(offset - PERIPH_ID0) // 4]
        # DR with an empty receive FIFO, RSR without errors, write-only ICR, reserved space.
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == DR:
            self._transmit(value & 0xFF)
            return
        mask = _LATCHES.get(offset)
        if mask is not None:
            self.registers[offset] = value & mask
        elif offset == IMSC:
            self.imsc = value & INT_ALL
            self._update_irq()
        elif offset == ICR:
            self.ris &= ~value
            self._update_irq()

    def _transmit(self, byte: int) -> None:
        if not self.registers[CR] & CR_LBE:
            self.transmitted += 1
            output = self._output
            if output is not None:
                output.write(bytes((byte,)))
                if byte == 0x0A and self._flush_lines:
                    output.flush()
        self.ris &= ~INT_TX
        self._update_irq()
        self.ris |= INT_TX
        self._update_irq()

    def _update_irq(self) -> None:
        if self._irq is None:
            return
        level = bool(self.ris & self.imsc)
        if level != self._irq_level:
            self._irq_level = level
            self._irq(level)

    def close(self) -> None:
        if self._output is not None:
            self._output.flush()
