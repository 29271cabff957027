"""The demo MMIO device: a page of registers behind MMIO exits.

========  ====  ==========================================================
offset    size  register
========  ====  ==========================================================
0x00      4     ID, read-only: ``b"PVMM"`` little-endian (0x4d4d5650)
0x08      8     scratch: reads back what was written, at any width
0x10      4     access counter, read-only: accesses seen so far
========  ====  ==========================================================

Other offsets read 0 and ignore writes.  The demo guest writes the scratch
register and reads it back to show an MMIO round trip through Python.
"""

from __future__ import annotations

from pyvmm.devices.base import Device
from pyvmm.devices.state import DeviceState, DeviceStateError, check_fields, take

DEMO_DEVICE_BASE = 0xFEB0_0000
DEMO_DEVICE_SIZE = 0x1000
DEMO_DEVICE_ID = int.from_bytes(b"PVMM", "little")

REG_ID = 0x00
REG_SCRATCH = 0x08
REG_COUNTER = 0x10
_SCRATCH_END = REG_SCRATCH + 8


class ScratchDevice(Device):
    name = "demo-device"
    state_version = 1

    def __init__(self) -> None:
        self._scratch = bytearray(8)
        self.accesses = 0

    def read(self, offset: int, size: int) -> int:
        self.accesses += 1
        if offset == REG_ID:
            return DEMO_DEVICE_ID
        if offset >= REG_SCRATCH and offset + size <= _SCRATCH_END:
            start = offset - REG_SCRATCH
            return int.from_bytes(self._scratch[start : start + size], "little")
        if offset == REG_COUNTER:
            return self.accesses & 0xFFFF_FFFF
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.accesses += 1
        if offset >= REG_SCRATCH and offset + size <= _SCRATCH_END:
            start = offset - REG_SCRATCH
            self._scratch[start : start + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    @property
    def scratch(self) -> int:
        return int.from_bytes(self._scratch, "little")

    def save_state(self) -> DeviceState:
        return {"scratch": bytes(self._scratch), "accesses": self.accesses}

    def load_state(self, state: DeviceState) -> None:
        check_fields(self.name, state, {"scratch", "accesses"})
        scratch = take(self.name, state, "scratch", bytes)
        accesses = take(self.name, state, "accesses", int)
        if len(scratch) != len(self._scratch):
            raise DeviceStateError(f"device {self.name}: the scratch register is 8 bytes, not {len(scratch)}")
        self._scratch[:], self.accesses = scratch, accesses
