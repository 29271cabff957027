"""kvm-unit-tests' ``vmexit`` test kernel under pyvmm and under QEMU, side by side.

``x86/vmexit.flat`` times each exit kind in guest TSC cycles and prints
``<test> <cycles>``.  This runs the same kernel with the same test arguments
under ``pyvmm run`` and under ``qemu-system-x86_64`` (KVM, the devices the
upstream runner adds: pc-testdev, isa-debug-exit, pci-testdev), in interleaved
rounds, and prints the median cycles of each and pyvmm's ratio to QEMU.
``inl_from_pmtimer`` is the exit that reaches the VMM's own device code (the
ACPI PM timer port); ``cpuid`` and ``inl_from_kernel`` stay in the kernel and
show the floor both share.  pyvmm runs once on each of pyvmm-kvm's exit paths:
``compiled`` (``pyvmm_kvm._fast_exits``, which answers the PM timer as a served
register without returning to Python) and ``pure`` (``PYVMM_KVM_PURE_EXITS=1``).

The test kernels are built elsewhere (pyvmm ships none of their code): point
``--kut-dir`` at a built kvm-unit-tests tree (``./configure && make``).  Not a
test: it prints, it never fails on a number.

    python benchmarks/bench_kut_vmexit.py --kut-dir DIR [--rounds N] [TEST ...]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_TESTS = ("inl_from_pmtimer", "inl_from_kernel", "cpuid")
TIMEOUT = 120


def cycles(output: str, test: str) -> int:
    match = re.search(rf"^{re.escape(test)} (\d+)\s*$", output, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no '{test} <cycles>' line in the output:\n{output[-2000:]}")
    return int(match.group(1))


#: pyvmm-kvm's exit paths, as the environment that selects each.
PATHS = {"compiled": "0", "pure": "1"}


def under_pyvmm(kernel: Path, test: str, path: str) -> int:
    env = dict(os.environ, PYVMM_KVM_PURE_EXITS=PATHS[path])
    with tempfile.TemporaryDirectory(prefix="kut-") as scratch:
        serial = Path(scratch) / "serial.log"
        command = [sys.executable, "-m", "pyvmm", "run", "-q", "--kernel", str(kernel), "--append", test]
        command += ["--testdev", "--serial", str(serial), "--memory", "128M", "--timeout", str(TIMEOUT)]
        subprocess.run(command, capture_output=True, check=False, timeout=TIMEOUT + 30, env=env)
        return cycles(serial.read_text(errors="replace"), test)


def under_qemu(qemu: str, kernel: Path, test: str) -> int:
    command = [qemu, "-enable-kvm", "-machine", "pc,accel=kvm", "-nodefaults", "-vnc", "none", "-serial", "stdio"]
    command += ["-device", "pc-testdev", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4"]
    command += ["-device", "pci-testdev", "-m", "128", "-kernel", str(kernel), "-append", test]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=TIMEOUT)
    return cycles(done.stdout, test)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kut-dir", type=Path, required=True, help="a built kvm-unit-tests tree")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--qemu", default=shutil.which("qemu-system-x86_64") or "qemu-system-x86_64")
    parser.add_argument("tests", nargs="*", default=DEFAULT_TESTS)
    args = parser.parse_args(argv)
    kernel = args.kut_dir / "x86" / "vmexit.flat"
    if not kernel.is_file():
        parser.error(f"{kernel} does not exist: build kvm-unit-tests first")
    samples: dict[str, dict[str, list[int]]] = {t: {"qemu": [], **{p: [] for p in PATHS}} for t in args.tests}
    for _ in range(args.rounds):
        for test in args.tests:
            samples[test]["qemu"].append(under_qemu(args.qemu, kernel, test))
            for path in PATHS:
                samples[test][path].append(under_pyvmm(kernel, test, path))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"vmexit.flat, median cycles of {args.rounds} interleaved rounds (load {load:.2f})")
    print(f"{'test':<20} {'QEMU':>10} {'compiled':>10} {'pure':>10} {'compiled/QEMU':>14} {'pure/QEMU':>10}")
    for test in args.tests:
        qemu, compiled, pure = (statistics.median(samples[test][k]) for k in ("qemu", *PATHS))
        print(f"{test:<20} {qemu:10.0f} {compiled:10.0f} {pure:10.0f} {compiled / qemu:13.2f}x {pure / qemu:9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
