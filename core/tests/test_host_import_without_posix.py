"""``import pyvmm`` and every module of core import on a host without the POSIX-only
calls (issue 9, point 4): HAXM and WHPX run on Windows, and core must load there.

One subprocess deletes what Windows lacks (``os.eventfd`` and ``os.EFD_*``,
``os.sched_*``, ``mmap.MAP_NORESERVE``, ``signal.SIGRTMIN``/``SIGRTMAX``,
``signal.pthread_kill``; the ``fcntl``, ``termios``, ``resource``, ``pty``,
``tty``, ``grp`` and ``pwd`` modules), sets ``sys.platform = "win32"``, then
imports ``pyvmm`` and each module of the package in turn and reports each outcome;
each module is one test case here, so a failure names the module.

Only third-party and standard-library state is prepared under the real platform
first (sysconfig's cached variables, which the stdlib would otherwise look up
for "win32" and not find): pyvmm's own code all runs under the fake one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import pyvmm

#: Modules that need an optional dependency may be skipped when it is absent.
OPTIONAL_DEPENDENCIES = ("unicorn",)
#: Not importable as a library: running it is the CLI.
SCRIPTS = {"pyvmm.__main__"}

PROBE = r"""
import importlib, json, mmap, os, signal, sys, sysconfig, traceback

sysconfig.get_config_vars()  # stdlib state, cached under the real platform
# Standard-library modules that pick their Windows half at import when
# sys.platform says "win32" (Python 3.13's shutil imports _winapi, which real
# Windows has): loaded under the real platform, as they would be there.
import importlib.metadata, shutil, subprocess, tempfile, zipfile  # noqa: E401
for name in [n for n in dir(os) if n.startswith(("eventfd", "EFD_", "sched_"))]:
    delattr(os, name)
for module, names in ((mmap, ("MAP_NORESERVE",)), (signal, ("SIGRTMIN", "SIGRTMAX", "pthread_kill"))):
    for name in names:
        if hasattr(module, name):
            delattr(module, name)
for name in ("fcntl", "termios", "resource", "pty", "tty", "grp", "pwd"):
    sys.modules[name] = None  # "import fcntl" now raises ImportError, as on Windows
sys.platform = "win32"

modules, optional = json.loads(sys.stdin.read())
results = {}
import pyvmm
import pyvmm.host
results["pyvmm"] = "ok"
results["default event"] = pyvmm.host.default_event_class().__name__
for name in modules:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing in optional and missing not in sys.modules:
            results[name] = "skip: needs " + missing
        else:
            results[name] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    except BaseException as exc:
        results[name] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-3:]).strip()
    else:
        results[name] = "ok"
print(json.dumps(results))
"""


def _core_modules() -> list[str]:
    """Every module of the pyvmm package, from the files (nothing imported here)."""
    root = Path(pyvmm.__file__).parent
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        if name not in SCRIPTS:
            names.append(name)
    return names


MODULES = _core_modules()


@pytest.fixture(scope="module")
def outcomes() -> dict[str, str]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        input=json.dumps([MODULES, OPTIONAL_DEPENDENCIES]),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"the probe itself failed (import pyvmm?):\n{result.stderr}"
    outcomes: dict[str, str] = json.loads(result.stdout.strip().splitlines()[-1])
    return outcomes


def test_import_pyvmm(outcomes: dict[str, str]) -> None:
    assert outcomes["pyvmm"] == "ok"
    assert outcomes["default event"] == "Win32Event"  # chosen at call time, not at import


def test_the_module_list_covers_the_package() -> None:
    assert "pyvmm.host.event" in MODULES
    assert "pyvmm.memory" in MODULES
    assert len(MODULES) > 40


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_without_posix_only_calls(outcomes: dict[str, str], module: str) -> None:
    outcome = outcomes[module]
    if outcome.startswith("skip:"):
        pytest.skip(outcome)
    assert outcome == "ok", f"{module} needs a POSIX-only call at import time:\n{outcome}"
