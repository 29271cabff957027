"""The 16550 UART: transmit, the registers guests probe, and its interrupt."""

from __future__ import annotations

import io

from pyvmm.devices import uart
from pyvmm.devices.uart import Uart16550


class FlushCounter(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_thr_writes_go_to_the_output_and_lines_are_flushed() -> None:
    out = FlushCounter()
    dev = Uart16550(out)
    for byte in b"hi\nyo":
        dev.write(uart.RBR_THR, 1, byte)
    assert out.getvalue() == b"hi\nyo"
    assert out.flushes == 1  # at the newline only
    dev.close()
    assert out.flushes == 2
    assert dev.transmitted == 5


def test_lsr_always_reports_the_transmitter_empty() -> None:
    dev = Uart16550(None)
    assert dev.read(uart.LSR, 1) == 0x60
    dev.write(uart.RBR_THR, 1, ord("x"))
    assert dev.read(uart.LSR, 1) & uart.LSR_THRE


def test_dlab_latches_the_divisor_instead_of_thr_and_ier() -> None:
    out = io.BytesIO()
    dev = Uart16550(out)
    dev.write(uart.LCR, 1, 0x83)
    dev.write(uart.RBR_THR, 1, 0x0C)
    dev.write(uart.IER, 1, 0x00)
    assert (dev.read(uart.RBR_THR, 1), dev.read(uart.IER, 1)) == (0x0C, 0x00)
    assert dev.divisor == 0x000C
    dev.write(uart.LCR, 1, 0x03)
    assert dev.read(uart.LCR, 1) == 0x03
    assert out.getvalue() == b""  # the divisor write was not transmitted
    dev.write(uart.IER, 1, 0x05)
    assert dev.read(uart.IER, 1) == 0x05
    assert dev.divisor == 0x000C


def test_scratch_mcr_and_loopback_modem_status() -> None:
    dev = Uart16550(None)
    dev.write(uart.SCR, 1, 0xA5)
    assert dev.read(uart.SCR, 1) == 0xA5
    assert dev.read(uart.MSR, 1) == uart.MSR_CONNECTED
    dev.write(uart.MCR, 1, uart.MCR_LOOP | 0x0F)
    assert dev.read(uart.MCR, 1) == 0x1F
    assert dev.read(uart.MSR, 1) == 0xF0
    dev.write(uart.MCR, 1, uart.MCR_LOOP | 0x02)  # RTS -> CTS
    assert dev.read(uart.MSR, 1) == 0x10


def test_iir_reports_no_interrupt_and_fifo_state() -> None:
    dev = Uart16550(None)
    assert dev.read(uart.IIR_FCR, 1) == uart.IIR_NONE
    dev.write(uart.IIR_FCR, 1, 0x07)
    assert dev.read(uart.IIR_FCR, 1) == uart.IIR_NONE | uart.IIR_FIFO_ENABLED


def test_thre_interrupt_raises_pulses_and_is_acknowledged() -> None:
    levels: list[bool] = []
    dev = Uart16550(io.BytesIO(), irq=levels.append)
    dev.write(uart.RBR_THR, 1, ord("a"))
    assert levels == []  # IER off: polled
    dev.write(uart.IER, 1, uart.IER_THRE)
    assert levels == [True]  # enabling it with THR empty interrupts at once
    dev.write(uart.RBR_THR, 1, ord("b"))
    assert levels == [True, False, True]  # a fresh edge per byte
    assert dev.read(uart.IIR_FCR, 1) == uart.IIR_THRE
    assert levels[-1] is False  # reading IIR acknowledged it
    assert dev.read(uart.IIR_FCR, 1) == uart.IIR_NONE
    dev.write(uart.IER, 1, 0)
    assert levels[-1] is False


def test_no_output_stream_discards_bytes() -> None:
    dev = Uart16550(None)
    dev.write(uart.RBR_THR, 1, ord("z"))
    dev.close()
    assert dev.transmitted == 1
