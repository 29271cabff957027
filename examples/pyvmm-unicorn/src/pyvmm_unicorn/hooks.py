"""The pyvmm hook implementations of the unicorn backend.

Each hook is a thin adapter from the contract (:mod:`pyvmm.hookspecs`) to the
handles in :mod:`pyvmm_unicorn.machine`.  The capabilities below are exactly the
optional hooks implemented here, plus flags for what the software CPU really
does; registration fails if the two ever disagree.
"""

from __future__ import annotations

from typing import Any

from pyvmm.boot import VcpuInit
from pyvmm.capabilities import Capability
from pyvmm.config import Arch, VmConfig
from pyvmm.exits import VcpuExit
from pyvmm.hookspecs import hookimpl
from pyvmm.manifest import CONTRACT_VERSION, Availability, BackendManifest
from pyvmm.memory import RamRegion
from pyvmm.softcpu import available
from pyvmm.vcpu_state import StateKind
from pyvmm_unicorn import __version__
from pyvmm_unicorn.machine import UnicornVcpu, UnicornVm

CAPABILITIES = (
    Capability.USER_MEMORY,  # guest RAM is core's host memory, mapped zero-copy
    Capability.READ_ONLY_MEMORY,  # guest writes become MMIO write exits
    Capability.MEMORY_REMOVAL,  # pyvmm_unmap_memory
    Capability.LATE_MEMORY,  # regions can be added after start
    Capability.DIRTY_LOG,  # pyvmm_get_dirty_log
    Capability.PORT_IO,  # x86 IN/OUT exits
    Capability.VCPU_REGISTERS,  # pyvmm_get_vcpu_state / pyvmm_set_vcpu_state
    Capability.IMMEDIATE_EXIT,  # pyvmm_kick_vcpu
    Capability.GUEST_DEBUG,  # pyvmm_set_guest_debug
)


def probe() -> Availability:
    """Never raises: whether unicorn can be loaded here."""
    ok, reason = available()
    return Availability.yes() if ok else Availability.no(reason)


@hookimpl
def pyvmm_backend_info() -> BackendManifest:
    return BackendManifest(
        name="unicorn",
        version=__version__,
        contract_version=CONTRACT_VERSION,
        description="software CPU (unicorn): x86_64 and aarch64 guests anywhere, slowly",
        host_os=("linux",),
        guest_arches=(Arch.X86_64, Arch.AARCH64),
        capabilities=CAPABILITIES,
        priority=10,  # any hardware backend that is available wins
        probe=probe,
    )


@hookimpl
def pyvmm_create_vm(backend: Any, config: VmConfig) -> UnicornVm:
    return UnicornVm(config)


@hookimpl
def pyvmm_destroy_vm(vm: UnicornVm) -> None:
    vm.close()


@hookimpl
def pyvmm_map_memory(vm: UnicornVm, region: RamRegion) -> None:
    vm.map_memory(region)


@hookimpl
def pyvmm_unmap_memory(vm: UnicornVm, region: RamRegion) -> None:
    vm.unmap_memory(region)


@hookimpl
def pyvmm_get_dirty_log(vm: UnicornVm, region: RamRegion) -> bytes:
    return vm.dirty_log(region)


@hookimpl
def pyvmm_create_vcpu(vm: UnicornVm, index: int) -> UnicornVcpu:
    return vm.create_vcpu(index)


@hookimpl
def pyvmm_destroy_vcpu(vcpu: UnicornVcpu) -> None:
    vcpu.close()


@hookimpl
def pyvmm_init_vcpu(vcpu: UnicornVcpu, boot: VcpuInit) -> None:
    vcpu.cpu.init(boot)


@hookimpl
def pyvmm_run_vcpu(vcpu: UnicornVcpu) -> VcpuExit:
    return vcpu.cpu.run()


@hookimpl
def pyvmm_kick_vcpu(vcpu: UnicornVcpu) -> None:
    vcpu.cpu.kick()


@hookimpl
def pyvmm_get_vcpu_state(vcpu: UnicornVcpu, kind: StateKind) -> Any:
    return vcpu.get_state(kind)


@hookimpl
def pyvmm_set_vcpu_state(vcpu: UnicornVcpu, kind: StateKind, value: Any) -> None:
    vcpu.set_state(kind, value)


@hookimpl
def pyvmm_set_guest_debug(vcpu: UnicornVcpu, single_step: bool, breakpoints: list[int]) -> None:
    vcpu.cpu.set_guest_debug(single_step, breakpoints)
