"""Snapshots of aarch64 VMs on real arm64 KVM: every listed register, the MP
state and the in-kernel GICv3 saved, restored into a fresh VM that goes on as if
never stopped; and the snapshots that do not fit -- another vCPU count, another
GIC, registers this vCPU lacks, a damaged GIC image -- refused with a
SnapshotError that leaves no descriptor behind.

These need KVM on an aarch64 host (the arm64 test bed: README "test beds");
elsewhere only the guest's source check runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm import snapshot
from pyvmm.arch.aarch64 import MpState, OneReg, sysreg_id
from pyvmm.boot import BootSpec
from pyvmm.config import Arch
from pyvmm.exits import ExitKind, MmioExit, SystemEvent, SystemEventExit
from pyvmm.gicv3_state import Gicv3State
from pyvmm.snapshot import Snapshot, SnapshotError
from pyvmm.testing.conformance import programs_aarch64 as p
from pyvmm.testing.guests.snapshot_counter_aarch64 import (
    RESULT,
    SNAPSHOT_COUNTER_AARCH64,
    SNAPSHOT_REQUEST,
    TICKS_BEFORE_SNAPSHOT,
    expected_result,
)
from pyvmm.vcpu_state import StateKind
from pyvmm.vm import Backend, Vcpu, Vm
from pyvmm.vm_state import VmStateKind
from pyvmm_kvm import arm64_uapi as a
from pyvmm_kvm.host_arch import host_is_arm64

on_arm64 = pytest.mark.skipif(not host_is_arm64(), reason="needs KVM on an aarch64 host: runs in the arm64 test bed")

#: How long a guest may take to reach its next MMIO write (KVM nested in QEMU's
#: TCG is slow) before the watchdog kicks it out and the test fails.
WATCHDOG_SECONDS = 120.0
#: The virtual counter (KVM_REG_ARM_TIMER_CNT): it moves on, by design.
TIMER_CNT_ID = sysreg_id(3, 3, 14, 3, 2)
#: GICD_ISPENDR1: SPIs 0-31's pending bits; GICD_IPRIORITYR<n>: priority bytes;
#: GICD_ICFGR2: the configuration of INTIDs 32-47 (two bits each, the upper one: edge).
GICD_ISPENDR1, GICD_IPRIORITYR, GICD_ICFGR2 = 0x204, 0x400, 0xC08


def test_the_guest_bytes_are_its_source() -> None:
    assembled = SNAPSHOT_COUNTER_AARCH64.assembled()
    if assembled is None:
        pytest.skip("no aarch64 GNU as/objcopy on this machine")
    assert assembled == SNAPSHOT_COUNTER_AARCH64.code


def _leftovers() -> tuple[int, int]:
    return len(os.listdir("/proc/self/fd")), threading.active_count()


@contextlib.contextmanager
def counter_vm(kvm: Backend, cpus: int = 1) -> Iterator[Vm]:
    """The counting guest on vCPU 0 (more vCPUs stay powered off), with the
    in-kernel GICv3, booted."""
    with kvm.create_vm({"arch": "aarch64", "vcpus": cpus}) as vm:
        vm.add_memory(p.RAM_BASE, p.RAM_SIZE, contents={p.CODE_ADDRESS: SNAPSHOT_COUNTER_AARCH64.code})
        vm.create_irqchip()
        for _ in range(cpus):
            vm.create_vcpu()
        vm.boot(BootSpec(arch=Arch.AARCH64, entry=p.CODE_ADDRESS))
        yield vm


def run_to_write(vcpu: Vcpu, address: int) -> int:
    """Run ``vcpu`` to its MMIO write at ``address``; the value written.  A
    guest that never gets there (waiting for an interrupt a restore lost) is
    kicked out by a watchdog and fails the test."""
    watchdog = threading.Timer(WATCHDOG_SECONDS, vcpu.kick)
    watchdog.start()
    try:
        exit_ = vcpu.run()
    finally:
        watchdog.cancel()
    if exit_.kind is ExitKind.INTERRUPTED:
        pytest.fail(f"the guest did not write {address:#x} within {WATCHDOG_SECONDS:g} s: it waits for a lost tick")
    assert isinstance(exit_, MmioExit) and exit_.is_write and exit_.address == address, exit_
    return int.from_bytes(exit_.data[: exit_.size], "little")


def shuts_down(vcpu: Vcpu) -> None:
    exit_ = vcpu.run()
    assert isinstance(exit_, SystemEventExit) and exit_.event is SystemEvent.SHUTDOWN, exit_


@pytest.fixture(scope="module")
def saved(kvm: Backend, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A snapshot file of the counting guest at its request point, and the
    result the same VM reported when it then ran on, never stopped."""
    if not host_is_arm64():
        pytest.skip("needs KVM on an aarch64 host: runs in the arm64 test bed")
    path = tmp_path_factory.mktemp("arm64-snapshot") / "counter.snap"
    with counter_vm(kvm) as vm:
        (vcpu,) = vm.vcpus
        assert run_to_write(vcpu, SNAPSHOT_REQUEST) >= TICKS_BEFORE_SNAPSHOT
        snapshot.save(vm, path)
        unstopped = run_to_write(vcpu, RESULT)
        shuts_down(vcpu)
    return path, unstopped


