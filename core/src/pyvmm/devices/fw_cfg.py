"""QEMU's fw_cfg, legacy port interface: selector at 0x510, data at 0x511.

A 16-bit write to the selector picks an item and rewinds it; each read of the
data port returns the item's next byte (a wider read returns that many bytes,
little-endian), and 0 past the end or for an unknown item, as QEMU does.  No DMA
interface (the ID item says so) and an empty file directory.

Item 0x11 needs a word: kvm-unit-tests reads it as "FW_CFG_MAX_RAM" (0 = no
limit), but in QEMU key 0x11 is FW_CFG_KERNEL_DATA, so QEMU answers with the
first bytes of the kernel image and thereby caps the tests' "high memory".
pyvmm answers 0, the value the tests document as meaning "no limit".
"""

from __future__ import annotations

import struct

from pyvmm.devices.base import Device
from pyvmm.devices.state import DeviceState, check_fields, take

SELECTOR_PORT = 0x510
DATA_PORT = 0x511
PORT_COUNT = 2

FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_UUID = 0x02
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_KVM_UNIT_TESTS_MAX_RAM = 0x11
FW_CFG_FILE_DIR = 0x19

#: FW_CFG_ID bit 0: the traditional (port) interface; bit 1 (DMA) stays clear.
ID_TRADITIONAL = 0x1


class FwCfg(Device):
    name = "fw_cfg"
    state_version = 1

    def __init__(self, *, ram_size: int, cpus: int, max_cpus: int | None = None) -> None:
        self.items: dict[int, bytes] = {
            FW_CFG_SIGNATURE: b"QEMU",
            FW_CFG_ID: struct.pack("<I", ID_TRADITIONAL),
            FW_CFG_UUID: bytes(16),
            FW_CFG_RAM_SIZE: struct.pack("<Q", ram_size),
            FW_CFG_NOGRAPHIC: struct.pack("<H", 1),
            FW_CFG_NB_CPUS: struct.pack("<H", cpus),
            FW_CFG_MAX_CPUS: struct.pack("<H", max_cpus if max_cpus is not None else cpus),
            FW_CFG_KVM_UNIT_TESTS_MAX_RAM: struct.pack("<Q", 0),
            FW_CFG_FILE_DIR: struct.pack(">I", 0),  # the directory is big-endian
        }
        self.selector = 0
        self._item = self.items[FW_CFG_SIGNATURE]
        self._offset = 0

    def select(self, key: int) -> None:
        self.selector = key & 0xFFFF
        self._item = self.items.get(self.selector, b"")
        self._offset = 0

    def read(self, offset: int, size: int) -> int:
        if offset == 0:
            return self.selector
        start = self._offset
        chunk = self._item[start : start + size]
        self._offset = start + size
        return int.from_bytes(chunk, "little")  # bytes past the end read as 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.select(value)
        # Writes to the data port are ignored, as by QEMU since 2.4.

    def save_state(self) -> DeviceState:
        # The items are the machine's configuration, rebuilt from it: only the
        # guest's position among them is state.
        return {"selector": self.selector, "offset": self._offset}

    def load_state(self, state: DeviceState) -> None:
        check_fields(self.name, state, {"selector", "offset"})
        selector = take(self.name, state, "selector", int, 16)
        offset = take(self.name, state, "offset", int, 32)
        self.select(selector)
        self._offset = offset
