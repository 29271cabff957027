"""Coalesced MMIO and PIO on KVM: the zones and the ring they fill.

``KVM_REGISTER_COALESCED_MMIO`` on the VM fd takes a ``struct
kvm_coalesced_mmio_zone`` (``pio`` = 1 for a port range, with
``KVM_CAP_COALESCED_PIO``).  A guest write inside a zone is appended to a ring
the VM shares with user space and the guest continues without an exit
(``virt/kvm/coalesced_mmio.c``, ``coalesced_mmio_write``).  The ring lives in
the vCPU mapping, ``KVM_CHECK_EXTENSION(KVM_CAP_COALESCED_MMIO)`` pages after
the ``kvm_run`` page, and is one page for the whole VM: every vCPU's mapping
shows the same ring.  The kernel writes entry ``last`` and then advances
``last``; user space reads from ``first`` up to ``last`` and then advances
``first``; both wrap at ``KVM_COALESCED_MMIO_MAX`` entries.  When the ring is
full (one entry is always left empty) the write exits as ordinary MMIO/PIO.
docs/backends/kvm.md has the interface notes.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Sequence
from typing import Any

from pyvmm.coalesced import CoalescedWrite
from pyvmm.config import PAGE_SIZE
from pyvmm.errors import HypervisorError
from pyvmm.vcpu_state import AddressSpace, IoEventAddress
from pyvmm_kvm import bindings as k
from pyvmm_kvm.bindings import ffi

_HEAD = struct.Struct("<II")  # first, last
_ENTRY = struct.Struct("<QII8s")  # phys_addr, len, pio, data[8]
#: Entries in the one-page ring (the uapi's KVM_COALESCED_MMIO_MAX).
RING_ENTRIES = (PAGE_SIZE - ffi.sizeof("struct kvm_coalesced_mmio_ring")) // ffi.sizeof("struct kvm_coalesced_mmio")
_PORT, _MEMORY = AddressSpace.PIO, AddressSpace.MMIO


class CoalescedZones:
    """A KVM VM's coalesced zones, and the reader of its ring."""

    def __init__(self, host: Any, ring_page: int) -> None:
        self.host = host
        #: Pages after the kvm_run page where the ring is (0: no ring).
        self.ring_page = ring_page
        #: The zones registered, as ``(address, size)``.
        self.zones: list[tuple[IoEventAddress, int]] = []

    def _zone(self, address: IoEventAddress, size: int) -> Any:
        pio = 1 if address.space is _PORT else 0
        return ffi.new("struct kvm_coalesced_mmio_zone *", {"addr": address.address, "size": size, "pio": pio})

    def register(self, vm_fd: int, address: IoEventAddress, size: int) -> None:
        self.host.ioctl(vm_fd, k.KVM_REGISTER_COALESCED_MMIO, self._zone(address, size))
        self.zones.append((address, size))

    def unregister(self, vm_fd: int, address: IoEventAddress, size: int) -> None:
        self.host.ioctl(vm_fd, k.KVM_UNREGISTER_COALESCED_MMIO, self._zone(address, size))
        if (address, size) in self.zones:
            self.zones.remove((address, size))

    def ring_view(self, vcpu_views: Sequence[memoryview]) -> memoryview | None:
        """The ring page, seen through the first vCPU mapping that reaches it."""
        start = self.ring_page * PAGE_SIZE
        for view in vcpu_views:
            if self.ring_page and len(view) >= start + PAGE_SIZE:
                return view[start : start + PAGE_SIZE]
        return None

    @staticmethod
    def take(ring: memoryview | None) -> list[CoalescedWrite]:
        """Every write in ``ring`` from ``first`` to ``last``, oldest first; the
        entries are handed back to the kernel (``first`` = ``last``).

        :raises HypervisorError: the ring's indices are outside it (the kernel
            never writes such; a VMM that wrote the page itself could).
        """
        if ring is None:
            return []
        first, last = _HEAD.unpack_from(ring, 0)
        if first == last:
            return []
        if first >= RING_ENTRIES or last >= RING_ENTRIES:
            raise HypervisorError(
                "coalesced MMIO ring", errno.EPROTO, f"first={first}, last={last}, entries={RING_ENTRIES}"
            )
        base, size = _HEAD.size, _ENTRY.size
        # At most two runs of entries: first..end of ring, then 0..last.
        spans = [(first, last)] if first < last else [(first, RING_ENTRIES), (0, last)]
        # tuple.__new__ builds each record without a Python frame (CoalescedWrite
        # is a named tuple); a full-width slice of bytes is the bytes itself.
        new, record = tuple.__new__, CoalescedWrite
        writes = [
            new(record, (_PORT if pio else _MEMORY, address, data[:length]))
            for start, end in spans
            for address, length, pio, data in _ENTRY.iter_unpack(ring[base + start * size : base + end * size])
        ]
        struct.pack_into("<I", ring, 0, last)
        return writes
