"""The interrupt, routing, MSR-list, TSC and raw-capability API on the contract
backend: what core checks before it calls a backend, and what it passes."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from coretests_support import ALL_CAPS, MakeBackend, RecordingBackend

from pyvmm.arch.x86_64 import ExceptionEvent, InterruptEvent, InterruptShadow, MsrEntry, NmiEvent, VcpuEvents
from pyvmm.errors import ConfigError, InterruptNotReady, MsrAccessError, VmStateError
from pyvmm.host import Event
from pyvmm.interrupts import IrqChip, IrqchipRoute, IrqRoute, MsiRoute
from pyvmm.vm import Vcpu, Vm


@pytest.fixture
def machine(make_backend: MakeBackend) -> Iterator[tuple[RecordingBackend, Vm, Vcpu]]:
    test_backend, backend = make_backend(ALL_CAPS)
    with backend.create_vm() as vm:
        yield test_backend, vm, vm.create_vcpu()


def hooks_called(test_backend: RecordingBackend, mark: int) -> list[str]:
    return test_backend.hooks_since(mark)


def test_an_interrupt_is_injected_only_into_a_ready_vcpu(machine: tuple[RecordingBackend, Vm, Vcpu]) -> None:
    test_backend, _, vcpu = machine
    vcpu.handle.ready = False
    mark = len(test_backend.calls)
    with pytest.raises(InterruptNotReady, match="vCPU 0 cannot take interrupt vector 0x20") as info:
        vcpu.interrupt(0x20)
    assert isinstance(info.value, VmStateError)
    assert hooks_called(test_backend, mark) == ["pyvmm_ready_for_interrupt"], "nothing was injected"
    vcpu.handle.ready = True
    vcpu.interrupt(0xFF)
    assert vcpu.handle.injected == [0xFF]


@pytest.mark.parametrize("vector", [-1, 256, True, 1.0])
def test_a_vector_is_a_byte(machine: tuple[RecordingBackend, Vm, Vcpu], vector: object) -> None:
    test_backend, _, vcpu = machine
    mark = len(test_backend.calls)
    with pytest.raises(ConfigError, match="vector"):
        vcpu.interrupt(vector)  # type: ignore[arg-type]
    assert hooks_called(test_backend, mark) == []


def test_interrupt_calls_are_for_the_vcpus_thread(machine: tuple[RecordingBackend, Vm, Vcpu]) -> None:
    _, _, vcpu = machine
    errors: list[BaseException] = []

    def other() -> None:
        for call in (vcpu.ready_for_interrupt, vcpu.inject_nmi, lambda: vcpu.interrupt(0x20)):
            try:
                call()
            except VmStateError as exc:
                errors.append(exc)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert len(errors) == 3 and all("thread that created vCPU 0" in str(e) for e in errors)


def test_the_window_request_and_nmi_reach_the_backend(machine: tuple[RecordingBackend, Vm, Vcpu]) -> None:
    _, _, vcpu = machine
    vcpu.request_interrupt_window()
    assert vcpu.handle.window_requested
    vcpu.request_interrupt_window(False)
    assert not vcpu.handle.window_requested
    vcpu.inject_nmi()
    assert vcpu.handle.nmis == 1


def test_vcpu_events_are_checked_records(machine: tuple[RecordingBackend, Vm, Vcpu]) -> None:
    _, _, vcpu = machine
    events = VcpuEvents(nmi=NmiEvent(pending=True), interrupt=InterruptEvent(shadow=InterruptShadow.STI))
    vcpu.set_events(events)
    assert vcpu.get_events() is events
    with pytest.raises(ConfigError, match="VcpuEvents is needed, not dict"):
        vcpu.set_events({})  # type: ignore[arg-type]
    events.exception.vector = 256
    with pytest.raises(ConfigError, match=r"ExceptionEvent.vector: 256 is out of range"):
        vcpu.set_events(events)
    with pytest.raises(ConfigError, match=r"InterruptEvent\.shadow"):
        InterruptEvent(shadow=7)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"NmiEvent\.pending: must be True, False or None"):
        NmiEvent(pending=1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"VcpuEvents\.exception: must be a ExceptionEvent"):
        VcpuEvents(exception=None)  # type: ignore[arg-type]
    assert InterruptEvent(shadow=2).shadow is InterruptShadow.STI  # type: ignore[arg-type]
    assert ExceptionEvent(payload=1 << 63).payload == 1 << 63


def test_a_resampled_irqfd_is_level_triggered_with_its_own_event(machine: tuple[RecordingBackend, Vm, Vcpu]) -> None:
    test_backend, vm, _ = machine
    with Event() as irq, Event() as resample:
        with pytest.raises(ConfigError, match="resample: a resample event is for a level-triggered irqfd"):
            vm.register_irqfd(irq, 10, resample=resample)
        with pytest.raises(ConfigError, match="another Event"):
            vm.register_irqfd(irq, 10, level=True, resample=irq)
        with pytest.raises(ConfigError, match=r"resample: a pyvmm\.host\.Event is needed"):
            vm.register_irqfd(irq, 10, level=True, resample=5)  # type: ignore[arg-type]
        vm.register_irqfd(irq, 10, level=True, resample=resample)
        vm.register_irqfd(irq, 11, level=True)  # no resample: the original hook
        vm.unregister_irqfd(irq, 10)
        assert ("pyvmm_register_resample_irqfd", irq, 10, resample) in test_backend.calls
        assert ("pyvmm_register_irqfd", irq, 11, True) in test_backend.calls
        assert ("pyvmm_unregister_irqfd", irq, 10) in test_backend.calls
        with pytest.raises(ConfigError, match="line"):
            vm.unregister_irqfd(irq, -1)


def test_routes_and_msis_are_checked(machine: tuple[RecordingBackend, Vm, Vcpu]) -> None:
    test_backend, vm, _ = machine
    routes: list[IrqRoute] = [
        IrqchipRoute(0, IrqChip.PIC_PRIMARY, 0),
        IrqchipRoute(0, IrqChip.IOAPIC, 2),
        MsiRoute(24, 0xFEE00000, 0x41),
    ]
    vm.set_gsi_routing(routes)
    assert ("pyvmm_set_gsi_routing", routes) in test_backend.calls
    with pytest.raises(ConfigError, match="an IrqchipRoute or MsiRoute is needed, not tuple"):
        vm.set_gsi_routing([(0, 0)])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match=r"IrqchipRoute\.pin"):
        IrqchipRoute(0, IrqChip.IOAPIC, -1)
    with pytest.raises(ConfigError, match=r"IrqchipRoute\.chip"):
        IrqchipRoute(0, "ioapic", 1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"MsiRoute\.data"):
        MsiRoute(24, 0xFEE00000, 1 << 32)
    assert vm.signal_msi(0xFEE00000, 0x41) is True
    with pytest.raises(ConfigError, match="address"):
        vm.signal_msi(1 << 64, 0)


def test_msr_lists_tsc_and_raw_capabilities_pass_through(machine: tuple[RecordingBackend, Vm, Vcpu]) -> None:
    test_backend, vm, vcpu = machine
    assert vm.msr_index_list() == [0x10, 0x174]
    assert vm.feature_msrs() == [MsrEntry(0x10A, 0)]
    vcpu.set_tsc_khz(2_000_000)
    assert vcpu.get_tsc_khz() == 2_000_000
    vcpu.set_tsc_offset(-5)
    assert vcpu.get_tsc_offset() == (1 << 64) - 5, "a negative offset is its two's complement"
    for bad in (lambda: vcpu.set_tsc_khz(0), lambda: vcpu.set_tsc_offset(1 << 64), lambda: vcpu.set_tsc_khz(-1)):
        with pytest.raises(ConfigError):
            bad()
    assert vm.check_raw_capability(188) == 1
    assert vm.enable_raw_capability(188, 0, (2,)) == 0
    assert ("pyvmm_enable_raw_capability", 188, 0, (2, 0, 0, 0)) in test_backend.calls, "padded to four"
    assert vcpu.enable_raw_capability(7, 1, [1, 2, 3, 4]) == 0  # type: ignore[arg-type]
    for args in ((1, 2, 3, 4, 5), (-1,), "1234"):
        with pytest.raises(ConfigError, match="args"):
            vm.enable_raw_capability(188, 0, args)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="capability"):
        vm.check_raw_capability(-1)


def test_a_refused_msr_is_named_without_an_errno() -> None:
    error = MsrAccessError("KVM_GET_MSRS", 0xDEAD0000, 2, ((0x10, 1), (0x174, 8)))
    assert str(error) == "KVM_GET_MSRS: MSR 0xdead0000 cannot be read (the 2 MSR(s) before it were processed)"
    assert error.entries == [MsrEntry(0x10, 1), MsrEntry(0x174, 8)]
    assert not isinstance(error, OSError)
    written = MsrAccessError("KVM_SET_MSRS", 0x10, 0, write=True)
    assert str(written) == "KVM_SET_MSRS: MSR 0x10 cannot be written"
