"""The Bochs/QEMU power-off port 0x8900: writing the bytes "Shutdown" powers off.

kvm-unit-tests writes it after the debug-exit port as a fallback, and pyvmm's
demo guest uses it to end successfully with status 0.
"""

from __future__ import annotations

from collections.abc import Callable

from pyvmm.devices.base import Device
from pyvmm.devices.state import DeviceState, DeviceStateError, check_fields, take

POWEROFF_PORT = 0x8900
MAGIC = b"Shutdown"


class BochsPoweroff(Device):
    name = "bochs-poweroff"
    state_version = 1

    def __init__(self, on_poweroff: Callable[[], None]) -> None:
        self._on_poweroff = on_poweroff
        self._matched = 0

    def write(self, offset: int, size: int, value: int) -> None:
        for shift in range(0, 8 * size, 8):
            self._feed((value >> shift) & 0xFF)

    def _feed(self, byte: int) -> None:
        if byte == MAGIC[self._matched]:
            self._matched += 1
            if self._matched == len(MAGIC):
                self._matched = 0
                self._on_poweroff()
        else:
            self._matched = 1 if byte == MAGIC[0] else 0

    def save_state(self) -> DeviceState:
        return {"matched": self._matched}  # how much of "Shutdown" the guest wrote so far

    def load_state(self, state: DeviceState) -> None:
        check_fields(self.name, state, {"matched"})
        matched = take(self.name, state, "matched", int)
        if matched >= len(MAGIC):
            raise DeviceStateError(f"device {self.name}: {matched} bytes of {MAGIC!r} matched is impossible")
        self._matched = matched
