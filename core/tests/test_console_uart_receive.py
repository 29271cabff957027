"""The receive side of the console's UARTs: the 16550 (COM1) and the PL011."""

from __future__ import annotations

import threading

from pyvmm.devices import pl011, uart
from pyvmm.devices.pl011 import Pl011
from pyvmm.devices.serial_line import RX_BUFFER, RxBuffer
from pyvmm.devices.uart import Uart16550


class Line:
    """An interrupt line that records its levels."""

    def __init__(self) -> None:
        self.levels: list[bool] = []

    def __call__(self, level: bool) -> None:
        self.levels.append(level)

    @property
    def level(self) -> bool:
        return bool(self.levels) and self.levels[-1]


# --- 16550 ------------------------------------------------------------------------------


def test_received_bytes_are_read_from_rbr_in_order_and_lsr_says_data_ready() -> None:
    dev = Uart16550(None)
    assert not dev.read(uart.LSR, 1) & uart.LSR_DR
    assert dev.receive(b"hi") == 2
    assert dev.read(uart.LSR, 1) & uart.LSR_DR
    assert dev.read(uart.LSR, 1) & uart.LSR_THRE  # receiving does not touch the transmitter
    assert bytes((dev.read(uart.RBR_THR, 1), dev.read(uart.RBR_THR, 1))) == b"hi"
    assert not dev.read(uart.LSR, 1) & uart.LSR_DR
    assert dev.read(uart.RBR_THR, 1) == 0  # empty: reads 0, as the real part's stale holding register
    assert dev.received == 2


def test_dlab_reads_the_divisor_not_the_receive_buffer() -> None:
    dev = Uart16550(None)
    dev.receive(b"x")
    dev.write(uart.LCR, 1, 0x83)
    assert dev.read(uart.RBR_THR, 1) == 0x01  # divisor low byte
    dev.write(uart.LCR, 1, 0x03)
    assert dev.read(uart.RBR_THR, 1) == ord("x")


def test_received_data_interrupt_follows_ier_and_the_data() -> None:
    line = Line()
    dev = Uart16550(None, irq=line)
    dev.receive(b"a")
    assert not line.level  # ERBFI clear: no interrupt, the guest may poll
    dev.write(uart.IER, 1, uart.IER_RDA)
    assert line.level
    assert dev.read(uart.IIR_FCR, 1) & 0x0F == uart.IIR_RDA
    assert dev.read(uart.IIR_FCR, 1) & 0x0F == uart.IIR_RDA  # reading IIR does not clear it
    dev.read(uart.RBR_THR, 1)
    assert not line.level
    assert dev.read(uart.IIR_FCR, 1) & 0x0F == uart.IIR_NONE
    dev.receive(b"b")
    assert line.levels[-2:] == [False, True]  # a new edge for new data


def test_received_data_outranks_thr_empty() -> None:
    line = Line()
    dev = Uart16550(None, irq=line)
    dev.write(uart.IER, 1, uart.IER_RDA | uart.IER_THRE)
    dev.receive(b"z")
    assert dev.read(uart.IIR_FCR, 1) & 0x0F == uart.IIR_RDA
    dev.read(uart.RBR_THR, 1)
    assert dev.read(uart.IIR_FCR, 1) & 0x0F == uart.IIR_THRE  # then the THRE interrupt, still pending
    assert dev.read(uart.IIR_FCR, 1) & 0x0F == uart.IIR_NONE


def test_fifo_trigger_level_decides_data_available_or_character_timeout() -> None:
    dev = Uart16550(None)
    dev.write(uart.IER, 1, uart.IER_RDA)
    dev.write(uart.IIR_FCR, 1, 0xC1)  # FIFO on, trigger at 14 bytes
    dev.receive(b"abc")
    assert dev.read(uart.IIR_FCR, 1) == uart.IIR_FIFO_ENABLED | uart.IIR_TIMEOUT
    dev.receive(b"x" * 11)
    assert dev.read(uart.IIR_FCR, 1) == uart.IIR_FIFO_ENABLED | uart.IIR_RDA


