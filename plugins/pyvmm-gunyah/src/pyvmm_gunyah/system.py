"""``/dev/gunyah`` and which of the incompatible Gunyah interfaces it speaks.

Three ABIs share the device name and the ``'G'`` ioctl numbers
(``docs/backends/gunyah.md`` §2.1); pyvmm-gunyah speaks **B**, the one crosvm
targets, and refuses the others with a message that names what was found.

The probe runs on a *scratch VM* that is never started and is closed at once.
It makes only valid calls, so it breaks no rule of any interface, and every
call is one the driver answers before anything reaches the resource manager
(RM) or the hypervisor: an unstarted VM is kernel bookkeeping only
(``gunyah_vm_alloc``; the RM sees a VM first in ``gunyah_vm_start``), and
closing it releases that bookkeeping (``_gunyah_vm_put`` with the status still
NO_STATE stops and resets nothing).  ``docs/backends/gunyah.md`` §2.3 has the
sources of each step.

1. ``GH_VM_SET_BOOT_CONTEXT{REG_SET_PC, 0}``: stored in the scratch VM's
   ``boot_context`` xarray on B and C; **ENOTTY on A**, whose VM ioctl switch has
   no 0xa.
2. ``GH_VM_SET_USER_MEM_REGION`` of one anonymous page, label 0, read-only, at
   guest address 0: a binding in the scratch VM's table on A and B; **ENOTTY on
   C**, which replaced it with guest_memfd (``GUNYAH_VM_MAP_MEM``).
3. ``GH_VM_CHECK_EXTENSION(GH_CAP_VCPU_TIMER_WAKEUP)``: a read-only query, 1 or
   0 on the Qualcomm B kernels (``la_kernel_msm vm_mgr.c``).  The ACK android15
   ``vm_mgr.c`` has every ioctl crosvm uses but not this one (ENOTTY), so its
   absence does not make a kernel "not B"; the answer is kept as
   :attr:`AbiProbe.timer_wakeup` (None when absent), which is what crosvm
   consults it for.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import mmap
from dataclasses import dataclass

from pyvmm.backend import DeviceHost
from pyvmm.errors import HypervisorError
from pyvmm.manifest import Availability
from pyvmm_gunyah import bindings as g
from pyvmm_gunyah.bindings import ffi
from pyvmm_gunyah.host import HOST
from pyvmm_gunyah.manifest import DEVICE


class Abi(enum.Enum):
    A = "A"
    B = "B"
    C = "C"


ABI_DESCRIPTIONS = {
    Abi.A: "the android14-6.1 'GH_' interface (ABI A: GH_VM_SET_BOOT_CONTEXT gives ENOTTY)",
    Abi.B: "the android15+/Qualcomm interface (ABI B)",
    Abi.C: "the guest_memfd interface of the upstream patch series (ABI C: GH_VM_SET_USER_MEM_REGION gives ENOTTY)",
}


@dataclass(frozen=True)
class AbiProbe:
    abi: Abi
    #: ``GH_VM_CHECK_EXTENSION(GH_CAP_VCPU_TIMER_WAKEUP)``: None where the ioctl is absent.
    timer_wakeup: bool | None = None


class UnsupportedAbi(HypervisorError):
    """``/dev/gunyah`` speaks a Gunyah interface other than B.  Like every pyvmm
    error it pickles with its fields (``abi``, ``path``, the message): the base
    class rebuilds it from its constructor arguments."""

    def __init__(self, path: str, abi: Abi) -> None:
        super().__init__(
            "Gunyah interface probe",
            errno.ENOTTY,
            f"{path} speaks {ABI_DESCRIPTIONS[abi]}; "
            f"pyvmm-gunyah needs {ABI_DESCRIPTIONS[Abi.B]}, the one crosvm targets",
        )
        self.path = path
        self.abi = abi


def probe_abi(host: DeviceHost, device_fd: int) -> AbiProbe:
    """Which interface the driver behind ``device_fd`` speaks (see the module docstring)."""
    vm = host.ioctl(device_fd, g.GH_CREATE_VM, 0, detail="scratch VM for the interface probe")
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        boot = ffi.new("struct gh_vm_boot_context *", {"reg": g.boot_context_reg(g.REG_SET_PC, 0), "value": 0})
        result = host.try_ioctl(vm, g.GH_VM_SET_BOOT_CONTEXT, boot)
        if result == -errno.ENOTTY:
            return AbiProbe(Abi.A)
        if result < 0:
            raise HypervisorError("GH_VM_SET_BOOT_CONTEXT", -result, "interface probe on a scratch VM")
        anchor = ctypes.c_char.from_buffer(page)
        page_addr = ctypes.addressof(anchor)
        del anchor
        region = ffi.new(
            "struct gh_userspace_memory_region *",
            {
                "label": 0,
                "flags": g.GH_MEM_ALLOW_READ,
                "guest_phys_addr": 0,
                "memory_size": mmap.PAGESIZE,
                "userspace_addr": page_addr,
            },
        )
        result = host.try_ioctl(vm, g.GH_VM_SET_USER_MEM_REGION, region)
        if result == -errno.ENOTTY:
            return AbiProbe(Abi.C)
        if result < 0:
            raise HypervisorError("GH_VM_SET_USER_MEM_REGION", -result, "interface probe on a scratch VM")
        result = host.try_ioctl(vm, g.GH_VM_CHECK_EXTENSION, g.GH_CAP_VCPU_TIMER_WAKEUP)
        if result == -errno.ENOTTY:
            return AbiProbe(Abi.B, timer_wakeup=None)
        if result < 0:
            raise HypervisorError("GH_VM_CHECK_EXTENSION", -result, "interface probe on a scratch VM")
        return AbiProbe(Abi.B, timer_wakeup=bool(result))
    finally:
        # The VM goes first: it holds the page until it is released.
        host.close(vm)
        page.close()


class GunyahSystem:
    """An open ``/dev/gunyah`` that speaks ABI B.  One per host is enough:
    :func:`system` shares it."""

    def __init__(self, host: DeviceHost, path: str = DEVICE) -> None:
        self.host = host
        self.path = path
        self.fd = host.open_device(path)
        try:
            self.abi = probe_abi(host, self.fd)
            if self.abi.abi is not Abi.B:
                raise UnsupportedAbi(path, self.abi.abi)
        except BaseException:
            host.close(self.fd)
            raise

    def create_vm(self) -> int:
        """``GH_CREATE_VM(0)``: a new VM fd (the argument is reserved and must be 0)."""
        return self.host.ioctl(self.fd, g.GH_CREATE_VM, 0)

    def close(self) -> None:
        if self.fd >= 0:
            self.host.close(self.fd)
            self.fd = -1


def system(host: DeviceHost | None = None) -> GunyahSystem:
    """The probed ``/dev/gunyah`` of ``host`` (default: the current one), opened
    on first use and kept in ``host.state["system"]``."""
    return (host or HOST.current()).shared("system", GunyahSystem, GunyahSystem)


def probe() -> Availability:
    """The manifest's availability probe: never raises."""
    try:
        system()
    except UnsupportedAbi as exc:
        return Availability.no(str(exc))
    except HypervisorError as exc:
        if exc.errno == errno.ENOENT:
            return Availability.no(f"{DEVICE} does not exist (no Gunyah hypervisor, or its driver is not loaded)")
        return Availability.no(str(exc))
    except Exception as exc:  # noqa: BLE001 - a probe never raises
        return Availability.no(f"{type(exc).__name__}: {exc}")
    return Availability.yes()
