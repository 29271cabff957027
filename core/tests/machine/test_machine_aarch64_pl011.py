"""The PL011 UART: what Linux's earlycon and amba-pl011 driver read and write."""

from __future__ import annotations

import io

import pytest

from pyvmm.devices.pl011 import (
    CR,
    CR_LBE,
    CR_RESET,
    DMACR,
    DR,
    FBRD,
    FR,
    FR_BUSY,
    FR_RXFE,
    FR_TXFE,
    FR_TXFF,
    IBRD,
    ICR,
    IFLS,
    IFLS_RESET,
    IMSC,
    INT_TX,
    LCR_H,
    MIS,
    RIS,
    Pl011,
)


def test_written_bytes_reach_the_output() -> None:
    out = io.BytesIO()
    uart = Pl011(out)
    for byte in b"hi\n":
        uart.write(DR, 4, byte | 0xFFFF_FF00)  # a 32-bit store: only the low byte is data
    assert out.getvalue() == b"hi\n"
    assert uart.transmitted == 3


def test_flag_register_says_transmit_empty_never_full() -> None:
    uart = Pl011(None)
    flags = uart.read(FR, 4)
    assert flags & FR_TXFE and flags & FR_RXFE
    assert not flags & (FR_TXFF | FR_BUSY)
    uart.write(DR, 1, 0x41)
    assert uart.read(FR, 4) == flags  # transmission is instantaneous


def test_receive_side_is_empty() -> None:
    uart = Pl011(None)
    assert uart.read(DR, 4) == 0
    assert uart.read(0x004, 4) == 0  # RSR: no errors


@pytest.mark.parametrize(
    ("offset", "written", "kept"),
    [(IBRD, 0x1_0027, 0x0027), (FBRD, 0xFF, 0x3F), (LCR_H, 0x1_70, 0x70), (CR, 0x1_0301, 0x0301), (IFLS, 0xFF, 0x3F)],
)
def test_configuration_registers_are_latches(offset: int, written: int, kept: int) -> None:
    uart = Pl011(None)
    uart.write(offset, 4, written)
    assert uart.read(offset, 4) == kept


def test_reset_values() -> None:
    uart = Pl011(None)
    assert uart.read(CR, 4) == CR_RESET
    assert uart.read(IFLS, 4) == IFLS_RESET
    assert uart.read(IMSC, 4) == 0 and uart.read(RIS, 4) == 0 and uart.read(DMACR, 4) == 0


def test_primecell_identification_for_the_amba_bus() -> None:
    uart = Pl011(None)
    periph = sum(uart.read(0xFE0 + 4 * i, 4) << (8 * i) for i in range(4))
    cell = sum(uart.read(0xFF0 + 4 * i, 4) << (8 * i) for i in range(4))
    assert cell == 0xB105F00D
    assert periph & 0xFFF == 0x011  # part number: PL011
    assert (periph >> 12) & 0xFF == 0x41  # designer: Arm
    assert uart.read(0xFE2, 1) == 0  # not a register boundary


def test_loopback_bytes_do_not_reach_the_output() -> None:
    out = io.BytesIO()
    uart = Pl011(out)
    uart.write(CR, 4, CR_RESET | CR_LBE | 1)
    uart.write(DR, 4, 0)  # Linux's start-up write that provokes the TX interrupt
    uart.write(CR, 4, CR_RESET | 1)
    uart.write(DR, 4, 0x21)
    assert out.getvalue() == b"!"
    assert uart.read(RIS, 4) & INT_TX  # the loopback write still set the TX interrupt


def test_transmit_interrupt_status_mask_and_clear() -> None:
    uart = Pl011(None)
    uart.write(DR, 4, 0x41)
    assert uart.read(RIS, 4) == INT_TX
    assert uart.read(MIS, 4) == 0  # masked
    uart.write(IMSC, 4, INT_TX)
    assert uart.read(IMSC, 4) == INT_TX and uart.read(MIS, 4) == INT_TX
    uart.write(ICR, 4, INT_TX)
    assert uart.read(RIS, 4) == 0 and uart.read(MIS, 4) == 0


def test_interrupt_line_rises_once_per_byte_while_enabled() -> None:
    levels: list[bool] = []
    uart = Pl011(None, irq=levels.append)
    uart.write(DR, 4, 0x41)
    assert levels == []  # TXIM masked: the line stays low
    uart.write(IMSC, 4, INT_TX)
    assert levels == [True]  # enabling with TXRIS set interrupts at once
    uart.write(DR, 4, 0x42)
    uart.write(DR, 4, 0x43)
    # Each write clears TXRIS and the instant transmission sets it again.
    assert levels == [True, False, True, False, True]
    uart.write(IMSC, 4, 0)
    assert levels[-1] is False


def test_close_flushes() -> None:
    class Flushes(io.BytesIO):
        flushed = 0

        def flush(self) -> None:
            self.flushed += 1
            super().flush()

    out = Flushes()
    uart = Pl011(out, flush_lines=False)
    uart.write(DR, 4, 0x0A)
    assert out.flushed == 0
    uart.close()
    assert out.flushed == 1
