"""Run kvm-unit-tests' x86 test kernels under ``pyvmm run`` and compare with QEMU.

The test kernels are built elsewhere (pyvmm ships none of their code or
binaries); point ``--kut-dir`` at a built kvm-unit-tests tree.  Each entry of
``x86/unittests.cfg`` is run the way the upstream runner would run it under
QEMU (its ``smp``, ``test_args``, ``-m`` and ``timeout``), and its exit status is
mapped as the upstream runner maps QEMU's (``scripts/runtime.bash``): 1 is PASS,
77 is SKIP, anything else FAIL.  With ``--qemu-log`` (the output of
``./run_tests.sh`` under QEMU on the same machine) the two results are printed
side by side.

    python tools/kvm_unit_tests.py --kut-dir /path/to/kvm-unit-tests [--qemu-log LOG] [TEST ...]
"""

from __future__ import annotations

import argparse
import configparser
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;]*m")
RESULT_LINE = re.compile(r"^(PASS|FAIL|SKIP)\s+(\S+)\s*(.*)$")


@dataclass
class Entry:
    name: str
    file: str
    smp: int
    args: str
    memory_mib: int | None
    timeout: float
    manual: bool
    arch: str
    checks: list[tuple[str, str]]


@dataclass
class Outcome:
    status: str
    detail: str
    seconds: float


def _path_and_value(check: str) -> tuple[str, str]:
    path, value = check.split("=", 1)
    return path, value


def read_config(path: Path) -> list[Entry]:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.read_string(path.read_text())
    entries = []
    for name in parser.sections():
        section = parser[name]
        params = shlex.split(section.get("qemu_params", "") + " " + section.get("extra_params", ""))
        memory = None
        if "-m" in params:  # QEMU sizes: MiB unless suffixed (e.g. "4g")
            size = re.fullmatch(r"(\d+)([kKmMgG]?)", params[params.index("-m") + 1])
            if size:
                scale = {"": 1, "m": 1, "g": 1024, "k": 1 / 1024}[size.group(2).lower()]
                memory = int(int(size.group(1)) * scale) or None
        timeout = section.get("timeout", "90").rstrip("s")
        entries.append(
            Entry(
                name=name,
                file=section["file"],
                smp=int(section.get("smp", "1").split()[0]) if section.get("smp", "1").split()[0].isdigit() else 1,
                args=section.get("test_args", "").strip("'\""),
                memory_mib=memory,
                timeout=float(timeout),
                manual="nodefault" in section.get("groups", ""),
                arch=section.get("arch", "x86_64"),
                checks=[_path_and_value(c) for c in section.get("check", "").split() if "=" in c],
            )
        )
    return entries


def run_pyvmm(kut: Path, entry: Entry, python: str) -> Outcome:
    kernel = kut / "x86" / entry.file
    if entry.arch != "x86_64":
        return Outcome("SKIP", f"{entry.arch} only", 0.0)
    if entry.manual:
        return Outcome("SKIP", "marked as manual run only", 0.0)
    for path, wanted in entry.checks:  # host settings the test needs, as the upstream runner checks them
        have = Path(path).read_text().strip() if Path(path).exists() else None
        if have != wanted:
            return Outcome("SKIP", f"{path} not equal to {wanted}", 0.0)
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as serial:
        command = [python, "-m", "pyvmm", "run", "--kernel", str(kernel), "--cpus", str(entry.smp)]
        command += ["--timeout", str(entry.timeout), "--serial", serial.name]
        command += ["--memory", f"{entry.memory_mib or 128}M"]
        command += ["--testdev"]  # the upstream runner always adds QEMU's pc-testdev
        if entry.args:
            command += ["--append", entry.args]
        started = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        seconds = time.monotonic() - started
        output = Path(serial.name).read_text(errors="replace")
    summary = [line for line in output.splitlines() if line.startswith("SUMMARY:")]
    detail = summary[-1][len("SUMMARY:") :].strip() if summary else ""
    if done.returncode == 1:
        return Outcome("PASS", detail, seconds)
    if done.returncode == 77:
        return Outcome("SKIP", detail, seconds)
    reason = {124: "timeout", 130: "interrupted"}.get(done.returncode, f"status {done.returncode}")
    error = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    return Outcome("FAIL", f"{reason}; {detail or error}"[:90], seconds)


def read_qemu_log(path: Path) -> dict[str, tuple[str, str]]:
    results = {}
    for line in path.read_text().splitlines():
        match = RESULT_LINE.match(ANSI.sub("", line).strip())
        if match:
            results[match.group(2)] = (match.group(1), match.group(3).strip("() "))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kut-dir", type=Path, required=True, help="a built kvm-unit-tests tree")
    parser.add_argument("--qemu-log", type=Path, action="append", default=[], help="run_tests.sh output under QEMU")
    parser.add_argument("--python", default=sys.executable, help="the Python that has pyvmm installed")
    parser.add_argument("tests", nargs="*", help="only these cfg entries")
    args = parser.parse_args()
    entries = read_config(args.kut_dir / "x86" / "unittests.cfg")
    if args.tests:
        entries = [e for e in entries if e.name in args.tests]
    qemu: dict[str, tuple[str, str]] = {}
    for log in args.qemu_log:  # later logs (re-runs) override earlier ones
        qemu.update(read_qemu_log(log))
    print(f"{'test':44} {'QEMU':5} {'pyvmm':5} {'secs':>6}  pyvmm detail")
    agree = qemu_passes = both_pass = 0
    for entry in entries:
        ours = run_pyvmm(args.kut_dir, entry, args.python)
        theirs = qemu.get(entry.name, ("-", ""))[0]
        qemu_passes += theirs == "PASS"
        both_pass += theirs == "PASS" and ours.status == "PASS"
        agree += theirs == ours.status
        print(f"{entry.name:44} {theirs:5} {ours.status:5} {ours.seconds:6.1f}  {ours.detail}", flush=True)
    if qemu:
        print(f"QEMU passes {qemu_passes}; pyvmm passes {both_pass} of those; same status on {agree} of {len(entries)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
