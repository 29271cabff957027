"""The VM's ioeventfds as the driver matches guest writes against them.

A vCPU needs them after an interrupted run: the driver hands an MMIO write
that an ioeventfd takes to the eventfd and goes on looping, and a signal
ending the loop right then copies that write out with ``EINTR``
(``gzvm_vcpu.c gzvm_vcpu_run``).  The write was delivered already; only the
ioeventfds registered through this VM say so, by the driver's own match
(``gzvm_ioeventfd.c gzvm_ioevent_in_range``, first registered first).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class IoEvent:
    """One registered ioeventfd: ``length`` 0 takes every write at ``address``;
    ``datamatch`` None takes any value of ``length`` bytes."""

    fd: int
    address: int
    length: int
    datamatch: int | None

    def takes(self, address: int, size: int, value: int) -> bool:
        if address != self.address:
            return False
        if not self.length:
            return True
        return size == self.length and (self.datamatch is None or value == self.datamatch)


class IoEvents:
    """What this VM registered with ``GZVM_IOEVENTFD``; safe across threads (the
    VMM registers while vCPU threads run)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[IoEvent] = []

    def add(self, event: IoEvent) -> None:
        with self._lock:
            self._events.append(event)

    def remove(self, event: IoEvent) -> None:
        """The one the driver deassigned (same eventfd, address, length and match)."""
        with self._lock:
            if event in self._events:
                self._events.remove(event)

    def take_write(self, address: int, data: bytes) -> bool:
        """Whether the driver gives a guest write of ``data`` at ``address`` to an
        ioeventfd instead of to the VMM."""
        value = int.from_bytes(data, "little")
        with self._lock:
            return any(event.takes(address, len(data), value) for event in self._events)
