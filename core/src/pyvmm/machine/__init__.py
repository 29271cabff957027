"""The machine layer: RAM layout, buses, devices, vCPU threads and the run loop,
on any backend through :mod:`pyvmm.vm` -- the PC board for x86_64 guests, the
``virt`` board (PL011, device tree) for aarch64 ones.

``from pyvmm.machine import Machine, MachineConfig`` and ``Machine(config).run()``.
Names load on first use so that importing a submodule stays cheap.
"""

from __future__ import annotations

TYPE_CHECKING = False  # as in pyvmm/__init__.py: keep the package import free of typing

_LAZY = {
    "Machine": "pyvmm.machine.machine",
    "MachineConfig": "pyvmm.machine.config",
    "CpuidOverride": "pyvmm.machine.config",
    "build_config": "pyvmm.machine.config",
    "RunResult": "pyvmm.machine.outcome",
    "StopReason": "pyvmm.machine.outcome",
    "DeviceError": "pyvmm.machine.vcpu_loop",
    "BusConflict": "pyvmm.machine.bus",
    "Aarch64Image": "pyvmm.machine.images",
    "GuestImage": "pyvmm.machine.images",
    "KernelFile": "pyvmm.machine.images",
}

__all__ = [
    "Aarch64Image",
    "BusConflict",
    "CpuidOverride",
    "DeviceError",
    "GuestImage",
    "KernelFile",
    "Machine",
    "MachineConfig",
    "RunResult",
    "StopReason",
    "build_config",
]

if TYPE_CHECKING:
    from pyvmm.machine.bus import BusConflict
    from pyvmm.machine.config import CpuidOverride, MachineConfig, build_config
    from pyvmm.machine.images import Aarch64Image, GuestImage, KernelFile
    from pyvmm.machine.machine import Machine
    from pyvmm.machine.outcome import RunResult, StopReason
    from pyvmm.machine.vcpu_loop import DeviceError


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pyvmm.machine' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
