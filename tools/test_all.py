"""Run every test environment of pyvmm, on every Python it can find, and say at
the end -- loudly -- what it could not run.

    python3 -m pip install 'tox>=4.20' && python3 tools/test_all.py [TOX OPTIONS] [-- PYTEST ARGS]

Why a script around tox: tox alone looks for ``python3.10``/``python3.13`` on
PATH only, where pyenv keeps them as shims that fail unless that version is
selected, so on a machine with one Python it skipped 6 of its 10 environments
and still ended with "congratulations".  This script

1. finds CPython 3.10 and newer on PATH (trying each one) and in pyenv's versions
   (``$PYENV_ROOT``, ``pyenv root``, ``~/.pyenv``) and hands them to tox
   (``--discover``), so every environment whose Python exists here runs;
2. runs tox (every environment of ``tox.ini``, or those selected with ``-e``),
   its output as it comes, and reads tox's JSON result.  The environments are
   created afresh (``--recreate``; ``--reuse`` skips that): tox installs the
   checkout's own packages only when it creates an environment, so a reused one
   tests the pyvmm of an earlier run), and the ``build/`` directories setuptools
   leaves next to the sources are removed first (it reuses them: a module deleted
   from the sources would still be installed and tested);
3. checks the system tools some tests need, which otherwise skip quietly inside
   a passing environment (the list is :data:`NEEDS`; ``--apt-packages`` prints
   the Debian packages, which ``.ci/run`` installs);
4. ends with one line per environment -- OK, FAIL, NOT RUN and why -- then one
   per missing tool with the package to install, then ``environments: N passed,
   N failed, N skipped``.

The exit status is 1 when an environment failed, else 0: what could not run is
named, not failed.  ``--strict`` (or ``TOX_SKIP_MISSING_INTERPRETERS=false``,
which CI sets) makes a missing Python or system tool a failure too.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: Python minor versions looked for: 3.10 (the lowest pyvmm supports) and up.
MINORS = range(10, 20)
ENV_STRICT = "TOX_SKIP_MISSING_INTERPRETERS"
#: The factors of tox environments that run pytest (lint and type do not).
TEST_FACTORS = frozenset({"core", "kvm", "gunyah", "whpx", "geniezone", "haxm", "all", "example"})


# --- Pythons ----------------------------------------------------------------------


def python_version(executable: str) -> tuple[int, int] | None:
    """(major, minor) of a CPython that runs, else None (a pyenv shim of a version
    that is not selected fails here)."""
    code = "import sys, platform; print(platform.python_implementation(), *sys.version_info[:2])"
    try:
        done = subprocess.run([executable, "-c", code], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    parts = done.stdout.split()
    if done.returncode != 0 or len(parts) != 3 or parts[0] != "CPython":
        return None
    return int(parts[1]), int(parts[2])


def pyenv_roots(environ: dict[str, str]) -> list[Path]:
    roots = []
    if environ.get("PYENV_ROOT"):
        roots.append(Path(environ["PYENV_ROOT"]))
    pyenv = shutil.which("pyenv", path=environ.get("PATH"))
    if pyenv:
        try:
            done = subprocess.run([pyenv, "root"], capture_output=True, text=True, timeout=30, check=False)
            if done.returncode == 0 and done.stdout.strip():
                roots.append(Path(done.stdout.strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    roots.append(Path(environ["HOME"]) / ".pyenv" if environ.get("HOME") else Path.home() / ".pyenv")
    unique: list[Path] = []
    for root in roots:
        if root not in unique:
            unique.append(root)
    return unique


def _patch_level(path: Path) -> tuple[int, ...]:
    """Version numbers of a pyenv version directory (``3.10.13`` -> (3, 10, 13))."""
    return tuple(int(n) for n in re.findall(r"\d+", path.name))


def find_pythons(environ: dict[str, str] | None = None) -> dict[tuple[int, int], str]:
    """The newest working CPython of each minor version from 3.10 on: from PATH
    first, then from pyenv's versions."""
    environ = dict(os.environ if environ is None else environ)
    found: dict[tuple[int, int], str] = {}
    for minor in MINORS:
        name = f"python3.{minor}"
        for directory in environ.get("PATH", "").split(os.pathsep):
            candidate = Path(directory or ".") / name
            if candidate.is_file() and os.access(candidate, os.X_OK) and python_version(str(candidate)) == (3, minor):
                found[(3, minor)] = str(candidate)
                break
    for root in pyenv_roots(environ):
        versions = root / "versions"
        for minor in MINORS:
            if (3, minor) in found:
                continue
            # CPython builds only: "3.10.13", not "pypy3.10-7.3", "3.13.0t" or "3.14-dev"
            candidates = [p for p in versions.glob(f"3.{minor}.*") if re.fullmatch(rf"3\.{minor}\.\d+", p.name)]
            for version in sorted(candidates, key=_patch_level, reverse=True):
                executable = version / "bin" / f"python3.{minor}"
                if python_version(str(executable)) == (3, minor):
                    found[(3, minor)] = str(executable)
                    break
    return found


