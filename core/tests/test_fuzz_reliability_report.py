"""tools/reliability_report.py still runs and reports: a few cases of the
campaigns that need no hypervisor (the random-guest campaigns need one)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "reliability_report.py"


def test_the_report_runs_its_campaigns_and_counts_cases() -> None:
    campaigns = "loader:elf,loader:arm64,machine-file,guest-memory"
    result = subprocess.run(
        [sys.executable, str(TOOL), "--campaigns", campaigns, "--cases", "15", "--time", "20"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    table = [line.split() for line in result.stdout.splitlines()]
    rows = {parts[0]: parts[1:6] for parts in table if len(parts) > 5 and parts[1].isdigit()}
    for name in campaigns.split(","):
        tried, clean, unclean, hangs, crashes = (int(n) for n in rows[name])
        assert (tried, clean, unclean, hangs, crashes) == (15, 15, 0, 0, 0), name


def test_an_unknown_campaign_is_refused() -> None:
    result = subprocess.run(
        [sys.executable, str(TOOL), "--campaigns", "nonesuch"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert "unknown campaign(s) nonesuch" in result.stderr


def _hypervisor_here() -> bool:
    from pyvmm.errors import PyvmmError
    from pyvmm.vm import get_backend

    try:
        return "x86_64" in [arch.value for arch in get_backend().manifest.guest_arches]
    except PyvmmError:
        return False


@pytest.mark.skipif(not _hypervisor_here(), reason="the random-guest campaigns need an x86_64 backend")
@pytest.mark.parametrize(("fault", "column"), [("crash", 4), ("hang", 3)])
def test_a_crashing_or_hanging_guest_worker_is_counted(fault: str, column: int) -> None:
    """The report's own check: case 1 of the worker crashes (SIGSEGV) or hangs."""
    result = subprocess.run(
        [sys.executable, str(TOOL), "--campaigns", "guests:long", "--cases", "4", "--case-timeout", "3",
         "--inject-fault", fault],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    row = next(line.split() for line in result.stdout.splitlines() if line.startswith("guests:long "))
    counts = [int(n) for n in row[1:6]]
    assert counts[0] == 4 and counts[column] == 1 and counts[1] == 3, row
