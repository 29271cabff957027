"""kernel32 through ctypes: the few Windows calls pyvmm's host services make.

Nothing here runs at import time: :func:`kernel32` loads the DLL on first use, so
this module imports (and its callers can be tested with a fake DLL) on any host.
Tests replace ``ctypes.WinDLL`` and ``ctypes.get_last_error`` and reset the cache
with :func:`reset`.

Sources (Microsoft Learn): "VirtualAlloc function (memoryapi.h)", "VirtualFree
function (memoryapi.h)", "Memory Protection Constants", "CreateEventW function
(synchapi.h)", "SetEvent function (synchapi.h)", "ResetEvent function
(synchapi.h)", "WaitForSingleObject function (synchapi.h)", "CloseHandle function
(handleapi.h)".
"""

from __future__ import annotations

import math
import threading
from typing import Any

# ctypes is imported by the calls below, not here: the constants are read on
# every host (pyvmm.host.event, pyvmm.host.ram import this module), and ctypes
# costs a few milliseconds of every start-up where nothing calls Windows.

#: ``VirtualAlloc`` allocation types and the protection pyvmm uses.
MEM_COMMIT = 0x0000_1000
MEM_RESERVE = 0x0000_2000
#: ``VirtualFree``: release the whole reservation (the size must then be 0).
MEM_RELEASE = 0x0000_8000
PAGE_READWRITE = 0x04

#: ``WaitForSingleObject`` results and its "no timeout" value.
WAIT_OBJECT_0 = 0x0000_0000
WAIT_ABANDONED = 0x0000_0080
WAIT_TIMEOUT = 0x0000_0102
WAIT_FAILED = 0xFFFF_FFFF
INFINITE = 0xFFFF_FFFF


def _signatures() -> tuple[tuple[str, list[Any], Any], ...]:
    """(name, argtypes, restype).  HANDLE and LPVOID are pointers (c_void_p: an
    int or None in Python), BOOL is an int, DWORD a 32-bit unsigned, SIZE_T a size_t."""
    import ctypes

    return (
        ("VirtualAlloc", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint32, ctypes.c_uint32], ctypes.c_void_p),
        ("VirtualFree", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint32], ctypes.c_int),
        ("CreateEventW", [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_wchar_p], ctypes.c_void_p),
        ("SetEvent", [ctypes.c_void_p], ctypes.c_int),
        ("ResetEvent", [ctypes.c_void_p], ctypes.c_int),
        ("WaitForSingleObject", [ctypes.c_void_p, ctypes.c_uint32], ctypes.c_uint32),
        ("CloseHandle", [ctypes.c_void_p], ctypes.c_int),
    )


_lock = threading.Lock()
_kernel32: Any = None


def kernel32() -> Any:
    """kernel32.dll with the signatures above declared (loaded once).

    ``use_last_error=True`` makes ctypes save ``GetLastError()`` right after each
    call, before anything else can overwrite it; read it with :func:`last_error`.
    """
    import ctypes

    global _kernel32
    with _lock:
        if _kernel32 is None:
            # ctypes.WinDLL exists only on Windows: looked up here, not at import.
            dll = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined,unused-ignore]
            for name, argtypes, restype in _signatures():
                function = getattr(dll, name)
                function.argtypes = argtypes
                function.restype = restype
            _kernel32 = dll
        return _kernel32


def last_error() -> int:
    """The Win32 error of the last kernel32 call on this thread (ctypes' saved copy)."""
    import ctypes

    return int(ctypes.get_last_error())  # type: ignore[attr-defined,unused-ignore]


def reset() -> None:
    """Forget the loaded DLL (tests, after replacing ``ctypes.WinDLL``)."""
    global _kernel32
    with _lock:
        _kernel32 = None


def timeout_ms(timeout: float | None) -> int:
    """A ``WaitForSingleObject`` timeout: None waits forever, anything else is
    rounded up to whole milliseconds (never INFINITE by accident)."""
    if timeout is None:
        return INFINITE
    if not timeout > 0:
        return 0
    if math.isinf(timeout):
        return INFINITE
    return min(math.ceil(timeout * 1000), INFINITE - 1)
