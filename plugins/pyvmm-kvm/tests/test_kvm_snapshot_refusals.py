"""A snapshot whose checksum is right but whose state KVM refuses (a PIT image
of the wrong size, an XSAVE area from a host with more components): a
SnapshotError naming the part, and no fd, thread or VM left behind -- on the
machine, where the vCPU state is only set on the vCPU threads at run(), and on
the VM API."""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path

import pytest

from pyvmm import snapshot
from pyvmm.arch.x86_64 import Xsave
from pyvmm.machine import Machine, MachineConfig
from pyvmm.machine.outcome import StopReason
from pyvmm.snapshot import Snapshot, SnapshotError
from pyvmm.testing.guests.snapshot_counter import snapshot_counter_image
from pyvmm.vcpu_state import StateKind
from pyvmm.vm import Backend
from pyvmm.vm_state import VmStateKind

CONFIG = MachineConfig(backend="kvm", irqchip="kernel", timeout=20, serial="none")


def _leftovers() -> tuple[int, int]:
    return len(os.listdir("/proc/self/fd")), threading.active_count()


@pytest.fixture(scope="module")
def image(kvm: Backend, tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    path = tmp_path_factory.mktemp("refusals") / "counter.snap"
    with Machine(CONFIG, image=snapshot_counter_image(), snapshot_to=path) as machine:
        assert machine.run().reason is StopReason.SNAPSHOT
    return snapshot.load(path)


def _with_big_xsave(image: Snapshot) -> Snapshot:
    states = [
        (kind, Xsave(value.region + bytes(1 << 20)) if kind is StateKind.XSAVE else value)
        for kind, value in image.vcpus[0]
    ]
    return dataclasses.replace(image, vcpus=[states])


def test_a_pit_image_kvm_refuses_is_a_snapshot_error_while_building(image: Snapshot) -> None:
    bad = dataclasses.replace(
        image, vm_states=[(kind, data[:-1] if kind is VmStateKind.PIT else data) for kind, data in image.vm_states]
    )
    before = _leftovers()
    with pytest.raises(SnapshotError, match="VM state pit does not fit"):
        Machine(CONFIG, image=snapshot_counter_image(), restore=bad)
    assert _leftovers() == before


def test_a_vcpu_state_kvm_refuses_is_a_snapshot_error_from_run(image: Snapshot) -> None:
    before = _leftovers()
    with (
        pytest.raises(SnapshotError, match="vCPU 0 xsave does not fit"),
        Machine(CONFIG, image=snapshot_counter_image(), restore=_with_big_xsave(image)) as machine,
    ):
        machine.run()
    assert _leftovers() == before


def test_the_vm_api_closes_the_vm_it_was_building(kvm: Backend) -> None:
    with kvm.create_vm({"arch": "x86_64"}) as vm:
        vm.add_memory(0, 0x10000)
        vm.create_vcpu()
        saved = snapshot.capture(vm)
    before = _leftovers()
    with pytest.raises(SnapshotError, match="vCPU 0 xsave does not fit"):
        snapshot.restore(kvm, _with_big_xsave(saved))
    assert _leftovers() == before


def test_nothing_is_created_for_a_file_that_is_not_a_snapshot(kvm: Backend, tmp_path: Path) -> None:
    junk = tmp_path / "junk.snap"
    junk.write_bytes(b"PYVMMSNP" + bytes(100))
    before = _leftovers()
    for attempt in (
        lambda: snapshot.restore(kvm, junk),
        lambda: Machine(CONFIG, image=snapshot_counter_image(), restore=junk),
    ):
        with pytest.raises(SnapshotError):
            attempt()
    assert _leftovers() == before


def test_a_machine_sets_the_irqchip_and_clock_after_every_vcpu_state(
    image: Snapshot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The machine's vCPUs only exist once run() starts their threads: the
    VM-wide state must wait for them (see the KVM test of why in
    test_kvm_snapshot_continuity), and the clock is set as the guest starts."""
    from pyvmm.machine import snapshots

    order: list[str] = []
    real_vcpu, real_vm = snapshots.apply_vcpu, snapshots.apply_vm
    monkeypatch.setattr(snapshots, "apply_vcpu", lambda vcpu, i: (order.append("vcpu"), real_vcpu(vcpu, i))[1])
    monkeypatch.setattr(snapshots, "apply_vm", lambda vm, i: (order.append("vm"), real_vm(vm, i))[1])
    with Machine(CONFIG, image=snapshot_counter_image(), restore=image) as machine:
        assert order == []
        result = machine.run()
    assert order == ["vcpu", "vm"]
    assert result.reason is StopReason.DEBUG_EXIT
