"""What a snapshot reads and sets, on the contract backend: VM-wide state only
with the capability, in the order restored, after the irqchip exists; an
aarch64 VM's GIC image checked when loaded and set once the VM started."""

from __future__ import annotations

from pathlib import Path

import pytest
from coretests_support import MakeBackend

from pyvmm import snapshot
from pyvmm.capabilities import Capability
from pyvmm.config import Arch
from pyvmm.errors import UnsupportedCapability
from pyvmm.gicv3_state import Gicv3State
from pyvmm.snapshot import Snapshot, SnapshotError
from pyvmm.vcpu_state import StateKind
from pyvmm.vm_state import AARCH64_IRQCHIP_KINDS, X86_IRQCHIP_KINDS, VmStateKind

KINDS = (StateKind.REGS, StateKind.SREGS)


def test_an_irqchip_vm_needs_vm_state(make_backend: MakeBackend) -> None:
    _, backend = make_backend((Capability.VCPU_REGISTERS, Capability.IRQCHIP))
    with backend.create_vm() as vm:
        vm.add_memory(0, 0x4000)
        vm.create_irqchip()
        vm.create_vcpu()
        with pytest.raises(UnsupportedCapability, match="VM_STATE"):
            snapshot.capture(vm, KINDS)


def test_an_aarch64_vm_with_the_gic_saves_the_gic_and_a_file_without_a_valid_one_is_refused(
    make_backend: MakeBackend,
) -> None:
    _, backend = make_backend((Capability.VCPU_REGISTERS, Capability.IRQCHIP, Capability.VM_STATE))
    with backend.create_vm({"arch": "aarch64"}) as vm:
        vm.add_memory(0x4000_0000, 0x4000)
        vm.create_irqchip()
        vm.create_vcpu()
        image = snapshot.capture(vm, ())
    assert [kind for kind, _ in image.vm_states] == list(AARCH64_IRQCHIP_KINDS)
    # The contract backend's image is 16 zero bytes, not a GICv3 image: found on loading.
    with pytest.raises(SnapshotError, match="gicv3: GICv3 image: not the JSON"):
        snapshot.parse(snapshot.encode(image))


def test_an_aarch64_gic_is_set_after_the_vm_started(make_backend: MakeBackend) -> None:
    """KVM's vGIC takes its registers only once initialised (VM_START), after the vCPUs exist."""
    caps = (Capability.VCPU_REGISTERS, Capability.IRQCHIP, Capability.VM_STATE, Capability.VM_START)
    test_backend, backend = make_backend(caps)
    gic = Gicv3State(32, {0: 0x12}, [{0: 0}], [{}], [0], [0])
    image = Snapshot(Arch.AARCH64, [], [], [[]], [None], [None], [(VmStateKind.GICV3, gic.encode())])
    with snapshot.restore(backend, snapshot.parse(snapshot.encode(image))):
        pass
    hooks = [call[0] for call in test_backend.calls]
    assert hooks.index("pyvmm_create_irqchip") < hooks.index("pyvmm_create_vcpu") < hooks.index("pyvmm_start_vm")
    assert hooks.index("pyvmm_start_vm") < hooks.index("pyvmm_set_vm_state")


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