def test_fcr_clears_the_receive_fifo() -> None:
    dev = Uart16550(None)
    dev.receive(b"junk")
    dev.write(uart.IIR_FCR, 1, 0x03)
    assert not dev.read(uart.LSR, 1) & uart.LSR_DR
    assert dev.fcr == 0x01  # the clear bit does not stay set


def test_loopback_sends_written_bytes_to_the_receiver_not_the_output() -> None:
    import io

    out = io.BytesIO()
    dev = Uart16550(out)
    dev.write(uart.MCR, 1, uart.MCR_LOOP)
    dev.write(uart.RBR_THR, 1, 0x55)
    assert out.getvalue() == b""
    assert dev.read(uart.RBR_THR, 1) == 0x55
    dev.write(uart.MCR, 1, 0)
    dev.write(uart.RBR_THR, 1, 0x41)
    assert out.getvalue() == b"A"


def test_a_full_buffer_takes_no_more_and_the_writer_waits_for_room() -> None:
    dev = Uart16550(None)
    assert dev.receive(b"x" * (RX_BUFFER + 10)) == RX_BUFFER
    assert not dev.rx.wait_for_room(0.01)
    reader = threading.Timer(0.05, lambda: dev.read(uart.RBR_THR, 1))
    reader.start()
    assert dev.rx.wait_for_room(5.0)
    reader.join()
    assert dev.receive(b"yz") == 1


def test_rx_buffer_counts_and_clears() -> None:
    rx = RxBuffer(4)
    assert rx.put(b"abcdef") == 4
    assert len(rx) == 4 and rx.take() == ord("a")
    rx.clear()
    assert rx.take() is None and rx.wait_for_room(0)


# --- PL011 -------------------------------------------------------------------------------


def test_pl011_receive_clears_rxfe_and_dr_reads_the_bytes() -> None:
    dev = Pl011(None)
    assert dev.read(pl011.FR, 4) & pl011.FR_RXFE
    dev.receive(b"ok")
    flags = dev.read(pl011.FR, 4)
    assert not flags & pl011.FR_RXFE and flags & pl011.FR_TXFE
    assert dev.read(pl011.DR, 4) == ord("o")
    assert dev.read(pl011.DR, 4) == ord("k")
    assert dev.read(pl011.FR, 4) & pl011.FR_RXFE


def test_pl011_rxff_when_the_buffer_is_full() -> None:
    dev = Pl011(None)
    dev.receive(b"x" * RX_BUFFER)
    assert dev.read(pl011.FR, 4) & pl011.FR_RXFF


def test_pl011_receive_interrupt_is_masked_by_imsc_and_cleared_by_reading() -> None:
    line = Line()
    dev = Pl011(None, irq=line)
    dev.receive(b"q")
    assert dev.read(pl011.RIS, 4) & pl011.INT_RX
    assert not line.level
    dev.write(pl011.IMSC, 4, pl011.INT_RX | pl011.INT_RT)
    assert line.level
    assert dev.read(pl011.MIS, 4) & pl011.INT_RX
    dev.read(pl011.DR, 4)
    assert not line.level
    assert not dev.read(pl011.RIS, 4) & (pl011.INT_RX | pl011.INT_RT)


def test_pl011_with_the_fifo_on_below_the_trigger_is_a_receive_timeout() -> None:
    dev = Pl011(None)
    dev.write(pl011.LCR_H, 4, pl011.LCR_H_FEN)  # IFLS reset: trigger at half (8)
    dev.receive(b"abc")
    assert dev.read(pl011.RIS, 4) & (pl011.INT_RX | pl011.INT_RT) == pl011.INT_RT
    dev.receive(b"defgh")
    assert dev.read(pl011.RIS, 4) & (pl011.INT_RX | pl011.INT_RT) == pl011.INT_RX


def test_pl011_loopback_goes_to_the_receiver() -> None:
    dev = Pl011(None)
    dev.write(pl011.CR, 4, pl011.CR_RESET | pl011.CR_LBE | 1)
    dev.write(pl011.DR, 4, 0x7A)
    assert dev.read(pl011.DR, 4) == 0x7A
    assert dev.transmitted == 0
