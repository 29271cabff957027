"""The KVM backend's manifest and plugin object (entry point ``kvm``).

The hooks themselves are the methods of :class:`~pyvmm_kvm.vm.KvmVm` and
:class:`~pyvmm_kvm.vcpu.KvmVcpu`; :func:`pyvmm.backend.backend_plugin` generates
the pluggy implementations that forward to them.
"""

from __future__ import annotations

from pyvmm.backend import backend_plugin
from pyvmm.capabilities import Capability
from pyvmm.config import Arch
from pyvmm.manifest import CONTRACT_VERSION, BackendManifest
from pyvmm_kvm import __version__
from pyvmm_kvm.host_arch import host_is_arm64
from pyvmm_kvm.system import probe
from pyvmm_kvm.vcpu import KvmVcpu
from pyvmm_kvm.vm import KvmVm

CAPABILITIES = (
    Capability.USER_MEMORY,
    Capability.IMMEDIATE_EXIT,
    Capability.READ_ONLY_MEMORY,
    Capability.DIRTY_LOG,
    Capability.MEMORY_REMOVAL,
    Capability.LATE_MEMORY,
    Capability.PORT_IO,
    Capability.VCPU_REGISTERS,
    Capability.MSRS,
    Capability.PREPARED_VCPU_STATE,
    Capability.CPUID,
    Capability.XCRS,
    Capability.IOEVENTS,
    Capability.PIO_IOEVENTS,
    Capability.IRQFD,
    Capability.IRQ_LINE,
    Capability.IRQCHIP,
    Capability.GUEST_DEBUG,
    Capability.PVCLOCK,
    Capability.MULTI_VCPU,
    # Interrupts from userspace and the rest of the API (docs/backends/kvm.md §6.4-§8.1).
    Capability.INTERRUPT_INJECTION,
    Capability.NMI,
    Capability.VCPU_EVENTS,
    Capability.INTERRUPT_SHADOW,
    Capability.IRQFD_REMOVAL,
    Capability.IRQFD_RESAMPLE,
    Capability.GSI_ROUTING,
    Capability.MSI,
    Capability.MSR_INDEX_LIST,
    Capability.FEATURE_MSRS,
    Capability.TSC_FREQUENCY,
    Capability.TSC_SCALING,
    Capability.TSC_OFFSET,
    Capability.RAW_CAPABILITIES,
    # Exits avoided (pyvmm_kvm.coalesced).
    Capability.COALESCED_IO,
    Capability.COALESCED_PIO,
    # Registers answered in the run loop (pyvmm_kvm.served, compiled or pure).
    Capability.SERVED_IO,
    # Complete snapshots (pyvmm_kvm.irqchip_state, KvmVcpu.get_xsave).
    Capability.XSAVE,
    Capability.MP_STATE,
    Capability.VM_STATE,
)


def manifest() -> BackendManifest:
    return BackendManifest(
        name="kvm",
        version=__version__,
        contract_version=CONTRACT_VERSION,
        description="Linux KVM through /dev/kvm",
        host_os=("linux",),
        guest_arches=(Arch.X86_64,),
        capabilities=CAPABILITIES,
        priority=100,
        probe=probe,
    )


def _plugin_for_this_host() -> object:
    """KVM runs guests of the host's architecture only: an arm64 host gets the
    arm64 backend (:mod:`pyvmm_kvm.arm64_plugin`, imported only there: it pulls
    in the virt board's layout), any other the x86 one above."""
    if host_is_arm64():
        from pyvmm_kvm.arm64_plugin import plugin as arm64

        return arm64
    return backend_plugin(manifest=manifest, create_vm=KvmVm.create, vm_class=KvmVm, vcpu_class=KvmVcpu)


plugin = _plugin_for_this_host()
