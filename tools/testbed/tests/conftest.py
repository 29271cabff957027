"""Host side of the test beds: which beds run, and a closing summary of what ran
inside them (the guest's own pass/skip counts per bed and mode)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tools/, where `testbed` lives

from testbed.bed import BedResult

RESULTS: list[BedResult] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("testbed")
    group.addoption(
        "--testbed",
        action="append",
        default=[],
        metavar="ARCH[:MODE]",
        help="boot this bed (arm64, arm64:nvhe, amd64, ...); repeatable; none boots without it",
    )
    group.addoption("--testbed-junit-dir", type=Path, default=None, help="keep each guest's junit XML here")
    group.addoption(
        "--testbed-selection",
        action="append",
        default=[],
        metavar="PATH",
        help="test paths run inside the guest instead of the bed's default",
    )


@pytest.fixture
def bed_results() -> list[BedResult]:
    """Where a test keeps what a bed returned, for the closing summary."""
    return RESULTS


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RESULTS:
        return
    terminalreporter.section("inside the test beds (real KVM)")
    for result in RESULTS:
        terminalreporter.write_line(
            f"{result.arch:6} {result.mode:10} {result.counts.line():48} QEMU {result.boot_seconds:6.1f} s"
            f"  [{result.kvm_mode_line.strip()}]"
        )
        for extra in result.payload.get("notes", []):
            terminalreporter.write_line(f"{'':18}{extra}")
