"""The exceptions pyvmm raises.

Every error pyvmm raises derives from :class:`PyvmmError`, so a VMM can catch
"anything pyvmm said no to" in one place.  Errors that come from the host
(an ioctl, a DLL call) derive from :class:`HypervisorError`, which is also an
:class:`OSError`, so ``except OSError`` code keeps working.  A HypervisorError
carries its code *with the space the code comes from* (:class:`ErrorSpace`):
an errno from a Linux ioctl, an HRESULT from WHPX, an NTSTATUS or a Win32
``GetLastError()`` value from HAXM and the Windows host services.

Every pyvmm error survives pickling (a VMM may run vCPUs or fuzz campaigns in
worker processes and send their errors back) with all its fields, including the
errors plugins define: :class:`PyvmmError` records the arguments each instance
was constructed with and rebuilds it from them, so a subclass needs no
``__reduce__`` of its own.
"""

from __future__ import annotations

import enum
import errno as _errno
import functools
import os
from collections.abc import Callable
from typing import Any

# The instance attribute holding (args, kwargs) of the outermost constructor call.
_CTOR = "_pyvmm_ctor"
# Set while the outermost constructor runs, so nested super().__init__ calls do not record.
_RECORDING = "_pyvmm_recording"


def _recording_init(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap ``init`` so the outermost constructor call records its arguments."""

    @functools.wraps(init)
    def recording_init(self: BaseException, *args: Any, **kwargs: Any) -> None:
        state = self.__dict__
        if state.get(_RECORDING):
            init(self, *args, **kwargs)  # a super().__init__ call: the outer call recorded
            return
        state[_RECORDING] = True
        state[_CTOR] = (args, kwargs)
        try:
            init(self, *args, **kwargs)
        finally:
            del state[_RECORDING]

    recording_init._pyvmm_recording = True  # type: ignore[attr-defined]
    return recording_init


def _rebuild(cls: type[PyvmmError], args: tuple[Any, ...], kwargs: dict[str, Any], state: dict[str, Any]) -> Any:
    """Unpickle: construct again from the recorded arguments, then restore
    attributes set after construction (``__notes__``, fields a caller added)."""
    error = cls(*args, **kwargs)
    error.__dict__.update(state)
    return error


class PyvmmError(Exception):
    """Base class of every error raised by pyvmm and its backends.

    Subclasses (in pyvmm or in a plugin) may take any constructor arguments:
    pickling calls the constructor again with the same ones.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Wrap the __init__ this class resolves to, wherever it comes from (a mixin
        # earlier in the MRO may supply one that no PyvmmError ever wrapped).
        init = cls.__init__
        if not getattr(init, "_pyvmm_recording", False) or "__init__" in cls.__dict__:
            cls.__init__ = _recording_init(init)  # type: ignore[method-assign]

    def __reduce__(self) -> tuple[Any, ...]:
        state = dict(self.__dict__)
        args, kwargs = state.pop(_CTOR, (self.args, {}))
        return (_rebuild, (type(self), args, kwargs, state))


class BackendError(PyvmmError):
    """A backend cannot be found, loaded or selected."""


class BackendNotFound(BackendError):
    """No installed backend has the requested name (or none is available)."""


class BackendUnavailable(BackendError):
    """The backend is installed but cannot run on this host; ``reason`` says why."""

    def __init__(self, backend: str, reason: str) -> None:
        super().__init__(f"backend {backend!r} is not available here: {reason}")
        self.backend = backend
        self.reason = reason


class PluginContractError(BackendError):
    """A plugin breaks the hook contract (manifest and hooks disagree, bad manifest,
    duplicate name, wrong contract version).  Raised at registration, never later."""


class UnsupportedCapability(PyvmmError):
    """An optional operation was requested from a backend that does not declare the
    capability it needs.  Raised by core *instead of* calling the backend."""

    def __init__(self, backend: str, capability: object, what: str = "", *, because: str = "") -> None:
        cap = getattr(capability, "name", str(capability))
        if because:
            # Refused because of a capability the backend *has* (e.g. the
            # hypervisor owns the boot registers): say what and why.
            text = f"backend {backend!r} cannot {what}: {because} ({cap})"
        else:
            text = f"backend {backend!r} does not support {cap}" + (f" (needed for {what})" if what else "")
        super().__init__(text)
        self.backend = backend
        self.capability = capability
        self.what = what
        self.because = because


class ConfigError(PyvmmError, ValueError):
    """A configuration value or an API argument is invalid.  The message names the
    field or argument and, for a number, the allowed range."""


class GuestMemoryError(PyvmmError, ValueError):
    """A guest-physical access or mapping falls outside guest RAM, overlaps, or is
    misaligned.  Raised before any host memory is touched."""


class VmStateError(PyvmmError, RuntimeError):
    """An operation is not valid in the VM's or vCPU's current state
    (closed, already started, wrong thread, ...)."""


class InterruptNotReady(VmStateError):
    """An external interrupt was injected into a vCPU that cannot take one now:
    interrupts are disabled (IF=0), an interrupt shadow (STI, MOV SS) blocks them,
    or another event is being delivered.  Core raises it *instead of* calling the
    backend, so nothing was queued.  Request an interrupt window
    (:meth:`pyvmm.vm.Vcpu.request_interrupt_window`) and inject at its
    :class:`~pyvmm.exits.IrqWindowOpenExit`."""

    def __init__(self, vcpu: int, vector: int) -> None:
        super().__init__(
            f"vCPU {vcpu} cannot take interrupt vector {vector:#04x} now (interrupts disabled, an interrupt "
            "shadow, or an event being delivered): request an interrupt window and inject at its exit"
        )
        self.vcpu = vcpu
        self.vector = vector


class MsrAccessError(PyvmmError):
    """The hypervisor processed fewer MSRs than it was given: ``index`` is the first
    one it refused (at ``position`` in the request), and ``completed`` holds the
    ``(index, value)`` pairs it did process before it (the values read, for a
    read; :attr:`entries` as records).

    This is what the hypervisor reported, not an error code: KVM's
    ``KVM_GET_MSRS``/``KVM_SET_MSRS`` return how many MSRs they processed and stop
    at the first failure, without an errno (``docs/backends/kvm.md`` §2.3), so
    none is invented here.  (crosvm turns the same short count into ``ENOENT``
    for a read and ``EPERM`` for a write.)
    """

    def __init__(
        self,
        operation: str,
        index: int,
        position: int,
        completed: tuple[tuple[int, int], ...] = (),
        *,
        write: bool = False,
    ) -> None:
        done = f" (the {position} MSR(s) before it were processed)" if position else ""
        verb = "written" if write else "read"
        super().__init__(f"{operation}: MSR {index:#x} cannot be {verb}{done}")
        self.operation = operation
        self.index = index
        self.position = position
        self.completed = tuple((int(i), int(v)) for i, v in completed)
        self.write = write

    @property
    def entries(self) -> list[Any]:
        """:attr:`completed` as :class:`pyvmm.arch.x86_64.MsrEntry` records."""
        from pyvmm.arch.x86_64 import MsrEntry

        return [MsrEntry(index, value) for index, value in self.completed]


# --- error codes and their spaces ---------------------------------------------------


class ErrorSpace(enum.Enum):
    """Where a :class:`HypervisorError`'s code comes from."""

    #: A POSIX errno (Linux ioctls: KVM, GenieZone, Gunyah; HAXM on macOS).
    ERRNO = "errno"
    #: A COM-style HRESULT (the WHPX API, WinHvPlatform.dll).
    HRESULT = "HRESULT"
    #: A Windows kernel NTSTATUS (what a driver such as HAXM's completes an IRP with).
    NTSTATUS = "NTSTATUS"
    #: A Win32 error code, as ``GetLastError()`` returns after a failed BOOL call.
    WIN32 = "Win32"


#: Win32 error codes: name and the system's message.  Source: Microsoft Learn,
#: "System Error Codes (0-499)" (values also in the SDK's winerror.h).
WIN32_ERRORS: dict[int, tuple[str, str]] = {
    1: ("ERROR_INVALID_FUNCTION", "Incorrect function"),
    2: ("ERROR_FILE_NOT_FOUND", "The system cannot find the file specified"),
    3: ("ERROR_PATH_NOT_FOUND", "The system cannot find the path specified"),
    5: ("ERROR_ACCESS_DENIED", "Access is denied"),
    6: ("ERROR_INVALID_HANDLE", "The handle is invalid"),
    8: ("ERROR_NOT_ENOUGH_MEMORY", "Not enough memory resources are available to process this command"),
    14: ("ERROR_OUTOFMEMORY", "Not enough storage is available to complete this operation"),
    50: ("ERROR_NOT_SUPPORTED", "The request is not supported"),
    87: ("ERROR_INVALID_PARAMETER", "The parameter is incorrect"),
    122: ("ERROR_INSUFFICIENT_BUFFER", "The data area passed to a system call is too small"),
    126: ("ERROR_MOD_NOT_FOUND", "The specified module could not be found"),
    127: ("ERROR_PROC_NOT_FOUND", "The specified procedure could not be found"),
    183: ("ERROR_ALREADY_EXISTS", "Cannot create a file when that file already exists"),
}

#: FACILITY_WIN32 (winerror.h): an HRESULT 0x8007xxxx wraps Win32 error xxxx.
FACILITY_WIN32 = 7


def hresult_from_win32(code: int) -> int:
    """``HRESULT_FROM_WIN32`` (winerror.h; as Raymond Chen quotes it in "How do I
    convert an HRESULT to a Win32 error code?"): the low 16 bits with
    FACILITY_WIN32 and the failure bit; 0 and negative values pass unchanged."""
    if code <= 0:
        return code & 0xFFFF_FFFF
    return (code & 0xFFFF) | (FACILITY_WIN32 << 16) | 0x8000_0000


def win32_from_hresult(hresult: int) -> int | None:
    """The Win32 error an HRESULT wraps (facility WIN32 with the failure bit), or None."""
    hresult &= 0xFFFF_FFFF
    if hresult >> 16 == 0x8000 | FACILITY_WIN32:
        return hresult & 0xFFFF
    return None


#: HRESULTs with a name of their own.  Sources: Microsoft Learn, "Error Handling
#: Strategies" (COM; the E_* table) and, for WHV_E_*, winerror.h as the Windows
#: Hypervisor Platform documentation's function pages name them (e.g.
#: "WHvGetCapability": WHV_E_UNKNOWN_CAPABILITY); the values were checked against
#: the SDK header as mirrored by windows-sys (Win32::Foundation) and winresult.
HRESULTS: dict[int, tuple[str, str]] = {
    0x8000_4001: ("E_NOTIMPL", "Not implemented"),
    0x8000_4002: ("E_NOINTERFACE", "No such interface supported"),
    0x8000_4003: ("E_POINTER", "An invalid pointer was used"),
    0x8000_4004: ("E_ABORT", "The operation was aborted"),
    0x8000_4005: ("E_FAIL", "Unspecified failure"),
    0x8000_FFFF: ("E_UNEXPECTED", "Catastrophic failure"),
    0x8000_000A: ("E_PENDING", "The data necessary to complete this operation is not yet available"),
    0x8007_0005: ("E_ACCESSDENIED", "General access denied error"),
    0x8007_0006: ("E_HANDLE", "An invalid handle was used"),
    0x8007_000E: ("E_OUTOFMEMORY", "Failed to allocate necessary memory"),
    0x8007_0057: ("E_INVALIDARG", "One or more arguments are invalid"),
    0x8037_0300: ("WHV_E_UNKNOWN_CAPABILITY", "The specified capability does not exist"),
    0x8037_0301: ("WHV_E_INSUFFICIENT_BUFFER", "The specified buffer is too small for the requested data"),
    0x8037_0302: ("WHV_E_UNKNOWN_PROPERTY", "The specified property does not exist"),
    0x8037_0303: (
        "WHV_E_UNSUPPORTED_HYPERVISOR_CONFIG",
        "The configuration of the hypervisor on this system is not supported",
    ),
    0x8037_0304: ("WHV_E_INVALID_PARTITION_CONFIG", "The configuration of the partition is not valid"),
    0x8037_0305: ("WHV_E_GPA_RANGE_NOT_FOUND", "The specified GPA range was not found"),
    0x8037_0306: ("WHV_E_VP_ALREADY_EXISTS", "A virtual processor with the specified index already exists"),
    0x8037_0307: ("WHV_E_VP_DOES_NOT_EXIST", "A virtual processor with the specified index does not exist"),
    0x8037_0308: ("WHV_E_INVALID_VP_STATE", "The virtual processor is not in the correct state"),
    0x8037_0309: (
        "WHV_E_INVALID_VP_REGISTER_NAME",
        "A virtual processor register with the specified name does not exist",
    ),
}

#: NTSTATUS values.  Source: the SDK's ntstatus.h ([MS-ERREF] 2.3.1 lists the same).
NTSTATUSES: dict[int, tuple[str, str]] = {
    0xC000_0001: ("STATUS_UNSUCCESSFUL", "The requested operation was unsuccessful"),
    0xC000_0002: ("STATUS_NOT_IMPLEMENTED", "The requested operation is not implemented"),
    0xC000_0005: ("STATUS_ACCESS_VIOLATION", "The instruction referenced memory it could not access"),
    0xC000_0008: ("STATUS_INVALID_HANDLE", "An invalid handle was specified"),
    0xC000_000D: ("STATUS_INVALID_PARAMETER", "An invalid parameter was passed to a service or function"),
    0xC000_0017: ("STATUS_NO_MEMORY", "Not enough virtual memory or paging file quota is available"),
    0xC000_0022: ("STATUS_ACCESS_DENIED", "A process has requested access to an object it has not been granted"),
    0xC000_0023: ("STATUS_BUFFER_TOO_SMALL", "The buffer is too small to contain the entry"),
    0xC000_00BB: ("STATUS_NOT_SUPPORTED", "The request is not supported"),
}


def _hex(code: int) -> str:
    return f"0x{code:08X}"  # as Microsoft writes them: 0x80070057, 0xC000000D


def describe_code(code: int, space: ErrorSpace) -> tuple[str, str]:
    """``(name, description)`` of an error code: ``("EINVAL", "Invalid argument")``,
    ``("E_INVALIDARG", ...)``; a code no table knows is named by its value
    (decimal for errno and Win32, hex for HRESULT and NTSTATUS)."""
    if space is ErrorSpace.ERRNO:
        try:
            description = os.strerror(code)
        except (ValueError, OverflowError):
            description = "Unknown error"
        return _errno.errorcode.get(code, str(code)), description
    if space is ErrorSpace.WIN32:
        return WIN32_ERRORS.get(code, (str(code), "unknown Win32 error"))
    code &= 0xFFFF_FFFF
    if space is ErrorSpace.HRESULT:
        known = HRESULTS.get(code)
        if known is not None:
            return known
        win32 = win32_from_hresult(code)
        if win32 is not None and win32 in WIN32_ERRORS:
            name, description = WIN32_ERRORS[win32]
            return f"HRESULT_FROM_WIN32({name})", description
        return _hex(code), "unknown HRESULT"
    return NTSTATUSES.get(code, (_hex(code), "unknown NTSTATUS"))


class HypervisorError(PyvmmError, OSError):
    """A call into the hypervisor, or into a host service it needs, failed.

    ``operation`` names the call (an ioctl name such as ``KVM_CREATE_VM``, or a DLL
    function such as ``WHvCreatePartition``); ``code`` is what the host returned, in
    ``space`` (an errno unless the caller says otherwise; HRESULTs and NTSTATUSes
    are stored as unsigned 32-bit values, so ``-2147024809`` becomes ``0x80070057``);
    ``code_name`` is its name (``"EINVAL"``, ``"E_INVALIDARG"``, or the value when
    no table knows it); ``detail`` is the caller's note.

    As an :class:`OSError`: ``errno`` is the code in the ERRNO space and None
    otherwise; ``winerror`` is the Win32 error for the WIN32 space and for an HRESULT
    that wraps one (``0x8007xxxx``), else None; ``strerror`` is the whole message.
    """

    def __init__(self, operation: str, err: int, detail: str = "", *, space: ErrorSpace = ErrorSpace.ERRNO) -> None:
        space = ErrorSpace(space)
        code = int(err)
        if space in (ErrorSpace.HRESULT, ErrorSpace.NTSTATUS):
            code &= 0xFFFF_FFFF  # ctypes returns a LONG: negative for every failure
        name, description = describe_code(code, space)
        if space is ErrorSpace.ERRNO:
            text = f"{operation} failed: [{name}] {description}"
        elif name.startswith("0x") or name.isdigit():
            text = f"{operation} failed: {space.value} {name} ({description})"
        else:
            value = str(code) if space is ErrorSpace.WIN32 else _hex(code)
            text = f"{operation} failed: [{name}] {description} ({space.value} {value})"
        if detail:
            text += f" ({detail})"
        OSError.__init__(self, code if space is ErrorSpace.ERRNO else None, text)
        self.operation = operation
        self.code = code
        self.space = space
        self.code_name = name
        self.detail = detail
        # OSError has a winerror member only on Windows; elsewhere this is an
        # ordinary attribute with the same meaning.
        if space is ErrorSpace.WIN32:
            self.winerror: int | None = code
        elif space is ErrorSpace.HRESULT:
            self.winerror = win32_from_hresult(code)
        else:
            self.winerror = None

    def __str__(self) -> str:
        return str(self.args[1])


class UnknownExitError(HypervisorError):
    """The hypervisor reported an exit reason this backend does not know."""

    def __init__(self, operation: str, reason: int) -> None:
        super().__init__(operation, _errno.EPROTO, f"unknown exit reason {reason}")
        self.reason = reason