@on_arm64
def test_a_restored_guest_counts_on_as_if_never_stopped(kvm: Backend, saved: tuple[Path, int]) -> None:
    path, unstopped = saved
    assert unstopped == expected_result(), "the guest itself, never stopped"
    with snapshot.restore(kvm, path) as restored:
        (vcpu,) = restored.vcpus
        assert run_to_write(vcpu, RESULT) == unstopped
        shuts_down(vcpu)


@on_arm64
def test_every_register_kvm_lists_is_saved_and_set_back(kvm: Backend, saved: tuple[Path, int]) -> None:
    image = snapshot.load(saved[0])
    states = dict(image.vcpus[0])
    assert set(states) == {StateKind.CORE_REGS, StateKind.REGISTER_LIST, StateKind.MP_STATE}
    registers = {r.reg_id: r.value for r in states[StateKind.REGISTER_LIST]}
    with snapshot.restore(kvm, image) as restored:
        (vcpu,) = restored.vcpus
        ids = vcpu.handle.reg_list()
        assert list(registers) == ids, "the snapshot holds every register KVM lists, in its order"
        differ = [
            hex(reg_id)
            for reg_id in ids
            if reg_id != TIMER_CNT_ID and vcpu.handle.get_one_reg_bytes(reg_id) != registers[reg_id]
        ]
        assert differ == [], "registers that did not come back as saved"
        assert vcpu.get_state(StateKind.MP_STATE) is MpState.RUNNABLE


@on_arm64
def test_a_secondary_never_started_is_restored_powered_off(kvm: Backend) -> None:
    with counter_vm(kvm, cpus=2) as vm:
        assert run_to_write(vm.vcpus[0], SNAPSHOT_REQUEST) >= TICKS_BEFORE_SNAPSHOT
        image = snapshot.capture(vm)
    gic = Gicv3State.decode(dict(image.vm_states)[VmStateKind.GICV3])
    assert gic.vcpus == 2
    with snapshot.restore(kvm, image) as restored:
        assert restored.vcpus[1].get_state(StateKind.MP_STATE) is MpState.STOPPED
        assert restored.vcpus[0].get_state(StateKind.MP_STATE) is MpState.RUNNABLE
        assert run_to_write(restored.vcpus[0], RESULT) == expected_result()


