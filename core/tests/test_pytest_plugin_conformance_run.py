"""``pytest --pyvmm-backend NAME`` as a vendor runs it, in a pytest subprocess:
the per-scenario summary prints wherever the rootdir is, and a backend that is
not installed is one usage error, not a traceback per scenario.

The backend under test is a contract test backend installed through a real
entry point (a ``.dist-info`` directory on ``PYTHONPATH``), so these tests need
no hypervisor and no other plugin.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyvmm.plugins import ENTRY_POINT_GROUP, ENV_BACKEND
from pyvmm.policy import ENV_ALLOW, ENV_CONFIG, ENV_DENY

PLUGIN_MODULE = """\
import os

from pyvmm.testing.contract_backend import ContractTestBackend

_backend = ContractTestBackend("fake", available=os.environ.get("FAKE_AVAILABLE", "1") == "1")
plugin = _backend.plugin()
"""

#: One scenario the contract backend passes (it halts when nothing is
#: scripted), one it is excused from (it declares no DIRTY_LOG).
SELECTION = "(test_halt and not test_halt_) or (test_dirty_log and not test_dirty_log_)"  # exactly these
SUMMARY = [
    "===",  # the section title, checked separately
    "SKIP  test_x86_64.py::test_dirty_log  (backend 'fake' does not declare DIRTY_LOG)",
    "PASS  test_x86_64.py::test_halt",
    "2 scenarios: 1 passed, 0 failed, 0 errors, 1 skipped",
]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A directory that, on ``PYTHONPATH``, installs the backend ``fake``."""
    site = tmp_path / "site"
    info = site / "pyvmm_fake-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pyvmm-fake\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nfake = pyvmm_fake:plugin\n")
    (site / "pyvmm_fake.py").write_text(PLUGIN_MODULE)
    return site


def run_pytest(site: Path, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in (ENV_BACKEND, ENV_ALLOW, ENV_DENY, ENV_CONFIG)}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), environ.get("PYTHONPATH")]))
    environ[ENV_CONFIG] = str(site / "no-such-config.toml")  # no user policy file
    environ[ENV_ALLOW] = "fake"  # import no other installed plugin
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def summary(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if "pyvmm conformance: backend 'fake'" in line), None)
    assert start is not None, f"no conformance summary in:\n{stdout}"
    end = next(i for i in range(start, len(lines)) if " scenarios: " in lines[i])
    return ["===", *(line for line in lines[start + 1 : end + 1] if line)]


@pytest.mark.parametrize("layout", ["rootdir-is-cwd", "rootdir-above-cwd", "rootdir-option", "tests-elsewhere"])
def test_the_summary_prints_wherever_the_rootdir_is(site: Path, tmp_path: Path, layout: str) -> None:
    project = tmp_path / "project"
    (project / "tests" / "unit").mkdir(parents=True)
    (project / "tests" / "unit" / "test_own.py").write_text(
        "def test_own(pyvmm_backend):\n    assert pyvmm_backend.name == 'fake'\n"
    )
    args = ["--pyvmm-backend", "fake", "-k", f"{SELECTION} or test_own"]
    if layout == "rootdir-is-cwd":
        cwd = project
    elif layout == "rootdir-above-cwd":  # a project's ini file sets the rootdir; pytest runs in a subdirectory
        (project / "pytest.ini").write_text("[pytest]\n")
        cwd = project / "tests" / "unit"
    elif layout == "rootdir-option":
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        cwd = project
        args += ["--rootdir", str(elsewhere)]
    else:  # tox's changedir: the tests are given by path, the rootdir is their common ancestor
        cwd = tmp_path / "work"
        cwd.mkdir()
        args.append(str(project / "tests"))
    result = run_pytest(site, cwd, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert summary(result.stdout) == SUMMARY
    assert "2 passed, 1 skipped" in result.stdout  # the own test and test_halt; test_dirty_log


def test_an_unknown_backend_is_one_usage_error(site: Path, tmp_path: Path) -> None:
    result = run_pytest(site, tmp_path, "--pyvmm-backend", "nosuch")
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
    assert errors == ["ERROR: --pyvmm-backend nosuch: no backend named 'nosuch' (installed: fake)"]
    assert "passed" not in result.stdout and "error" not in result.stdout.lower()


def test_an_unknown_backend_is_a_usage_error_without_the_suite_too(site: Path, tmp_path: Path) -> None:
    result = run_pytest(site, tmp_path, "--pyvmm-backend", "nosuch", "--pyvmm-no-conformance")
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
    assert "no backend named 'nosuch'" in result.stderr


def test_a_denied_backend_is_a_usage_error_naming_the_rule(site: Path, tmp_path: Path) -> None:
    result = run_pytest(site, tmp_path, "--pyvmm-backend", "fake", **{ENV_DENY: "fake"})
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
    assert error.startswith("ERROR: --pyvmm-backend fake: no backend named 'fake'")
    assert ENV_DENY in error


def test_an_unavailable_backend_skips_with_the_reason(site: Path, tmp_path: Path) -> None:
    """Installed but unable to run here (no device node, say): skipped, not an error,
    so a CI host without the hypervisor still passes."""
    result = run_pytest(site, tmp_path, "--pyvmm-backend", "fake", "-k", SELECTION, FAKE_AVAILABLE="0")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = summary(result.stdout)
    assert lines[-1] == "2 scenarios: 0 passed, 0 failed, 0 errors, 2 skipped"
    assert all("switched off by the test" in line for line in lines[1:-1]), lines
