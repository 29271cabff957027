"""The OS seams of pyvmm-haxm: one channel to the HAXM driver per host OS.

HAXM is one driver reached two ways (``docs/backends/haxm.md`` §2):

* **Linux and macOS**: device files (``/dev/HAX``, ``/dev/hax_vm/vmNN``,
  ``/dev/hax_vmNN/vcpuMM``) and ``ioctl`` with the address of one struct that is
  read, written or both -- the backend kit's :class:`~pyvmm.backend.DeviceHost`
  over a :class:`~pyvmm.backend.DeviceSeam`;
* **Windows**: device names (``\\\\.\\HAX``, ...) opened with ``CreateFileW`` and
  ``DeviceIoControl`` with separate in and out buffers (``METHOD_BUFFERED``) --
  the kit's :class:`~pyvmm.backend.DllHost` over kernel32 as a
  :class:`~pyvmm.backend.DllSeam`.

:class:`PosixChannel` and :class:`WindowsChannel` give the VM and vCPU classes
one call for both: ``channel.control(handle, "SET_RAM2", struct, IN)``, with the
operation named as in :class:`~pyvmm_haxm.bindings.HaxRequests` and the buffer's
direction, which only Windows needs.  A failed call raises
:class:`~pyvmm.errors.HypervisorError` naming the HAXM request (errno on POSIX,
the Win32 error on Windows).

:data:`HOST` is the one switch: production code takes ``HOST.current()``; tests
put a driver model behind it with ``HOST.use(model, host_os)``.  (The kit's
:class:`~pyvmm.backend.HostSwitch` switches one device-file seam; HAXM needs to
switch between a device-file seam and a DLL seam, and between three OS
flavours of numbers and paths, hence its own switch built from the kit's hosts.)
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import sys
import threading
from collections.abc import Iterator
from typing import Any, Protocol

from pyvmm.backend import DeviceHost, DeviceSeam, DllHost, DllSeam, LibcDeviceSeam, address_of, kick_signal
from pyvmm.backend.dll import DllFunction, LoadedDll
from pyvmm.backend.stand_in import standing_in
from pyvmm.errors import ErrorSpace, HypervisorError
from pyvmm_haxm import bindings as b
from pyvmm_haxm.bindings import ffi


class Direction(enum.Enum):
    """Which way a request's struct travels (Windows passes it as the in buffer,
    the out buffer or both; POSIX passes its address either way)."""

    NONE = "none"
    IN = "in"
    OUT = "out"
    INOUT = "inout"


NONE, IN, OUT, INOUT = Direction.NONE, Direction.IN, Direction.OUT, Direction.INOUT


class HaxChannel(Protocol):
    """The calls the VM and vCPU classes make, on any host OS."""

    host_os: str
    requests: b.HaxRequests
    paths: b.DevicePaths
    #: Objects every VM on this channel shares (the opened system device), under ``lock``.
    shared: dict[str, object]
    lock: threading.Lock

    def open(self, path: str) -> int:
        """Open a HAXM device; raises :class:`HypervisorError`."""
        ...

    def close(self, handle: int) -> None: ...

    def control(self, handle: int, op: str, arg: Any = None, direction: Direction = NONE) -> int:
        """Issue request ``op`` (a :class:`~pyvmm_haxm.bindings.HaxRequests` field)
        with the cffi pointer ``arg``; raises :class:`HypervisorError` naming it."""
        ...

    def run(self, handle: int) -> int:
        """``HAX_VCPU_IOCTL_RUN``: 0, or the error code (POSIX: errno; Windows:
        the last error) without raising, for the per-exit path."""
        ...

    def retryable(self, code: int) -> bool:
        """Whether a failed RUN is an interruption to retry (POSIX ``EINTR``/``EAGAIN``)."""
        ...

    def interrupt_thread(self, handle: int, thread_id: int) -> None:
        """Make the vCPU ``handle`` running on ``thread_id`` leave the guest: a
        signal (its IPI makes the CPU leave VMX non-root) or ``KICKOFF``."""
        ...


class PosixChannel:
    """Linux and macOS: ``ioctl`` on device files through the kit's :class:`DeviceHost`."""

    def __init__(self, host: DeviceHost, host_os: str) -> None:
        self.host = host
        self.host_os = host_os
        self.requests = b.DARWIN if host_os == "darwin" else b.LINUX
        self.paths = b.DARWIN_PATHS if host_os == "darwin" else b.LINUX_PATHS
        self.shared: dict[str, object] = {}
        self.lock = threading.Lock()
        self._run_request = int(self.requests.RUN)
        self._ioctl, self._errno_of = host.fast_ioctl()

    def open(self, path: str) -> int:
        return self.host.open_device(path)

    def close(self, handle: int) -> None:
        self.host.close(handle)

    def control(self, handle: int, op: str, arg: Any = None, direction: Direction = NONE) -> int:
        request = getattr(self.requests, op)
        if request is None:
            raise HypervisorError(f"HAX_{op}", errno.ENOTTY, f"{self.host_os} HAXM has no such request")
        return self.host.ioctl(handle, request, 0 if arg is None else arg)

    def run(self, handle: int) -> int:
        result = self._ioctl(handle, self._run_request, 0)
        return 0 if result >= 0 else self._errno_of(result)

    def retryable(self, code: int) -> bool:
        return code in (errno.EINTR, errno.EAGAIN)

    def interrupt_thread(self, handle: int, thread_id: int) -> None:
        self.host.signal_thread(thread_id, kick_signal())


