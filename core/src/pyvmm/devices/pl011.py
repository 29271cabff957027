"""An Arm PL011 UART (PrimeCell r1p5): the serial console of the aarch64 machine.

Like :class:`~pyvmm.devices.uart.Uart16550`, transmission is instantaneous: the
transmit FIFO is always empty, so FR reads TXFE with TXFF and BUSY clear and a
guest polling FR never waits.  The baud-rate, line-control, control, FIFO-level,
interrupt-mask and DMA registers are latches: they read back what was written
and change nothing else.

The PrimeCell identification registers at 0xfe0..0xffc hold the values of an
Arm PL011 r1p5 (QEMU's), which is what Linux's AMBA bus reads to match the
``arm,primecell`` node to the pl011 driver: without them the device is never
probed.

Receiving: the console hands bytes to :meth:`Pl011.receive` from its own
thread; FR.RXFE clears while data waits (RXFF is set when the receive buffer is
full) and each read of DR takes one byte.  The receive interrupts follow the
data: RXRIS while at least the IFLS receive trigger level (or, with the FIFO
off, one byte) waits, RTRIS (receive timeout) while fewer do; reading the data
clears them, as draining the FIFO does on the real part.  The buffer is bounded
(:data:`~pyvmm.devices.serial_line.RX_BUFFER`): the console waits for room instead of
overrunning.

Interrupts: writing DR clears TXRIS and the (instant) transmission sets it
again, so the line -- the masked status, MIS -- is lowered and raised once per
byte while TXIM is enabled: an edge-triggered controller (a Gunyah doorbell)
sees a new edge for every byte, as Linux's interrupt-driven transmit path needs.
ICR clears TXRIS.

With CR.LBE (loopback) set, written bytes go to the receiver, not to the
output: Linux's driver writes a byte in loopback mode at start-up to make the
transmit interrupt assert.

The device is called from vCPU threads and from the console's thread: a lock
keeps its state and its interrupt line consistent.

Its snapshot state (:mod:`pyvmm.devices.state`, version 1): the latched
registers, the interrupt mask, the latched transmit status, the level its line
was driven to, and the bytes waiting to be read.
"""

from __future__ import annotations

from typing import BinaryIO

from pyvmm.devices.base import IrqLine
from pyvmm.devices.serial_line import SerialLine
from pyvmm.devices.state import DeviceState, DeviceStateError, check_fields, take

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
LCR_H_FEN = 1 << 4
INT_RX = 1 << 4
INT_TX = 1 << 5
INT_RT = 1 << 6
INT_ALL = 0x7FF

#: PeriphID0..3 then PCellID0..3, one byte per 32-bit register at 0xfe0..0xffc:
#: part 0x011, designer Arm (0x41), revision 1; the PrimeCell id 0xb105f00d.
IDENTIFICATION = (0x11, 0x10, 0x14, 0x00, 0x0D, 0xF0, 0x05, 0xB1)
#: CR after reset: transmit and receive enabled, the UART itself not.
CR_RESET = CR_TXE | CR_RXE
#: IFLS after reset: both FIFO triggers at half full.
IFLS_RESET = 0x12
#: Receive FIFO trigger levels by IFLS bits 5:3 (1/8 .. 7/8 of 16 entries).
RX_TRIGGER = (2, 4, 8, 12, 14, 14, 14, 14)

# Latched registers and the bits each keeps.
_LATCHES = {ILPR: 0xFF, IBRD: 0xFFFF, FBRD: 0x3F, LCR_H: 0xFF, CR: 0xFFFF, IFLS: 0x3F, DMACR: 0x7}


#: The latched registers by the names their snapshot state gives them.
_LATCH_NAMES = {ILPR: "ilpr", IBRD: "ibrd", FBRD: "fbrd", LCR_H: "lcr_h", CR: "cr", IFLS: "ifls", DMACR: "dmacr"}
_STATE_FIELDS = {*_LATCH_NAMES.values(), "imsc", "ris", "irq_level", "rx"}


