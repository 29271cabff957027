"""CR8 without an in-kernel local APIC: KVM loads it from ``kvm_run->cr8`` on
every ``KVM_RUN`` (even an immediate exit), so a CR8 written with the segment
registers must be the one the next run keeps (found restoring machine
snapshots under the userspace irqchip)."""

from __future__ import annotations

from pyvmm.boot import BootSpec, X86Mode
from pyvmm.config import Arch
from pyvmm.exits import ExitKind
from pyvmm.reset_point import ResetPoint
from pyvmm.testing.conformance import programs as p
from pyvmm.testing.conformance.harness import booted
from pyvmm.vcpu_state import StateKind
from pyvmm.vm import Backend, Vcpu


def _kicked_run(vcpu: Vcpu) -> None:
    vcpu.kick()
    assert vcpu.run().kind is ExitKind.INTERRUPTED


def test_a_cr8_set_with_the_segment_registers_survives_the_next_run(kvm: Backend) -> None:
    with booted(kvm, p.HLT) as (_, vcpu):
        sregs = vcpu.get_state(StateKind.SREGS)
        sregs.cr8 = 5
        vcpu.set_state(StateKind.SREGS, sregs)
        _kicked_run(vcpu)
        assert vcpu.get_state(StateKind.SREGS).cr8 == 5


def test_a_reset_puts_back_the_cr8_it_saved(kvm: Backend) -> None:
    with kvm.create_vm({"arch": "x86_64"}) as vm:
        vm.add_memory(0, p.RAM_SIZE, log_dirty=True)
        vm.memory.write(p.CODE_ADDRESS, p.HLT.code)
        vcpu = vm.create_vcpu()
        vm.boot(BootSpec(arch=Arch.X86_64, entry=p.CODE_ADDRESS, stack=p.STACK_TOP, x86_mode=X86Mode.LONG))
        sregs = vcpu.get_state(StateKind.SREGS)
        sregs.cr8 = 7
        vcpu.set_state(StateKind.SREGS, sregs)
        point = ResetPoint.capture(vm)
        sregs.cr8 = 2
        vcpu.set_state(StateKind.SREGS, sregs)
        _kicked_run(vcpu)
        point.reset()
        _kicked_run(vcpu)
        assert vcpu.get_state(StateKind.SREGS).cr8 == 7
