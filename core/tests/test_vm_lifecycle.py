"""VM lifecycle: teardown order, idempotence, use after close, the vCPU thread rule."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Callable
from typing import Any

import pytest
from coretests_support import ALL_CAPS, MakeBackend, RecordingBackend

from pyvmm.arch.x86_64 import CpuidEntry, MsrEntry, Regs
from pyvmm.backend import SignalKicker
from pyvmm.boot import BootSpec, X86Mode
from pyvmm.capabilities import Capability
from pyvmm.config import Arch
from pyvmm.errors import HypervisorError, VmStateError
from pyvmm.exits import ExitKind, IoExit
from pyvmm.host import Event
from pyvmm.memory import RamRegion
from pyvmm.vcpu_state import IoEventAddress, StateKind
from pyvmm.vm import Backend, Vcpu, Vm


@pytest.fixture
def full(make_backend: MakeBackend) -> tuple[RecordingBackend, Backend]:
    return make_backend(ALL_CAPS)


def _on_other_thread(func: Callable[[], Any]) -> BaseException | None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            func()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return errors[0] if errors else None


def test_close_destroys_vcpus_then_vm(full: tuple[RecordingBackend, Backend]) -> None:
    test_backend, backend = full
    vm = backend.create_vm({"vcpus": 3})
    vm.add_memory(0, 0x1000)
    for _ in range(3):
        vm.create_vcpu()
    mark = len(test_backend.calls)
    vm.close()
    assert test_backend.calls[mark:] == [
        # Every vCPU is kicked out first, so all leave the hypervisor together.
        ("pyvmm_kick_vcpu", 0),
        ("pyvmm_kick_vcpu", 1),
        ("pyvmm_kick_vcpu", 2),
        ("pyvmm_destroy_vcpu", 2),
        ("pyvmm_destroy_vcpu", 1),
        ("pyvmm_destroy_vcpu", 0),
        ("pyvmm_destroy_vm", test_backend.vms[0]),
    ]
    assert test_backend.vms[0].destroyed
    assert len(vm.memory) == 0
    assert "closed" in repr(vm)
    vm.close()  # idempotent: nothing more is destroyed
    assert len(test_backend.calls) == mark + 7


def test_close_kicks_only_the_vcpus_whose_kit_kicker_may_be_running(full: tuple[RecordingBackend, Backend]) -> None:
    """A vCPU on the backend kit's kicker and idle is not kicked before its
    destruction (the kicker's close kicks it should a run start meanwhile, and
    the kick would touch its run page); a running one is, and so is a vCPU
    whose handle has no kit kicker."""
    test_backend, backend = full
    vm = backend.create_vm({"vcpus": 3})
    vcpus = [vm.create_vcpu() for _ in range(3)]
    idle, running = (SignalKicker(lambda: None, lambda thread, signum: None, "test") for _ in range(2))
    running.running = True
    vcpus[0].handle.kicker = idle
    vcpus[1].handle.kicker = running
    mark = len(test_backend.calls)
    vm.close()
    assert [call for call in test_backend.calls[mark:] if call[0] == "pyvmm_kick_vcpu"] == [
        ("pyvmm_kick_vcpu", 1),
        ("pyvmm_kick_vcpu", 2),
    ]


def test_a_closed_vm_and_its_vcpus_are_freed_without_the_cyclic_gc(full: tuple[RecordingBackend, Backend]) -> None:
    _, backend = full
    gc.collect()
    gc.disable()
    try:
        vm = backend.create_vm({"vcpus": 2})
        vm.add_memory(0, 0x1000)
        vcpus = [vm.create_vcpu(), vm.create_vcpu()]
        refs = [weakref.ref(vm), *(weakref.ref(vcpu) for vcpu in vcpus)]
        vm.close()
        with pytest.raises(VmStateError, match="vCPU 1 is closed"):
            vcpus[1].run()
        del vm, vcpus
        assert [ref() for ref in refs] == [None, None, None]
    finally:
        gc.enable()


def test_context_manager(full: tuple[RecordingBackend, Backend]) -> None:
    test_backend, backend = full
    with backend.create_vm() as vm:
        assert isinstance(vm, Vm)
        vm.create_vcpu()
        assert "1 vCPUs" in repr(vm)
    assert [c[0] for c in test_backend.calls[-2:]] == ["pyvmm_destroy_vcpu", "pyvmm_destroy_vm"]


def test_context_manager_closes_on_error_and_lets_it_through(full: tuple[RecordingBackend, Backend]) -> None:
    test_backend, backend = full
    with pytest.raises(ZeroDivisionError), backend.create_vm() as vm:
        vm.create_vcpu()
        _ = 1 / 0
    assert test_backend.calls[-1][0] == "pyvmm_destroy_vm"


def test_destroy_vm_runs_and_memory_is_freed_even_if_a_vcpu_destroy_fails(
    full: tuple[RecordingBackend, Backend],
) -> None:
    test_backend, backend = full
    vm = backend.create_vm()
    region = vm.add_memory(0, 0x1000)
    vm.create_vcpu()
    test_backend.fail("pyvmm_destroy_vcpu", HypervisorError("close", 9))
    with pytest.raises(HypervisorError):
        vm.close()
    assert test_backend.calls[-1][0] == "pyvmm_destroy_vm"
    assert region.closed
    vm.close()  # already closed: no second attempt
    assert test_backend.calls[-1][0] == "pyvmm_destroy_vm"
    assert len(test_backend.calls_of("pyvmm_destroy_vm")) == 1


VM_OPS: list[tuple[str, Callable[[Vm, RamRegion], Any]]] = [
    ("add_memory", lambda vm, _: vm.add_memory(0x10000, 0x1000)),
    ("remove_memory", lambda vm, region: vm.remove_memory(region)),
    ("dirty_log", lambda vm, region: vm.dirty_log(region)),
    ("create_vcpu", lambda vm, _: vm.create_vcpu()),
    ("set_boot", lambda vm, _: vm.set_boot(BootSpec(arch=Arch.X86_64, entry=0x7C00, x86_mode=X86Mode.REAL))),
    ("start", lambda vm, _: vm.start()),
    ("create_irqchip", lambda vm, _: vm.create_irqchip()),
    ("set_irq_line", lambda vm, _: vm.set_irq_line(4, True)),
    ("register_irqfd", lambda vm, _: vm.register_irqfd(Event(), 4)),
    ("register_ioevent", lambda vm, _: vm.register_ioevent(Event(), IoEventAddress.mmio(0xD000_0000))),
    ("unregister_ioevent", lambda vm, _: vm.unregister_ioevent(Event(), IoEventAddress.mmio(0xD000_0000))),
    ("get_clock", lambda vm, _: vm.get_clock()),
    ("set_clock", lambda vm, _: vm.set_clock(1)),
    ("supported_cpuid", lambda vm, _: vm.supported_cpuid()),
]


@pytest.mark.parametrize("op", [op for _, op in VM_OPS], ids=[name for name, _ in VM_OPS])
def test_vm_operations_after_close(full: tuple[RecordingBackend, Backend], op: Callable[[Vm, RamRegion], Any]) -> None:
    test_backend, backend = full
    vm = backend.create_vm()
    region = vm.add_memory(0, 0x1000, log_dirty=True)
    vm.close()
    mark = len(test_backend.calls)
    with pytest.raises(VmStateError, match="closed"):
        op(vm, region)
    assert test_backend.calls[mark:] == []  # no hook ever sees a destroyed handle


VCPU_OPS: list[tuple[str, Callable[[Vcpu], Any]]] = [
    ("run", lambda vcpu: vcpu.run()),
    ("kick", lambda vcpu: vcpu.kick()),
    ("get_state", lambda vcpu: vcpu.get_state(StateKind.REGS)),
    ("set_regs", lambda vcpu: vcpu.set_regs(Regs())),
    ("get_msrs", lambda vcpu: vcpu.get_msrs([0x10])),
    ("set_msrs", lambda vcpu: vcpu.set_msrs([MsrEntry(0x10)])),
    ("set_cpuid", lambda vcpu: vcpu.set_cpuid([CpuidEntry(0)])),
    ("set_guest_debug", lambda vcpu: vcpu.set_guest_debug(True)),
    ("apply_boot", lambda vcpu: vcpu.apply_boot()),
]


@pytest.mark.parametrize("op", [op for _, op in VCPU_OPS], ids=[name for name, _ in VCPU_OPS])
def test_vcpu_operations_after_close(full: tuple[RecordingBackend, Backend], op: Callable[[Vcpu], Any]) -> None:
    test_backend, backend = full
    vm = backend.create_vm()
    vcpu = vm.create_vcpu()
    vm.close()
    mark = len(test_backend.calls)
    with pytest.raises(VmStateError, match="closed"):
        op(vcpu)
    assert test_backend.calls[mark:] == []


def test_run_returns_scripted_exits_through_the_bound_hook(full: tuple[RecordingBackend, Backend]) -> None:
    test_backend, backend = full
    with backend.create_vm() as vm:
        vcpu = vm.create_vcpu()
        io = IoExit()
        io.port, io.size, io.is_write = 0x3F8, 1, True
        test_backend.script_exits(io)
        first = vcpu.run()
        assert first is io
        assert first.kind is ExitKind.IO
        assert vcpu.run().kind is ExitKind.HLT
        assert test_backend.calls_of("pyvmm_run_vcpu") == [("pyvmm_run_vcpu", 0), ("pyvmm_run_vcpu", 0)]


def test_hook_exceptions_propagate_unchanged(full: tuple[RecordingBackend, Backend]) -> None:
    test_backend, backend = full
    with backend.create_vm() as vm:
        vcpu = vm.create_vcpu()
        error = HypervisorError("KVM_RUN", 4)
        test_backend.fail("pyvmm_run_vcpu", error)
        with pytest.raises(HypervisorError) as info:
            vcpu.run()
        assert info.value is error
        assert info.value.errno == 4
        assert info.value.operation == "KVM_RUN"


# --- the vCPU thread rule -------------------------------------------------------------


def test_vcpu_calls_from_another_thread_are_refused(full: tuple[RecordingBackend, Backend]) -> None:
    test_backend, backend = full
    with backend.create_vm() as vm:
        vcpu = vm.create_vcpu()
        assert vcpu.thread_id == threading.get_ident()
        mark = len(test_backend.calls)
        for call in (
            lambda: vcpu.get_state(StateKind.REGS),
            lambda: vcpu.set_regs(Regs()),
            lambda: vcpu.get_msrs([0x10]),
            lambda: vcpu.set_cpuid([]),
            lambda: vcpu.set_guest_debug(single_step=True),
        ):
            error = _on_other_thread(call)
            assert isinstance(error, VmStateError)
            assert "thread that created vCPU 0" in str(error)
        assert test_backend.calls[mark:] == []
        assert vcpu.get_regs() == Regs()  # on its own thread it works


def test_kick_from_another_thread_is_allowed(full: tuple[RecordingBackend, Backend]) -> None:
    test_backend, backend = full
    with backend.create_vm() as vm:
        vcpu = vm.create_vcpu()
        assert _on_other_thread(vcpu.kick) is None
        assert test_backend.calls_of("pyvmm_kick_vcpu") == [("pyvmm_kick_vcpu", 0)]


def test_vcpu_created_on_another_thread_belongs_to_it(full: tuple[RecordingBackend, Backend]) -> None:
    _, backend = full
    with backend.create_vm({"vcpus": 2}) as vm:
        created: list[Vcpu] = []
        assert _on_other_thread(lambda: created.append(vm.create_vcpu())) is None
        vcpu = created[0]
        assert vcpu.thread_id != threading.get_ident()
        with pytest.raises(VmStateError, match="thread"):
            vcpu.get_regs()


def test_repr(full: tuple[RecordingBackend, Backend]) -> None:
    _, backend = full
    assert repr(backend) == "Backend('contract-test')"
    with backend.create_vm() as vm:
        vm.add_memory(0, 0x1000)
        assert repr(vm) == "Vm('contract-test', x86_64, 1 regions, 0 vCPUs)"
        assert repr(vm.create_vcpu()) == "Vcpu(0, backend='contract-test')"
    assert backend.supports(Capability.PVCLOCK)
