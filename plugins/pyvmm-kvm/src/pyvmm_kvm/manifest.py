"""The KVM backend's manifest and availability probe (entry point ``kvm``).

What ``pyvmm backends`` reads of this backend, so it imports nothing of it but
this module: no cffi bindings, no VM or vCPU code.  The probe asks ``/dev/kvm``
through :func:`fcntl.ioctl` (the same two requests :class:`~pyvmm_kvm.system.KvmSystem`
makes, ``KVM_GET_API_VERSION`` and ``KVM_CHECK_EXTENSION``); while a driver model
or a test's seam stands in for the host (:mod:`pyvmm.backend.stand_in`), it asks
:func:`pyvmm_kvm.system.probe`, which goes through the seam.

On an arm64 host the ``kvm`` backend is the arm64 one: its manifest and probe
are :mod:`pyvmm_kvm.arm64_plugin`'s (imported there only).  The plugin object
is :data:`pyvmm_kvm.plugin.plugin`, imported when the backend is first used.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Final

from pyvmm.backend.ioctl import linux
from pyvmm.backend.stand_in import has_stand_in
from pyvmm.capabilities import Capability
from pyvmm.config import Arch
from pyvmm.manifest import CONTRACT_VERSION, Availability, BackendManifest
from pyvmm_kvm import __version__
from pyvmm_kvm.host_arch import host_is_arm64

DEVICE = os.environ.get("PYVMM_KVM_DEVICE", "/dev/kvm")
BACKEND = "kvm"

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

# The requests and extension numbers the probe needs, from <linux/kvm.h> as
# pyvmm_kvm.bindings has them (a test checks the two agree); written out here
# so that the probe needs no bindings.
KVMIO: Final = 0xAE
KVM_API_VERSION: Final = 12
KVM_GET_API_VERSION: Final = linux.io(KVMIO, 0x00)
KVM_CHECK_EXTENSION: Final = linux.io(KVMIO, 0x03)
KVM_CAP_IRQCHIP: Final = 0
KVM_CAP_MP_STATE: Final = 14
KVM_CAP_COALESCED_MMIO: Final = 15
KVM_CAP_USER_NMI: Final = 22
KVM_CAP_SET_GUEST_DEBUG: Final = 23
KVM_CAP_IRQ_ROUTING: Final = 25
KVM_CAP_IRQFD: Final = 32
KVM_CAP_PIT_STATE2: Final = 35
KVM_CAP_IOEVENTFD: Final = 36
KVM_CAP_ADJUST_CLOCK: Final = 39
KVM_CAP_VCPU_EVENTS: Final = 41
KVM_CAP_XSAVE: Final = 55
KVM_CAP_XCRS: Final = 56
KVM_CAP_TSC_CONTROL: Final = 60
KVM_CAP_GET_TSC_KHZ: Final = 61
KVM_CAP_SIGNAL_MSI: Final = 77
KVM_CAP_READONLY_MEM: Final = 81
KVM_CAP_IRQFD_RESAMPLE: Final = 82
KVM_CAP_ENABLE_CAP_VM: Final = 98
KVM_CAP_VCPU_ATTRIBUTES: Final = 127
KVM_CAP_IMMEDIATE_EXIT: Final = 136
KVM_CAP_GET_MSR_FEATURES: Final = 153
KVM_CAP_COALESCED_PIO: Final = 162

#: Capabilities the plugin implements that depend on a KVM extension; anything
#: not listed here the base KVM API (version 12) always has.
CAPABILITY_EXTENSIONS: dict[Capability, int] = {
    Capability.IMMEDIATE_EXIT: KVM_CAP_IMMEDIATE_EXIT,
    Capability.READ_ONLY_MEMORY: KVM_CAP_READONLY_MEM,
    Capability.IOEVENTS: KVM_CAP_IOEVENTFD,
    Capability.PIO_IOEVENTS: KVM_CAP_IOEVENTFD,
    Capability.IRQFD: KVM_CAP_IRQFD,
    Capability.IRQCHIP: KVM_CAP_IRQCHIP,
    Capability.IRQ_LINE: KVM_CAP_IRQCHIP,
    Capability.GUEST_DEBUG: KVM_CAP_SET_GUEST_DEBUG,
    Capability.PVCLOCK: KVM_CAP_ADJUST_CLOCK,
    Capability.XCRS: KVM_CAP_XCRS,
    Capability.NMI: KVM_CAP_USER_NMI,
    Capability.VCPU_EVENTS: KVM_CAP_VCPU_EVENTS,
    # Upstream x86 KVM never reports KVM_CAP_INTR_SHADOW (kvm_vm_ioctl_check_extension
    # in arch/x86/kvm/x86.c has no case for it): the STI/MOV-SS shadow comes with
    # the vCPU events (KVM_VCPUEVENT_VALID_SHADOW, kvm_vcpu_ioctl_x86_get_vcpu_events).
    Capability.INTERRUPT_SHADOW: KVM_CAP_VCPU_EVENTS,
    Capability.IRQFD_REMOVAL: KVM_CAP_IRQFD,
    Capability.IRQFD_RESAMPLE: KVM_CAP_IRQFD_RESAMPLE,
    Capability.GSI_ROUTING: KVM_CAP_IRQ_ROUTING,
    Capability.MSI: KVM_CAP_SIGNAL_MSI,
    Capability.FEATURE_MSRS: KVM_CAP_GET_MSR_FEATURES,
    Capability.TSC_FREQUENCY: KVM_CAP_GET_TSC_KHZ,
    Capability.TSC_SCALING: KVM_CAP_TSC_CONTROL,
    Capability.TSC_OFFSET: KVM_CAP_VCPU_ATTRIBUTES,
    Capability.RAW_CAPABILITIES: KVM_CAP_ENABLE_CAP_VM,
    Capability.COALESCED_IO: KVM_CAP_COALESCED_MMIO,
    Capability.COALESCED_PIO: KVM_CAP_COALESCED_PIO,
    Capability.XSAVE: KVM_CAP_XSAVE,
    Capability.MP_STATE: KVM_CAP_MP_STATE,
    Capability.VM_STATE: KVM_CAP_PIT_STATE2,
}


#: Implementations of the KVM API that differ from upstream KVM where no extension
#: says so, by the kernel module that names them: the capabilities they lack.
#: kvm_pvm takes an interrupt injected right after ``sti`` inside the shadow
#: (docs/backends/kvm.md §6.5).
DEVIATING_MODULES: dict[str, tuple[Capability, ...]] = {"kvm_pvm": (Capability.INTERRUPT_SHADOW,)}


def missing_capabilities(check_extension: Callable[[int], int]) -> tuple[Capability, ...]:
    """The declared capabilities this KVM lacks, from its ``KVM_CHECK_EXTENSION``
    answers and the modules loaded (:data:`DEVIATING_MODULES`)."""
    missing = [cap for cap, ext in CAPABILITY_EXTENSIONS.items() if not check_extension(ext)]
    for module, lacking in DEVIATING_MODULES.items():
        if os.path.isdir(f"/sys/module/{module}"):
            missing += [cap for cap in lacking if cap not in missing]
    return tuple(missing)


def probe() -> Availability:
    """The manifest's availability probe: never raises."""
    if has_stand_in(BACKEND):
        from pyvmm_kvm.system import probe as probe_through_the_seam

        return probe_through_the_seam()
    if host_is_arm64():
        from pyvmm_kvm.arm64_plugin import probe as arm64_probe

        return arm64_probe()
    if not os.path.exists(DEVICE):
        return Availability.no(f"{DEVICE} does not exist (is the kvm module loaded?)")
    try:
        return _probe_device()
    except Exception as exc:  # noqa: BLE001 - a probe never raises
        return Availability.no(f"{type(exc).__name__}: {exc}")


