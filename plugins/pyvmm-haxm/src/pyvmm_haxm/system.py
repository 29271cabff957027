"""The HAXM system device: version and capability checks, VM creation, the probe.

What pyvmm-haxm requires of the driver, and why (``docs/backends/haxm.md`` §4):

* ``HAX_IOCTL_VERSION``: ``compat_version <= 4 <= cur_version`` -- the API v4
  tunnel and fast-MMIO protocol (QEMU 8.1 ``hax_version_support`` asked the same);
* ``HAX_IOCTL_CAPABILITY``: ``HAX_CAP_STATUS_WORKING`` (else the driver says
  whether VT-x or NX is off), ``HAX_CAP_UG`` (unrestricted guest: without it
  HAXM returns ``HAX_EXIT_REALMODE`` and the VMM must emulate real mode, which
  pyvmm does not), ``HAX_CAP_FASTMMIO`` (without it MMIO is the legacy exit whose
  instruction the VMM must emulate).  ``HAX_CAP_MEMQUOTA`` bounds the guest RAM
  (checked when memory is mapped); ``HAX_CAP_64BIT_RAMBLOCK``,
  ``HAX_CAP_64BIT_SETRAM`` and ``HAX_CAP_IMPLICIT_RAMBLOCK`` choose the RAM calls.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from pyvmm.errors import ErrorSpace, HypervisorError
from pyvmm.manifest import Availability
from pyvmm_haxm import bindings as b
from pyvmm_haxm.bindings import ffi
from pyvmm_haxm.host import HOST, OUT, HaxChannel


@dataclass(frozen=True)
class Capabilities:
    """``struct hax_capabilityinfo``, decoded."""

    wstatus: int
    winfo: int
    mem_quota: int

    @property
    def working(self) -> bool:
        return bool(self.wstatus & b.HAX_CAP_STATUS_WORKING)

    @property
    def quota(self) -> int | None:
        """The driver's memory quota in bytes, or None without ``HAX_CAP_MEMQUOTA``."""
        return self.mem_quota if self.wstatus & b.HAX_CAP_MEMQUOTA else None

    def has(self, flag: int) -> bool:
        """Whether ``winfo`` has ``flag`` (meaningful only while :attr:`working`)."""
        return self.working and bool(self.winfo & flag)

    def failure(self) -> str:
        """Why a driver that is not working says it is not."""
        reasons = []
        if self.winfo & b.HAX_CAP_FAILREASON_VT:
            reasons.append("VT-x is disabled or unavailable")
        if self.winfo & b.HAX_CAP_FAILREASON_NX:
            reasons.append("NX (execute disable) is disabled")
        return "; ".join(reasons) or "no reason given"


class UnsupportedDriver(HypervisorError):
    """The HAXM driver is present but cannot run pyvmm's guests (too old, VT-x or
    NX off, no unrestricted guest, no fast MMIO)."""

    def __init__(self, reason: str) -> None:
        super().__init__("HAXM capability check", errno.ENOTSUP, reason)
        self.reason = reason

    def __reduce__(self) -> tuple[type[UnsupportedDriver], tuple[str]]:
        return (type(self), (self.reason,))


class HaxSystem:
    """The open system device, checked.  One per channel: :func:`system` shares it."""

    def __init__(self, channel: HaxChannel) -> None:
        self.channel = channel
        self.handle = channel.open(channel.paths.system)
        try:
            version = ffi.new("struct hax_module_version *")
            channel.control(self.handle, "VERSION", version, OUT)
            self.compat_version, self.cur_version = int(version.compat_version), int(version.cur_version)
            if not self.compat_version <= b.HAX_API_VERSION <= self.cur_version:
                raise UnsupportedDriver(
                    f"the HAXM driver speaks API versions {self.compat_version}..{self.cur_version}; "
                    f"pyvmm-haxm needs API v{b.HAX_API_VERSION} (HAXM 7.x)"
                )
            info = ffi.new("struct hax_capabilityinfo *")
            channel.control(self.handle, "CAPABILITY", info, OUT)
            self.capabilities = Capabilities(int(info.wstatus), int(info.winfo), int(info.mem_quota))
            caps = self.capabilities
            if not caps.working:
                raise UnsupportedDriver(f"the HAXM driver is not working: {caps.failure()}")
            if not caps.has(b.HAX_CAP_UG):
                raise UnsupportedDriver(
                    "the CPU has no unrestricted guest mode (HAX_CAP_UG): HAXM would hand real mode to the VMM, "
                    "which pyvmm cannot emulate"
                )
            if not caps.has(b.HAX_CAP_FASTMMIO):
                raise UnsupportedDriver("the HAXM driver has no fast MMIO (HAX_CAP_FASTMMIO)")
        except BaseException:
            channel.close(self.handle)
            raise

    def create_vm(self) -> int:
        """``HAX_IOCTL_CREATE_VM``: the new VM's id (its device is ``paths.vm_path(id)``)."""
        vm_id = ffi.new("uint32_t *")
        self.channel.control(self.handle, "CREATE_VM", vm_id, OUT)
        return int(vm_id[0])

    def close(self) -> None:
        if self.handle >= 0:
            self.channel.close(self.handle)
            self.handle = -1


def system(channel: HaxChannel | None = None) -> HaxSystem:
    """The checked system device of ``channel`` (default: the current one), opened
    on first use and kept in ``channel.shared`` for every VM on that channel."""
    channel = channel or HOST.current()
    with channel.lock:
        found = channel.shared.get("system")
        if not isinstance(found, HaxSystem):
            found = channel.shared["system"] = HaxSystem(channel)
        return found


def probe() -> Availability:
    """The manifest's availability probe: never raises."""
    try:
        system()
    except UnsupportedDriver as exc:
        return Availability.no(exc.reason)
    except HypervisorError as exc:
        missing = (exc.space is ErrorSpace.ERRNO and exc.code == errno.ENOENT) or (
            exc.space is ErrorSpace.WIN32 and exc.code == 2
        )
        if missing:
            path = HOST.current().paths.system
            return Availability.no(
                f"{path} does not exist: the Intel HAXM driver is not installed (HAXM is a legacy backend: "
                "Intel archived it in 2023 and QEMU 8.2 removed its support)"
            )
        return Availability.no(str(exc))
    except Exception as exc:  # noqa: BLE001 - a probe never raises
        return Availability.no(f"{type(exc).__name__}: {exc}")
    return Availability.yes()
