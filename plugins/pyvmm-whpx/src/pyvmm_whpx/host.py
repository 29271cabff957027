"""The DLL seam of pyvmm-whpx: WinHvPlatform.dll and WinHvEmulation.dll as one table.

Every call the backend makes goes through the :class:`~pyvmm.backend.DllHost`
that :data:`HOST` hands out.  In production the seam is :class:`WindowsDlls`,
both DLLs loaded with ``ctypes.WinDLL`` on first use (never at import, so the
plugin imports on every host); tests and ``pyvmm run --model`` route new
objects to the driver model with ``HOST.use(model)``.

:data:`HOST` is the kit's :class:`~pyvmm.backend.DllSwitch` (a VM keeps the host
it was made with, so switching never reroutes a live object).
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

from pyvmm.backend import DllSwitch, LoadedDll
from pyvmm.errors import ErrorSpace, HypervisorError
from pyvmm_whpx.bindings import EMULATION_FUNCTIONS, PLATFORM_FUNCTIONS

PLATFORM_DLL = "WinHvPlatform.dll"
EMULATION_DLL = "WinHvEmulation.dll"
#: Win32 ERROR_MOD_NOT_FOUND: what LoadLibrary reports for a DLL that is not there.
ERROR_MOD_NOT_FOUND = 126


class WindowsDlls:
    """Both WHPX DLLs behind one :class:`~pyvmm.backend.DllSeam`."""

    def __init__(self) -> None:
        platform: str = sys.platform  # not narrowed by the type checker: this runs on every host
        if not platform.startswith("win"):
            raise HypervisorError(
                f"load {PLATFORM_DLL}",
                ERROR_MOD_NOT_FOUND,
                f"the Windows Hypervisor Platform is a Windows API; this host is {platform}",
                space=ErrorSpace.WIN32,
            )
        loader: Any = getattr(ctypes, "WinDLL")  # noqa: B009 - exists on Windows only
        self.dlls: list[LoadedDll] = []
        for name, functions in ((PLATFORM_DLL, PLATFORM_FUNCTIONS), (EMULATION_DLL, EMULATION_FUNCTIONS)):
            try:
                library = loader(name, use_last_error=True)
            except OSError as exc:
                raise HypervisorError(
                    f"load {name}",
                    getattr(exc, "winerror", None) or ERROR_MOD_NOT_FOUND,
                    "enable the Windows feature 'Windows Hypervisor Platform' (Windows 10 1803 or later)",
                    space=ErrorSpace.WIN32,
                ) from exc
            self.dlls.append(LoadedDll(library, functions))

    def function(self, name: str) -> Any:
        for dll in self.dlls:
            if dll.has(name):
                return dll.function(name)
        raise KeyError(name)

    def has(self, name: str) -> bool:
        return any(dll.has(name) for dll in self.dlls)

    def last_error(self) -> int:
        return int(self.dlls[0].last_error())


HOST = DllSwitch("whpx", WindowsDlls)
