"""What every UART model shares: the line to the console (or looped back), the
receive buffer the console feeds from any thread, and the byte counters.

:class:`Uart16550` and :class:`~pyvmm.devices.pl011.Pl011` differ in registers
and interrupt rules; each implements ``_update_irq`` and calls :meth:`SerialLine._send`
from its transmit register.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import BinaryIO

from pyvmm.devices.base import Device, IrqLine

#: Bytes the receive side holds: the FIFO plus the line's backlog.
RX_BUFFER = 4096


class RxBuffer:
    """The bytes a UART has received and the guest has not read yet, bounded.

    :meth:`put` takes what fits and returns how many; a writer that got less
    waits on :meth:`wait_for_room`.  The owner calls :meth:`take` under its own
    lock; room is signalled to a waiting writer.
    """

    def __init__(self, capacity: int = RX_BUFFER) -> None:
        self.capacity = capacity
        self._bytes: deque[int] = deque()
        self._room = threading.Event()
        self._room.set()

    def __len__(self) -> int:
        return len(self._bytes)

    def put(self, data: bytes) -> int:
        room = self.capacity - len(self._bytes)
        taken = data[:room]
        self._bytes.extend(taken)
        if len(self._bytes) >= self.capacity:
            self._room.clear()
        return len(taken)

    def take(self) -> int | None:
        if not self._bytes:
            return None
        byte = self._bytes.popleft()
        if not self._room.is_set():
            self._room.set()
        return byte

    def peek(self) -> bytes:
        """What is waiting, without taking it."""
        return bytes(self._bytes)

    def clear(self) -> None:
        self._bytes.clear()
        self._room.set()

    def wait_for_room(self, timeout: float | None = None) -> bool:
        """Block until the buffer has room (True) or ``timeout`` passed (False)."""
        return self._room.wait(timeout)


class SerialLine(Device):
    """A UART's line: output, loopback, receive buffer and counters."""

    def __init__(self, output: BinaryIO | None, *, irq: IrqLine | None = None, flush_lines: bool = True) -> None:
        self._output = output
        self._irq = irq
        self._flush_lines = flush_lines
        self._lock = threading.Lock()
        self._irq_level = False
        self.rx = RxBuffer()
        self.transmitted = 0
        self.received = 0

    def _update_irq(self) -> None:
        raise NotImplementedError

    # --- the host side ------------------------------------------------------------
    def receive(self, data: bytes) -> int:
        """Bytes arriving on the line (from any thread); returns how many fit.
        Wait with ``rx.wait_for_room()`` before handing over the rest."""
        with self._lock:
            taken = self.rx.put(data)
            if taken:
                self.received += taken
                self._update_irq()
            return taken

    def _send(self, byte: int, *, loopback: bool) -> None:
        """A byte the guest transmitted: to the receiver in loopback mode, else to
        the console (flushed at each newline when ``flush_lines``)."""
        if loopback:
            if self.rx.put(bytes((byte,))):
                self.received += 1
            return
        self.transmitted += 1
        output = self._output
        if output is not None:
            output.write(bytes((byte,)))
            if byte == 0x0A and self._flush_lines:
                output.flush()
