"""A gdb stub: ``pyvmm run --gdb tcp:HOST:PORT`` lets gdb debug the guest.

:class:`GdbServer` listens (before the machine is built); :meth:`GdbServer.attach`
hands a :class:`~pyvmm.machine.machine.Machine` to a :class:`GdbStub`, which
holds every vCPU before its first instruction until gdb continues or steps.
The protocol is GDB's remote serial protocol (registers with a target
description, memory, breakpoints, stepping, Ctrl-C, detach and kill) on the
backend's ``GUEST_DEBUG`` capability and register access; see
:mod:`pyvmm.gdbstub.stub`.  Names load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["GdbServer", "GdbStub", "parse_gdb_address"]

if TYPE_CHECKING:
    from pyvmm.gdbstub.address import parse_gdb_address
    from pyvmm.gdbstub.stub import GdbServer, GdbStub


def __getattr__(name: str) -> Any:
    if name == "parse_gdb_address":
        from pyvmm.gdbstub.address import parse_gdb_address

        return parse_gdb_address
    if name in ("GdbServer", "GdbStub"):
        from pyvmm.gdbstub import stub

        return getattr(stub, name)
    raise AttributeError(f"module 'pyvmm.gdbstub' has no attribute {name!r}")
