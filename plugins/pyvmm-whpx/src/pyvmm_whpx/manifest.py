"""The whpx backend's manifest and availability probe (entry point ``whpx``).

What ``pyvmm backends`` reads of this backend, so it imports nothing of it but
this module (no bindings, no VM or vCPU code); the plugin object,
:data:`pyvmm_whpx.plugin.plugin`, is imported when the backend is first used.
"""

from __future__ import annotations

from pyvmm.capabilities import Capability
from pyvmm.config import Arch
from pyvmm.manifest import CONTRACT_VERSION, Availability, BackendManifest
from pyvmm_whpx import __version__

BACKEND = "whpx"

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


def probe() -> Availability:
    """The manifest's availability probe: never raises.  Core asks it only on
    Windows or with a stand-in behind the backend (``host_os``), and there it
    asks :func:`pyvmm_whpx.system.probe`, which loads the platform's DLLs: on
    any other host ``pyvmm backends`` imports nothing of this backend."""
    from pyvmm_whpx.system import probe as probe_the_platform

    return probe_the_platform()


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
        plugin="pyvmm_whpx.plugin:plugin",
    )
