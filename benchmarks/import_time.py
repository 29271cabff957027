"""How much ``import pyvmm`` adds to interpreter start-up.

Runs ``python -c pass`` and ``python -c "import pyvmm"`` alternately in fresh
subprocesses of this same interpreter, keeps the best wall time of each, and
prints both, the difference and the ratio.  Not a test: no thresholds.

    python benchmarks/import_time.py [-n RUNS]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

CASES = {
    "python -c pass": "pass",
    "python -c 'import pyvmm'": "import pyvmm",
}


def wall_time(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--runs", type=int, default=20, help="runs of each command (best one counts)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    for code in CASES.values():  # warm the OS caches and the bytecode cache
        wall_time(code)
    best = dict.fromkeys(CASES, float("inf"))
    for _ in range(args.runs):
        for label, code in CASES.items():  # interleaved, so drift hits both alike
            best[label] = min(best[label], wall_time(code))

    base, with_pyvmm = best.values()
    print(f"interpreter: {sys.executable} ({sys.version.split()[0]}), best of {args.runs}")
    for label, seconds in best.items():
        print(f"  {label:<28} {seconds * 1e3:8.2f} ms")
    print(f"  {'import pyvmm adds':<28} {(with_pyvmm - base) * 1e3:8.2f} ms  (ratio {with_pyvmm / base:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
