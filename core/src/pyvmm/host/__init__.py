"""Platform-neutral host services: what core and backends need from the host OS,
with a POSIX and a Windows side.

* :func:`allocate_ram` -> :class:`HostRam`: zeroed, page-aligned guest RAM with
  its host address and a zero-copy writable ``memoryview`` (POSIX ``mmap`` with
  ``MAP_NORESERVE``; Windows ``VirtualAlloc``).
* :class:`Event`: a signalable event, what hooks and the machine layer pass
  instead of raw eventfd numbers (Linux ``eventfd``, a pipe on other POSIX hosts, a
  Windows event object).

Importing this package runs nothing platform-specific: every host call happens
when a function is called, so ``import pyvmm.host`` works on any OS.
"""

from __future__ import annotations

from pyvmm.host.event import Event, EventFd, PipeEvent, Win32Event, default_event_class
from pyvmm.host.ram import HostRam, allocate_ram, map_noreserve

__all__ = [
    "Event",
    "EventFd",
    "HostRam",
    "PipeEvent",
    "Win32Event",
    "allocate_ram",
    "default_event_class",
    "map_noreserve",
]
