"""Machine snapshots on real KVM: a guest counting in-kernel PIT ticks and
checksumming its memory reports, restored, what it reports never stopped; a
file of another machine or a damaged one is a typed error and leaves nothing."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from pyvmm import cli, snapshot
from pyvmm.arch.x86_64 import MpState
from pyvmm.boot import X86Mode
from pyvmm.devices.state import DeviceImage
from pyvmm.errors import ConfigError
from pyvmm.machine import GuestImage, Machine, MachineConfig
from pyvmm.machine.outcome import StopReason
from pyvmm.snapshot import Snapshot, SnapshotError
from pyvmm.testing.guests.snapshot_counter import expected_code, snapshot_counter_flat, snapshot_counter_image
from pyvmm.vcpu_state import StateKind
from pyvmm.vm import Backend, Vm
from pyvmm.vm_state import VmStateKind

BASE: dict[str, object] = {"backend": "kvm", "irqchip": "kernel", "timeout": 20, "serial": "none"}


def _config(**changes: object) -> MachineConfig:
    return MachineConfig(**{**BASE, **changes})


CONFIG = _config()

#: A guest that would end at once with code 0x77: a restored machine built to
#: boot it must run the snapshot instead.
EXIT_AT_ONCE = GuestImage("exit-at-once", ((0x100000, bytes.fromhex("b877000000e7f4")),), 0x100000, X86Mode.LONG)


def _save(path: Path) -> None:
    with Machine(CONFIG, image=snapshot_counter_image(), snapshot_to=path) as machine:
        result = machine.run()
    assert result.reason is StopReason.SNAPSHOT and result.status == 0


@pytest.fixture(scope="module")
def saved(kvm: Backend, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("machine") / "counter.snap"
    _save(path)
    return path


def test_the_guest_never_stopped_reports_its_expected_checksum(kvm: Backend) -> None:
    with Machine(CONFIG, image=snapshot_counter_image()) as machine:
        result = machine.run()
    assert (result.reason, result.code) == (StopReason.DEBUG_EXIT, expected_code())


def test_the_snapshot_holds_the_irqchip_pit_clock_and_every_device(saved: Path) -> None:
    image = snapshot.load(saved)
    assert [kind for kind, _ in image.vm_states] == [
        VmStateKind.PIC_PRIMARY,
        VmStateKind.PIC_SECONDARY,
        VmStateKind.IOAPIC,
        VmStateKind.PIT,
    ]
    assert image.clock is not None and image.clock > 0
    keys = {d.key for d in image.devices or ()}
    assert {"pio@0x3f8:uart", "pio@0x60:i8042", "pio@0x70:rtc", "pio@0x510:fw_cfg", "pio@0xcf8:pci-host"} <= keys
    assert "mmio@0xfeb00000:demo-device" in keys
    kinds = [kind.value for kind, _ in image.vcpus[0]]
    assert {"regs", "sregs", "lapic", "mp_state"} <= set(kinds)


def test_a_restored_machine_continues_where_it_stopped(saved: Path) -> None:
    with Machine(CONFIG, image=EXIT_AT_ONCE, restore=saved) as machine:
        result = machine.run()
    assert (result.reason, result.code) == (StopReason.DEBUG_EXIT, expected_code())


def test_a_second_vcpu_waiting_for_its_sipi_is_restored_waiting(kvm: Backend, tmp_path: Path) -> None:
    config = _config(cpus=2)
    path = tmp_path / "smp.snap"
    with Machine(config, image=snapshot_counter_image(), snapshot_to=path) as machine:
        assert machine.run().reason is StopReason.SNAPSHOT
    image = snapshot.load(path)
    mp_states = [dict(states)[StateKind.MP_STATE] for states in image.vcpus]
    assert mp_states == [MpState.RUNNABLE, MpState.UNINITIALIZED]
    with Machine(config, image=EXIT_AT_ONCE, restore=path) as machine:
        result = machine.run()
    assert (result.reason, result.code) == (StopReason.DEBUG_EXIT, expected_code())


def test_without_the_irqchip_state_the_restored_guest_does_not_finish(
    saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: the guest depends on the restored 8259s and 8254 (fresh
    ones deliver the tick to a vector it has no gate for, or never tick)."""

    def clock_only(vm: Vm, image: Snapshot) -> None:
        snapshot.apply_vm(vm, dataclasses.replace(image, vm_states=[]))

    monkeypatch.setattr("pyvmm.machine.snapshots.apply_vm", clock_only)
    with Machine(_config(timeout=2), image=EXIT_AT_ONCE, restore=saved) as machine:
        result = machine.run()
    assert result.code != expected_code()
    assert result.reason in (StopReason.TIMEOUT, StopReason.TRIPLE_FAULT, StopReason.DEBUG_EXIT)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"memory": 256 << 20}, "another memory size"),
        ({"cpus": 2}, "1 vCPU"),
        ({"testdev": True}, "only here"),
    ],
    ids=["memory", "cpus", "devices"],
)
def test_another_machines_snapshot_is_refused_and_leaves_nothing(
    saved: Path, change: dict[str, object], words: str
) -> None:
    before = _fds()
    with pytest.raises(SnapshotError, match=words):
        Machine(_config(**change), image=EXIT_AT_ONCE, restore=saved)
    assert _fds() == before, "the machine being built was closed"


