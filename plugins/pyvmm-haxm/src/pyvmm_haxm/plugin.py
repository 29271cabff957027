"""The HAXM backend's manifest and plugin object (entry point ``haxm``).

The hooks themselves are the methods of :class:`~pyvmm_haxm.vm.HaxmVm` and
:class:`~pyvmm_haxm.vcpu.HaxmVcpu`; :func:`pyvmm.backend.backend_plugin`
generates the pluggy implementations that forward to them.
"""

from __future__ import annotations

from pyvmm.backend import backend_plugin
from pyvmm.capabilities import Capability
from pyvmm.config import Arch
from pyvmm.manifest import CONTRACT_VERSION, BackendManifest
from pyvmm_haxm import __version__
from pyvmm_haxm.system import probe
from pyvmm_haxm.vcpu import HaxmVcpu
from pyvmm_haxm.vm import HaxmVm

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
    )


plugin = backend_plugin(manifest=manifest, create_vm=HaxmVm.create, vm_class=HaxmVm, vcpu_class=HaxmVcpu)
