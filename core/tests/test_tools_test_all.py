"""tools/test_all.py, the README's test command: it finds the Pythons tox alone
misses, hands them to tox, and ends by naming what passed, what failed and what
could not run -- failing only for failures, or for anything not run with
``--strict`` (CI).  tox itself is faked here: a ``tox`` package on PYTHONPATH that
records its arguments and writes the result JSON the test gives it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "test_all.py"
HERE = sys.version_info[:2]

FAKE_TOX = """\
import json, os, sys

args = sys.argv[1:]
with open(os.environ["FAKE_TOX_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if args == ["--version"]:
    print("4.99.0 (fake)")
    sys.exit(0)
with open(args[args.index("--result-json") + 1], "w") as out:
    out.write(open(os.environ["FAKE_TOX_RESULT"]).read())
print("fake tox output")
sys.exit(int(os.environ.get("FAKE_TOX_STATUS", "0")))
"""


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    if not TOOL.is_file():
        pytest.skip(f"not inside pyvmm's repository ({TOOL} is absent)")
    spec = importlib.util.spec_from_file_location("test_all_tool", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def wrapper(path: Path) -> Path:
    """An executable at ``path`` that is this Python."""
    return executable(path, f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')


@pytest.fixture
def machine(tmp_path: Path) -> dict[str, Any]:
    """A PATH with a broken pyenv shim for this Python's version and a fake
    ``python3.19``; a pyenv root holding this Python as two patch levels, and a
    PyPy that must be ignored."""
    minor = HERE[1]
    path = tmp_path / "bin"
    executable(path / f"python3.{minor}", "#!/bin/sh\necho 'pyenv: command not found' >&2\nexit 127\n")
    executable(path / "python3.19", "#!/bin/sh\necho CPython 3 19\n")
    root = tmp_path / "pyenv"
    wrapper(root / "versions" / f"3.{minor}.1" / "bin" / f"python3.{minor}")
    newest = wrapper(root / "versions" / f"3.{minor}.12" / "bin" / f"python3.{minor}")
    wrapper(root / "versions" / f"pypy3.{minor}-7.3.17" / "bin" / f"python3.{minor}")
    wrapper(root / "versions" / f"3.{minor}.99t" / "bin" / f"python3.{minor}")  # free-threaded build
    environ = {"PATH": str(path), "PYENV_ROOT": str(root), "HOME": str(tmp_path / "home")}
    return {"environ": environ, "newest": str(newest), "path": path, "root": root}


def test_pythons_are_found_on_path_and_in_pyenv(tool: ModuleType, machine: dict[str, Any]) -> None:
    found = tool.find_pythons(machine["environ"])
    assert found == {HERE: machine["newest"], (3, 19): str(machine["path"] / "python3.19")}


def test_the_result_json_becomes_one_line_per_environment(tool: ModuleType, tmp_path: Path) -> None:
    result = tmp_path / "result.json"
    result.write_text(json.dumps(RESULT))
    roots = [Path("/opt/pyenv")]
    results = {r.name: r for r in tool.read_results(result, {(3, 11): "/usr/bin/python3.11"}, roots)}
    assert set(results) == {"py311-core", "py399-kvm", "lint", "type"}, "unselected environments are left out"
    assert (results["py311-core"].status, results["py311-core"].seconds) == ("OK", 61.5)
    assert results["py399-kvm"].status == "NOT RUN"
    assert results["py399-kvm"].detail == (
        "no Python 3.99 on PATH and in pyenv (/opt/pyenv/versions): install it (e.g. `pyenv install 3.99`)"
    )
    assert results["lint"].status == "FAIL"
    assert results["lint"].detail == "`ruff check .` exited 1"
    assert results["type"].detail == "exit code 2"


RESULT: dict[str, Any] = {
    "testenvs": {
        "py311-core": {"python": {}, "result": {"success": True, "exit_code": 0, "duration": 61.5, "skipped": False}},
        "py399-kvm": {"result": {"success": True, "exit_code": 0, "duration": 0.4, "skipped": True}},
        "lint": {
            "python": {},
            "result": {"success": False, "exit_code": 1, "duration": 1.0, "skipped": False},
            "setup": [],
            "test": [{"command": ["ruff", "check", "."], "retcode": 1}, {"command": ["ruff"], "retcode": 0}],
        },
        "type": {"python": {}, "result": {"success": False, "exit_code": 2, "duration": 1.0, "skipped": False}},
        "example": {},  # not selected with -e
        ".pkg": {"result": {"success": True, "exit_code": 0, "duration": 1.0, "skipped": False}},
    }
}


def run_tool(
    tmp_path: Path, machine: dict[str, Any], envs: dict[str, Any], *args: str, **env: str
) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    fake = tmp_path / "fake"
    (fake / "tox").mkdir(parents=True, exist_ok=True)
    (fake / "tox" / "__init__.py").write_text("")
    (fake / "tox" / "__main__.py").write_text(FAKE_TOX)
    (tmp_path / "result.json").write_text(json.dumps({"testenvs": envs}))
    log = tmp_path / "tox.log"
    log.write_text("")
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("TOX_", "PYENV", "PYTHON"))}
    environ.update(machine["environ"])
    environ.update(PYTHONPATH=str(fake), FAKE_TOX_LOG=str(log), FAKE_TOX_RESULT=str(tmp_path / "result.json"), **env)
    done = subprocess.run(
        [sys.executable, str(TOOL), *args], env=environ, capture_output=True, text=True, timeout=120, check=False
    )
    return done, [json.loads(line) for line in log.read_text().splitlines()]


def ok(seconds: float = 1.0) -> dict[str, Any]:
    return {"python": {}, "result": {"success": True, "exit_code": 0, "duration": seconds, "skipped": False}}


SKIPPED = {"result": {"success": True, "exit_code": 0, "duration": 0.1, "skipped": True}}


def test_a_run_with_environments_not_run_passes_and_names_them_last(
    tool: ModuleType, tmp_path: Path, machine: dict[str, Any]
) -> None:
    envs = {f"py3{HERE[1]}-core": ok(75), "py399-core": SKIPPED, "lint": ok()}
    done, calls = run_tool(tmp_path, machine, envs, "-e", "x,y", "--", "-k", "halt")
    assert done.returncode == 0, done.stdout + done.stderr
    run = calls[-1]
    assert run[:2] == ["run", "-c"] and "--result-json" in run
    discover = run.index("--discover")
    assert run[discover + 1 : discover + 3] == [machine["newest"], str(machine["path"] / "python3.19")]
    assert run[-5:] == ["-e", "x,y", "--", "-k", "halt"], "tox's and pytest's arguments pass through"
    assert "--skip-missing-interpreters" not in run
    assert "--recreate" in run, "a reused environment tests the pyvmm of an earlier run"
    lines = done.stdout.splitlines()
    tail = lines[lines.index(next(line for line in lines if "what ran and what did not" in line)) :]
    assert re.fullmatch(rf"OK +py3{HERE[1]}-core +\(1m15s\)", tail[1])
    assert re.fullmatch(r"NOT RUN +py399-core +no Python 3.99 on PATH and in pyenv \(.*\): install it.*", tail[2])
    assert re.fullmatch(r"OK +lint +\(1s\)", tail[3])
    # the fake PATH has no dtc, no assemblers: those tests are named, with their package
    assert any(line.startswith("NOT RUN  no dtc: ") and "apt-get install device-tree-compiler" in line for line in tail)
    assert tail[-3].startswith("NOT RUN: 1 environment(s) and ")
    assert re.fullmatch(r"test_all: 2 passed, 0 failed, \d+ skipped", tail[-1])


def test_a_failure_fails_the_run(tool: ModuleType, tmp_path: Path, machine: dict[str, Any]) -> None:
    envs = {"lint": RESULT["testenvs"]["lint"], "type": ok()}
    done, _ = run_tool(tmp_path, machine, envs, FAKE_TOX_STATUS="1")
    assert done.returncode == 1
    assert re.search(r"^FAIL +lint +\(1s\) +`ruff check \.` exited 1$", done.stdout, re.M)
    assert re.search(r"^test_all: 1 passed, 1 failed, \d+ skipped$", done.stdout.splitlines()[-1])


def test_strict_fails_what_could_not_run(tool: ModuleType, tmp_path: Path, machine: dict[str, Any]) -> None:
    """CI's setting: tox is told not to skip, and a missing Python or tool is a failure."""
    envs = {f"py3{HERE[1]}-core": ok(), "py399-core": SKIPPED}
    done, calls = run_tool(tmp_path, machine, envs, "--reuse", TOX_SKIP_MISSING_INTERPRETERS="false")
    assert done.returncode == 1, done.stdout
    assert "--recreate" not in calls[-1]
    assert calls[-1][calls[-1].index("--skip-missing-interpreters") + 1] == "false"
    assert re.search(r"^FAIL     no dtc: .*apt-get install device-tree-compiler$", done.stdout, re.M)
    assert re.search(r"^FAIL +py399-core +no Python 3.99 ", done.stdout, re.M)
    assert re.fullmatch(r"test_all: 1 passed, [2-9]\d* failed, 0 skipped", done.stdout.splitlines()[-1])
    assert "NOT RUN:" not in done.stdout


def test_no_tox_is_a_clear_error(tmp_path: Path, machine: dict[str, Any]) -> None:
    no_tox = tmp_path / "no-tox"
    (no_tox / "tox").mkdir(parents=True)
    (no_tox / "tox" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'tox'\")\n")
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("TOX_", "PYTHON"))}
    environ.update(machine["environ"], PYTHONPATH=str(no_tox))
    done = subprocess.run(
        [sys.executable, str(TOOL)], env=environ, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert done.stdout.startswith("test_all: tox is not installed for ")
    assert "-m pip install 'tox>=4.20'" in done.stdout


def test_readme_ci_and_tool_agree(tool: ModuleType) -> None:
    """The README's test command is what CI runs; the system packages the tool
    checks for are the ones the README names and CI installs."""
    readme = (REPO / "README.md").read_text()
    command = next(line.strip() for line in readme.splitlines() if "tools/test_all.py" in line and "pip" in line)
    assert command == "python3 -m pip install 'tox>=4.20' && python3 tools/test_all.py"
    ci = (REPO / ".ci" / "run").read_text()
    assert command in ci.splitlines()
    assert "$(python3 tools/test_all.py --apt-packages)" in ci
    apt_line = next(line for line in readme.splitlines() if line.strip().startswith("apt-get install"))
    named = set(apt_line.split()[2:])
    every = {package for need in tool.NEEDS for package in need.packages.split()}
    assert named == every, "the README names every package of tools/test_all.py's NEEDS"
    assert set(tool.apt_packages()) <= every


def test_stale_builds_are_removed(tool: ModuleType, tmp_path: Path) -> None:
    """setuptools reuses build/lib: a module deleted from the sources would still be
    installed into a tox environment and tested."""
    for project in ("core", "plugins/pyvmm-a", "examples/pyvmm-b"):
        (tmp_path / project / "build" / "lib" / "pkg").mkdir(parents=True)
        (tmp_path / project / "build" / "lib" / "pkg" / "deleted_module.py").write_text("")
        (tmp_path / project / "pyproject.toml").write_text("")
    (tmp_path / "docs" / "build").mkdir(parents=True)  # not a project: left alone
    assert tool.remove_stale_builds(tmp_path) == ["core", "plugins/pyvmm-a", "examples/pyvmm-b"]
    assert sorted(tmp_path.glob("**/build")) == [tmp_path / "docs" / "build"]
    assert tool.remove_stale_builds(tmp_path) == []
