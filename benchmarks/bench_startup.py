"""Start-up wall time of the ``pyvmm`` commands, as ratios to ``python -c pass``.

Each command runs in a fresh subprocess of this interpreter; rounds are
interleaved (one of each command per round, so a noisy neighbour hits all of
them alike) and the median and best of the rounds are printed, with each
command's median as a ratio to the median of ``python -c pass``, and its best
as a ratio to the best of ``python -c pass``.

The children run with bytecode caching on, in a private cache directory
(``PYTHONPYCACHEPREFIX``), whatever ``PYTHONDONTWRITEBYTECODE`` says here: an
installed pyvmm has its bytecode compiled, and compiling every module on every
start would measure the compiler, not pyvmm.  A warm-up run fills that cache and
the cffi declaration cache (:mod:`pyvmm.backend.ffi_cache`); the
``PYVMM_FFI_CACHE=off`` rows show what the declarations cost when parsed in
every process, as all of them were before the cache.

After the times, one line per command says which of the costly modules it
imported (pydantic, pluggy, cffi, pycparser, importlib.metadata, the software
CPU, each plugin's modules beyond its manifest), from one ``-X importtime`` run:
what the figures above are made of.  ``core/tests/test_cli_startup.py`` asserts
what ``pyvmm backends`` may import; this only reports.

``--baseline-python`` measures the same commands run by another interpreter --
a venv with another pyvmm installed, say the one before a change -- in the same
rounds, as ``baseline:`` rows (``--baseline`` does it for another checkout's
sources on ``PYTHONPATH``, which works while both use the same entry points).

Not a test: it prints, it never fails on a number.

    python benchmarks/bench_startup.py [--rounds N] [--backend NAME] [--baseline SRC ...]
        [--baseline-python PYTHON]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    label: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()


def cases(backend: str, baseline: tuple[str, ...], baseline_python: str | None = None) -> list[Case]:
    python = sys.executable
    pyvmm = (python, "-m", "pyvmm")
    # The same commands run from another checkout's sources (PYTHONPATH comes
    # before the editable installs), measured in the same rounds.
    base_env = (("PYTHONPATH", os.pathsep.join(baseline)), ("PYVMM_FFI_CACHE", "off"))
    compared = (
        [
            Case("baseline: pyvmm backends", (*pyvmm, "backends"), base_env),
            Case(f"baseline: pyvmm run --backend {backend}", (*pyvmm, "run", "-q", "--backend", backend), base_env),
            Case("baseline: pyvmm run (best available)", (*pyvmm, "run", "-q"), base_env),
        ]
        if baseline
        else []
    )
    if baseline_python is not None:
        other = (baseline_python, "-m", "pyvmm")
        compared += [
            Case("baseline: python -c pass", (baseline_python, "-c", "pass")),
            Case("baseline: pyvmm backends", (*other, "backends")),
            Case(f"baseline: pyvmm run --backend {backend} (demo)", (*other, "run", "-q", "--backend", backend)),
            Case("baseline: pyvmm run (demo, best available)", (*other, "run", "-q")),
        ]
    return [
        Case("python -c pass", (python, "-c", "pass")),
        Case("python -c 'import pyvmm'", (python, "-c", "import pyvmm")),
        # What any command that validates a manifest or a config pays before
        # pyvmm's own code: importing pydantic and building one model.
        Case(
            "floor: pydantic + one model",
            (python, "-c", "from pydantic import BaseModel\nclass M(BaseModel):\n    x: int = 0\nM(x=1)"),
        ),
        Case("pyvmm backends", (*pyvmm, "backends")),
        Case(f"pyvmm run --backend {backend} (demo)", (*pyvmm, "run", "-q", "--backend", backend)),
        Case("pyvmm run (demo, best available)", (*pyvmm, "run", "-q")),
        Case("pyvmm backends, PYVMM_FFI_CACHE=off", (*pyvmm, "backends"), (("PYVMM_FFI_CACHE", "off"),)),
        Case(
            f"pyvmm run --backend {backend}, PYVMM_FFI_CACHE=off",
            (*pyvmm, "run", "-q", "--backend", backend),
            (("PYVMM_FFI_CACHE", "off"),),
        ),
        *compared,
    ]


def wall_time(case: Case, env: dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(case.argv, env={**env, **dict(case.env)}, capture_output=True, check=False)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{case.label} failed ({result.returncode}): {result.stderr.decode(errors='replace')}")
    return elapsed


#: Modules whose presence says where a command's time goes (each with its submodules).
COSTLY = ("pydantic", "pluggy", "cffi", "pycparser", "importlib.metadata", "pyvmm.softcpu", "unicorn")
#: The modules of a plugin that reading its manifest imports.
PLUGIN_MANIFEST_MODULES = ("manifest", "host_arch")


def reported_name(module: str) -> str | None:
    """How :func:`costly_imports` reports an imported module: its entry of
    :data:`COSTLY`, itself when it is a plugin module beyond the manifest, else None."""
    for prefix in COSTLY:
        if module == prefix or module.startswith(prefix + "."):
            return prefix
    package, _, rest = module.partition(".")
    if package.startswith("pyvmm_") and rest and rest.split(".")[0] not in PLUGIN_MANIFEST_MODULES:
        return module
    return None


def costly_imports(case: Case, env: dict[str, str]) -> list[str]:
    """What ``case`` imports of :data:`COSTLY` and of plugins beyond their
    manifests, from one ``-X importtime`` run (its report is on stderr)."""
    argv = (case.argv[0], "-X", "importtime", *case.argv[1:])
    result = subprocess.run(argv, env={**env, **dict(case.env)}, capture_output=True, check=False)
    found: dict[str, None] = {}
    for line in result.stderr.decode(errors="replace").splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = reported_name(line.rsplit("|", 1)[1].strip())
            if name is not None:
                found[name] = None
    return list(found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (median and best printed)")
    parser.add_argument("--backend", default="kvm", help="backend for the pyvmm run rows (default kvm)")
    parser.add_argument(
        "--baseline",
        nargs="+",
        default=(),
        metavar="SRC",
        help="source directories of another checkout (its core/src and plugin src dirs): "
        "its commands are measured in the same rounds, as 'baseline:' rows",
    )
    parser.add_argument(
        "--baseline-python",
        metavar="PYTHON",
        help="another interpreter with pyvmm installed (another venv): its commands are measured in the same "
        "rounds, as 'baseline:' rows",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    pycache = tempfile.mkdtemp(prefix="pyvmm-bench-pycache-")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = pycache
    try:
        all_cases = cases(args.backend, tuple(args.baseline), args.baseline_python)
        for case in all_cases:  # warm-up: bytecode, the cffi cache, the OS caches
            wall_time(case, env)
        times: dict[str, list[float]] = {case.label: [] for case in all_cases}
        for _ in range(args.rounds):
            for case in all_cases:
                times[case.label].append(wall_time(case, env))
        imported = {case.label: costly_imports(case, env) for case in all_cases if "pyvmm" in case.label}
    finally:
        shutil.rmtree(pycache, ignore_errors=True)

    base = statistics.median(times[all_cases[0].label])
    base_best = min(times[all_cases[0].label])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"interpreter: {sys.executable} ({sys.version.split()[0]}); {args.rounds} interleaved rounds; load {load:.2f}"
    )
    # Both ratios: the medians', and the best runs' (the least disturbed by a
    # noisy neighbour, as import_time.py reports).
    print(f"  {'command':<50} {'median':>9} {'best':>9} {'ratio':>7} {'best ratio':>10}")
    for case in all_cases:
        runs = times[case.label]
        median, best = statistics.median(runs), min(runs)
        print(
            f"  {case.label:<50} {median * 1e3:6.1f} ms {best * 1e3:6.1f} ms {median / base:6.2f}x "
            f"{best / base_best:9.2f}x"
        )
    print("  imports (costly modules, and plugin modules beyond their manifests):")
    for label, modules in imported.items():
        print(f"  {label:<50} {', '.join(modules) or '(none)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
