"""The device interface the machine's buses dispatch to."""

from __future__ import annotations

from collections.abc import Callable

from pyvmm.devices.state import DeviceState, Stateful, check_fields
from pyvmm.lean_dataclass import lean_dataclass
from pyvmm.served_io import ServedSpan

#: What an absent device answers on a real bus: every data line floats high.
ALL_ONES = 0xFFFF_FFFF_FFFF_FFFF

#: Drives one interrupt line: ``irq(True)`` raises it, ``irq(False)`` lowers it.
IrqLine = Callable[[bool], None]


@lean_dataclass(frozen=True)
class Doorbell:
    """A register whose write only says "look now" (a virtqueue notify).

    ``size`` bytes at ``offset`` of the device; with ``datamatch``, only writes
    of that value ring it.  The value written is otherwise not passed on: where
    the backend has ioevents the write never reaches the VMM as an access, only
    as a signal (:mod:`pyvmm.machine.doorbells`).
    """

    offset: int
    size: int
    datamatch: int | None = None


class Device:
    """A device behind a range of ports or MMIO addresses.

    ``offset`` is relative to the base the device is registered at; ``size`` is
    the access width in bytes (1, 2, 4 or 8) and ``value`` the little-endian
    value of the access.  A read may return more bits than ``size``: the bus
    keeps the low ``size`` bytes.  The defaults model a register window that
    ignores writes and reads as all ones.

    Devices are called from whichever vCPU thread made the access, one access at
    a time per vCPU; a device that several vCPUs use keeps its own state
    consistent.  An exception raised here stops the machine and propagates out of
    :meth:`pyvmm.machine.Machine.run`, naming the access.
    """

    name = "device"
    #: True when the device's writes may take effect at the guest's next exit
    #: instead of at once: the machine then lets the backend record them without
    #: exiting, where it can (pyvmm.machine.coalesced_io says which devices qualify).
    coalesced_writes = False
    #: Registers the machine may turn into ioevents, so that writing one does not
    #: exit: :meth:`doorbell_rung` is then called on the machine's doorbell
    #: thread instead of :meth:`write` on the vCPU's.  Where the backend has no
    #: ioevents, the write arrives through :meth:`write` as any other.
    doorbells: tuple[Doorbell, ...] = ()

    #: The version of :meth:`save_state`'s format (:mod:`pyvmm.devices.state`):
    #: 0, no state; None (the default: a subclass holds state this class cannot
    #: know of), the device cannot be snapshotted.
    state_version: int | None = None

    def read(self, offset: int, size: int) -> int:
        return ALL_ONES

    def write(self, offset: int, size: int, value: int) -> None:
        return None

    def served_spans(self) -> tuple[ServedSpan, ...]:
        """Registers simple enough for the backend to answer inside its run,
        never exiting (:mod:`pyvmm.served_io`), asked once when the machine
        starts: where the backend declares ``SERVED_IO`` the machine registers
        them, and their accesses no longer reach :meth:`read`/:meth:`write`.
        A span's answers must be exactly what :meth:`read`/:meth:`write` would
        give.  None by default."""
        return ()

    def doorbell_rung(self, doorbell: Doorbell) -> None:
        """One of :attr:`doorbells` was written at least once since the last
        call (several writes may ring once), on the machine's doorbell thread.
        By default the write the exit would have made: ``datamatch`` (or 0)."""
        self.write(doorbell.offset, doorbell.size, doorbell.datamatch or 0)

    def close(self) -> None:
        """Flush and release host resources when the machine stops."""
        return None

    def state_holder(self) -> Stateful:
        """The object whose state this bus entry shows: itself, or the controller
        a port view belongs to (saved once however many views it has)."""
        return self

    def save_state(self) -> DeviceState:
        """The guest-visible state, for a snapshot (called with every vCPU stopped)."""
        return {}

    def load_state(self, state: DeviceState) -> None:
        """Take a state :meth:`save_state` returned (its version already checked);
        check every field before changing anything.

        :raises DeviceStateError: a field is missing, extra or out of range.
        """
        check_fields(self.name, state, set())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
