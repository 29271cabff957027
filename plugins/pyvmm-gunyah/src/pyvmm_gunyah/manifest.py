"""The gunyah backend's manifest and availability probe (entry point ``gunyah``).

What ``pyvmm backends`` reads of this backend, so it imports nothing of it but
this module (no bindings, no VM or vCPU code); the plugin object,
:data:`pyvmm_gunyah.plugin.plugin`, is imported when the backend is first used.
"""

from __future__ import annotations

import os

from pyvmm.backend.stand_in import has_stand_in
from pyvmm.capabilities import Capability
from pyvmm.config import Arch
from pyvmm.manifest import CONTRACT_VERSION, Availability, BackendManifest
from pyvmm_gunyah import __version__

BACKEND = "gunyah"
DEVICE = os.environ.get("PYVMM_GUNYAH_DEVICE", "/dev/gunyah")

#: What crosvm's Gunyah backend declares (``gunyah/mod.rs``), plus the pyvmm
#: hooks this plugin implements.  Not: register access, read-only or dirty-logged
#: memory, memory removal or late memory, port I/O.
CAPABILITIES = (
    Capability.HYPERVISOR_INITIALIZED_BOOT_CONTEXT,
    Capability.VM_START,
    Capability.IMMEDIATE_EXIT,
    Capability.USER_MEMORY,
    Capability.STATIC_SWIOTLB_ALLOCATION_REQUIRED,
    Capability.PROTECTED,
    Capability.IOEVENTS,
    Capability.IRQFD,
    Capability.MULTI_VCPU,
    Capability.DEVICE_TREE_NODES,
)


def probe() -> Availability:
    """The manifest's availability probe: never raises.  Without the device node
    (the common case: no Gunyah here) it answers from the file system alone;
    with it, or with a stand-in behind the backend, it asks
    :func:`pyvmm_gunyah.system.probe`, which checks the driver's interface."""
    if not has_stand_in(BACKEND) and not os.path.exists(DEVICE):
        return Availability.no(f"{DEVICE} does not exist (no Gunyah hypervisor, or its driver is not loaded)")
    from pyvmm_gunyah.system import probe as probe_the_driver

    return probe_the_driver()


def manifest() -> BackendManifest:
    return BackendManifest(
        name="gunyah",
        version=__version__,
        contract_version=CONTRACT_VERSION,
        description="Qualcomm Gunyah through /dev/gunyah (the android15+ interface crosvm targets)",
        host_os=("linux",),
        guest_arches=(Arch.AARCH64,),
        capabilities=CAPABILITIES,
        priority=90,
        probe=probe,
        plugin="pyvmm_gunyah.plugin:plugin",
    )
