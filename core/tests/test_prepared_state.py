"""Vcpu.prepare_state / Vcpu.restore_state (pyvmm.prepared_state): checked once,
written back in one order, through the backend's prepared writes where it has
``PREPARED_VCPU_STATE`` and through the register hooks where it has not."""

from __future__ import annotations

import threading

import pytest
from coretests_support import MakeBackend

from pyvmm.arch.x86_64 import MsrEntry, Regs, Sregs, VcpuEvents
from pyvmm.capabilities import Capability
from pyvmm.errors import ConfigError, UnsupportedCapability, VmStateError
from pyvmm.prepared_state import SavedVcpuState
from pyvmm.vcpu_state import StateKind

REGISTERS = (Capability.VCPU_REGISTERS, Capability.MSRS, Capability.VCPU_EVENTS)
WRITES = ("pyvmm_set_msrs", "pyvmm_set_vcpu_state", "pyvmm_set_vcpu_events", "pyvmm_restore_vcpu_state")


def _state() -> SavedVcpuState:
    return SavedVcpuState(
        ((StateKind.SREGS, Sregs(cr0=0x11)), (StateKind.REGS, Regs(rax=7, rip=0x1000))),
        (MsrEntry(0x174, 8),),
        VcpuEvents(),
    )


def test_without_the_capability_the_register_hooks_write_it_back_in_order(make_backend: MakeBackend) -> None:
    test_backend, backend = make_backend(REGISTERS)
    with backend.create_vm() as vm:
        vcpu = vm.create_vcpu()
        state = _state()
        prepared = vcpu.prepare_state(state)
        assert prepared.backend_state is None
        state.states[1][1].rax = 99  # after preparing: must not reach the write
        mark = len(test_backend.calls)
        vcpu.restore_state(prepared)
        writes = [c for c in test_backend.calls[mark:] if c[0] in WRITES]
        assert [(c[0], c[1]) for c in writes] == [
            ("pyvmm_set_msrs", [MsrEntry(0x174, 8)]),
            ("pyvmm_set_vcpu_state", StateKind.SREGS),
            ("pyvmm_set_vcpu_state", StateKind.REGS),
            ("pyvmm_set_vcpu_events", VcpuEvents()),
        ]
        assert writes[2][2] == Regs(rax=7, rip=0x1000)
        vcpu.restore_state(prepared)  # as often as needed
        assert [c[0] for c in test_backend.calls if c[0] in WRITES].count("pyvmm_set_vcpu_state") == 4


def test_with_the_capability_the_backend_prepares_once_and_gets_its_own_object_back(
    make_backend: MakeBackend,
) -> None:
    test_backend, backend = make_backend((*REGISTERS, Capability.PREPARED_VCPU_STATE), name="prepared")
    with backend.create_vm() as vm:
        vcpu = vm.create_vcpu()
        state = _state()
        prepared = vcpu.prepare_state(state)
        assert test_backend.hook_names() >= {"pyvmm_prepare_vcpu_state"}
        mark = len(test_backend.calls)
        vcpu.restore_state(prepared)
        vcpu.restore_state(prepared)
        calls = test_backend.calls[mark:]
        assert [c[0] for c in calls if c[0] in WRITES] == ["pyvmm_restore_vcpu_state"] * 2
        assert all(c[1] is prepared.backend_state for c in calls)
        assert "pyvmm_prepare_vcpu_state" not in [c[0] for c in calls], "prepared once, not per restore"


def test_a_state_prepared_for_one_vcpu_is_refused_by_another(make_backend: MakeBackend) -> None:
    test_backend, backend = make_backend((*REGISTERS, Capability.MULTI_VCPU))
    with backend.create_vm({"vcpus": 2}) as vm:
        first, second = vm.create_vcpu(), vm.create_vcpu()
        prepared = first.prepare_state(_state())
        mark = len(test_backend.calls)
        with pytest.raises(ConfigError, match="prepared for vCPU 0, not for vCPU 1"):
            second.restore_state(prepared)
        assert not [c for c in test_backend.calls[mark:] if c[0] in WRITES]


def test_bad_states_are_refused_when_prepared_not_when_restored(make_backend: MakeBackend) -> None:
    test_backend, backend = make_backend((Capability.VCPU_REGISTERS,), name="registers-only")
    with backend.create_vm() as vm:
        vcpu = vm.create_vcpu()
        with pytest.raises(ConfigError, match="rax"):
            vcpu.prepare_state(SavedVcpuState(((StateKind.REGS, Regs(rax=1 << 64)),)))
        with pytest.raises(ConfigError, match="StateKind is needed, not str"):
            vcpu.prepare_state(SavedVcpuState((("regs", Regs()),)))  # type: ignore[arg-type]
        with pytest.raises(UnsupportedCapability) as msrs:
            vcpu.prepare_state(SavedVcpuState((), (MsrEntry(0x10, 0),)))
        assert msrs.value.capability is Capability.MSRS
        with pytest.raises(UnsupportedCapability) as events:
            vcpu.prepare_state(SavedVcpuState((), (), VcpuEvents()))
        assert events.value.capability is Capability.VCPU_EVENTS
        assert not [c for c in test_backend.calls if c[0] in WRITES]


def test_events_of_another_type_are_refused(make_backend: MakeBackend) -> None:
    _, backend = make_backend(REGISTERS)
    with backend.create_vm() as vm:
        vcpu = vm.create_vcpu()
        with pytest.raises(ConfigError, match="VcpuEvents is needed, not dict"):
            vcpu.prepare_state(SavedVcpuState((), (), {}))  # type: ignore[arg-type]


def test_prepare_and_restore_keep_to_the_vcpu_thread(make_backend: MakeBackend) -> None:
    _, backend = make_backend(REGISTERS)
    with backend.create_vm() as vm:
        vcpu = vm.create_vcpu()
        prepared = vcpu.prepare_state(_state())
        errors: list[BaseException] = []

        def elsewhere() -> None:
            for call in (lambda: vcpu.prepare_state(_state()), lambda: vcpu.restore_state(prepared)):
                try:
                    call()
                except VmStateError as exc:
                    errors.append(exc)

        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
        assert len(errors) == 2
        assert all("thread that created vCPU 0" in str(e) for e in errors)
