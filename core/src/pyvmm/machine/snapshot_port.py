"""The PC's snapshot request port (0x5f0), apart from the snapshot machinery.

Every x86_64 machine has the port, so that a guest which asks for a snapshot
runs the same whether one is being taken or not; only a machine that saves or
restores one needs :mod:`pyvmm.machine.snapshots` and :mod:`pyvmm.snapshot`,
which a plain ``pyvmm run`` therefore never imports (a start-up cost).
"""

from __future__ import annotations

from collections.abc import Callable

from pyvmm.devices.base import Device

#: The port a guest writes to ask for a snapshot (unused on the PC otherwise).
SNAPSHOT_PORT = 0x5F0


class SnapshotRequestPort(Device):
    """Port 0x5f0: a write asks for a snapshot when the machine is to save one,
    and is ignored otherwise; reads all ones.  Stateless."""

    name = "snapshot-request"
    state_version = 0

    def __init__(self) -> None:
        self.on_request: Callable[[], None] | None = None

    def write(self, offset: int, size: int, value: int) -> None:
        if self.on_request is not None:
            self.on_request()
