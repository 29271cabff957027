"""The geniezone backend's manifest and availability probe (entry point ``geniezone``).

What ``pyvmm backends`` reads of this backend, so it imports nothing of it but
this module (no bindings, no VM or vCPU code); the plugin object,
:data:`pyvmm_geniezone.plugin.plugin`, is imported when the backend is first used.
"""

from __future__ import annotations

import os

from pyvmm.backend.stand_in import has_stand_in
from pyvmm.capabilities import Capability
from pyvmm.config import Arch
from pyvmm.manifest import CONTRACT_VERSION, Availability, BackendManifest
from pyvmm_geniezone import __version__

BACKEND = "geniezone"
DEVICE = os.environ.get("PYVMM_GENIEZONE_DEVICE", "/dev/gzvm")

CAPABILITIES = (
    Capability.USER_MEMORY,
    Capability.IMMEDIATE_EXIT,
    Capability.MULTI_VCPU,
    Capability.PROTECTED,
    Capability.IRQCHIP,
    Capability.IRQ_LINE,
    Capability.IRQFD,
    Capability.IRQFD_REMOVAL,
    Capability.IOEVENTS,
)


def probe() -> Availability:
    """The manifest's availability probe: never raises.  Without the device node
    (the common case: no GenieZone here) it answers from the file system alone;
    with it, or with a stand-in behind the backend, it asks
    :func:`pyvmm_geniezone.system.probe`, which checks the driver's interface."""
    if not has_stand_in(BACKEND) and not os.path.exists(DEVICE):
        return Availability.no(f"{DEVICE} does not exist (no GenieZone hypervisor, or its driver is not loaded)")
    from pyvmm_geniezone.system import probe as probe_the_driver

    return probe_the_driver()


def manifest() -> BackendManifest:
    return BackendManifest(
        name="geniezone",
        version=__version__,
        contract_version=CONTRACT_VERSION,
        description="MediaTek GenieZone through /dev/gzvm (the Android Common Kernel interface crosvm drives)",
        host_os=("linux",),
        guest_arches=(Arch.AARCH64,),
        capabilities=CAPABILITIES,
        priority=85,
        probe=probe,
        plugin="pyvmm_geniezone.plugin:plugin",
    )