def wanted_python(env: str) -> tuple[int, int] | None:
    """The Python a tox environment's ``py3N`` factor asks for."""
    for factor in env.split("-"):
        match = re.fullmatch(r"py3(\d+)", factor)
        if match:
            return 3, int(match.group(1))
    return None


# --- system tools -------------------------------------------------------------------


def _which_all(*tools: str) -> Callable[[], str | None]:
    def check() -> str | None:
        missing = [tool for tool in tools if shutil.which(tool) is None]
        return f"no {', '.join(missing)}" if missing else None

    return check


def _aarch64_binutils() -> str | None:
    if shutil.which("aarch64-linux-gnu-as") and shutil.which("aarch64-linux-gnu-objcopy"):
        return None
    if platform.machine() in ("aarch64", "arm64") and shutil.which("as") and shutil.which("objcopy"):
        return None
    return "no aarch64-linux-gnu-as/objcopy"


def _kvm_header() -> str | None:
    missing = _which_all("cc")()
    if missing:
        return missing
    return None if Path("/usr/include/linux/kvm.h").is_file() else "no /usr/include/linux/kvm.h"


def _debian_kernel() -> str | None:
    return None if glob.glob("/boot/vmlinuz-*-cloud-amd64") else "no /boot/vmlinuz-*-cloud-amd64"


def _dev_kvm() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm"
    return None if os.access("/dev/kvm", os.R_OK | os.W_OK) else "/dev/kvm is not readable and writable by this user"


@dataclass(frozen=True)
class Need:
    """Something outside Python that some tests need; without it they skip."""

    tests: str
    #: Factors of the tox environments whose tests use it.
    factors: frozenset[str]
    #: Debian packages that provide it ("" if no package does).
    packages: str
    #: How to get it when no package does.
    hint: str
    #: None when present, else what is missing.
    check: Callable[[], str | None]
    #: Host machines where it matters (empty: all).
    machines: tuple[str, ...] = ()

    def relevant(self, envs: Iterable[str]) -> bool:
        if self.machines and platform.machine() not in self.machines:
            return False
        return any(self.factors & set(env.split("-")) for env in envs)


