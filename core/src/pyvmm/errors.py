"""The exceptions pyvmm raises.

Every error pyvmm raises derives from :class:`PyvmmError`, so a VMM can catch
"anything pyvmm said no to" in one place.  Errors that come from the host
(an ioctl, a DLL call) derive from :class:`HypervisorError`, which is also an
:class:`OSError` carrying the errno, so ``except OSError`` code keeps working.
"""

from __future__ import annotations

import errno as _errno
import os


class PyvmmError(Exception):
    """Base class of every error raised by pyvmm and its backends."""


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


class ConfigError(PyvmmError, ValueError):
    """A configuration value is invalid.  The message names the field."""


class GuestMemoryError(PyvmmError, ValueError):
    """A guest-physical access or mapping falls outside guest RAM, overlaps, or is
    misaligned.  Raised before any host memory is touched."""


class VmStateError(PyvmmError, RuntimeError):
    """An operation is not valid in the VM's or vCPU's current state
    (closed, already started, wrong thread, ...)."""


class HypervisorError(PyvmmError, OSError):
    """A call into the hypervisor failed.

    ``operation`` names the call (an ioctl name such as ``KVM_CREATE_VM``, or a DLL
    function), ``errno`` the error number the host returned.
    """

    def __init__(self, operation: str, err: int, detail: str = "") -> None:
        name = _errno.errorcode.get(err, str(err))
        text = f"{operation} failed: [{name}] {os.strerror(err)}"
        if detail:
            text += f" ({detail})"
        OSError.__init__(self, err, text)
        self.operation = operation

    def __str__(self) -> str:
        return str(self.args[1])

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.operation, self.errno))


class UnknownExitError(HypervisorError):
    """The hypervisor reported an exit reason this backend does not know."""

    def __init__(self, operation: str, reason: int) -> None:
        super().__init__(operation, _errno.EPROTO, f"unknown exit reason {reason}")
        self.reason = reason
