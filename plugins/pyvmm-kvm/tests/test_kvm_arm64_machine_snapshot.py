"""Machine snapshots on the aarch64 ``virt`` board with arm64 KVM's GICv3: the
counting guest asks for a snapshot through the board's request register, and
the machine built from the file (``Machine(restore=...)``, ``pyvmm run
--restore``) ends with the checksum the guest reports when never stopped; a
file of another vCPU count is refused and the half-built machine closed.

These need KVM on an aarch64 host (the arm64 test bed: README "test beds").
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from pyvmm import cli, snapshot
from pyvmm.arch.aarch64 import MpState
from pyvmm.gicv3_state import Gicv3State
from pyvmm.machine import Machine, MachineConfig
from pyvmm.machine.outcome import StopReason
from pyvmm.machine.virt import RAM_BASE as VIRT_RAM_BASE
from pyvmm.snapshot import SnapshotError
from pyvmm.testing.guests.snapshot_counter_aarch64 import SNAPSHOT_COUNTER_AARCH64, expected_result
from pyvmm.vcpu_state import StateKind
from pyvmm.vm import Backend
from pyvmm.vm_state import VmStateKind
from pyvmm_kvm.host_arch import host_is_arm64

pytestmark = pytest.mark.skipif(not host_is_arm64(), reason="needs KVM on an aarch64 host: runs in the arm64 test bed")

#: Generous: KVM nested in QEMU's TCG is slow.
TIMEOUT = 120


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("arm64-machine") / "counter.bin"
    path.write_bytes(SNAPSHOT_COUNTER_AARCH64.code)
    return path


def _config(kernel: Path, **changes: object) -> MachineConfig:
    fields: dict[str, object] = {
        "arch": "aarch64",
        "backend": "kvm",
        "irqchip": "kernel",
        "timeout": TIMEOUT,
        "serial": "none",
        "kernel": kernel,
        "load_address": VIRT_RAM_BASE,
    }
    return MachineConfig(**{**fields, **changes})


@pytest.fixture(scope="module")
def saved(kvm: Backend, kernel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("arm64-machine-snap") / "counter.snap"
    with Machine(_config(kernel), snapshot_to=path) as machine:
        result = machine.run()
    assert result.reason is StopReason.SNAPSHOT and result.status == 0
    return path


def test_the_guest_never_stopped_reports_its_checksum(kvm: Backend, kernel: Path) -> None:
    with Machine(_config(kernel)) as machine:
        result = machine.run()
    assert (result.reason, result.code) == (StopReason.DEBUG_EXIT, expected_result())


def test_the_snapshot_holds_the_gic_and_every_device(saved: Path) -> None:
    image = snapshot.load(saved)
    assert [kind for kind, _ in image.vm_states] == [VmStateKind.GICV3]
    assert image.devices is not None
    assert {device.key.split(":")[1] for device in image.devices} >= {"pl011", "snapshot-request", "debug-exit"}


def test_a_restored_machine_ends_as_if_never_stopped(saved: Path, kernel: Path) -> None:
    with Machine(_config(kernel), restore=saved) as machine:
        result = machine.run()
    assert (result.reason, result.code) == (StopReason.DEBUG_EXIT, expected_result())


def test_a_snapshot_of_another_vcpu_count_is_refused_and_nothing_left(saved: Path, kernel: Path) -> None:
    before = len(os.listdir("/proc/self/fd")), threading.active_count()
    with pytest.raises(SnapshotError, match=r"1 vCPU\(s\), this machine 2"):
        Machine(_config(kernel, cpus=2), restore=saved)
    assert (len(os.listdir("/proc/self/fd")), threading.active_count()) == before


def test_pyvmm_run_saves_and_restores(kvm: Backend, kernel: Path, tmp_path: Path) -> None:
    path = tmp_path / "cli.snap"
    base = ["run", "--arch", "aarch64", "--backend", "kvm", "--irqchip", "kernel", "--serial", "none"]
    base += ["--timeout", str(TIMEOUT), "--kernel", str(kernel), "--load-address", hex(VIRT_RAM_BASE)]
    assert cli.main([*base, "--snapshot-to", str(path)]) == 0
    assert cli.main([*base, "--restore", str(path)]) == (expected_result() << 1 | 1) & 0xFF


def test_a_two_vcpu_machine_restores_its_idle_secondary_and_both_redistributors(
    kvm: Backend, kernel: Path, tmp_path: Path
) -> None:
    """The guest never starts vCPU 1: its thread is kicked out of its powered-off
    wait for the snapshot, and it is restored powered off, with its own
    redistributor and CPU interface in the GIC image."""
    path = tmp_path / "two.snap"
    with Machine(_config(kernel, cpus=2), snapshot_to=path) as machine:
        assert machine.run().reason is StopReason.SNAPSHOT
    image = snapshot.load(path)
    assert [dict(states)[StateKind.MP_STATE] for states in image.vcpus] == [MpState.RUNNABLE, MpState.STOPPED]
    assert Gicv3State.decode(dict(image.vm_states)[VmStateKind.GICV3]).vcpus == 2
    with Machine(_config(kernel, cpus=2), restore=path) as machine:
        result = machine.run()
    assert (result.reason, result.code) == (StopReason.DEBUG_EXIT, expected_result())