NEEDS = (
    Need(
        "x86 guest programs assembled from their source",
        TEST_FACTORS,
        "binutils",
        "",
        _which_all("as", "ld", "objcopy"),
    ),
    Need(
        "aarch64 guest programs checked against their source",
        TEST_FACTORS,
        "binutils-aarch64-linux-gnu",
        "",
        _aarch64_binutils,
    ),
    Need(
        "device trees checked by dtc",
        frozenset({"core", "gunyah", "all"}),
        "device-tree-compiler",
        "",
        _which_all("dtc"),
    ),
    Need(
        "the gdb stub driven by a real gdb (x86_64) and gdb-multiarch (aarch64)",
        TEST_FACTORS,
        "gdb gdb-multiarch",
        "",
        _which_all("gdb", "gdb-multiarch"),
    ),
    Need(
        "KVM's bindings checked against <linux/kvm.h>", frozenset({"kvm", "all"}), "gcc linux-libc-dev", "", _kvm_header
    ),
    Need(
        "GenieZone's bindings compiled for arm64",
        frozenset({"geniezone", "all"}),
        "gcc-aarch64-linux-gnu",
        "",
        _which_all("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-objcopy"),
    ),
    Need(
        "KVM's arm64 bindings checked against the arm64 uapi",
        frozenset({"kvm", "all"}),
        "gcc-aarch64-linux-gnu",
        "",
        _which_all("aarch64-linux-gnu-gcc"),
    ),
    Need(
        "a stock Linux kernel booted under pyvmm on KVM",
        frozenset({"kvm"}),
        "linux-image-cloud-amd64",
        "",
        _debian_kernel,
        machines=("x86_64",),
    ),
    Need(
        "KVM's tests and the conformance suite on KVM",
        frozenset({"kvm", "all"}),
        "",
        "a Linux host with KVM (the kvm_intel or kvm_amd module, or nested virtualisation)",
        _dev_kvm,
    ),
    Need(
        "the arm64 test bed (real KVM in an emulated arm64 guest)",
        frozenset({"arm64"}),
        "qemu-system-arm",
        "",
        _which_all("qemu-system-aarch64"),
    ),
    Need(
        "the amd64 test bed (real kvm_amd in an emulated x86 guest)",
        frozenset({"amd"}),
        "qemu-system-x86",
        "",
        _which_all("qemu-system-x86_64"),
    ),
)


def apt_packages() -> list[str]:
    """The Debian packages of every need that matters on this machine."""
    packages: list[str] = []
    for need in NEEDS:
        if not need.machines or platform.machine() in need.machines:
            packages += [p for p in need.packages.split() if p not in packages]
    return packages


# --- tox ----------------------------------------------------------------------------


@dataclass
class EnvResult:
    name: str
    status: str  # "OK", "FAIL", "NOT RUN"
    detail: str
    seconds: float = 0.0


def _failing_command(data: dict[str, object]) -> str:
    for phase in ("setup", "test"):
        commands = data.get(phase)
        if not isinstance(commands, list):
            continue
        for command in commands:
            if isinstance(command, dict) and command.get("retcode") not in (0, None):
                argv = command.get("command")
                words = [str(word) for word in argv] if isinstance(argv, list) else [str(argv)]
                shown = " ".join([Path(words[0]).name, *words[1:]])  # the environment's own pytest, ruff, ...
                if len(shown) > 70:
                    shown = shown[:67] + "..."
                return f"`{shown}` exited {command.get('retcode')}"
    return ""


def read_results(path: Path, pythons: dict[tuple[int, int], str], roots: list[Path]) -> list[EnvResult]:
    data = json.loads(path.read_text())
    results = []
    looked = "on PATH and in pyenv (" + ", ".join(str(r / "versions") for r in roots) + ")"
    for name, env in data.get("testenvs", {}).items():
        result = env.get("result")
        if name.startswith(".") or not result:  # tox's packaging environments, or not selected
            continue
        seconds = float(result.get("duration", 0.0))
        wanted = wanted_python(name)
        no_python = ""
        if wanted is not None and wanted not in pythons and "python" not in env:
            version = f"{wanted[0]}.{wanted[1]}"
            no_python = f"no Python {version} {looked}: install it (e.g. `pyenv install {version}`)"
        if result.get("skipped"):
            results.append(EnvResult(name, "NOT RUN", no_python or "skipped by tox (see its output above)", seconds))
        elif result.get("success"):
            results.append(EnvResult(name, "OK", "", seconds))
        else:
            detail = no_python or _failing_command(env) or f"exit code {result.get('exit_code')}"
            results.append(EnvResult(name, "FAIL", detail, seconds))
    return results


