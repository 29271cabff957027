"""pyvmm: build virtual machine monitors on hardware hypervisors, in Python.

``import pyvmm`` is kept cheap: it loads no backend and no heavy dependency.
The names below are imported on first use.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself costs ~10 ms to import; keep `import pyvmm` cheap

__version__ = "0.1.0"

_LAZY = {
    "hookimpl": "pyvmm.hookspecs",
    "Capability": "pyvmm.capabilities",
    "VmConfig": "pyvmm.config",
    "MemoryRegionSpec": "pyvmm.config",
    "Arch": "pyvmm.config",
    "BootSpec": "pyvmm.boot",
    "X86Mode": "pyvmm.boot",
    "BackendManifest": "pyvmm.manifest",
    "Availability": "pyvmm.manifest",
    "CONTRACT_VERSION": "pyvmm.manifest",
    "Backend": "pyvmm.vm",
    "Vm": "pyvmm.vm",
    "Vcpu": "pyvmm.vm",
    "get_backend": "pyvmm.vm",
    "ExitKind": "pyvmm.exits",
    "StateKind": "pyvmm.vcpu_state",
}

__all__ = [
    "__version__",
    "hookimpl",
    "Capability",
    "VmConfig",
    "MemoryRegionSpec",
    "Arch",
    "BootSpec",
    "X86Mode",
    "BackendManifest",
    "Availability",
    "CONTRACT_VERSION",
    "Backend",
    "Vm",
    "Vcpu",
    "get_backend",
    "ExitKind",
    "StateKind",
]

if TYPE_CHECKING:
    from pyvmm.boot import BootSpec, X86Mode
    from pyvmm.capabilities import Capability
    from pyvmm.config import Arch, MemoryRegionSpec, VmConfig
    from pyvmm.exits import ExitKind
    from pyvmm.hookspecs import hookimpl
    from pyvmm.manifest import CONTRACT_VERSION, Availability, BackendManifest
    from pyvmm.vcpu_state import StateKind
    from pyvmm.vm import Backend, Vcpu, Vm, get_backend


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pyvmm' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
