"""KVM's prepared vCPU state (pyvmm_kvm.prepared_state): what it refuses when
prepared, how a refused MSR is reported when restored, and the register sets of
an in-kernel irqchip VM written back as well."""

from __future__ import annotations

import pytest

from pyvmm.arch.x86_64 import Lapic, MpState, MsrEntry, Regs
from pyvmm.capabilities import Capability
from pyvmm.errors import ConfigError, MsrAccessError
from pyvmm.prepared_state import SavedVcpuState
from pyvmm.reset_point import ResetPoint, default_kinds
from pyvmm.vcpu_state import StateKind
from pyvmm.vm import Backend

#: IA32_SYSENTER_CS, which every x86 vCPU has, and an index no CPU defines.
KNOWN_MSR, UNKNOWN_MSR = 0x174, 0x4000_FFFF
TPR = 0x80  # the local APIC's task priority register, in the 1 KiB register page


def test_kvm_declares_the_prepared_state(kvm: Backend) -> None:
    assert kvm.supports(Capability.PREPARED_VCPU_STATE)


def test_a_register_set_kvm_lacks_is_refused_when_prepared(kvm: Backend) -> None:
    with kvm.create_vm({"arch": "x86_64"}) as vm:
        vcpu = vm.create_vcpu()
        with pytest.raises(ConfigError, match="KVM x86 vCPUs have no core_regs state"):
            vcpu.prepare_state(SavedVcpuState(((StateKind.CORE_REGS, {}),)))


def test_an_msr_kvm_refuses_is_named_on_restore_with_those_written_before_it(kvm: Backend) -> None:
    with kvm.create_vm({"arch": "x86_64"}) as vm:
        vcpu = vm.create_vcpu()
        prepared = vcpu.prepare_state(
            SavedVcpuState((), (MsrEntry(KNOWN_MSR, 0x10), MsrEntry(UNKNOWN_MSR, 1), MsrEntry(KNOWN_MSR, 0x20)))
        )
        with pytest.raises(MsrAccessError) as refused:
            vcpu.restore_state(prepared)
        assert refused.value.index == UNKNOWN_MSR
        assert (refused.value.position, refused.value.completed) == (1, ((KNOWN_MSR, 0x10),))
        assert vcpu.get_msrs([KNOWN_MSR]) == [MsrEntry(KNOWN_MSR, 0x10)], "KVM stopped at the refused one"


def test_prepared_writes_are_the_values_at_prepare_time(kvm: Backend) -> None:
    with kvm.create_vm({"arch": "x86_64"}) as vm:
        vcpu = vm.create_vcpu()
        regs = Regs(rax=0x1234, rip=0x1000, rflags=2)
        prepared = vcpu.prepare_state(SavedVcpuState(((StateKind.REGS, regs),)))
        regs.rax = 0x9999  # later changes do not reach the prepared struct
        vcpu.set_regs(Regs(rax=1, rip=0x2000, rflags=2))
        vcpu.restore_state(prepared)
        assert (vcpu.get_regs().rax, vcpu.get_regs().rip) == (0x1234, 0x1000)


def test_a_reset_of_an_irqchip_vm_restores_lapic_and_mp_state(kvm: Backend) -> None:
    with kvm.create_vm({"arch": "x86_64"}) as vm:
        vm.create_irqchip()
        vm.add_memory(0, 0x10000, log_dirty=True)
        vcpu = vm.create_vcpu()
        point = ResetPoint.capture(vm, (*default_kinds(vm), StateKind.LAPIC, StateKind.MP_STATE))
        lapic, mp_state = vcpu.get_state(StateKind.LAPIC), vcpu.get_state(StateKind.MP_STATE)
        changed = bytearray(lapic.regs)
        changed[TPR] = 0x20
        vcpu.set_state(StateKind.LAPIC, Lapic(bytes(changed)))
        vcpu.set_state(StateKind.MP_STATE, MpState.HALTED)
        assert vcpu.get_state(StateKind.LAPIC).regs[TPR] == 0x20
        assert vcpu.get_state(StateKind.MP_STATE) is MpState.HALTED != mp_state
        point.reset()
        assert vcpu.get_state(StateKind.LAPIC).regs[TPR] == lapic.regs[TPR]
        assert vcpu.get_state(StateKind.MP_STATE) == mp_state
