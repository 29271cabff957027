"""What a snapshot reads and sets, on the contract backend: VM-wide state only
with the capability, in the order restored, after the irqchip exists; an
aarch64 VM with the hypervisor's GIC is refused rather than saved without it."""

from __future__ import annotations

from pathlib import Path

import pytest
from coretests_support import MakeBackend

from pyvmm import snapshot
from pyvmm.capabilities import Capability
from pyvmm.errors import UnsupportedCapability
from pyvmm.snapshot import SnapshotError
from pyvmm.vcpu_state import StateKind
from pyvmm.vm_state import X86_IRQCHIP_KINDS

KINDS = (StateKind.REGS, StateKind.SREGS)


def test_an_irqchip_vm_needs_vm_state(make_backend: MakeBackend) -> None:
    _, backend = make_backend((Capability.VCPU_REGISTERS, Capability.IRQCHIP))
    with backend.create_vm() as vm:
        vm.add_memory(0, 0x4000)
        vm.create_irqchip()
        vm.create_vcpu()
        with pytest.raises(UnsupportedCapability, match="VM_STATE"):
            snapshot.capture(vm, KINDS)


def test_an_aarch64_vm_with_the_gic_is_refused(make_backend: MakeBackend) -> None:
    _, backend = make_backend((Capability.VCPU_REGISTERS, Capability.IRQCHIP, Capability.VM_STATE))
    with backend.create_vm({"arch": "aarch64"}) as vm:
        vm.add_memory(0x4000_0000, 0x4000)
        vm.create_irqchip()
        with pytest.raises(SnapshotError, match="GIC"):
            snapshot.capture(vm, (StateKind.CORE_REGS,))


def test_vm_state_is_saved_and_set_again_after_the_irqchip(make_backend: MakeBackend, tmp_path: Path) -> None:
    caps = (Capability.VCPU_REGISTERS, Capability.IRQCHIP, Capability.VM_STATE, Capability.PVCLOCK)
    test_backend, backend = make_backend(caps)
    path = tmp_path / "vm.snap"
    with backend.create_vm() as vm:
        vm.add_memory(0, 0x4000)
        vm.create_irqchip()
        vm.create_vcpu()
        snapshot.save(vm, path, KINDS)
    image = snapshot.load(path)
    assert [kind for kind, _ in image.vm_states] == list(X86_IRQCHIP_KINDS)
    assert image.clock == 0
    test_backend.calls.clear()
    with snapshot.restore(backend, path):
        pass
    hooks = [call[0] for call in test_backend.calls]
    irqchip = hooks.index("pyvmm_create_irqchip")
    sets = [i for i, hook in enumerate(hooks) if hook == "pyvmm_set_vm_state"]
    assert len(sets) == 4 and irqchip < hooks.index("pyvmm_create_vcpu") < sets[0]
    assert [test_backend.calls[i][1] for i in sets] == list(X86_IRQCHIP_KINDS)
    assert hooks.index("pyvmm_set_clock") > sets[-1], "the clock last, just before the guest runs"