@on_arm64
def test_pending_spis_line_levels_and_a_priority_come_back_in_the_gic(kvm: Backend) -> None:
    """SPI 5 made level-sensitive, its line high: its level comes back, and
    lowering the line leaves nothing pending.  SPI 6 edge-triggered (KVM's
    default for SPIs), raised: latched pending, which lowering its line does not
    clear.  (Userspace reads of ISPENDR give the latch alone.)"""
    dist = a.KVM_DEV_ARM_VGIC_GRP_DIST_REGS
    with counter_vm(kvm) as vm:
        vgic = vm.handle.vgic
        assert vgic.get_attr(dist, GICD_ICFGR2) == 0xAAAA_AAAA, "KVM's SPIs start edge-triggered"
        vgic.set_attr(dist, GICD_ICFGR2, 0xAAAA_AAAA & ~(3 << 10))  # INTID 37 level-sensitive
        vgic.set_attr(dist, GICD_IPRIORITYR + 40, 0xA0B0C0D0)
        vm.set_irq_line(5, True)
        vm.set_irq_line(6, True)
        image = snapshot.capture(vm)
    with snapshot.restore(kvm, image) as restored:
        vgic2 = restored.handle.vgic
        assert vgic2.get_attr(dist, GICD_IPRIORITYR + 40) == 0xA0B0C0D0
        assert vgic2.get_attr(dist, GICD_ICFGR2) == 0xAAAA_AAAA & ~(3 << 10)
        assert vgic2.get_attr(dist, GICD_ISPENDR1) == 1 << 6
        assert vgic2.get_attr(a.KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, 32) == 1 << 5, "SPI 5's line is high"
        restored.set_irq_line(5, False)
        restored.set_irq_line(6, False)
        assert vgic2.get_attr(a.KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, 32) == 0
        assert vgic2.get_attr(dist, GICD_ISPENDR1) == 1 << 6, "SPI 6's latch outlives its line"


# --- snapshots that do not fit ------------------------------------------------------


def _with_gic(image: Snapshot, change: dict[str, object]) -> Snapshot:
    data = json.loads(dict(image.vm_states)[VmStateKind.GICV3])
    data.update(change)
    return dataclasses.replace(image, vm_states=[(VmStateKind.GICV3, json.dumps(data).encode())])


@on_arm64
def test_a_gic_of_another_vcpu_count_is_refused_when_loaded(saved: tuple[Path, int], tmp_path: Path) -> None:
    image = snapshot.load(saved[0])
    two_vcpus = dataclasses.replace(image, vcpus=image.vcpus * 2, events=image.events * 2, msrs=image.msrs * 2)
    path = tmp_path / "two.snap"
    snapshot.write(two_vcpus, path)
    before = _leftovers()
    with pytest.raises(SnapshotError, match="the GIC has 1 redistributor"):
        snapshot.load(path)
    assert _leftovers() == before


@on_arm64
def test_a_damaged_gic_image_is_refused_when_loaded(saved: tuple[Path, int], tmp_path: Path) -> None:
    image = snapshot.load(saved[0])
    for change, message in (
        ({"spis": 33}, "whole number"),
        ({"private_levels": [1 << 32]}, "does not fit 32 bits"),
        ({"distributor": [[0x10000, 0]]}, "not a register of its frame"),
    ):
        path = tmp_path / "damaged.snap"
        snapshot.write(_with_gic(image, change), path)
        with pytest.raises(SnapshotError, match=message):
            snapshot.load(path)


@on_arm64
def test_a_gic_with_other_spis_is_refused_and_the_vm_closed(kvm: Backend, saved: tuple[Path, int]) -> None:
    image = snapshot.load(saved[0])
    gic = json.loads(dict(image.vm_states)[VmStateKind.GICV3])
    fewer = _with_gic(image, {"spis": 32, "spi_levels": gic["spi_levels"][:1]})
    before = _leftovers()
    with pytest.raises(SnapshotError, match=r"VM state gicv3 does not fit.*SPIs"):
        snapshot.restore(kvm, fewer)
    assert _leftovers() == before


@on_arm64
def test_registers_this_vcpu_lacks_are_refused_and_the_vm_closed(kvm: Backend, saved: tuple[Path, int]) -> None:
    image = snapshot.load(saved[0])
    sve_z0 = 0x6080_0000_0015_0000  # KVM_REG_ARM64_SVE Z0 slice 0 (2048 bits): no SVE vCPU here
    states = [
        (kind, [*value, OneReg(sve_z0, bytes(256))] if kind is StateKind.REGISTER_LIST else value)
        for kind, value in image.vcpus[0]
    ]
    before = _leftovers()
    with pytest.raises(SnapshotError, match=r"register_list does not fit.*0x6080000000150000"):
        snapshot.restore(kvm, dataclasses.replace(image, vcpus=[states]))
    assert _leftovers() == before
