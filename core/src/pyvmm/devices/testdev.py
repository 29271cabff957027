"""QEMU's ``pc-testdev``: the ports and the MMIO window kvm-unit-tests pokes to
check instruction emulation and interrupt routing.

=====================  ==================================================
where                  what
=====================  ==================================================
port 0xe0-0xe3         a 32-bit latch: any width at any offset reads back
                       the bytes last written there
port 0xe4-0xe7         "flush page": a 32-bit write of a guest-physical
                       address; a no-op here (see below)
port 0xe8-0xeb         the same latch, one byte at a time
port 0x2000-0x2017     ISA interrupt line ``port - 0x2000``: a non-zero byte
                       raises it, zero lowers it
MMIO 0xff000000        64 KiB that read back what was written
=====================  ==================================================

A test device: the machine installs it only when asked (``testdev``), never on
an ordinary PC.

The flush-page port makes QEMU revoke and restore the host mapping of one guest
page, so that KVM has to fault it in again.  pyvmm cannot change a mapping under
the hypervisor through its backend interface, so the write is accepted and does
nothing: eventinj only loses the coverage of that re-fault.

Interrupt-line writes wider than a byte act as one write per byte, to
consecutive lines, as QEMU splits accesses wider than the one byte this region
accepts: realmode.flat's ``outl 1, 0x200b`` raises line 11 and lowers 12-14.
"""

from __future__ import annotations

from collections.abc import Callable

from pyvmm.devices.base import Device
from pyvmm.lazy_logging import LazyLogger

# Loads logging only when a record goes out (start-up time).
log = LazyLogger("pyvmm.devices")

LATCH_PORT = 0xE0
#: The latch, the flush-page port and the byte-wide latch, 4 ports each.
LATCH_PORT_COUNT = 12
_LATCH_SIZE = 4
_FLUSH_OFFSET = 4
_BYTE_LATCH_OFFSET = 8

IRQ_PORT = 0x2000
#: ISA lines 0-15 and the IOAPIC's 16-23.
IRQ_PORT_COUNT = 24

IOMEM_BASE = 0xFF00_0000
IOMEM_SIZE = 0x1_0000

#: ``set_line(line, level)``: drive one interrupt line of the machine.
SetIrqLine = Callable[[int, bool], None]


class PcTestDev:
    """The device; the machine registers its three views (:attr:`ports`,
    :attr:`irq_ports`, :attr:`iomem`) on the buses.

    :param set_irq_line: drives the machine's interrupt lines; None where the
        hypervisor has no interrupt controller, in which case line writes are
        ignored (and logged once).
    """

    def __init__(self, set_irq_line: SetIrqLine | None) -> None:
        self.latch = bytearray(_LATCH_SIZE)
        self.buffer = bytearray(IOMEM_SIZE)
        self._set_irq_line = set_irq_line
        self._warned = False
        self.ports = TestDevPorts(self)
        self.irq_ports = TestDevIrqPorts(self)
        self.iomem = TestDevMemory(self)

    def set_line(self, line: int, level: bool) -> None:
        if self._set_irq_line is None:
            if not self._warned:
                self._warned = True
                log.warning("pc-testdev: interrupt line %d: no interrupt controller to drive (ignored)", line)
            return
        self._set_irq_line(line, level)


class TestDevPorts(Device):
    """Ports 0xe0-0xeb."""

    name = "pc-testdev"

    def __init__(self, dev: PcTestDev) -> None:
        self._dev = dev

    def _span(self, offset: int, size: int) -> tuple[int, int]:
        # Bytes of an access that fall outside this 4-byte register belong to the next
        # one in QEMU; here they are dropped on writes and read as zero.
        start = offset % _LATCH_SIZE
        return start, min(start + size, _LATCH_SIZE)

    def read(self, offset: int, size: int) -> int:
        if _FLUSH_OFFSET <= offset < _BYTE_LATCH_OFFSET:
            return 0
        start, end = self._span(offset, size)
        return int.from_bytes(self._dev.latch[start:end], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if _FLUSH_OFFSET <= offset < _BYTE_LATCH_OFFSET:
            return  # flush page: see the module docstring
        start, end = self._span(offset, size)
        self._dev.latch[start:end] = (value & ((1 << (8 * (end - start))) - 1)).to_bytes(end - start, "little")


class TestDevIrqPorts(Device):
    """Ports 0x2000-0x2017: one interrupt line each."""

    name = "pc-testdev irq lines"

    def __init__(self, dev: PcTestDev) -> None:
        self._dev = dev

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            line = offset + i
            if line < IRQ_PORT_COUNT:
                self._dev.set_line(line, bool((value >> (8 * i)) & 0xFF))


class TestDevMemory(Device):
    """MMIO 0xff000000-0xff00ffff: plain memory behind MMIO exits."""

    name = "pc-testdev iomem"

    def __init__(self, dev: PcTestDev) -> None:
        self._buffer = dev.buffer

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self._buffer[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        end = min(offset + size, IOMEM_SIZE)
        self._buffer[offset:end] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")[: end - offset]
