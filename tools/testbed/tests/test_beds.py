"""Boots the beds chosen with ``--testbed`` (tox envs ``kvm-arm64``, ``kvm-amd``)
and fails unless the guest's pytest passed on the real KVM inside.

A missing QEMU is a skip with the package to install on a developer's machine,
and a failure where everything must run (CI, or
``TOX_SKIP_MISSING_INTERPRETERS=false``, as ``tools/test_all.py --strict``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from testbed.arches import arch_named
from testbed.bed import BedResult, run_bed
from testbed.errors import MissingTool

#: Generous: the amd64 bed's full KVM suite takes minutes under emulation.
TIMEOUT = float(os.environ.get("PYVMM_TESTBED_TIMEOUT", "2400"))


def _everything_must_run() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("TOX_SKIP_MISSING_INTERPRETERS", "").lower() == "false"


def _beds(config: pytest.Config) -> list[tuple[str, str]]:
    beds = []
    for wanted in config.getoption("testbed"):
        arch_name, _, mode_name = wanted.partition(":")
        arch = arch_named(arch_name)
        modes = [arch.mode(mode_name)] if mode_name else list(arch.modes)
        beds += [(arch.name, mode.name) for mode in modes]
    return beds


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "bed" in metafunc.fixturenames:
        beds = _beds(metafunc.config)
        metafunc.parametrize("bed", beds, ids=[f"{a}-{m}" for a, m in beds])


def test_guest_pytest_passes_on_real_kvm(
    bed: tuple[str, str], bed_results: list[BedResult], request: pytest.FixtureRequest
) -> None:
    arch = arch_named(bed[0])
    mode = arch.mode(bed[1])
    selection = request.config.getoption("testbed_selection")
    pytest_args: list[str] = [] if selection else list(arch.default_pytest_args)
    selection = selection or list(arch.default_selection)
    try:
        result = run_bed(arch, mode.name, selection, pytest_args, timeout=TIMEOUT, log=print)
    except MissingTool as missing:
        if _everything_must_run():
            pytest.fail(f"the {arch.name} bed cannot run: {missing}")
        pytest.skip(f"the {arch.name} bed cannot run: {missing}")
    bed_results.append(result)
    junit_dir: Path | None = request.config.getoption("testbed_junit_dir")
    if junit_dir is not None and result.junit is not None:
        junit_dir.mkdir(parents=True, exist_ok=True)
        (junit_dir / f"{arch.name}-{mode.name}.xml").write_text(result.junit)
    print(f"{arch.name} ({mode.name}): {result.counts.line()}; KVM: {result.kvm_mode_line.strip()}")
    assert mode.dmesg_marker in result.kvm_mode_line
    failed = [name for name, outcome in result.counts.outcomes.items() if outcome in ("failed", "error")]
    assert result.exit_status == 0, f"the guest's pytest exited {result.exit_status}; failed: {failed}"
    assert result.counts.passed > 0, "the guest's pytest passed no test"
