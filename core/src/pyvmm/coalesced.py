"""Coalesced I/O: guest writes the hypervisor records instead of exiting.

A VMM registers a *zone* (a guest-physical range, or a port range where the
backend declares ``COALESCED_PIO``) with :meth:`pyvmm.vm.Vm.register_coalesced_io`.
A guest write inside a zone then does not exit to the VMM: the hypervisor appends
it to a ring and lets the guest go on (KVM: ``KVM_REGISTER_COALESCED_MMIO``, the
ring on a page of the vCPU mapping).  The VMM collects the writes with
:meth:`~pyvmm.vm.Vm.take_coalesced_io` -- in the order the guest made them -- and
must do so **before it handles the next exit**, so that a device sees the
coalesced writes before whatever access made the guest exit (a doorbell read, a
status poll, ``HLT``).  When the ring is full the hypervisor exits as usual, and
that exit is where the VMM drains it.

Only writes whose effect may wait until the next exit belong in a zone: a frame
buffer, a log port, a device's register file that the guest writes many times
before it rings a doorbell.  Reads in a zone still exit.
"""

from __future__ import annotations

from typing import NamedTuple

from pyvmm.vcpu_state import AddressSpace


class CoalescedWrite(NamedTuple):
    """One recorded guest write: ``data`` (1-8 bytes) at ``address`` in ``space``.

    A named tuple because a ring is drained by the hundred entries at a time:
    building one (``tuple.__new__``) took about two thirds of the time of a
    slotted class's Python ``__init__`` here, and its fields are read without a
    Python frame either."""

    space: AddressSpace
    address: int
    data: bytes

    @property
    def value(self) -> int:
        """``data`` as the little-endian integer the guest wrote."""
        return int.from_bytes(self.data, "little")

    def __repr__(self) -> str:
        return f"CoalescedWrite({self.space.value} {self.address:#x} <- {self.data.hex()})"