def _rewritten(saved: Path, tmp_path: Path, devices: list[DeviceImage]) -> Path:
    image = dataclasses.replace(snapshot.load(saved), devices=devices)
    path = tmp_path / "rewritten.snap"
    snapshot.write(image, path)
    return path


def _device(saved: Path, key: str) -> tuple[list[DeviceImage], int]:
    devices = list(snapshot.load(saved).devices or ())
    (index,) = [i for i, d in enumerate(devices) if d.key == key]
    return devices, index


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda d: dataclasses.replace(d, version=2), "state version 2"),
        (lambda d: dataclasses.replace(d, state={**d.state, "ier": 300}), "field ier"),
        (lambda d: dataclasses.replace(d, state={**d.state, "rx": 5}), "field rx"),
        (lambda d: dataclasses.replace(d, state={k: v for k, v in d.state.items() if k != "lcr"}), "missing"),
        (lambda d: dataclasses.replace(d, key="pio@0x2f8:uart"), "only in the snapshot"),
    ],
    ids=["version", "range", "type", "missing", "key"],
)
def test_device_state_that_does_not_fit_is_a_snapshot_error(
    saved: Path, tmp_path: Path, edit: object, words: str
) -> None:
    devices, index = _device(saved, "pio@0x3f8:uart")
    devices[index] = edit(devices[index])  # type: ignore[operator]
    path = _rewritten(saved, tmp_path, devices)
    before = _fds()
    with pytest.raises(SnapshotError, match=words):
        Machine(CONFIG, image=EXIT_AT_ONCE, restore=path)
    assert _fds() == before


