"""The contract test backend: an in-process backend that runs no guest code.

Core's own tests use it to exercise the hook contract (capability gating, the
boot-context rule, registration checks, memory bookkeeping) without any
hypervisor.  It records every hook call in :attr:`ContractTestBackend.calls` and
returns the exits a test scripts with :meth:`ContractTestBackend.script_exits`.
It is never auto-selected.

Build one with the capabilities under test; :meth:`ContractTestBackend.plugin`
returns the object to register, holding exactly the hooks those capabilities
call for (or, with ``omit``/``extra``, a deliberately wrong set).
"""

from __future__ import annotations

import types
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyvmm.arch.x86_64 import CpuidEntry, MsrEntry, Regs, Sregs, VcpuEvents
from pyvmm.boot import BootSpec, VcpuInit
from pyvmm.capabilities import Capability
from pyvmm.coalesced import CoalescedWrite
from pyvmm.config import Arch, VmConfig
from pyvmm.contract import INIT_VCPU_HOOK, hooks_by_capability, required_hooks
from pyvmm.exits import HltExit, VcpuExit
from pyvmm.hookspecs import hookimpl
from pyvmm.interrupts import IrqRoute
from pyvmm.manifest import CONTRACT_VERSION, Availability, BackendManifest
from pyvmm.memory import RamRegion
from pyvmm.prepared_state import SavedVcpuState
from pyvmm.served_io import ServedRegister
from pyvmm.vcpu_state import IoEventAddress, StateKind
from pyvmm.vm_state import VmStateKind

if TYPE_CHECKING:
    from pyvmm.host import Event
    from pyvmm.machine.devicetree import DeviceTree


class InitVcpuCalled(AssertionError):
    """Raised by a test backend that must never see ``pyvmm_init_vcpu``."""


@dataclass
class TestVm:
    __test__ = False  # a VM handle, not a pytest test class
    config: VmConfig
    regions: dict[int, RamRegion] = field(default_factory=dict)
    destroyed: bool = False
    started: bool = False
    boot: BootSpec | None = None


@dataclass
class TestVcpu:
    __test__ = False
    vm: TestVm
    index: int
    regs: Regs = field(default_factory=Regs)
    sregs: Sregs = field(default_factory=Sregs)
    init: VcpuInit | None = None
    kicked: bool = False
    destroyed: bool = False
    #: What ``pyvmm_ready_for_interrupt`` answers; a test sets it.
    ready: bool = True
    injected: list[int] = field(default_factory=list)
    window_requested: bool = False
    nmis: int = 0
    events: VcpuEvents = field(default_factory=VcpuEvents)
    tsc_khz: int = 1_000_000
    tsc_offset: int = 0


