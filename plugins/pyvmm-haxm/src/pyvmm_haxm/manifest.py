"""The haxm backend's manifest and availability probe (entry point ``haxm``).

What ``pyvmm backends`` reads of this backend, so it imports nothing of it but
this module (no bindings, no VM or vCPU code); the plugin object,
:data:`pyvmm_haxm.plugin.plugin`, is imported when the backend is first used.
"""

from __future__ import annotations

import os
import sys

from pyvmm.backend.stand_in import has_stand_in
from pyvmm.capabilities import Capability
from pyvmm.config import Arch
from pyvmm.manifest import CONTRACT_VERSION, Availability, BackendManifest
from pyvmm_haxm import __version__

BACKEND = "haxm"
#: The system device on Linux and macOS (``pyvmm_haxm.bindings.LINUX_PATHS``).
UNIX_DEVICE = "/dev/HAX"

#: What HAXM gives a VMM (docs/backends/haxm.md §9).  Not: an in-kernel irqchip,
#: irqfds or ioeventfds (HAXM has none), NMI injection (no ioctl), dirty logging,
#: CPUID tables (pyvmm-haxm does not use HAX_VCPU_IOCTL_SET_CPUID yet), guest
#: debugging (HAX_IOCTL_VCPU_DEBUG is bound, not used), XCRs.
CAPABILITIES = (
    Capability.USER_MEMORY,
    Capability.READ_ONLY_MEMORY,
    Capability.MEMORY_REMOVAL,
    Capability.LATE_MEMORY,
    Capability.PORT_IO,
    Capability.VCPU_REGISTERS,
    Capability.MSRS,
    Capability.IMMEDIATE_EXIT,
    Capability.MULTI_VCPU,
    Capability.INTERRUPT_INJECTION,
    Capability.INTERRUPT_SHADOW,
)


def probe() -> Availability:
    """The manifest's availability probe: never raises.  On Linux and macOS
    without ``/dev/HAX`` (the common case: HAXM is not installed) it answers
    from the file system alone; otherwise -- the device exists, the host is
    Windows (whose ``\\\\.\\HAX`` no file test sees), or a stand-in is behind the
    backend -- it asks :func:`pyvmm_haxm.system.probe`, which opens the driver."""
    if not has_stand_in(BACKEND) and sys.platform != "win32" and not os.path.exists(UNIX_DEVICE):
        return Availability.no(
            f"{UNIX_DEVICE} does not exist: the Intel HAXM driver is not installed (HAXM is a legacy backend: "
            "Intel archived it in 2023 and QEMU 8.2 removed its support)"
        )
    from pyvmm_haxm.system import probe as probe_the_driver

    return probe_the_driver()


def manifest() -> BackendManifest:
    return BackendManifest(
        name="haxm",
        version=__version__,
        contract_version=CONTRACT_VERSION,
        description="Intel HAXM (legacy: archived by Intel in 2023) through \\\\.\\HAX or /dev/HAX",
        host_os=("win32", "darwin", "linux"),
        guest_arches=(Arch.X86_64,),
        capabilities=CAPABILITIES,
        priority=20,
        probe=probe,
        plugin="pyvmm_haxm.plugin:plugin",
    )
