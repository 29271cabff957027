"""The WHPX backend's manifest and plugin object (entry point ``whpx``).

The hooks are the methods of :class:`~pyvmm_whpx.vm.WhpxVm` and
:class:`~pyvmm_whpx.vcpu.WhpxVcpu`; :func:`pyvmm.backend.backend_plugin`
generates the pluggy implementations that forward to them.

``host_os`` is Windows alone: the driver model (:mod:`pyvmm_whpx.model`,
``pyvmm run --model``) runs on other hosts because a stand-in behind the switch
lifts that limit (:mod:`pyvmm.backend.stand_in`).
"""

from __future__ import annotations

from pyvmm.backend import backend_plugin
from pyvmm.capabilities import Capability
from pyvmm.config import Arch
from pyvmm.manifest import CONTRACT_VERSION, BackendManifest
from pyvmm_whpx import __version__
from pyvmm_whpx.system import probe
from pyvmm_whpx.vcpu import WhpxVcpu
from pyvmm_whpx.vm import WhpxVm

#: What this backend does; DIRTY_LOG is withdrawn by the probe on a Windows
#: without dirty-page tracking.  IOEVENTS are withdrawn without the doorbell exports.  Not (yet): the
#: local APIC emulation (IRQCHIP/MSI), VCPU_EVENTS, MSRs/CPUID tables, XSAVE/FPU state.  CPUID and
#: MSR *exits* are backend options (pyvmm_whpx.options), not the CPUID/MSRS table hooks.
CAPABILITIES = (
    Capability.USER_MEMORY,
    Capability.IMMEDIATE_EXIT,
    Capability.PORT_IO,
    Capability.READ_ONLY_MEMORY,
    Capability.LATE_MEMORY,
    Capability.MEMORY_REMOVAL,
    Capability.DIRTY_LOG,
    Capability.VCPU_REGISTERS,
    Capability.INTERRUPT_INJECTION,
    Capability.INTERRUPT_SHADOW,
    Capability.NMI,
    Capability.IOEVENTS,
    Capability.MULTI_VCPU,
)


def manifest() -> BackendManifest:
    return BackendManifest(
        name="whpx",
        version=__version__,
        contract_version=CONTRACT_VERSION,
        description="the Windows Hypervisor Platform (WinHvPlatform.dll + WinHvEmulation.dll)",
        host_os=("win32",),
        guest_arches=(Arch.X86_64,),
        capabilities=CAPABILITIES,
        priority=80,
        probe=probe,
    )


plugin = backend_plugin(manifest=manifest, create_vm=WhpxVm.create, vm_class=WhpxVm, vcpu_class=WhpxVcpu)
