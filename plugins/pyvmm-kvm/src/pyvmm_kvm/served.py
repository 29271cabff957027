"""A KVM VM's served registers (:mod:`pyvmm.served_io`), answered in its vCPUs' run.

One :class:`ServedRanges` per VM, shared by its vCPUs.  On the compiled path
(:mod:`pyvmm_kvm.fast_exits`) the ranges are mirrored into the C table that
``fx_run`` reads, and a latch's bytes live in a buffer both sides see; on the
pure path :meth:`ServedRanges.serve_port` and :meth:`ServedRanges.serve_mmio`
answer the same accesses the same way (``fast_exits.c`` ``serve()``), which
the tests check side by side.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pyvmm.errors import ConfigError
from pyvmm.exits import IoExit, MmioExit
from pyvmm.served_io import (
    MAX_SERVED_RANGES,
    PM_TIMER_WIDTH,
    ConstantRegister,
    LatchedBytes,
    ServedRegister,
    pm_timer_count,
)
from pyvmm.vcpu_state import AddressSpace, IoEventAddress

# The C table's codes (fast_exits.c FX_*).
_PORT, _MMIO = 0, 1
_CONSTANT, _LATCH, _PM_TIMER = 1, 2, 3


class ServedRange:
    """One served range: ``base``..``end`` of ``space``, answered as ``kind``."""

    __slots__ = ("base", "end", "kind", "latch", "register", "space", "value")

    def __init__(self, space: AddressSpace, base: int, size: int, register: ServedRegister) -> None:
        self.space = space
        self.base = base
        self.end = base + size
        self.register = register
        self.latch = bytearray()
        if isinstance(register, ConstantRegister):
            self.kind, self.value = _CONSTANT, register.value
        elif isinstance(register, LatchedBytes):
            self.kind, self.value = _LATCH, 0
            self.latch = bytearray([register.initial]) * size
        else:
            self.kind, self.value = _PM_TIMER, register.start_ns

    def answer(self, offset: int, size: int, is_write: bool, data: memoryview, at: int) -> bool:
        """One access; a read's value goes into ``data[at:at + size]``.  False:
        the access is the VMM's (a PM timer write, or a read of another width)."""
        kind = self.kind
        if kind == _CONSTANT:
            if is_write:
                return True
            value = self.value
        elif kind == _LATCH:
            if is_write:
                self.latch[offset] = data[at]
                return True
            value = self.latch[offset]
        else:
            if is_write or size != PM_TIMER_WIDTH:
                return False
            value = pm_timer_count(self.value, time.monotonic_ns())
        data[at : at + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        return True


class ServedRanges:
    """The served ranges of one VM.

    :param compiled: the compiled module (its ``ffi`` makes the C table), or None
        on the pure path.
    :param coalesced: returns the VM's coalesced zones (a served range must not
        overlap one: its writes would sit in the ring while reads are answered).
    """

    def __init__(self, compiled: Any | None, coalesced: Callable[[], list[tuple[IoEventAddress, int]]]) -> None:
        self.ranges: list[ServedRange] = []
        #: The ranges of each space, for the pure path's lookups.
        self.ports: list[ServedRange] = []
        self.mmio: list[ServedRange] = []
        self._coalesced = coalesced
        self._ffi = compiled.ffi if compiled is not None else None
        #: The C table ``fx_run`` reads (compiled path only).
        self.table: Any = self._ffi.new("struct fx_table *") if self._ffi is not None else None
        self._pinned: list[Any] = []  # the C views of the latches, alive as long as the table

    def add(self, address: IoEventAddress, size: int, register: ServedRegister) -> None:
        """Serve ``size`` bytes from ``address`` as ``register`` (checked by core).

        :raises ConfigError: the range overlaps a served range or a coalesced
            zone, or the VM already serves :data:`MAX_SERVED_RANGES` ranges.
        """
        base, end = address.address, address.address + size
        for other in self.ranges:
            if other.space is address.space and base < other.end and other.base < end:
                raise ConfigError(f"served range {base:#x}..{end - 1:#x} overlaps the served range at {other.base:#x}")
        for zone, zone_size in self._coalesced():
            if zone.space is address.space and base < zone.address + zone_size and zone.address < end:
                raise ConfigError(
                    f"served range {base:#x}..{end - 1:#x} overlaps the coalesced zone at {zone.address:#x}"
                )
        if len(self.ranges) >= MAX_SERVED_RANGES:
            raise ConfigError(f"a KVM VM serves at most {MAX_SERVED_RANGES} ranges")
        served = ServedRange(address.space, base, size, register)
        if self.table is not None:
            self._mirror(served)
        self.ranges.append(served)
        (self.ports if address.space is AddressSpace.PIO else self.mmio).append(served)

    def _mirror(self, served: ServedRange) -> None:
        assert self._ffi is not None
        entry = self.table.ranges[len(self.ranges)]
        entry.base, entry.size, entry.value = served.base, served.end - served.base, served.value
        entry.space = _PORT if served.space is AddressSpace.PIO else _MMIO
        entry.kind = served.kind
        if served.kind == _LATCH:
            latch = self._ffi.from_buffer("uint8_t[]", served.latch)
            self._pinned.append(latch)
            entry.latch = latch
        # The entry is complete before the count admits it (fx_run reads the
        # count first, with acquire order; x86 keeps stores in order).
        self.table.count = len(self.ranges) + 1

    def serve_port(self, io: IoExit) -> bool:
        """The pure path: answer ``io`` if a served range holds its port."""
        port = io.port
        for served in self.ports:
            if served.base <= port < served.end:
                size, data, is_write, offset, count = io.size, io.data, io.is_write, port - served.base, io.count
                if count == 1:
                    return served.answer(offset, size, is_write, data, 0)
                return all(served.answer(offset, size, is_write, data, i * size) for i in range(count))
        return False

    def serve_mmio(self, mmio: MmioExit) -> bool:
        """The pure path: answer ``mmio`` if a served range holds its address."""
        address = mmio.address
        for served in self.mmio:
            if served.base <= address < served.end:
                return served.answer(address - served.base, mmio.size, mmio.is_write, mmio.data, 0)
        return False
