"""pyvmm hook implementations for Gunyah: thin adapters from the contract to
:mod:`pyvmm_gunyah.vm` and :mod:`pyvmm_gunyah.vcpu`.  Registered through the
``pyvmm`` entry point ``gunyah``.

The hypervisor owns the vCPU registers, so this backend declares
``HYPERVISOR_INITIALIZED_BOOT_CONTEXT`` and has no ``pyvmm_init_vcpu`` (and no
register hooks at all): the boot entry goes to :func:`pyvmm_set_boot_context`.
"""

from __future__ import annotations

from typing import Any

from pyvmm.boot import BootSpec
from pyvmm.capabilities import Capability
from pyvmm.config import Arch, VmConfig
from pyvmm.exits import VcpuExit
from pyvmm.hookspecs import hookimpl
from pyvmm.kick_signal import install_kick_handler
from pyvmm.manifest import CONTRACT_VERSION, BackendManifest
from pyvmm.memory import RamRegion
from pyvmm.vcpu_state import IoEventAddress
from pyvmm_gunyah import __version__
from pyvmm_gunyah.system import probe, system
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
)


@hookimpl
def pyvmm_backend_info() -> BackendManifest:
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


@hookimpl
def pyvmm_create_vm(backend: Any, config: VmConfig) -> GunyahVm:
    install_kick_handler()
    return GunyahVm(system(), config)


@hookimpl
def pyvmm_destroy_vm(vm: GunyahVm) -> None:
    vm.close()


@hookimpl
def pyvmm_map_memory(vm: GunyahVm, region: RamRegion) -> None:
    vm.map_memory(region)


@hookimpl
def pyvmm_create_vcpu(vm: GunyahVm, index: int) -> GunyahVcpu:
    return vm.create_vcpu(index)


@hookimpl
def pyvmm_destroy_vcpu(vcpu: GunyahVcpu) -> None:
    vcpu.vm.remove_vcpu(vcpu)
    vcpu.close()


@hookimpl
def pyvmm_run_vcpu(vcpu: GunyahVcpu) -> VcpuExit:
    return vcpu.run()


@hookimpl
def pyvmm_set_boot_context(vm: GunyahVm, boot: BootSpec) -> None:
    vm.set_boot_context(boot)


@hookimpl
def pyvmm_start_vm(vm: GunyahVm) -> None:
    vm.start()


@hookimpl
def pyvmm_kick_vcpu(vcpu: GunyahVcpu) -> None:
    vcpu.kick()


@hookimpl
def pyvmm_register_ioevent(vm: GunyahVm, fd: int, address: IoEventAddress, datamatch: int | None, length: int) -> None:
    vm.ioevent(fd, address, datamatch, length, remove=False)


@hookimpl
def pyvmm_unregister_ioevent(
    vm: GunyahVm, fd: int, address: IoEventAddress, datamatch: int | None, length: int
) -> None:
    vm.ioevent(fd, address, datamatch, length, remove=True)


@hookimpl
def pyvmm_register_irqfd(vm: GunyahVm, fd: int, line: int, level: bool) -> None:
    vm.register_irqfd(fd, line, level)