class ContractTestBackend:
    """A backend whose behaviour a test controls completely."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        name: str = "contract-test",
        capabilities: Iterable[Capability | str] = (),
        *,
        arches: tuple[Arch, ...] = (Arch.X86_64, Arch.AARCH64),
        available: bool = True,
        contract_version: int = CONTRACT_VERSION,
        priority: int = 0,
        auto_select: bool = False,
    ) -> None:
        self.name = name
        self.capabilities = tuple(capabilities)
        self.arches = arches
        self.available = available
        self.contract_version = contract_version
        self.priority = priority
        self.auto_select = auto_select
        self.calls: list[tuple[Any, ...]] = []
        self.vms: list[TestVm] = []
        self._exits: deque[VcpuExit] = deque()
        self.fail_next: dict[str, BaseException] = {}

    # --- test control -------------------------------------------------------
    def script_exits(self, *exits: VcpuExit) -> None:
        """Queue exits for ``run``; once empty, ``run`` returns a halt."""
        self._exits.extend(exits)

    def fail(self, hook: str, error: BaseException) -> None:
        """Make the next call of ``hook`` raise ``error``."""
        self.fail_next[hook] = error

    def hook_names(self) -> set[str]:
        return {call[0] for call in self.calls}

    def _record(self, hook: str, *args: Any) -> None:
        self.calls.append((hook, *args))
        error = self.fail_next.pop(hook, None)
        if error is not None:
            raise error

    def manifest(self) -> BackendManifest:
        return BackendManifest(
            name=self.name,
            version="0",
            contract_version=self.contract_version,
            description="in-process backend for pyvmm's contract tests; runs no guest code",
            host_os=("linux", "darwin", "win32"),
            guest_arches=self.arches,
            capabilities=self.capabilities,
            priority=self.priority,
            auto_select=self.auto_select,
            probe=lambda: Availability.yes() if self.available else Availability.no("switched off by the test"),
        )

    def plugin(self, *, omit: Iterable[str] = (), extra: Iterable[str] = ()) -> types.SimpleNamespace:
        """The registrable plugin object: required hooks, the init hook unless the
        hypervisor owns the boot context, the hooks of the declared capabilities,
        minus ``omit`` plus ``extra``."""
        declared = {c if isinstance(c, Capability) else Capability(c) for c in self.capabilities if _known(c)}
        wanted = set(required_hooks())
        if Capability.HYPERVISOR_INITIALIZED_BOOT_CONTEXT not in declared:
            wanted.add(INIT_VCPU_HOOK)
        for cap in declared:
            wanted.update(hooks_by_capability().get(cap, ()))
        wanted = (wanted - set(omit)) | set(extra)
        return types.SimpleNamespace(**{hook: getattr(self, hook) for hook in sorted(wanted)})

    # --- required hooks -----------------------------------------------------
    @hookimpl
    def pyvmm_backend_info(self) -> BackendManifest:
        return self.manifest()

    @hookimpl
    def pyvmm_create_vm(self, backend: Any, config: VmConfig) -> TestVm:
        self._record("pyvmm_create_vm", config)
        vm = TestVm(config)
        self.vms.append(vm)
        return vm

    @hookimpl
    def pyvmm_destroy_vm(self, vm: TestVm) -> None:
        self._record("pyvmm_destroy_vm", vm)
        vm.destroyed = True

    @hookimpl
    def pyvmm_map_memory(self, vm: TestVm, region: RamRegion) -> None:
        self._record("pyvmm_map_memory", region.slot, region.guest_phys_addr, region.size)
        vm.regions[region.slot] = region

    @hookimpl
    def pyvmm_create_vcpu(self, vm: TestVm, index: int) -> TestVcpu:
        self._record("pyvmm_create_vcpu", index)
        return TestVcpu(vm, index)

    @hookimpl
    def pyvmm_destroy_vcpu(self, vcpu: TestVcpu) -> None:
        self._record("pyvmm_destroy_vcpu", vcpu.index)
        vcpu.destroyed = True

    @hookimpl
    def pyvmm_run_vcpu(self, vcpu: TestVcpu) -> VcpuExit:
        self._record("pyvmm_run_vcpu", vcpu.index)
        return self._exits.popleft() if self._exits else HltExit()

    @hookimpl
    def pyvmm_init_vcpu(self, vcpu: TestVcpu, boot: VcpuInit) -> None:
        if Capability.HYPERVISOR_INITIALIZED_BOOT_CONTEXT.value in [getattr(c, "value", c) for c in self.capabilities]:
            raise InitVcpuCalled(f"pyvmm_init_vcpu called on {self.name!r}, whose hypervisor owns the boot context")
        self._record("pyvmm_init_vcpu", vcpu.index, boot)
        vcpu.init = boot

    # --- optional hooks -----------------------------------------------------
    @hookimpl
    def pyvmm_set_boot_context(self, vm: TestVm, boot: BootSpec) -> None:
        self._record("pyvmm_set_boot_context", boot)
        vm.boot = boot

    @hookimpl
    def pyvmm_start_vm(self, vm: TestVm) -> None:
        self._record("pyvmm_start_vm")
        vm.started = True

    @hookimpl
    def pyvmm_unmap_memory(self, vm: TestVm, region: RamRegion) -> None:
        self._record("pyvmm_unmap_memory", region.slot)
        del vm.regions[region.slot]

    @hookimpl
    def pyvmm_get_dirty_log(self, vm: TestVm, region: RamRegion) -> bytes:
        self._record("pyvmm_get_dirty_log", region.slot)
        return bytes((region.size // 4096 + 7) // 8)

    @hookimpl
    def pyvmm_get_clock(self, vm: TestVm) -> int:
        self._record("pyvmm_get_clock")
        return 0

    @hookimpl
    def pyvmm_set_clock(self, vm: TestVm, nanoseconds: int) -> None:
        self._record("pyvmm_set_clock", nanoseconds)

    @hookimpl
    def pyvmm_kick_vcpu(self, vcpu: TestVcpu) -> None:
        self._record("pyvmm_kick_vcpu", vcpu.index)
        vcpu.kicked = True

    @hookimpl
    def pyvmm_get_vcpu_state(self, vcpu: TestVcpu, kind: StateKind) -> Any:
        self._record("pyvmm_get_vcpu_state", kind)
        return {StateKind.REGS: vcpu.regs, StateKind.SREGS: vcpu.sregs}[kind]

    @hookimpl
    def pyvmm_set_vcpu_state(self, vcpu: TestVcpu, kind: StateKind, value: Any) -> None:
        self._record("pyvmm_set_vcpu_state", kind, value)
        setattr(vcpu, kind.value, value)

    @hookimpl
    def pyvmm_prepare_vcpu_state(self, vcpu: TestVcpu, state: SavedVcpuState) -> tuple[TestVcpu, SavedVcpuState]:
        self._record("pyvmm_prepare_vcpu_state", state)
        return (vcpu, state)

    @hookimpl
    def pyvmm_restore_vcpu_state(self, vcpu: TestVcpu, prepared: tuple[TestVcpu, SavedVcpuState]) -> None:
        self._record("pyvmm_restore_vcpu_state", prepared)
        for kind, value in prepared[1].states:
            setattr(vcpu, kind.value, value)

    @hookimpl
    def pyvmm_get_msrs(self, vcpu: TestVcpu, indices: list[int]) -> list[MsrEntry]:
        self._record("pyvmm_get_msrs", indices)
        return [MsrEntry(i, 0) for i in indices]

    @hookimpl
    def pyvmm_set_msrs(self, vcpu: TestVcpu, entries: list[MsrEntry]) -> None:
        self._record("pyvmm_set_msrs", entries)

    @hookimpl
    def pyvmm_get_supported_cpuid(self, vm: TestVm) -> list[CpuidEntry]:
        self._record("pyvmm_get_supported_cpuid")
        return [CpuidEntry(0, eax=1)]

    @hookimpl
    def pyvmm_set_cpuid(self, vcpu: TestVcpu, entries: list[CpuidEntry]) -> None:
        self._record("pyvmm_set_cpuid", entries)

    @hookimpl
    def pyvmm_register_ioevent(
        self, vm: TestVm, event: Event, address: IoEventAddress, datamatch: int | None, length: int
    ) -> None:
        self._record("pyvmm_register_ioevent", event, address, datamatch, length)

    @hookimpl
    def pyvmm_unregister_ioevent(
        self, vm: TestVm, event: Event, address: IoEventAddress, datamatch: int | None, length: int
    ) -> None:
        self._record("pyvmm_unregister_ioevent", event, address, datamatch, length)

    @hookimpl
    def pyvmm_register_irqfd(self, vm: TestVm, event: Event, line: int, level: bool) -> None:
        self._record("pyvmm_register_irqfd", event, line, level)

    @hookimpl
    def pyvmm_add_device_tree_nodes(self, vm: TestVm, tree: DeviceTree) -> None:
        self._record("pyvmm_add_device_tree_nodes", tree)

    @hookimpl
    def pyvmm_set_irq_line(self, vm: TestVm, line: int, level: bool) -> None:
        self._record("pyvmm_set_irq_line", line, level)

    @hookimpl
    def pyvmm_create_irqchip(self, vm: TestVm) -> None:
        self._record("pyvmm_create_irqchip")

    @hookimpl
    def pyvmm_set_guest_debug(self, vcpu: TestVcpu, single_step: bool, breakpoints: list[int]) -> None:
        self._record("pyvmm_set_guest_debug", single_step, breakpoints)

    # --- contract version 2: interrupts, routing, MSR lists, TSC, raw caps -----
    @hookimpl
    def pyvmm_ready_for_interrupt(self, vcpu: TestVcpu) -> bool:
        self._record("pyvmm_ready_for_interrupt", vcpu.index)
        return vcpu.ready

    @hookimpl
    def pyvmm_inject_interrupt(self, vcpu: TestVcpu, vector: int) -> None:
        self._record("pyvmm_inject_interrupt", vector)
        vcpu.injected.append(vector)

    @hookimpl
    def pyvmm_request_interrupt_window(self, vcpu: TestVcpu, requested: bool) -> None:
        self._record("pyvmm_request_interrupt_window", requested)
        vcpu.window_requested = requested

    @hookimpl
    def pyvmm_inject_nmi(self, vcpu: TestVcpu) -> None:
        self._record("pyvmm_inject_nmi")
        vcpu.nmis += 1

    @hookimpl
    def pyvmm_get_vcpu_events(self, vcpu: TestVcpu) -> VcpuEvents:
        self._record("pyvmm_get_vcpu_events")
        return vcpu.events

    @hookimpl
    def pyvmm_set_vcpu_events(self, vcpu: TestVcpu, events: VcpuEvents) -> None:
        self._record("pyvmm_set_vcpu_events", events)
        vcpu.events = events

    @hookimpl
    def pyvmm_unregister_irqfd(self, vm: TestVm, event: Event, line: int) -> None:
        self._record("pyvmm_unregister_irqfd", event, line)

    @hookimpl
    def pyvmm_register_resample_irqfd(self, vm: TestVm, event: Event, line: int, resample: Event) -> None:
        self._record("pyvmm_register_resample_irqfd", event, line, resample)

    @hookimpl
    def pyvmm_set_gsi_routing(self, vm: TestVm, routes: list[IrqRoute]) -> None:
        self._record("pyvmm_set_gsi_routing", routes)

    @hookimpl
    def pyvmm_signal_msi(self, vm: TestVm, address: int, data: int) -> bool:
        self._record("pyvmm_signal_msi", address, data)
        return True

    @hookimpl
    def pyvmm_get_msr_index_list(self, vm: TestVm) -> list[int]:
        self._record("pyvmm_get_msr_index_list")
        return [0x10, 0x174]

    @hookimpl
    def pyvmm_get_feature_msrs(self, vm: TestVm) -> list[MsrEntry]:
        self._record("pyvmm_get_feature_msrs")
        return [MsrEntry(0x10A, 0)]

    @hookimpl
    def pyvmm_get_tsc_khz(self, vcpu: TestVcpu) -> int:
        self._record("pyvmm_get_tsc_khz")
        return vcpu.tsc_khz

    @hookimpl
    def pyvmm_set_tsc_khz(self, vcpu: TestVcpu, khz: int) -> None:
        self._record("pyvmm_set_tsc_khz", khz)
        vcpu.tsc_khz = khz

    @hookimpl
    def pyvmm_get_tsc_offset(self, vcpu: TestVcpu) -> int:
        self._record("pyvmm_get_tsc_offset")
        return vcpu.tsc_offset

    @hookimpl
    def pyvmm_set_tsc_offset(self, vcpu: TestVcpu, offset: int) -> None:
        self._record("pyvmm_set_tsc_offset", offset)
        vcpu.tsc_offset = offset

    @hookimpl
    def pyvmm_check_raw_capability(self, vm: TestVm, capability: int) -> int:
        self._record("pyvmm_check_raw_capability", capability)
        return 1

    @hookimpl
    def pyvmm_enable_raw_capability(self, vm: TestVm, capability: int, flags: int, args: tuple[int, ...]) -> int:
        self._record("pyvmm_enable_raw_capability", capability, flags, args)
        return 0

    @hookimpl
    def pyvmm_enable_vcpu_raw_capability(
        self, vcpu: TestVcpu, capability: int, flags: int, args: tuple[int, ...]
    ) -> int:
        self._record("pyvmm_enable_vcpu_raw_capability", capability, flags, args)
        return 0

    @hookimpl
    def pyvmm_register_coalesced_io(self, vm: TestVm, address: IoEventAddress, size: int) -> None:
        self._record("pyvmm_register_coalesced_io", address, size)

    @hookimpl
    def pyvmm_unregister_coalesced_io(self, vm: TestVm, address: IoEventAddress, size: int) -> None:
        self._record("pyvmm_unregister_coalesced_io", address, size)

    @hookimpl
    def pyvmm_take_coalesced_io(self, vm: TestVm) -> list[CoalescedWrite]:
        self._record("pyvmm_take_coalesced_io")
        return []

    @hookimpl
    def pyvmm_get_vm_state(self, vm: TestVm, kind: VmStateKind) -> bytes:
        self._record("pyvmm_get_vm_state", kind)
        return bytes(16)

    @hookimpl
    def pyvmm_set_vm_state(self, vm: TestVm, kind: VmStateKind, data: bytes) -> None:
        self._record("pyvmm_set_vm_state", kind, data)

    @hookimpl
    def pyvmm_serve_io(self, vm: TestVm, address: IoEventAddress, size: int, register: ServedRegister) -> None:
        self._record("pyvmm_serve_io", address, size, register)


def _known(cap: Capability | str) -> bool:
    if isinstance(cap, Capability):
        return True
    try:
        Capability(cap)
    except ValueError:
        return False
    return True
