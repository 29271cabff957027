"""Helpers for the machine tests: scripted exits, a tiny image, machine configs.

The name is deliberately unusual so it cannot clash with another test
directory's helpers in one pytest session.
"""

from __future__ import annotations

from typing import Any

from pyvmm.boot import X86Mode
from pyvmm.capabilities import Capability
from pyvmm.exits import IoExit, MmioExit
from pyvmm.machine.config import MachineConfig
from pyvmm.machine.images import GuestImage

#: What an x86 machine backend without in-kernel interrupt controllers declares.
MACHINE_CAPS = (
    Capability.PORT_IO,
    Capability.IMMEDIATE_EXIT,
    Capability.VCPU_REGISTERS,
    Capability.CPUID,
    Capability.MULTI_VCPU,
)
#: ... and one with them.
IRQCHIP_CAPS = (*MACHINE_CAPS, Capability.IRQCHIP, Capability.IRQ_LINE)

#: One ``hlt``: the contract backend never runs it, but the machine loads it.
TINY_IMAGE = GuestImage("tiny", ((0x100000, b"\xf4"),), 0x100000, X86Mode.LONG, stack=0x90000)


def io_exit(port: int, size: int = 1, *, write: bool = False, value: int = 0, count: int = 1) -> IoExit:
    """A port exit; for a write of ``count`` items each item is ``value``."""
    exit_ = IoExit()
    exit_.port, exit_.size, exit_.count, exit_.is_write = port, size, count, write
    item = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little") if write else bytes(size)
    exit_.data = memoryview(bytearray(item * count))
    return exit_


def io_exit_bytes(port: int, data: bytes) -> IoExit:
    """``rep outsb`` of ``data`` to ``port``."""
    exit_ = IoExit()
    exit_.port, exit_.size, exit_.count, exit_.is_write = port, 1, len(data), True
    exit_.data = memoryview(bytearray(data))
    return exit_


def mmio_exit(address: int, size: int = 4, *, write: bool = False, value: int = 0) -> MmioExit:
    exit_ = MmioExit()
    exit_.address, exit_.size, exit_.is_write = address, size, write
    exit_.data = memoryview(bytearray(value.to_bytes(size, "little") if write else bytes(size)))
    return exit_


def value_of(exit_: IoExit | MmioExit) -> int:
    return int.from_bytes(exit_.data, "little")


def machine_config(**settings: Any) -> MachineConfig:
    return MachineConfig.from_mapping({"serial": "none", **settings})
