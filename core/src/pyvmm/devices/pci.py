"""PCI configuration mechanism #1 (0xcf8 address, 0xcfc-0xcff data) and the
PIIX reset control register at 0xcf9.

The register offset of a data access is the address register's low byte with
the data port's low two bits ORed in (QEMU's ``config_reg | (addr & 3)``): guests
may put an unaligned offset into CONFIG_ADDRESS and then read 0xcfc with a
narrower access (kvm-unit-tests reads the device ID with ``reg = 2`` and
``inw 0xcfc``), or use the aligned address and read 0xcfe.

Bus 0 holds only the functions added with :meth:`PciConfigSpace.add_function`;
by default none, so every read answers "no device" (all ones).
"""

from __future__ import annotations

from collections.abc import Callable

from pyvmm.devices.base import ALL_ONES, Device
from pyvmm.devices.state import DeviceState, DeviceStateError, check_fields, take

CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_DATA_PORT = 0xCFC
RESET_CONTROL_PORT = 0xCF9

CONFIG_ENABLE = 0x8000_0000
CONFIG_SPACE_SIZE = 256
#: Reset control register: bit 2 starts the reset that bit 1 selects (hard/soft).
RCR_RESET = 0x04


class PciConfigSpace:
    """The functions on bus 0, by devfn, each with a 256-byte config space."""

    def __init__(self) -> None:
        self.functions: dict[int, bytearray] = {}

    def add_function(self, devfn: int, config: bytes) -> None:
        if not 0 <= devfn < 256:
            raise ValueError(f"devfn {devfn:#x} is out of range")
        if devfn in self.functions:
            raise ValueError(f"PCI function 00:{devfn >> 3:02x}.{devfn & 7} already exists")
        self.functions[devfn] = bytearray(config.ljust(CONFIG_SPACE_SIZE, b"\0")[:CONFIG_SPACE_SIZE])

    def read(self, bus: int, devfn: int, register: int, size: int) -> int:
        space = self.functions.get(devfn) if bus == 0 else None
        if space is None or register + size > CONFIG_SPACE_SIZE:
            return ALL_ONES
        return int.from_bytes(space[register : register + size], "little")

    def write(self, bus: int, devfn: int, register: int, size: int, value: int) -> None:
        space = self.functions.get(devfn) if bus == 0 else None
        if space is not None and register + size <= CONFIG_SPACE_SIZE:
            space[register : register + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


class PciHost(Device):
    """Ports 0xcf8-0xcff: registered as one 8-port range at 0xcf8."""

    name = "pci-host"
    state_version = 1

    def __init__(self, config: PciConfigSpace | None = None, *, on_reset: Callable[[], None] | None = None) -> None:
        self.config = config if config is not None else PciConfigSpace()
        self.address = 0
        self.reset_control = 0
        self._on_reset = on_reset

    def _target(self, data_offset: int) -> tuple[int, int, int] | None:
        address = self.address
        if not address & CONFIG_ENABLE:
            return None
        register = (address & 0xFF) | (data_offset & 0x3)
        return (address >> 16) & 0xFF, (address >> 8) & 0xFF, register

    def read(self, offset: int, size: int) -> int:
        if offset == 0 and size == 4:
            return self.address
        if offset == 1 and size == 1:
            return self.reset_control
        if offset >= 4:
            target = self._target(offset - 4)
            if target is not None:
                return self.config.read(*target, size)
        return ALL_ONES

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size == 4:
            self.address = value & 0xFFFF_FFFF
        elif offset == 1 and size == 1:
            self.reset_control = value & 0x0E
            if value & RCR_RESET and self._on_reset is not None:
                self._on_reset()
        elif offset >= 4:
            target = self._target(offset - 4)
            if target is not None:
                self.config.write(*target, size, value)

    def save_state(self) -> DeviceState:
        functions = self.config.functions
        spaces = b"".join(bytes([devfn]) + bytes(functions[devfn]) for devfn in sorted(functions))
        return {"address": self.address, "reset_control": self.reset_control, "functions": spaces}

    def load_state(self, state: DeviceState) -> None:
        check_fields(self.name, state, {"address", "reset_control", "functions"})
        address = take(self.name, state, "address", int, 32)
        reset_control = take(self.name, state, "reset_control", int, 8)
        spaces = take(self.name, state, "functions", bytes)
        record = 1 + CONFIG_SPACE_SIZE
        if len(spaces) % record:
            raise DeviceStateError(f"device {self.name}: the config spaces are not whole ({len(spaces)} bytes)")
        saved = {spaces[i]: spaces[i + 1 : i + record] for i in range(0, len(spaces), record)}
        if sorted(saved) != sorted(self.config.functions):
            raise DeviceStateError(
                f"device {self.name}: the snapshot has PCI functions {sorted(saved)}, this machine "
                f"{sorted(self.config.functions)}"
            )
        self.address, self.reset_control = address, reset_control
        for devfn, space in saved.items():
            self.config.functions[devfn][:] = space