def test_a_damaged_machine_file_is_refused_before_a_vm_exists(
    kvm: Backend, saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = bytearray(saved.read_bytes())
    data[-2000] ^= 1
    bad = tmp_path / "bad.snap"
    bad.write_bytes(bytes(data))
    created: list[object] = []
    real_create = Backend.create_vm
    monkeypatch.setattr(Backend, "create_vm", lambda self, *a, **k: created.append(1) or real_create(self, *a, **k))
    with pytest.raises(SnapshotError, match="checksum"):
        Machine(CONFIG, image=EXIT_AT_ONCE, restore=bad)
    with pytest.raises(SnapshotError, match="checksum"):
        snapshot.restore(kvm, bad)
    assert created == [], "the file is checked before any VM is created"


def test_the_vm_api_and_the_machine_refuse_each_others_snapshots(kvm: Backend, saved: Path, tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="of a pyvmm machine"):
        snapshot.restore(kvm, saved)
    vm_only = dataclasses.replace(snapshot.load(saved), devices=None)
    with pytest.raises(SnapshotError, match="saved on the VM API"):
        Machine(CONFIG, image=EXIT_AT_ONCE, restore=vm_only)


def test_pyvmms_own_8259s_and_8254_are_saved_and_restored(kvm: Backend, tmp_path: Path) -> None:
    """``irqchip = "userspace"``: the board's PIC pair and PIT are devices of
    the machine, and their state crosses the snapshot as the in-kernel one does."""
    config = _config(irqchip="userspace")
    path = tmp_path / "userspace.snap"
    with Machine(config, image=snapshot_counter_image(), snapshot_to=path) as machine:
        assert machine.run().reason is StopReason.SNAPSHOT
    image = snapshot.load(path)
    assert image.vm_states == []
    assert {"pio@0x20:pic", "pio@0x40:pit"} <= {d.key for d in image.devices or ()}
    with Machine(config, image=EXIT_AT_ONCE, restore=path) as machine:
        result = machine.run()
    assert (result.reason, result.code) == (StopReason.DEBUG_EXIT, expected_code())


def test_a_device_without_state_support_is_refused_by_name(kvm: Backend, tmp_path: Path) -> None:
    path = tmp_path / "testdev.snap"
    with (
        Machine(_config(testdev=True), image=snapshot_counter_image(), snapshot_to=path) as machine,
        pytest.raises(SnapshotError, match=r"cannot be snapshotted: .*pc-testdev"),
    ):
        machine.run()
    assert not path.exists()


def test_pyvmm_run_saves_and_restores(kvm: Backend, tmp_path: Path) -> None:
    kernel = tmp_path / "counter.bin"
    kernel.write_bytes(snapshot_counter_flat())
    path = tmp_path / "cli.snap"
    base = ["run", "--backend", "kvm", "--irqchip", "kernel", "--serial", "none", "--timeout", "20"]
    base += ["--kernel", str(kernel), "--load-address", "0x100000"]
    status = (expected_code() << 1 | 1) & 0xFF
    assert cli.main(base) == status
    assert cli.main([*base, "--snapshot-to", str(path)]) == 0
    assert path.exists()
    assert cli.main([*base, "--restore", str(path)]) == status
    assert cli.main([*base, "--restore", str(path), "--memory", "64M"]) == 2


def test_pyvmm_run_saves_after_a_time(kvm: Backend, tmp_path: Path) -> None:
    """The guest sleeps between ticks; a snapshot after 5 ms of its 10 catches it
    mid-count, and the restore still ends with its checksum."""
    kernel = tmp_path / "counter.bin"
    kernel.write_bytes(snapshot_counter_flat())
    path = tmp_path / "timed.snap"
    base = ["run", "--backend", "kvm", "--irqchip", "kernel", "--serial", "none", "--timeout", "20"]
    base += ["--kernel", str(kernel), "--load-address", "0x100000"]
    saved = cli.main([*base, "--snapshot-to", str(path), "--snapshot-after", "0.005"])
    if saved != 0:
        pytest.skip("the guest finished before the snapshot time on this (loaded) machine")
    assert cli.main([*base, "--restore", str(path)]) == (expected_code() << 1 | 1) & 0xFF


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"snapshot_after": 1.0}, "needs a file"),
        ({"snapshot_to": "snap", "snapshot_after": 0.0}, "above 0 seconds"),
        ({"snapshot_to": "no/such/directory/snap"}, "is not a directory"),
    ],
    ids=["time-without-file", "zero-time", "no-directory"],
)
def test_bad_snapshot_options_are_config_errors_and_leave_nothing(
    kvm: Backend, tmp_path: Path, options: dict[str, object], words: str
) -> None:
    if "snapshot_to" in options:
        options = {**options, "snapshot_to": tmp_path / str(options["snapshot_to"])}
    before = _fds()
    with pytest.raises(ConfigError, match=words):
        Machine(CONFIG, image=EXIT_AT_ONCE, **options)  # type: ignore[arg-type]
    assert _fds() == before
