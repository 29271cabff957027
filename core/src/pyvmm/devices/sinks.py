"""Ports that must answer but do nothing: the POST code port 0x80 and, when the
hypervisor emulates no interrupt controller, the 8259 PIC ports (guests mask the
PIC before anything else: 0x21 and 0xa1) and the PIT's (the legacy firmware's
boot stub programs it).

A sink latches what was written and reads it back, so a guest that checks its
mask write sees the value it wrote; before any write it reads ``initial``.
"""

from __future__ import annotations

from pyvmm.devices.base import Device
from pyvmm.devices.state import DeviceState, DeviceStateError, check_fields, take

POST_PORT = 0x80
PIC_MASTER_PORT = 0x20
PIC_SLAVE_PORT = 0xA0
PIC_PORT_COUNT = 2
PIT_PORT = 0x40
PIT_PORT_COUNT = 4


class PortSink(Device):
    state_version = 1

    def __init__(self, name: str, ports: int = 1, initial: int = 0xFF) -> None:
        self.name = name
        self._latched = [initial] * ports

    def read(self, offset: int, size: int) -> int:
        return self._latched[offset] if offset < len(self._latched) else 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < len(self._latched):
            self._latched[offset] = value & 0xFF

    def save_state(self) -> DeviceState:
        return {"latched": bytes(self._latched)}

    def load_state(self, state: DeviceState) -> None:
        check_fields(self.name, state, {"latched"})
        latched = take(self.name, state, "latched", bytes)
        if len(latched) != len(self._latched):
            raise DeviceStateError(
                f"device {self.name}: {len(latched)} latched ports saved, it has {len(self._latched)}"
            )
        self._latched = list(latched)
