"""QEMU's isa-debug-exit at port 0xf4: a guest write ends the run.

A write of ``code`` (1, 2 or 4 bytes wide) ends the run with process status
``(code << 1) | 1``, exactly as QEMU does, because the kvm-unit-tests runner
decodes that status (1 = all tests passed).  The status is odd by construction,
so it never collides with the even statuses the machine uses for its own
outcomes.  Reads return all ones (the QEMU device has no read side).
"""

from __future__ import annotations

from collections.abc import Callable

from pyvmm.devices.base import Device

DEBUG_EXIT_PORT = 0xF4
PORT_COUNT = 4


def debug_exit_status(code: int, size: int) -> int:
    """The process status QEMU gives a write of ``code``, truncated to 8 bits as
    ``exit(3)`` does."""
    code &= (1 << (8 * size)) - 1
    return ((code << 1) | 1) & 0xFF


class DebugExit(Device):
    name = "debug-exit"
    state_version = 0

    def __init__(self, on_exit: Callable[[int, int], None]) -> None:
        """``on_exit(code, status)`` is called once per write."""
        self._on_exit = on_exit

    def write(self, offset: int, size: int, value: int) -> None:
        code = value & ((1 << (8 * size)) - 1)
        self._on_exit(code, debug_exit_status(code, size))
