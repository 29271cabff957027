"""Address buses: which device answers a port or MMIO address.

Devices are registered by address range before the machine runs; an overlapping
range is refused.  Registration prepares the structure the run loop searches on
every exit, so an exit costs one lookup and no allocation:

* the port bus keeps a dict from every registered port to its entry (64 Ki ports
  at most, devices span a handful each);
* the MMIO bus keeps sorted range starts for :func:`bisect.bisect_right`.

An entry is the tuple ``(read, write, base, device)`` with the bound methods
looked up once; the port table's entries hold the port's offset in place of the
base (and a port's address in place of 0 for the unhandled entry), so a port
access needs no subtraction.  An address no device claims gets the bus's :class:`Unhandled`
entry, which answers like an empty bus (all ones) and logs the first access to
each address.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable

from pyvmm.devices.base import ALL_ONES, Device
from pyvmm.errors import ConfigError
from pyvmm.lazy_logging import LazyLogger

# Loads logging only when a record goes out (start-up time).
log = LazyLogger("pyvmm.machine")

#: ``(read, write, base, device)``; base is 0 for the unhandled entry, whose
#: device therefore sees absolute addresses.
Entry = tuple[Callable[[int, int], int], Callable[[int, int, int], None], int, Device]
#: ``(read, write, offset, device)``: what the port table holds per port.
PortEntry = Entry


class BusConflict(ConfigError):
    """A device was registered over an address range another device holds."""


class Unhandled(Device):
    """What answers where no device is: reads all ones, ignores writes, and logs
    the first access to each address."""

    state_version = 0  # which addresses were logged is the VMM's business, not the guest's

    def __init__(self, space: str) -> None:
        self.name = f"unhandled {space}"
        self.space = space
        self.seen: set[int] = set()
        self._lock = threading.Lock()

    def _note(self, address: int, size: int, what: str) -> None:
        with self._lock:
            if address in self.seen:
                return
            self.seen.add(address)
        log.warning(
            "unhandled %d-byte %s %s at %#x (%s; logged once per address)",
            size,
            self.space,
            what,
            address,
            "read as all ones" if what == "read" else "ignored",
        )

    def read(self, offset: int, size: int) -> int:
        if offset not in self.seen:
            self._note(offset, size, "read")
        return ALL_ONES

    def write(self, offset: int, size: int, value: int) -> None:
        if offset not in self.seen:
            self._note(offset, size, "write")


class Bus:
    """Ranges of one address space and the devices behind them."""

    def __init__(self, space: str, limit: int) -> None:
        self.space = space
        self.limit = limit
        self.unhandled = Unhandled(space)
        self.unhandled_entry: Entry = (self.unhandled.read, self.unhandled.write, 0, self.unhandled)
        self._ranges: list[tuple[int, int, Device]] = []

    def register(self, base: int, size: int, device: Device) -> None:
        """Put ``device`` at ``base..base+size``.

        :raises BusConflict: the range overlaps a registered device's, naming both.
        :raises ConfigError: the range is empty or leaves the address space.
        """
        if size <= 0 or base < 0 or base + size > self.limit:
            raise ConfigError(f"{device.name}: {self.space} range {base:#x}+{size:#x} is not inside 0..{self.limit:#x}")
        for other_base, other_size, other in self._ranges:
            if base < other_base + other_size and other_base < base + size:
                raise BusConflict(
                    f"{device.name}: {self.space} range {base:#x}..{base + size - 1:#x} overlaps "
                    f"{other.name} at {other_base:#x}..{other_base + other_size - 1:#x}"
                )
        self._ranges.append((base, size, device))
        self._ranges.sort(key=lambda item: item[0])
        self._prepare()

    def _prepare(self) -> None:
        """Rebuild the lookup structure after a registration."""

    @property
    def ranges(self) -> list[tuple[int, int, Device]]:
        """``(base, size, device)`` of every registered device, by address."""
        return list(self._ranges)

    def devices(self) -> list[Device]:
        unique: dict[int, Device] = {}
        for _, _, device in self._ranges:
            unique.setdefault(id(device), device)
        return list(unique.values())

    def entry(self, address: int) -> Entry:
        """The entry answering ``address`` (the unhandled entry if none)."""
        raise NotImplementedError

    def find(self, address: int) -> Device | None:
        entry = self.entry(address)
        return None if entry is self.unhandled_entry else entry[3]

    # --- convenience accesses (tests, tools); the run loop inlines these ----------
    def read(self, address: int, size: int) -> int:
        read, _, base, _ = self.entry(address)
        return read(address - base, size) & ((1 << (8 * size)) - 1)

    def write(self, address: int, size: int, value: int) -> None:
        _, write, base, _ = self.entry(address)
        write(address - base, size, value & ((1 << (8 * size)) - 1))


class PortBus(Bus):
    """x86 I/O ports 0..0xffff."""

    def __init__(self) -> None:
        super().__init__("port", 0x10000)
        self.table: dict[int, Entry] = {}

    def _prepare(self) -> None:
        table: dict[int, PortEntry] = {}
        for base, size, device in self._ranges:
            read, write = device.read, device.write
            for port in range(base, base + size):
                table[port] = (read, write, port - base, device)
        self.table = table

    def entry(self, address: int) -> Entry:
        found = self.table.get(address)
        if found is None:
            return self.unhandled_entry
        read, write, offset, device = found
        return (read, write, address - offset, device)

    def port_entry(self, address: int) -> PortEntry:
        """The run loop's form: ``(read, write, offset, device)``."""
        found = self.table.get(address)
        if found is None:
            unhandled = self.unhandled
            return (unhandled.read, unhandled.write, address, unhandled)
        return found


class MmioBus(Bus):
    """Guest-physical addresses that no RAM backs."""

    def __init__(self) -> None:
        super().__init__("MMIO", 1 << 52)
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.entries: list[Entry] = []

    def _prepare(self) -> None:
        self.starts = [base for base, _, _ in self._ranges]
        self.ends = [base + size for base, size, _ in self._ranges]
        self.entries = [(device.read, device.write, base, device) for base, _, device in self._ranges]

    def entry(self, address: int) -> Entry:
        index = bisect.bisect_right(self.starts, address) - 1
        if index >= 0 and address < self.ends[index]:
            return self.entries[index]
        return self.unhandled_entry
