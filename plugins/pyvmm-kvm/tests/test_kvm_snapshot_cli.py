"""``pyvmm run --snapshot-to / --restore`` as a user runs it: a separate
process, its status and its messages.  The counter guest restored ends with the
status of a run never stopped; every bad file or option is status 2 with one
line naming the problem and no traceback."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from pyvmm.testing.guests.snapshot_counter import expected_code, snapshot_counter_flat
from pyvmm.vm import Backend

#: isa-debug-exit: the process status of a guest writing ``code``.
STATUS = (expected_code() << 1 | 1) & 0xFF


def _pyvmm(kernel: Path, *options: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pyvmm", "run", "--backend", "kvm", "--irqchip", "kernel", "--serial", "none"]
    command += ["--timeout", "30", "--kernel", str(kernel), "--load-address", "0x100000", *options]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def kernel(kvm: Backend, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "counter.bin"
    path.write_bytes(snapshot_counter_flat())
    return path


@pytest.fixture(scope="module")
def saved(kernel: Path) -> Path:
    path = kernel.parent / "counter.snap"
    done = _pyvmm(kernel, "--snapshot-to", str(path))
    assert done.returncode == 0, done.stderr
    assert f"snapshot saved to {path}" in done.stderr
    return path


def test_a_restored_run_ends_as_one_never_stopped(kernel: Path, saved: Path) -> None:
    never_stopped = _pyvmm(kernel)
    restored = _pyvmm(kernel, "--restore", str(saved))
    assert never_stopped.returncode == restored.returncode == STATUS, restored.stderr


def _refused(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "pyvmm: error:" in done.stderr
    for word in words:
        assert word in done.stderr


def test_a_damaged_file_is_refused(kernel: Path, saved: Path, tmp_path: Path) -> None:
    data = bytearray(saved.read_bytes())
    data[len(data) // 2] ^= 0x40
    bad = tmp_path / "damaged.snap"
    bad.write_bytes(bytes(data))
    _refused(_pyvmm(kernel, "--restore", str(bad)), "checksum")


def test_a_truncated_file_is_refused(kernel: Path, saved: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.snap"
    cut.write_bytes(saved.read_bytes()[:-4096])
    _refused(_pyvmm(kernel, "--restore", str(cut)), "bytes of body")


def test_a_file_of_a_later_format_is_refused(kernel: Path, saved: Path, tmp_path: Path) -> None:
    data = bytearray(saved.read_bytes())
    struct.pack_into("<I", data, 8, 99)
    later = tmp_path / "v99.snap"
    later.write_bytes(bytes(data))
    _refused(_pyvmm(kernel, "--restore", str(later)), "version 99")


def test_a_missing_file_is_refused(kernel: Path, tmp_path: Path) -> None:
    _refused(_pyvmm(kernel, "--restore", str(tmp_path / "none.snap")), "cannot read")


def test_another_machines_snapshot_is_refused(kernel: Path, saved: Path) -> None:
    _refused(_pyvmm(kernel, "--restore", str(saved), "--cpus", "2"), "vCPU")


def test_saving_onto_a_directory_is_refused_before_the_guest_runs(kernel: Path, tmp_path: Path) -> None:
    target = tmp_path / "a-directory"
    target.mkdir()
    _refused(_pyvmm(kernel, "--snapshot-to", str(target)), "directory")
    assert target.is_dir() and not any(target.iterdir())


def test_a_snapshot_of_the_hypervisors_irqchip_needs_it_again(kernel: Path, saved: Path) -> None:
    _refused(_pyvmm(kernel, "--restore", str(saved), "--irqchip", "userspace"), "irqchip")


def test_another_memory_size_is_refused(kernel: Path, saved: Path) -> None:
    _refused(_pyvmm(kernel, "--restore", str(saved), "--memory", "64M"), "memory size")
