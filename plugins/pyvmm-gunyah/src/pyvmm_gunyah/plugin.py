"""The Gunyah backend's manifest and plugin object (entry point ``gunyah``).

The hooks themselves are the methods of :class:`~pyvmm_gunyah.vm.GunyahVm` and
:class:`~pyvmm_gunyah.vcpu.GunyahVcpu`; :func:`pyvmm.backend.backend_plugin`
generates the pluggy implementations that forward to them.

The hypervisor owns the vCPU registers, so this backend declares
``HYPERVISOR_INITIALIZED_BOOT_CONTEXT`` and its vCPU class has no ``init`` method
(hence no ``pyvmm_init_vcpu``) and no register methods at all: the boot entry goes
to :meth:`GunyahVm.set_boot_context <pyvmm_gunyah.vm.GunyahVm.set_boot_context>`.
"""

from __future__ import annotations

from pyvmm.backend import backend_plugin
from pyvmm.capabilities import Capability
from pyvmm.config import Arch
from pyvmm.manifest import CONTRACT_VERSION, BackendManifest
from pyvmm_gunyah import __version__
from pyvmm_gunyah.system import probe
from pyvmm_gunyah.vcpu import GunyahVcpu
from pyvmm_gunyah.vm import GunyahVm

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
    )


plugin = backend_plugin(manifest=manifest, create_vm=GunyahVm.create, vm_class=GunyahVm, vcpu_class=GunyahVcpu)