# winnt.h / fileapi.h
GENERIC_READ = 0x80000000
GENERIC_WRITE = 0x40000000
CREATE_ALWAYS = 2
FILE_ATTRIBUTE_NORMAL = 0x80
INVALID_HANDLE_VALUE = (1 << (8 * ctypes.sizeof(ctypes.c_void_p))) - 1


def kernel32_functions() -> tuple[DllFunction, ...]:
    """The three kernel32 exports the Windows channel calls, with their signatures."""
    handle, dword, pointer, boolean = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_int
    return (
        DllFunction("CreateFileW", handle, (ctypes.c_wchar_p, dword, dword, pointer, dword, dword, handle)),
        DllFunction("DeviceIoControl", boolean, (handle, dword, pointer, dword, pointer, dword, pointer, pointer)),
        DllFunction("CloseHandle", boolean, (handle,)),
    )


class WindowsChannel:
    """Windows: ``CreateFileW``/``DeviceIoControl``/``CloseHandle`` through the kit's
    :class:`DllHost` (``FALSE`` + last error becomes a :class:`HypervisorError`)."""

    host_os = "win32"
    requests = b.WINDOWS
    paths = b.WINDOWS_PATHS

    def __init__(self, dll: DllHost) -> None:
        self.dll = dll
        self.shared: dict[str, object] = {}
        self.lock = threading.Lock()
        self._device_io_control = dll.seam.function("DeviceIoControl")
        self._returned = ffi.new("uint32_t *")
        self._run_code = int(self.requests.RUN)

    def open(self, path: str) -> int:
        # crosvm haxm/win.rs opens every HAXM device this way.
        handle = self.dll.seam.function("CreateFileW")(
            path, GENERIC_READ | GENERIC_WRITE, 0, None, CREATE_ALWAYS, FILE_ATTRIBUTE_NORMAL, None
        )
        if handle is None or int(handle) in (INVALID_HANDLE_VALUE, -1):
            raise HypervisorError(f"CreateFileW({path})", self.dll.seam.last_error(), space=ErrorSpace.WIN32)
        return int(handle)

    def close(self, handle: int) -> None:
        self.dll.call_bool("CloseHandle", handle)

    def control(self, handle: int, op: str, arg: Any = None, direction: Direction = NONE) -> int:
        code = getattr(self.requests, op)
        if code is None:
            raise HypervisorError(f"HAX_{op}", 1, "Windows HAXM has no such request", space=ErrorSpace.WIN32)
        address = 0 if arg is None else address_of(arg)
        size = 0 if arg is None else ffi.sizeof(ffi.typeof(arg).item)
        in_address, in_size = (address, size) if direction in (IN, INOUT) else (0, 0)
        out_address, out_size = (address, size) if direction in (OUT, INOUT) else (0, 0)
        returned = ffi.new("uint32_t *")
        self.dll.call_bool(
            "DeviceIoControl",
            handle,
            code,
            in_address,
            in_size,
            out_address,
            out_size,
            address_of(returned),
            None,
            detail=f"HAX_{op}",
        )
        return int(returned[0])

    def run(self, handle: int) -> int:
        ok = self._device_io_control(handle, self._run_code, 0, 0, 0, 0, address_of(self._returned), None)
        return 0 if ok else self.dll.seam.last_error() or 31  # ERROR_GEN_FAILURE: STATUS_UNSUCCESSFUL

    def retryable(self, code: int) -> bool:
        return False

    def interrupt_thread(self, handle: int, thread_id: int) -> None:
        # HAX_VCPU_IOCTL_KICKOFF (windows/hax_entry.c): vcpu_takeoff() IPIs the CPU
        # running the vCPU, which leaves the guest with an INTERRUPT exit.
        self.control(handle, "KICKOFF")


def _production() -> HaxChannel:
    if sys.platform == "win32":
        library = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined,unused-ignore]
        return WindowsChannel(DllHost(LoadedDll(library, kernel32_functions())))
    host_os = "darwin" if sys.platform == "darwin" else "linux"
    return PosixChannel(DeviceHost(LibcDeviceSeam(), b.POSIX_NAMES), host_os)


class HaxHostSwitch:
    """The one switch between the real driver and a driver model."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._channel: HaxChannel | None = None

    def current(self) -> HaxChannel:
        """The channel new VMs are created on (made on first use)."""
        with self._lock:
            if self._channel is None:
                self._channel = _production()
            return self._channel

    @contextlib.contextmanager
    def use(self, seam: DeviceSeam | DllSeam, host_os: str) -> Iterator[HaxChannel]:
        """Route the VMs created inside the block to ``seam``, speaking the
        requests and paths of ``host_os`` (``"linux"``, ``"darwin"`` or
        ``"win32"``; a DLL seam is always Windows).  Only tests and models call this."""
        channel: HaxChannel
        if host_os == "win32":
            channel = WindowsChannel(DllHost(seam))  # type: ignore[arg-type]
        elif host_os in ("linux", "darwin"):
            channel = PosixChannel(DeviceHost(seam, b.POSIX_NAMES), host_os)  # type: ignore[arg-type]
        else:
            raise ValueError(f"host_os must be 'linux', 'darwin' or 'win32', not {host_os!r}")
        with self._lock:
            previous, self._channel = self._channel, channel
        try:
            # Recorded as the kit's switches do: the manifest's probe then asks
            # the driver model (pyvmm_haxm.manifest), not the file system.
            with standing_in("haxm"):
                yield channel
        finally:
            with self._lock:
                self._channel = previous


HOST = HaxHostSwitch()