def _probe_device() -> Availability:
    import fcntl

    try:
        fd = os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return Availability.no(f"{DEVICE}: cannot be opened: {exc.strerror or exc}")
    try:
        try:
            version = fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)
        except OSError as exc:
            return Availability.no(f"KVM_GET_API_VERSION on {DEVICE} failed: {exc.strerror or exc}")
        if version != KVM_API_VERSION:
            return Availability.no(f"{DEVICE} speaks API {version}, pyvmm-kvm needs {KVM_API_VERSION}")
        answers: dict[int, int] = {}

        def check_extension(extension: int) -> int:
            if extension not in answers:
                answers[extension] = fcntl.ioctl(fd, KVM_CHECK_EXTENSION, extension)
            return answers[extension]

        return Availability.yes(missing_capabilities=missing_capabilities(check_extension))
    finally:
        os.close(fd)


def manifest() -> BackendManifest:
    """The manifest the ``kvm`` entry point names: the arm64 backend's on an arm64 host."""
    if host_is_arm64():
        from pyvmm_kvm.arm64_plugin import manifest as arm64_manifest

        return arm64_manifest()
    return BackendManifest(
        name=BACKEND,
        version=__version__,
        contract_version=CONTRACT_VERSION,
        description="Linux KVM through /dev/kvm",
        host_os=("linux",),
        guest_arches=(Arch.X86_64,),
        capabilities=CAPABILITIES,
        priority=100,
        probe=probe,
        plugin="pyvmm_kvm.plugin:plugin",
    )
