"""The KVM backend's manifest and plugin object on an arm64 host.

KVM runs guests of the host's own architecture only, so the ``kvm`` entry point
(:mod:`pyvmm_kvm.plugin`) hands out this plugin on an aarch64 host and the x86
one elsewhere.  The hooks are the methods of :class:`~pyvmm_kvm.arm64_vm.KvmArm64Vm`
and :class:`~pyvmm_kvm.arm64_vcpu.KvmArm64Vcpu`.

What the arm64 backend declares, and the ``KVM_CHECK_EXTENSION`` answer each
capability depends on (the probe drops those this kernel lacks):

============================  =====================================================
``IMMEDIATE_EXIT``            ``KVM_CAP_IMMEDIATE_EXIT``
``READ_ONLY_MEMORY``          ``KVM_CAP_READONLY_MEM``
``VCPU_REGISTERS``            ``KVM_CAP_ONE_REG``
``IOEVENTS``                  ``KVM_CAP_IOEVENTFD`` (MMIO; no port I/O on arm64)
``IRQFD`` + ``_REMOVAL``      ``KVM_CAP_IRQFD``
``IRQFD_RESAMPLE``            ``KVM_CAP_IRQFD_RESAMPLE``
``IRQCHIP``, ``IRQ_LINE``     ``KVM_CAP_IRQCHIP`` (arm.c: "vgic_present") and
                              ``KVM_CAP_DEVICE_CTRL`` (``KVM_CREATE_DEVICE``)
``MULTI_VCPU``                ``KVM_CAP_ARM_PSCI_0_2`` (secondaries start by CPU_ON)
``REGISTER_LIST``             ``KVM_CAP_ONE_REG`` (``KVM_GET_REG_LIST``: snapshots)
``MP_STATE``                  ``KVM_CAP_MP_STATE``
``VM_STATE``                  ``KVM_CAP_IRQCHIP`` and ``KVM_CAP_DEVICE_CTRL`` (the
                              vGIC's registers as device attributes:
                              :mod:`pyvmm_kvm.arm64_vgic_state`)
``RAW_CAPABILITIES``          ``KVM_CAP_ENABLE_CAP_VM``
============================  =====================================================

USER_MEMORY, DIRTY_LOG, MEMORY_REMOVAL, LATE_MEMORY and VM_START (the vGIC's
initialisation) need nothing beyond API 12.  Not declared: PORT_IO, MSRS, CPUID
and the other x86 capabilities; GUEST_DEBUG (arm64 breakpoints are a separate
piece of work); GSI_ROUTING and MSI (the vGIC's ITS is not modelled); PVCLOCK
(``KVM_GET_CLOCK`` is x86's); PROTECTED (Linux 6.1 offers no protected VM type,
:mod:`pyvmm_kvm.arm64_uapi`).  No DEVICE_TREE_NODES: everything KVM emulates in
the kernel -- GICv3, architected timer, PSCI -- is what core's ``virt`` board
already describes, at the addresses and INTIDs KVM uses by default
(``tests/test_arm64_backend.py`` checks the two agree).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable

from pyvmm.backend import backend_plugin
from pyvmm.capabilities import Capability
from pyvmm.config import Arch
from pyvmm.errors import HypervisorError
from pyvmm.manifest import CONTRACT_VERSION, Availability, BackendManifest
from pyvmm_kvm import __version__
from pyvmm_kvm import bindings as k
from pyvmm_kvm.arm64_vcpu import KvmArm64Vcpu
from pyvmm_kvm.arm64_vm import KvmArm64Vm
from pyvmm_kvm.host_arch import host_is_arm64
from pyvmm_kvm.manifest import DEVICE, KVM_CAP_MP_STATE
from pyvmm_kvm.system import system

CAPABILITIES = (
    Capability.USER_MEMORY,
    Capability.IMMEDIATE_EXIT,
    Capability.READ_ONLY_MEMORY,
    Capability.DIRTY_LOG,
    Capability.MEMORY_REMOVAL,
    Capability.LATE_MEMORY,
    Capability.VCPU_REGISTERS,
    Capability.IOEVENTS,
    Capability.IRQFD,
    Capability.IRQFD_REMOVAL,
    Capability.IRQFD_RESAMPLE,
    Capability.IRQ_LINE,
    Capability.IRQCHIP,
    Capability.MULTI_VCPU,
    Capability.VM_START,
    Capability.RAW_CAPABILITIES,
    Capability.REGISTER_LIST,
    Capability.MP_STATE,
    Capability.VM_STATE,
)

#: Each capability that rests on extensions, with all the extensions it needs.
CAPABILITY_EXTENSIONS: dict[Capability, tuple[int, ...]] = {
    Capability.IMMEDIATE_EXIT: (k.KVM_CAP_IMMEDIATE_EXIT,),
    Capability.READ_ONLY_MEMORY: (k.KVM_CAP_READONLY_MEM,),
    Capability.VCPU_REGISTERS: (k.KVM_CAP_ONE_REG,),
    Capability.IOEVENTS: (k.KVM_CAP_IOEVENTFD,),
    Capability.IRQFD: (k.KVM_CAP_IRQFD, k.KVM_CAP_IRQCHIP),
    Capability.IRQFD_REMOVAL: (k.KVM_CAP_IRQFD, k.KVM_CAP_IRQCHIP),
    Capability.IRQFD_RESAMPLE: (k.KVM_CAP_IRQFD_RESAMPLE, k.KVM_CAP_IRQCHIP),
    Capability.IRQCHIP: (k.KVM_CAP_IRQCHIP, k.KVM_CAP_DEVICE_CTRL),
    Capability.IRQ_LINE: (k.KVM_CAP_IRQCHIP,),
    Capability.MULTI_VCPU: (k.KVM_CAP_ARM_PSCI_0_2,),
    Capability.RAW_CAPABILITIES: (k.KVM_CAP_ENABLE_CAP_VM,),
    Capability.REGISTER_LIST: (k.KVM_CAP_ONE_REG,),
    Capability.MP_STATE: (KVM_CAP_MP_STATE,),
    Capability.VM_STATE: (k.KVM_CAP_IRQCHIP, k.KVM_CAP_DEVICE_CTRL),
}

#: Without these no vCPU can be initialised the way this backend does it.
REQUIRED_EXTENSIONS = {k.KVM_CAP_ARM_PSCI_0_2: "PSCI 0.2", k.KVM_CAP_ONE_REG: "one-reg access"}


def missing_capabilities(check_extension: Callable[[int], int]) -> tuple[Capability, ...]:
    """The declared capabilities this KVM lacks, from its ``KVM_CHECK_EXTENSION`` answers."""
    answers: dict[int, int] = {}

    def has(extension: int) -> bool:
        if extension not in answers:
            answers[extension] = check_extension(extension)
        return answers[extension] > 0

    return tuple(cap for cap, needs in CAPABILITY_EXTENSIONS.items() if not all(has(ext) for ext in needs))


def availability(check_extension: Callable[[int], int], machine: str | None = None) -> Availability:
    """Whether this backend can run here: an arm64 host whose KVM has every
    :data:`REQUIRED_EXTENSIONS`; the capabilities it lacks otherwise narrow it."""
    if not host_is_arm64(machine):
        host = machine or platform.machine()
        return Availability.no(f"the KVM arm64 backend runs aarch64 guests on an aarch64 host; this host is {host}")
    absent = [name for ext, name in REQUIRED_EXTENSIONS.items() if not check_extension(ext)]
    if absent:
        return Availability.no(f"this KVM lacks {', '.join(absent)}")
    return Availability.yes(missing_capabilities=missing_capabilities(check_extension))


def probe() -> Availability:
    """The manifest's availability probe: never raises."""
    if not host_is_arm64():
        return availability(lambda ext: 0)
    if not os.path.exists(DEVICE):
        return Availability.no(f"{DEVICE} does not exist (is KVM enabled in this kernel?)")
    try:
        return availability(system().check_extension)
    except HypervisorError as exc:
        return Availability.no(str(exc))
    except Exception as exc:  # noqa: BLE001 - a probe never raises
        return Availability.no(f"{type(exc).__name__}: {exc}")


def manifest() -> BackendManifest:
    return BackendManifest(
        name="kvm",
        version=__version__,
        contract_version=CONTRACT_VERSION,
        description="Linux KVM through /dev/kvm (arm64 host)",
        host_os=("linux",),
        guest_arches=(Arch.AARCH64,),
        capabilities=CAPABILITIES,
        priority=100,
        probe=probe,
        plugin="pyvmm_kvm.arm64_plugin:plugin",
    )


plugin = backend_plugin(
    manifest=manifest, create_vm=KvmArm64Vm.create, vm_class=KvmArm64Vm, vcpu_class=KvmArm64Vcpu, name="pyvmm_kvm"
)
