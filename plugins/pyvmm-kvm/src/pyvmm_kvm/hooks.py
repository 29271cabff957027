"""pyvmm hook implementations for KVM: thin adapters from the contract to
:mod:`pyvmm_kvm.vm` and :mod:`pyvmm_kvm.vcpu`.  Registered through the ``pyvmm``
entry point ``kvm``."""

from __future__ import annotations

from typing import Any

from pyvmm.arch.x86_64 import CpuidEntry, MsrEntry
from pyvmm.boot import VcpuInit
from pyvmm.capabilities import Capability
from pyvmm.config import Arch, VmConfig
from pyvmm.exits import VcpuExit
from pyvmm.hookspecs import hookimpl
from pyvmm.kick_signal import install_kick_handler
from pyvmm.manifest import CONTRACT_VERSION, BackendManifest
from pyvmm.memory import RamRegion
from pyvmm.vcpu_state import IoEventAddress, StateKind
from pyvmm_kvm import __version__
from pyvmm_kvm.system import probe, system
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
)


@hookimpl
def pyvmm_backend_info() -> BackendManifest:
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


@hookimpl
def pyvmm_create_vm(backend: Any, config: VmConfig) -> KvmVm:
    install_kick_handler()
    return KvmVm(system(), config)


@hookimpl
def pyvmm_destroy_vm(vm: KvmVm) -> None:
    vm.close()


@hookimpl
def pyvmm_map_memory(vm: KvmVm, region: RamRegion) -> None:
    vm.map_memory(region)


@hookimpl
def pyvmm_unmap_memory(vm: KvmVm, region: RamRegion) -> None:
    vm.unmap_memory(region)


@hookimpl
def pyvmm_get_dirty_log(vm: KvmVm, region: RamRegion) -> bytes:
    return vm.dirty_log(region)


@hookimpl
def pyvmm_create_vcpu(vm: KvmVm, index: int) -> KvmVcpu:
    return vm.create_vcpu(index)


@hookimpl
def pyvmm_destroy_vcpu(vcpu: KvmVcpu) -> None:
    vcpu.vm.remove_vcpu(vcpu)
    vcpu.close()


@hookimpl
def pyvmm_init_vcpu(vcpu: KvmVcpu, boot: VcpuInit) -> None:
    vcpu.init(boot)


@hookimpl
def pyvmm_run_vcpu(vcpu: KvmVcpu) -> VcpuExit:
    return vcpu.run()


@hookimpl
def pyvmm_kick_vcpu(vcpu: KvmVcpu) -> None:
    vcpu.kick()


@hookimpl
def pyvmm_get_vcpu_state(vcpu: KvmVcpu, kind: StateKind) -> Any:
    return vcpu.get_state(kind)


@hookimpl
def pyvmm_set_vcpu_state(vcpu: KvmVcpu, kind: StateKind, value: Any) -> None:
    vcpu.set_state(kind, value)


@hookimpl
def pyvmm_get_msrs(vcpu: KvmVcpu, indices: list[int]) -> list[MsrEntry]:
    return vcpu.get_msrs(indices)


@hookimpl
def pyvmm_set_msrs(vcpu: KvmVcpu, entries: list[MsrEntry]) -> None:
    vcpu.set_msrs(entries)


@hookimpl
def pyvmm_get_supported_cpuid(vm: KvmVm) -> list[CpuidEntry]:
    return vm.kvm.supported_cpuid()


@hookimpl
def pyvmm_set_cpuid(vcpu: KvmVcpu, entries: list[CpuidEntry]) -> None:
    vcpu.set_cpuid(entries)


@hookimpl
def pyvmm_register_ioevent(vm: KvmVm, fd: int, address: IoEventAddress, datamatch: int | None, length: int) -> None:
    vm.ioevent(fd, address, datamatch, length, remove=False)


@hookimpl
def pyvmm_unregister_ioevent(vm: KvmVm, fd: int, address: IoEventAddress, datamatch: int | None, length: int) -> None:
    vm.ioevent(fd, address, datamatch, length, remove=True)


@hookimpl
def pyvmm_register_irqfd(vm: KvmVm, fd: int, line: int, level: bool) -> None:
    vm.register_irqfd(fd, line, level)


@hookimpl
def pyvmm_set_irq_line(vm: KvmVm, line: int, level: bool) -> None:
    vm.set_irq_line(line, level)


@hookimpl
def pyvmm_create_irqchip(vm: KvmVm) -> None:
    vm.create_irqchip()


@hookimpl
def pyvmm_set_guest_debug(vcpu: KvmVcpu, single_step: bool, breakpoints: list[int]) -> None:
    vcpu.set_guest_debug(single_step, breakpoints)


@hookimpl
def pyvmm_get_clock(vm: KvmVm) -> int:
    return vm.get_clock()


@hookimpl
def pyvmm_set_clock(vm: KvmVm, nanoseconds: int) -> None:
    vm.set_clock(nanoseconds)
