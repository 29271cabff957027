"""The backend kit: everything a pyvmm backend is built from, once, in core.

A backend is its **bindings** (cffi declarations and constants, ioctl numbers
encoded by :mod:`pyvmm.backend.ioctl`), its **VM and vCPU classes** on this kit,
and a **manifest**; ``docs/writing-a-backend.md`` walks through the template, and
``pyvmm-kvm`` and ``pyvmm-gunyah`` follow it.  The kit holds:

* :mod:`~pyvmm.backend.seam` -- the OS seams (:class:`DeviceSeam` for device-file
  drivers, :class:`DllSeam` for DLL APIs) and :class:`LibcDeviceSeam`;
* :mod:`~pyvmm.backend.host` -- :class:`DeviceHost` (a seam with the error
  conventions: a failed call raises :class:`~pyvmm.errors.HypervisorError` naming
  the ioctl) and :class:`HostSwitch`, the one switch tests use to put a driver
  model behind a backend;
* :mod:`~pyvmm.backend.dll` -- :class:`LoadedDll` and :class:`DllHost` (HRESULT and
  BOOL + last-error conventions, optional exports found at load time);
* :mod:`~pyvmm.backend.ioctl` -- Linux, BSD/macOS and Windows request encodings
  and the name table;
* :mod:`~pyvmm.backend.run_page` -- the shared run page of KVM-style drivers;
* :mod:`~pyvmm.backend.kick` -- :class:`SignalKicker`, the thread rules of a kick;
* :mod:`~pyvmm.backend.plugin` -- :func:`backend_plugin`, which turns the VM and
  vCPU classes into the plugin the entry point names.

Nothing here imports :mod:`pyvmm.testing`.
"""

from typing import TYPE_CHECKING

# Each name is imported from its module on first use (PEP 562), as in
# ``pyvmm/__init__.py``: a backend's bindings import one kit module (the ioctl
# encoding, the cffi cache) and must not pay for the plugin adapter, which pulls
# in pydantic, pluggy and the hook specifications.
_LAZY = {
    "DllFunction": "pyvmm.backend.dll",
    "DllHost": "pyvmm.backend.dll",
    "DllSwitch": "pyvmm.backend.dll",
    "LoadedDll": "pyvmm.backend.dll",
    "DeviceHost": "pyvmm.backend.host",
    "HostSwitch": "pyvmm.backend.host",
    "address_of": "pyvmm.backend.host",
    "IoctlRequest": "pyvmm.backend.ioctl",
    "bsd": "pyvmm.backend.ioctl",
    "ctl_code": "pyvmm.backend.ioctl",
    "linux": "pyvmm.backend.ioctl",
    "request_names": "pyvmm.backend.ioctl",
    "SignalKicker": "pyvmm.backend.kick",
    "install_kick_handler": "pyvmm.backend.kick",
    "kick_signal": "pyvmm.backend.kick",
    "backend_plugin": "pyvmm.backend.plugin",
    "RunPage": "pyvmm.backend.run_page",
    "DeviceSeam": "pyvmm.backend.seam",
    "DllSeam": "pyvmm.backend.seam",
    "LibcDeviceSeam": "pyvmm.backend.seam",
}

if TYPE_CHECKING:
    from pyvmm.backend.dll import DllFunction, DllHost, DllSwitch, LoadedDll
    from pyvmm.backend.host import DeviceHost, HostSwitch, address_of
    from pyvmm.backend.ioctl import IoctlRequest, bsd, ctl_code, linux, request_names
    from pyvmm.backend.kick import SignalKicker, install_kick_handler, kick_signal
    from pyvmm.backend.plugin import backend_plugin
    from pyvmm.backend.run_page import RunPage
    from pyvmm.backend.seam import DeviceSeam, DllSeam, LibcDeviceSeam

__all__ = [
    "DeviceHost",
    "DeviceSeam",
    "DllFunction",
    "DllHost",
    "DllSwitch",
    "DllSeam",
    "HostSwitch",
    "IoctlRequest",
    "LibcDeviceSeam",
    "LoadedDll",
    "RunPage",
    "SignalKicker",
    "address_of",
    "backend_plugin",
    "bsd",
    "ctl_code",
    "install_kick_handler",
    "kick_signal",
    "linux",
    "request_names",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pyvmm.backend' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
