"""What a vendor sees after ``pytest --pyvmm-backend NAME``: one line per
conformance scenario, skips with the capability that excused them."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import pytest
from pytest import TestReport
from pyvmm_unicorn.plugin import manifest

from pyvmm.plugins import ENTRY_POINT_GROUP
from pyvmm.testing import pytest_plugin

SUITE = pytest_plugin.CONFORMANCE_DIR
NAME = manifest().name


def test_a_run_ends_with_one_line_per_scenario(tmp_path: Path) -> None:
    if not any(ep.name == NAME for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)):
        pytest.skip(f"the backend {NAME!r} is not installed in this environment")
    selection = "test_halt or test_pio_write or test_psci_system_off_is_shutdown"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--pyvmm-backend", NAME, "-k", selection],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if f"pyvmm conformance: backend {NAME!r}" in line)
    assert [line for line in lines[start + 1 : start + 6] if line] == [
        "PASS  test_aarch64.py::test_psci_system_off_is_shutdown",
        "PASS  test_x86_64.py::test_halt",
        "PASS  test_x86_64.py::test_pio_write",
        "3 scenarios: 3 passed, 0 failed, 0 errors, 0 skipped",
    ]


class _Reporter:
    def __init__(self, stats: dict[str, list[Any]]) -> None:
        self.stats = stats
        self.lines: list[str] = []

    def section(self, title: str) -> None:
        self.lines.append(f"== {title}")

    def write_line(self, line: str) -> None:
        self.lines.append(line)


def _report(
    test: str,
    outcome: Literal["passed", "failed", "skipped"],
    when: Literal["setup", "call", "teardown"],
    longrepr: Any = None,
) -> TestReport:
    path = SUITE / "test_x86_64.py"
    return TestReport(f"test_x86_64.py::{test}", (str(path), 1, test), {}, outcome, longrepr, when)


def test_skips_name_the_capability_and_failures_win(
    pytestconfig: pytest.Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pytestconfig.option, "pyvmm_backend", "acme")
    skip = (str(SUITE / "test_x86_64.py"), 9, "Skipped: backend 'acme' does not declare DIRTY_LOG")
    reporter = _Reporter(
        {
            "passed": [_report("test_halt", "passed", "call"), _report("test_pio_write", "passed", "call")],
            "skipped": [_report("test_dirty_log", "skipped", "call", skip)],
            "failed": [_report("test_pio_write", "failed", "teardown")],
            "error": [_report("test_kick_before_run", "failed", "setup")],
        }
    )
    pytest_plugin.pytest_terminal_summary(reporter, 1, pytestconfig)  # type: ignore[arg-type]
    assert reporter.lines == [
        "== pyvmm conformance: backend 'acme'",
        "SKIP  test_x86_64.py::test_dirty_log  (backend 'acme' does not declare DIRTY_LOG)",
        "PASS  test_x86_64.py::test_halt",
        "ERROR test_x86_64.py::test_kick_before_run  (in setup)",
        "FAIL  test_x86_64.py::test_pio_write",
        "4 scenarios: 1 passed, 1 failed, 1 errors, 1 skipped",
    ]


def test_no_summary_without_a_backend(pytestconfig: pytest.Config, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pytestconfig.option, "pyvmm_backend", None)
    reporter = _Reporter({"passed": [_report("test_halt", "passed", "call")]})
    pytest_plugin.pytest_terminal_summary(reporter, 0, pytestconfig)  # type: ignore[arg-type]
    assert reporter.lines == []
