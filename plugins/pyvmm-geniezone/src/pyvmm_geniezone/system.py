"""``/dev/gzvm`` and which GenieZone interface it speaks.

The driver has no API-version ioctl.  What it offers to ask is
``GZVM_CHECK_EXTENSION`` on the device fd, and the interface pyvmm-geniezone is
written for (the Android Common Kernel's ``gzvm.h``, whose structs crosvm's
bindings declare) answers it in a way that tells it apart
(``docs/backends/geniezone.md`` §3):

* the argument is a **pointer** to a u64 holding the capability, and the answer
  is written back through it: ``GZVM_CAP_VM_GPA_SIZE`` gives the guest-physical
  address width (``CONFIG_ARM64_PA_BITS``), ``GZVM_CAP_PROTECTED_VM`` gives 1
  (``gzvm_main.c gzvm_dev_ioctl_check_extension``, ``arch/arm64/geniezone/vm.c
  gzvm_arch_check_extension``);
* an unknown capability gives ``EOPNOTSUPP``.

A driver without the ioctl (``ENOTTY``) is not this interface; one that returns
success without writing an address width back through the pointer reads the
argument some other way (by value, as crosvm's ``get_guest_phys_addr_bits``
passes it).  Both are refused with a message naming what was found.  The probe
creates no VM: ``GZVM_CREATE_VM`` already reaches the hypervisor.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from pyvmm.backend import DeviceHost
from pyvmm.capabilities import Capability
from pyvmm.errors import HypervisorError
from pyvmm.manifest import Availability
from pyvmm_geniezone import bindings as g
from pyvmm_geniezone.bindings import ffi
from pyvmm_geniezone.host import HOST
from pyvmm_geniezone.manifest import DEVICE

#: The interface this plugin speaks, as messages name it.
SUPPORTED_INTERFACE = "the Android Common Kernel gzvm interface (GZVM_CHECK_EXTENSION through a u64 pointer)"

#: Guest-physical address widths an arm64 kernel can report (CONFIG_ARM64_PA_BITS).
PA_BITS_RANGE = range(32, 53)


class UnsupportedInterface(HypervisorError):
    """``/dev/gzvm`` answers in a way the supported interface does not."""

    def __init__(self, path: str, found: str) -> None:
        super().__init__(
            "GenieZone interface probe",
            errno.ENOTTY,
            f"{path} speaks {found}; pyvmm-geniezone needs {SUPPORTED_INTERFACE}",
        )
        self.path = path
        self.found = found


@dataclass(frozen=True)
class InterfaceProbe:
    #: The guest-physical address width the driver reports.
    gpa_bits: int
    #: Whether ``GZVM_CAP_PROTECTED_VM`` is offered.
    protected_vm: bool


def check_extension(host: DeviceHost, fd: int, capability: int) -> tuple[int, int]:
    """``GZVM_CHECK_EXTENSION`` with a pointer to ``capability``: ``(result, value
    written back)``; ``result`` is ``-errno`` on failure."""
    cell = ffi.new("uint64_t *", capability)
    result = host.try_ioctl(fd, g.GZVM_CHECK_EXTENSION, cell)
    return result, int(cell[0])


def probe_interface(host: DeviceHost, device_fd: int, path: str = DEVICE) -> InterfaceProbe:
    """Which interface the driver behind ``device_fd`` speaks (module docstring).

    :raises UnsupportedInterface: not the supported one.
    :raises HypervisorError: the driver failed the query.
    """
    result, value = check_extension(host, device_fd, g.GZVM_CAP_VM_GPA_SIZE)
    if result == -errno.ENOTTY:
        raise UnsupportedInterface(path, "no GZVM_CHECK_EXTENSION (ENOTTY): not a GenieZone driver")
    if result < 0:
        raise HypervisorError("GZVM_CHECK_EXTENSION", -result, "GZVM_CAP_VM_GPA_SIZE, interface probe")
    if value not in PA_BITS_RANGE:
        raise UnsupportedInterface(
            path,
            f"an interface that answers GZVM_CHECK_EXTENSION(GZVM_CAP_VM_GPA_SIZE) with {result} and leaves "
            f"{value:#x} in the argument (not an address width written back through the pointer)",
        )
    result, answer = check_extension(host, device_fd, g.GZVM_CAP_PROTECTED_VM)
    if result < 0 and result != -errno.EOPNOTSUPP:
        raise HypervisorError("GZVM_CHECK_EXTENSION", -result, "GZVM_CAP_PROTECTED_VM, interface probe")
    return InterfaceProbe(gpa_bits=value, protected_vm=result == 0 and answer == 1)


class GenieZoneSystem:
    """An open ``/dev/gzvm`` that speaks the supported interface.  One per host:
    :func:`system` shares it."""

    def __init__(self, host: DeviceHost, path: str = DEVICE) -> None:
        self.host = host
        self.path = path
        self.fd = host.open_device(path)
        try:
            self.interface = probe_interface(host, self.fd, path)
        except BaseException:
            host.close(self.fd)
            raise

    def create_vm(self) -> int:
        """``GZVM_CREATE_VM(0)``: a new VM fd (type 0, the only one: a Linux guest)."""
        return self.host.ioctl(self.fd, g.GZVM_CREATE_VM, g.GZVM_VM_TYPE_LINUX)

    def close(self) -> None:
        if self.fd >= 0:
            self.host.close(self.fd)
            self.fd = -1


def system(host: DeviceHost | None = None) -> GenieZoneSystem:
    """The probed ``/dev/gzvm`` of ``host`` (default: the current one), opened on
    first use and kept in ``host.state["system"]``."""
    return (host or HOST.current()).shared("system", GenieZoneSystem, GenieZoneSystem)


def probe() -> Availability:
    """The manifest's availability probe: never raises.  Without
    ``GZVM_CAP_PROTECTED_VM`` the manifest is narrowed to no ``PROTECTED``."""
    try:
        found = system().interface
    except UnsupportedInterface as exc:
        return Availability.no(str(exc))
    except HypervisorError as exc:
        if exc.errno == errno.ENOENT:
            return Availability.no(f"{DEVICE} does not exist (no GenieZone hypervisor, or its driver is not loaded)")
        return Availability.no(str(exc))
    except Exception as exc:  # noqa: BLE001 - a probe never raises
        return Availability.no(f"{type(exc).__name__}: {exc}")
    if not found.protected_vm:
        return Availability.yes(missing_capabilities=(Capability.PROTECTED,))
    return Availability.yes()