class Pl011(SerialLine):
    name = "pl011"
    state_version = 1

    def __init__(self, output: BinaryIO | None, *, irq: IrqLine | None = None, flush_lines: bool = True) -> None:
        super().__init__(output, irq=irq, flush_lines=flush_lines)
        self.registers = {ILPR: 0, IBRD: 0, FBRD: 0, LCR_H: 0, CR: CR_RESET, IFLS: IFLS_RESET, DMACR: 0}
        self.imsc = 0
        #: The latched raw interrupt status (TX); the receive bits follow the data.
        self.ris = 0

    # --- registers --------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == FR:
                count = len(self.rx)
                flags = FR_TXFE
                if not count:
                    flags |= FR_RXFE
                elif count >= self.rx.capacity:
                    flags |= FR_RXFF
                return flags
            if offset == DR:
                byte = self.rx.take()
                if byte is None:
                    return 0
                self._update_irq()
                return byte
            latch = self.registers.get(offset)
            if latch is not None:
                return latch
            if offset == IMSC:
                return self.imsc
            if offset == RIS:
                return self._raw_status()
            if offset == MIS:
                return self._raw_status() & self.imsc
            if PERIPH_ID0 <= offset < PL011_SIZE and offset % 4 == 0:
                return IDENTIFICATION[(offset - PERIPH_ID0) // 4]
            # RSR without errors, write-only ICR, reserved space.
            return 0

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if offset == DR:
                self._transmit(value & 0xFF)
                return
            mask = _LATCHES.get(offset)
            if mask is not None:
                self.registers[offset] = value & mask
                self._update_irq()  # the FIFO enable and trigger level decide RXRIS vs RTRIS
            elif offset == IMSC:
                self.imsc = value & INT_ALL
                self._update_irq()
            elif offset == ICR:
                self.ris &= ~value
                self._update_irq()

    def _rx_status(self) -> int:
        count = len(self.rx)
        if not count:
            return 0
        if not self.registers[LCR_H] & LCR_H_FEN:
            return INT_RX
        trigger = RX_TRIGGER[(self.registers[IFLS] >> 3) & 0x7]
        return INT_RX if count >= trigger else INT_RT

    def _raw_status(self) -> int:
        return self.ris | self._rx_status()

    def _transmit(self, byte: int) -> None:
        self._send(byte, loopback=bool(self.registers[CR] & CR_LBE))
        self.ris &= ~INT_TX
        self._update_irq()
        self.ris |= INT_TX
        self._update_irq()

    def _update_irq(self) -> None:
        if self._irq is None:
            return
        level = bool(self._raw_status() & self.imsc)
        if level != self._irq_level:
            self._irq_level = level
            self._irq(level)

    # --- snapshots ----------------------------------------------------------------
    def save_state(self) -> DeviceState:
        with self._lock:
            state: DeviceState = {name: self.registers[offset] for offset, name in _LATCH_NAMES.items()}
            state.update(imsc=self.imsc, ris=self.ris, irq_level=self._irq_level, rx=self.rx.peek())
            return state

    def load_state(self, state: DeviceState) -> None:
        name = self.name
        check_fields(name, state, _STATE_FIELDS)
        latches = {offset: take(name, state, field, int, 16) for offset, field in _LATCH_NAMES.items()}
        for offset, value in latches.items():
            if value & ~_LATCHES[offset]:
                raise DeviceStateError(f"device {name}: {_LATCH_NAMES[offset]} {value:#x} has bits the register lacks")
        imsc, ris = take(name, state, "imsc", int, 16), take(name, state, "ris", int, 16)
        if imsc & ~INT_ALL or ris & ~INT_ALL:
            raise DeviceStateError(f"device {name}: interrupt bits beyond {INT_ALL:#x}")
        irq_level = take(name, state, "irq_level", bool)
        rx = take(name, state, "rx", bytes)
        if len(rx) > self.rx.capacity:
            raise DeviceStateError(f"device {name}: {len(rx)} received bytes exceed the {self.rx.capacity}-byte buffer")
        with self._lock:
            self.registers = latches
            self.imsc, self.ris = imsc, ris
            # The line's level is in the interrupt controller's saved state too:
            # taken as it was, not driven again.
            self._irq_level = irq_level
            self.rx.clear()
            self.rx.put(rx)

    def close(self) -> None:
        if self._output is not None:
            self._output.flush()