def remove_stale_builds(repo: Path = REPO) -> list[str]:
    """Delete the ``build/`` directories setuptools leaves in the checkout's
    projects: pip builds them in place and setuptools reuses ``build/lib``, so a
    module deleted from the sources would still be installed into the tox
    environments and tested.  Returns the projects cleaned."""
    cleaned = []
    projects = [repo / "core", *sorted(repo.glob("plugins/*")), *sorted(repo.glob("examples/*"))]
    for project in projects:
        build = project / "build"
        if (project / "pyproject.toml").is_file() and build.is_dir() and not build.is_symlink():
            shutil.rmtree(build, ignore_errors=True)
            cleaned.append(str(project.relative_to(repo)))
    return cleaned


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--strict", action="store_true", help="a missing Python or system tool fails the run (CI)")
    parser.add_argument("--apt-packages", action="store_true", help="print the Debian packages full coverage needs")
    parser.add_argument("--pythons", action="store_true", help="print the Pythons found and exit")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="reuse the tox environments as they are (faster; they keep the pyvmm last installed into them)",
    )
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)  # pytest's arguments pass through untouched
    args, tox_args = parser.parse_known_args(argv[:split])
    tox_args += argv[split:]
    if args.apt_packages:
        print(" ".join(apt_packages()))
        return 0
    strict = args.strict or os.environ.get(ENV_STRICT, "").lower() == "false"
    pythons = find_pythons()
    roots = pyenv_roots(dict(os.environ))
    if args.pythons:
        for (major, minor), path in sorted(pythons.items()):
            print(f"{major}.{minor}  {path}")
        return 0
    if subprocess.run([sys.executable, "-m", "tox", "--version"], capture_output=True, check=False).returncode:
        print(f"test_all: tox is not installed for {sys.executable}: {sys.executable} -m pip install 'tox>=4.20'")
        return 2

    cleaned = remove_stale_builds()
    if cleaned:
        print(f"test_all: removed the stale build/ of {', '.join(cleaned)}")
    with tempfile.TemporaryDirectory(prefix="pyvmm-test-all-") as scratch:
        result_json = Path(scratch) / "tox-result.json"
        command = [sys.executable, "-m", "tox", "run", "-c", str(REPO / "tox.ini"), "--result-json", str(result_json)]
        if not args.reuse:  # tox installs the checkout's packages only when it creates an environment
            command.append("--recreate")
        if strict:
            command += ["--skip-missing-interpreters", "false"]
        if pythons:
            command += ["--discover", *(pythons[version] for version in sorted(pythons))]
        command += tox_args
        print("test_all: Pythons found: " + (", ".join(f"{v[0]}.{v[1]}" for v in sorted(pythons)) or "none"))
        print("test_all: " + " ".join(command), flush=True)
        try:
            tox = subprocess.run(command, cwd=REPO, check=False)
        except KeyboardInterrupt:
            print("\ntest_all: interrupted")
            return 130
        results = read_results(result_json, pythons, roots) if result_json.is_file() else []

    names = [r.name for r in results]
    missing = [(need, what) for need in NEEDS if need.relevant(names) and (what := need.check()) is not None]

    print()
    print(" pyvmm: what ran and what did not ".center(88, "="))
    width = max([len(n) for n in names] + [12])
    for result in results:
        when = f"({_duration(result.seconds)})" if result.status != "NOT RUN" else ""
        label = "FAIL" if strict and result.status == "NOT RUN" else result.status
        line = f"{label:8} {result.name:{width}} {when:8} {result.detail}".rstrip()
        print(line)
    if not results:
        print(f"FAIL     tox stopped before reporting any environment (exit code {tox.returncode}): see above")
    for need, what in missing:
        how = f"apt-get install {need.packages}" if need.packages else need.hint
        label = "FAIL" if strict else "NOT RUN"
        print(f"{label:8} {what}: {need.tests} did not run -- {how}")

    not_run = [r for r in results if r.status == "NOT RUN"]
    failed = [r for r in results if r.status == "FAIL"]
    passed = len(results) - len(not_run) - len(failed)
    if strict:  # CI: a Python or a tool it lacks is a failure, never a skip
        failures, skips = len(failed) + len(not_run) + len(missing), 0
    else:
        failures, skips = len(failed), len(not_run) + len(missing)
    if skips:
        print()
        print(f"NOT RUN: {len(not_run)} environment(s) and {len(missing)} group(s) of tests, listed above: install")
        print("what they name and run again for full coverage (CI runs everything).")
    # Environments, and groups of tests that need a system tool, counted together.
    print(f"test_all: {passed} passed, {failures} failed, {skips} skipped")
    return 1 if failures or not results or tox.returncode else 0


if __name__ == "__main__":
    sys.exit(main())
