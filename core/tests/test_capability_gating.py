"""Every optional operation checks its capability before calling the backend."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from coretests_support import ALL_CAPS, MakeBackend, ProbeBackend, RecordingBackend, register

from pyvmm.arch.x86_64 import CpuidEntry, MsrEntry, Regs, Sregs, VcpuEvents
from pyvmm.capabilities import CAPABILITY_BY_HOOK, Capability
from pyvmm.errors import UnsupportedCapability
from pyvmm.host import Event
from pyvmm.interrupts import IrqChip, IrqchipRoute, MsiRoute
from pyvmm.manifest import Availability
from pyvmm.memory import RamRegion
from pyvmm.plugins import PluginRegistry
from pyvmm.served_io import PmTimerRegister
from pyvmm.vcpu_state import IoEventAddress, StateKind
from pyvmm.vm import Backend, Vcpu, Vm
from pyvmm.vm_state import VmStateKind


@dataclass
class Ctx:
    """A VM with one plain region and one dirty-logged region (where allowed); the
    vCPU is created on first use so the irqchip case can run before it."""

    test_backend: RecordingBackend
    backend: Backend
    vm: Vm
    region: RamRegion
    dirty_region: RamRegion
    _vcpu: Vcpu | None = None

    def vcpu(self) -> Vcpu:
        if self._vcpu is None:
            self._vcpu = self.vm.create_vcpu()
        return self._vcpu


def _add_late(ctx: Ctx) -> None:
    ctx.vm.start()
    ctx.vm.add_memory(0x800000, 0x1000)


@dataclass(frozen=True)
class Gate:
    id: str
    capability: Capability
    hook: str
    op: Callable[[Ctx], Any]
    declared_too: frozenset[Capability] = field(default=frozenset())


#: The gated event calls only pass it through; one event serves every case.
EVENT = Event()


def teardown_module() -> None:
    EVENT.close()


RESAMPLE = Event()


GATES = [
    Gate("remove_memory", Capability.MEMORY_REMOVAL, "pyvmm_unmap_memory", lambda c: c.vm.remove_memory(c.region)),
    Gate("dirty_log", Capability.DIRTY_LOG, "pyvmm_get_dirty_log", lambda c: c.vm.dirty_log(c.dirty_region)),
    Gate("dirty_pages", Capability.DIRTY_LOG, "pyvmm_get_dirty_log", lambda c: c.vm.dirty_pages(c.dirty_region)),
    Gate("get_clock", Capability.PVCLOCK, "pyvmm_get_clock", lambda c: c.vm.get_clock()),
    Gate("set_clock", Capability.PVCLOCK, "pyvmm_set_clock", lambda c: c.vm.set_clock(10**9)),
    Gate("get_vm_state", Capability.VM_STATE, "pyvmm_get_vm_state", lambda c: c.vm.get_vm_state(VmStateKind.PIT)),
    Gate(
        "set_vm_state",
        Capability.VM_STATE,
        "pyvmm_set_vm_state",
        lambda c: c.vm.set_vm_state(VmStateKind.IOAPIC, bytes(512)),
    ),
    Gate("kick", Capability.IMMEDIATE_EXIT, "pyvmm_kick_vcpu", lambda c: c.vcpu().kick()),
    Gate("get_state", Capability.VCPU_REGISTERS, "pyvmm_get_vcpu_state", lambda c: c.vcpu().get_state(StateKind.REGS)),
    Gate(
        "set_state",
        Capability.VCPU_REGISTERS,
        "pyvmm_set_vcpu_state",
        lambda c: c.vcpu().set_state(StateKind.REGS, Regs()),
    ),
    Gate("get_regs", Capability.VCPU_REGISTERS, "pyvmm_get_vcpu_state", lambda c: c.vcpu().get_regs()),
    Gate("set_regs", Capability.VCPU_REGISTERS, "pyvmm_set_vcpu_state", lambda c: c.vcpu().set_regs(Regs())),
    Gate("get_sregs", Capability.VCPU_REGISTERS, "pyvmm_get_vcpu_state", lambda c: c.vcpu().get_sregs()),
    Gate("set_sregs", Capability.VCPU_REGISTERS, "pyvmm_set_vcpu_state", lambda c: c.vcpu().set_sregs(Sregs())),
    Gate("get_msrs", Capability.MSRS, "pyvmm_get_msrs", lambda c: c.vcpu().get_msrs([0x10])),
    Gate("set_msrs", Capability.MSRS, "pyvmm_set_msrs", lambda c: c.vcpu().set_msrs([MsrEntry(0x10, 5)])),
    Gate("set_cpuid", Capability.CPUID, "pyvmm_set_cpuid", lambda c: c.vcpu().set_cpuid([CpuidEntry(0)])),
    Gate("supported_cpuid", Capability.CPUID, "pyvmm_get_supported_cpuid", lambda c: c.vm.supported_cpuid()),
    Gate(
        "register_ioevent_mmio",
        Capability.IOEVENTS,
        "pyvmm_register_ioevent",
        lambda c: c.vm.register_ioevent(EVENT, IoEventAddress.mmio(0xD000_0000), 1, 4),
    ),
    Gate(
        "unregister_ioevent_mmio",
        Capability.IOEVENTS,
        "pyvmm_unregister_ioevent",
        lambda c: c.vm.unregister_ioevent(EVENT, IoEventAddress.mmio(0xD000_0000), 1, 4),
    ),
    Gate(
        "register_ioevent_pio_without_ioevents",
        Capability.IOEVENTS,
        "pyvmm_register_ioevent",
        lambda c: c.vm.register_ioevent(EVENT, IoEventAddress.pio(0x3F8)),
    ),
    Gate(
        "register_ioevent_pio",
        Capability.PIO_IOEVENTS,
        "pyvmm_register_ioevent",
        lambda c: c.vm.register_ioevent(EVENT, IoEventAddress.pio(0x3F8), 0x41, 1),
    ),
    Gate(
        "unregister_ioevent_pio",
        Capability.PIO_IOEVENTS,
        "pyvmm_unregister_ioevent",
        lambda c: c.vm.unregister_ioevent(EVENT, IoEventAddress.pio(0x3F8), 0x41, 1),
    ),
    Gate(
        "register_irqfd", Capability.IRQFD, "pyvmm_register_irqfd", lambda c: c.vm.register_irqfd(EVENT, 4, level=True)
    ),
    Gate("set_irq_line", Capability.IRQ_LINE, "pyvmm_set_irq_line", lambda c: c.vm.set_irq_line(4, True)),
    Gate("create_irqchip", Capability.IRQCHIP, "pyvmm_create_irqchip", lambda c: c.vm.create_irqchip()),
    Gate(
        "add_device_tree_nodes",
        Capability.DEVICE_TREE_NODES,
        "pyvmm_add_device_tree_nodes",
        lambda c: c.vm.add_device_tree_nodes(object()),  # type: ignore[arg-type]
    ),
    Gate(
        "set_guest_debug",
        Capability.GUEST_DEBUG,
        "pyvmm_set_guest_debug",
        lambda c: c.vcpu().set_guest_debug(single_step=True, breakpoints=[0x1000]),
    ),
    Gate(
        "read_only_region",
        Capability.READ_ONLY_MEMORY,
        "pyvmm_map_memory",
        lambda c: c.vm.add_memory(0x800000, 0x1000, read_only=True),
    ),
    Gate(
        "log_dirty_region",
        Capability.DIRTY_LOG,
        "pyvmm_map_memory",
        lambda c: c.vm.add_memory(0x800000, 0x1000, log_dirty=True),
    ),
    Gate("add_memory_after_start", Capability.LATE_MEMORY, "pyvmm_map_memory", _add_late),
    Gate("two_vcpus", Capability.MULTI_VCPU, "pyvmm_create_vm", lambda c: c.backend.create_vm({"vcpus": 2})),
    # --- contract version 2: interrupts from userspace and the rest of the API ---
    Gate(
        "ready_for_interrupt",
        Capability.INTERRUPT_INJECTION,
        "pyvmm_ready_for_interrupt",
        lambda c: c.vcpu().ready_for_interrupt(),
    ),
    Gate("interrupt", Capability.INTERRUPT_INJECTION, "pyvmm_inject_interrupt", lambda c: c.vcpu().interrupt(0x20)),
    Gate(
        "request_interrupt_window",
        Capability.INTERRUPT_INJECTION,
        "pyvmm_request_interrupt_window",
        lambda c: c.vcpu().request_interrupt_window(True),
    ),
    Gate("inject_nmi", Capability.NMI, "pyvmm_inject_nmi", lambda c: c.vcpu().inject_nmi()),
    Gate("get_events", Capability.VCPU_EVENTS, "pyvmm_get_vcpu_events", lambda c: c.vcpu().get_events()),
    Gate("set_events", Capability.VCPU_EVENTS, "pyvmm_set_vcpu_events", lambda c: c.vcpu().set_events(VcpuEvents())),
    Gate(
        "unregister_irqfd",
        Capability.IRQFD_REMOVAL,
        "pyvmm_unregister_irqfd",
        lambda c: c.vm.unregister_irqfd(EVENT, 4),
    ),
    Gate(
        "register_resample_irqfd",
        Capability.IRQFD_RESAMPLE,
        "pyvmm_register_resample_irqfd",
        lambda c: c.vm.register_irqfd(EVENT, 4, level=True, resample=RESAMPLE),
    ),
    Gate(
        "set_gsi_routing",
        Capability.GSI_ROUTING,
        "pyvmm_set_gsi_routing",
        lambda c: c.vm.set_gsi_routing([IrqchipRoute(4, IrqChip.IOAPIC, 4), MsiRoute(30, 0xFEE00000, 0x41)]),
    ),
    Gate("signal_msi", Capability.MSI, "pyvmm_signal_msi", lambda c: c.vm.signal_msi(0xFEE00000, 0x41)),
    Gate("msr_index_list", Capability.MSR_INDEX_LIST, "pyvmm_get_msr_index_list", lambda c: c.vm.msr_index_list()),
    Gate("feature_msrs", Capability.FEATURE_MSRS, "pyvmm_get_feature_msrs", lambda c: c.vm.feature_msrs()),
    Gate("get_tsc_khz", Capability.TSC_FREQUENCY, "pyvmm_get_tsc_khz", lambda c: c.vcpu().get_tsc_khz()),
    Gate("set_tsc_khz", Capability.TSC_SCALING, "pyvmm_set_tsc_khz", lambda c: c.vcpu().set_tsc_khz(1_000_000)),
    Gate("get_tsc_offset", Capability.TSC_OFFSET, "pyvmm_get_tsc_offset", lambda c: c.vcpu().get_tsc_offset()),
    Gate("set_tsc_offset", Capability.TSC_OFFSET, "pyvmm_set_tsc_offset", lambda c: c.vcpu().set_tsc_offset(-5)),
    Gate(
        "check_raw_capability",
        Capability.RAW_CAPABILITIES,
        "pyvmm_check_raw_capability",
        lambda c: c.vm.check_raw_capability(0),
    ),
    Gate(
        "enable_raw_capability",
        Capability.RAW_CAPABILITIES,
        "pyvmm_enable_raw_capability",
        lambda c: c.vm.enable_raw_capability(188, 0, (2,)),
    ),
    Gate(
        "enable_vcpu_raw_capability",
        Capability.RAW_CAPABILITIES,
        "pyvmm_enable_vcpu_raw_capability",
        lambda c: c.vcpu().enable_raw_capability(123),
    ),
    # --- contract version 3: exits avoided ---
    Gate(
        "register_coalesced_io",
        Capability.COALESCED_IO,
        "pyvmm_register_coalesced_io",
        lambda c: c.vm.register_coalesced_io(IoEventAddress.mmio(0xD000_0000), 0x1000),
    ),
    Gate(
        "unregister_coalesced_io",
        Capability.COALESCED_IO,
        "pyvmm_unregister_coalesced_io",
        lambda c: c.vm.unregister_coalesced_io(IoEventAddress.mmio(0xD000_0000), 0x1000),
    ),
    Gate("take_coalesced_io", Capability.COALESCED_IO, "pyvmm_take_coalesced_io", lambda c: c.vm.take_coalesced_io()),
    Gate(
        "serve_io",
        Capability.SERVED_IO,
        "pyvmm_serve_io",
        lambda c: c.vm.serve_io(IoEventAddress.pio(0x608), 4, PmTimerRegister(0)),
    ),
]


def _context(make_backend: MakeBackend, declared: frozenset[Capability]) -> Ctx:
    test_backend, backend = make_backend(declared)
    vm = backend.create_vm()
    region = vm.add_memory(0, 0x10000)
    dirty = vm.add_memory(0x100000, 0x10000, log_dirty=Capability.DIRTY_LOG in declared)
    return Ctx(test_backend, backend, vm, region, dirty)


@pytest.mark.parametrize("gate", GATES, ids=[g.id for g in GATES])
def test_undeclared_capability_is_refused_without_calling_the_backend(make_backend: MakeBackend, gate: Gate) -> None:
    ctx = _context(make_backend, ALL_CAPS - {gate.capability})
    mark = len(ctx.test_backend.calls)
    with pytest.raises(UnsupportedCapability) as info:
        gate.op(ctx)
    assert info.value.backend == "contract-test"
    assert info.value.capability is gate.capability
    assert "'contract-test'" in str(info.value)
    assert gate.capability.name in str(info.value)
    assert gate.hook not in ctx.test_backend.hooks_since(mark)
    ctx.vm.close()


@pytest.mark.parametrize("gate", GATES, ids=[g.id for g in GATES])
def test_declared_capability_reaches_the_backend(make_backend: MakeBackend, gate: Gate) -> None:
    ctx = _context(make_backend, ALL_CAPS)
    mark = len(ctx.test_backend.calls)
    gate.op(ctx)
    assert ctx.test_backend.hooks_since(mark).count(gate.hook) == 1
    ctx.vm.close()


def test_every_optional_vm_or_vcpu_hook_has_a_gate() -> None:
    """A new optional hook must get a row in GATES (boot context and start are
    covered by test_boot_context; the prepared vCPU state, which core writes
    through the register hooks where the backend lacks it, by test_prepared_state)."""
    covered = {gate.hook for gate in GATES} | {"pyvmm_set_boot_context", "pyvmm_start_vm"}
    covered |= {"pyvmm_prepare_vcpu_state", "pyvmm_restore_vcpu_state"}
    assert set(CAPABILITY_BY_HOOK) <= covered


def test_gated_calls_pass_the_arguments_through(make_backend: MakeBackend) -> None:
    ctx = _context(make_backend, ALL_CAPS)
    vcpu = ctx.vcpu()
    ctx.vm.set_clock(123)
    ctx.vm.register_ioevent(EVENT, IoEventAddress.pio(0x60), 7, 2)
    ctx.vm.register_irqfd(EVENT, 33)
    vcpu.set_guest_debug(breakpoints=[0x10, 0x20])
    assert ("pyvmm_set_clock", 123) in ctx.test_backend.calls
    assert ("pyvmm_register_ioevent", EVENT, IoEventAddress.pio(0x60), 7, 2) in ctx.test_backend.calls
    assert ("pyvmm_register_irqfd", EVENT, 33, False) in ctx.test_backend.calls
    assert ("pyvmm_set_guest_debug", False, [0x10, 0x20]) in ctx.test_backend.calls
    assert vcpu.get_msrs([0x174, 0x175]) == [MsrEntry(0x174, 0), MsrEntry(0x175, 0)]
    assert ctx.vm.supported_cpuid() == [CpuidEntry(0, eax=1)]
    assert ctx.vm.dirty_log(ctx.dirty_region) == bytes(2)  # 16 pages -> 2 bytes of bitmap
    ctx.vm.close()


def test_early_init_cpuid_refuses_set_cpuid(make_backend: MakeBackend) -> None:
    test_backend, backend = make_backend(ALL_CAPS | {Capability.EARLY_INIT_CPUID})
    with backend.create_vm() as vm:
        vcpu = vm.create_vcpu()
        with pytest.raises(UnsupportedCapability, match="CPUID is fixed at VM creation"):
            vcpu.set_cpuid([CpuidEntry(1)])
        assert vm.supported_cpuid()  # reading the supported leaves is still fine
    assert "pyvmm_set_cpuid" not in test_backend.hook_names()


def test_irqchip_after_a_vcpu_is_refused(make_backend: MakeBackend) -> None:
    from pyvmm.errors import VmStateError

    test_backend, backend = make_backend(ALL_CAPS)
    with backend.create_vm() as vm:
        vm.create_vcpu()
        with pytest.raises(VmStateError, match="before the first vCPU"):
            vm.create_irqchip()
    assert "pyvmm_create_irqchip" not in test_backend.hook_names()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda vm: vm.register_ioevent(EVENT, IoEventAddress.mmio(0x1000), length=3), "length must be"),
        (lambda vm: vm.register_ioevent(7, IoEventAddress.mmio(0x1000), length=4), "Event is needed, not int"),  # type: ignore[arg-type]
        (lambda vm: vm.register_irqfd(7, 4), "Event is needed, not int"),  # type: ignore[arg-type]
        (lambda vm: vm.register_ioevent(EVENT, IoEventAddress.mmio(0x1000), datamatch=1), "needs a length"),
        (lambda vm: vm.vcpus[0].set_guest_debug(breakpoints=[1, 2, 3, 4, 5]), "at most 4"),
    ],
    ids=["bad_length", "ioevent_not_an_event", "irqfd_not_an_event", "datamatch_without_length", "five_breakpoints"],
)
def test_bad_arguments_to_gated_calls_are_config_errors(
    make_backend: MakeBackend, call: Callable[[Vm], None], message: str
) -> None:
    from pyvmm.errors import ConfigError

    test_backend, backend = make_backend(ALL_CAPS)
    with backend.create_vm() as vm:
        vm.create_vcpu()
        mark = len(test_backend.calls)
        with pytest.raises(ConfigError, match=message):
            call(vm)
        assert test_backend.hooks_since(mark) == []


def test_capability_missing_on_this_host_is_gated_like_an_undeclared_one(registry: PluginRegistry) -> None:
    """The probe may narrow the manifest (an older kernel): core gates on the narrowed set."""
    test_backend = ProbeBackend(
        "narrowed",
        ALL_CAPS,
        probe=lambda: Availability.yes(missing_capabilities=(Capability.PVCLOCK, Capability.IRQCHIP)),
    )
    backend = register(registry, test_backend)
    assert Capability.PVCLOCK in backend.manifest.capability_set  # still declared ...
    assert not backend.supports(Capability.PVCLOCK)  # ... but not offered here
    assert backend.supports(Capability.IRQ_LINE)
    with backend.create_vm() as vm:
        with pytest.raises(UnsupportedCapability, match="PVCLOCK"):
            vm.get_clock()
        with pytest.raises(UnsupportedCapability, match="IRQCHIP"):
            vm.create_irqchip()
        vm.set_irq_line(1, True)
    assert "pyvmm_get_clock" not in test_backend.hook_names()
    assert "pyvmm_create_irqchip" not in test_backend.hook_names()
    assert "pyvmm_set_irq_line" in test_backend.hook_names()
