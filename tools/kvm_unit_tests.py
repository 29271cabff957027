"""Run kvm-unit-tests' x86 test kernels under ``pyvmm run`` and compare with QEMU.

The test kernels are built elsewhere (pyvmm ships none of their code or
binaries); point ``--kut-dir`` at a built kvm-unit-tests tree.  Each entry of
``x86/unittests.cfg`` is run the way the upstream runner would run it under
QEMU, and its result is decided as the upstream runner decides QEMU's
(``scripts/arch-run.bash`` ``run_qemu`` and ``scripts/runtime.bash`` ``run``):

* status 1 (the test wrote 0 to the debug-exit port) is PASS only if pyvmm wrote
  nothing to stderr but lines that say "warning" (pyvmm runs with
  ``PYVMM_LOG=warning``); with any other stderr (a traceback, "No module named
  pyvmm", an error message) it is FAIL;
* 77 is SKIP; 0 (the guest stopped without writing a result) is FAIL; 124 is a
  timeout; a signal is FAIL naming it; anything else is FAIL.

The entry's options are applied where pyvmm has them: ``smp``, ``-smp``, ``-m``,
``-append``/``test_args``, ``-initrd``, and ``-cpu`` when its model is ``host`` or
``max`` (pyvmm's vCPUs get the hypervisor's whole CPUID, as QEMU's ``-cpu host``):
``-feature`` removals of the features in :data:`FEATURES` become CPUID overrides in
a machine file, ``+feature`` is what ``host`` already gives where the hypervisor
supports it (as QEMU, which drops an unsupported one with a warning), and
``vendor=`` sets the vendor string.  Everything else -- another CPU model
(``qemu64``, ``IvyBridge``), ``phys-bits``, Hyper-V flags, ``-machine`` options
such as ``kernel_irqchip=split``, extra ``-device``s, ``accel = tcg`` -- pyvmm
does not apply: the entry still runs, marked ``*`` with the options named, and
is counted apart from the comparable ones (``--skip-different`` skips it
instead).  An entry without ``-cpu`` runs on QEMU's default model (``qemu64``)
upstream and on the hypervisor's CPUID here; that one difference is not marked.

With ``--qemu-log`` (the output of ``./run_tests.sh`` under QEMU on the same
machine) the two results are printed side by side.  The exit status is 1 if any
entry FAILed under pyvmm, else 0.

    python tools/kvm_unit_tests.py --kut-dir /path/to/kvm-unit-tests [--qemu-log LOG] [TEST ...]
"""

from __future__ import annotations

import argparse
import configparser
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;]*m")
RESULT_LINE = re.compile(r"^(PASS|FAIL|SKIP)\s+(\S+)\s*(.*)$")
#: Seconds past an entry's timeout before a pyvmm that did not stop itself is killed.
GRACE = 30.0

#: CPU features a ``-cpu host/max,-NAME`` entry may remove: QEMU's name (``_``
#: and ``-`` are the same to QEMU) -> (CPUID leaf, subleaf, register, bit).
FEATURES: dict[str, tuple[int, int, str, int]] = {
    "sse3": (1, 0, "ecx", 0),
    "pclmulqdq": (1, 0, "ecx", 1),
    "monitor": (1, 0, "ecx", 3),
    "vmx": (1, 0, "ecx", 5),
    "ssse3": (1, 0, "ecx", 9),
    "fma": (1, 0, "ecx", 12),
    "cx16": (1, 0, "ecx", 13),
    "pdcm": (1, 0, "ecx", 15),
    "pcid": (1, 0, "ecx", 17),
    "sse4.1": (1, 0, "ecx", 19),
    "sse4.2": (1, 0, "ecx", 20),
    "x2apic": (1, 0, "ecx", 21),
    "movbe": (1, 0, "ecx", 22),
    "popcnt": (1, 0, "ecx", 23),
    "tsc-deadline": (1, 0, "ecx", 24),
    "aes": (1, 0, "ecx", 25),
    "xsave": (1, 0, "ecx", 26),
    "avx": (1, 0, "ecx", 28),
    "f16c": (1, 0, "ecx", 29),
    "rdrand": (1, 0, "ecx", 30),
    "fsgsbase": (7, 0, "ebx", 0),
    "tsc-adjust": (7, 0, "ebx", 1),
    "bmi1": (7, 0, "ebx", 3),
    "hle": (7, 0, "ebx", 4),
    "avx2": (7, 0, "ebx", 5),
    "smep": (7, 0, "ebx", 7),
    "bmi2": (7, 0, "ebx", 8),
    "erms": (7, 0, "ebx", 9),
    "invpcid": (7, 0, "ebx", 10),
    "rtm": (7, 0, "ebx", 11),
    "avx512f": (7, 0, "ebx", 16),
    "rdseed": (7, 0, "ebx", 18),
    "adx": (7, 0, "ebx", 19),
    "smap": (7, 0, "ebx", 20),
    "clflushopt": (7, 0, "ebx", 23),
    "clwb": (7, 0, "ebx", 24),
    "umip": (7, 0, "ecx", 2),
    "pku": (7, 0, "ecx", 3),
    "la57": (7, 0, "ecx", 16),
    "rdpid": (7, 0, "ecx", 22),
    "lahf-lm": (0x80000001, 0, "ecx", 0),
    "svm": (0x80000001, 0, "ecx", 2),
    "abm": (0x80000001, 0, "ecx", 5),
    "sse4a": (0x80000001, 0, "ecx", 6),
    "syscall": (0x80000001, 0, "edx", 11),
    "nx": (0x80000001, 0, "edx", 20),
    "pdpe1gb": (0x80000001, 0, "edx", 26),
    "rdtscp": (0x80000001, 0, "edx", 27),
    "lm": (0x80000001, 0, "edx", 29),
    "rdpru": (0x80000008, 0, "ebx", 4),
}
#: ``vendor=`` values: the 12-byte string in EBX, EDX, ECX of leaves 0 and 0x80000000.
VENDORS = ("GenuineIntel", "AuthenticAMD")
#: CPU models whose CPUID is the hypervisor's, as pyvmm's is.
HOST_MODELS = ("host", "max")
#: ``-cpu host/max`` properties that pyvmm's CPUID already satisfies.
HOST_PROPERTIES = ("migratable=no", "migratable=off", "host-phys-bits", "host-phys-bits=on")
#: QEMU options that change nothing for pyvmm (the runner's own, or pyvmm's default).
NEUTRAL_FLAGS = ("-enable-kvm", "-nodefaults", "-no-reboot", "--no-reboot", "-nographic")
NEUTRAL_VALUES = {
    "-machine": ("accel=kvm", "kernel_irqchip=on", "kernel-irqchip=on", "pc"),
    "-M": ("accel=kvm", "kernel_irqchip=on", "kernel-irqchip=on", "pc"),
    "-device": ("pc-testdev", "isa-debug-exit,iobase=0xf4,iosize=0x4", "isa-debug-exit"),
    "-vnc": ("none",),
    "-serial": ("stdio",),
}
#: QEMU options that take no value.
FLAGS = (*NEUTRAL_FLAGS, "-S", "-no-shutdown", "-no-hpet", "-no-acpi")


@dataclass
class Entry:
    name: str
    file: str
    smp: int
    params: list[str]
    timeout: float
    manual: bool
    arch: str
    checks: list[tuple[str, str]]
    accel: str = ""


@dataclass
class Plan:
    """How pyvmm runs an entry: the options it applies, and those it cannot."""

    cpus: int
    memory_mib: int | None = None
    append: str = ""
    initrd: str | None = None
    #: (leaf, subleaf, register) -> (mask, value) for the machine file.
    cpuid: dict[tuple[int, int, str], tuple[int, int]] = field(default_factory=dict)
    #: The entry's options pyvmm does not apply, as written.
    different: list[str] = field(default_factory=list)

    def machine_file(self) -> str:
        """A TOML machine file with the CPUID overrides ('' if there are none)."""
        lines = []
        for (leaf, subleaf, register), (mask, value) in sorted(self.cpuid.items()):
            lines += ["[[cpuid_overrides]]", f"function = {leaf:#x}", f"index = {subleaf}", f'register = "{register}"']
            lines += [f"mask = {mask:#010x}", f"value = {value:#010x}", ""]
        return "\n".join(lines)


@dataclass
class Outcome:
    status: str
    detail: str
    seconds: float
    different: list[str] = field(default_factory=list)


def _shell_words(text: str, max_smp: int) -> list[str]:
    """Words of a cfg value, as the upstream runner's ``eval`` splits them: quotes,
    and backticks and ``$VARS`` expanded by bash (globs are not expanded)."""
    text = " ".join(text.splitlines())  # a continuation line continues the value
    if not any(c in text for c in "`$"):
        return shlex.split(text)
    script = f'set -f; set -- {text}\nfor w; do printf "%s\\0" "$w"; done'
    env = {**os.environ, "MAX_SMP": str(max_smp)}
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60, check=True)
    return done.stdout.split("\0")[:-1]


def _seconds(text: str) -> float:
    """A GNU ``timeout`` duration: 90, 90s, 2m, 1h, 1d."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise ValueError(f"bad timeout {text!r}")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def _mib(text: str) -> int | None:
    """A QEMU ``-m`` size in MiB: MiB unless suffixed (``4g``, ``512M``)."""
    size = re.fullmatch(r"(\d+)([kKmMgG]?)", text)
    if not size:
        return None
    scale = {"": 1, "m": 1, "g": 1024, "k": 1 / 1024}[size.group(2).lower()]
    return int(int(size.group(1)) * scale) or None


def read_config(path: Path, max_smp: int | None = None) -> list[Entry]:
    max_smp = max_smp or os.cpu_count() or 1
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.read_string(path.read_text())
    entries = []
    for name in parser.sections():
        section = parser[name]
        params = _shell_words(section.get("qemu_params", "") + " " + section.get("extra_params", ""), max_smp)
        test_args = section.get("test_args", "").strip()
        if test_args:  # the newer cfg format: the test's arguments, given to QEMU as -append
            params += ["-append", " ".join(_shell_words(test_args, max_smp))]
        smp = _shell_words(section.get("smp", "1"), max_smp) or ["1"]
        entries.append(
            Entry(
                name=name,
                file=section["file"],
                smp=int(smp[0]) if smp[0].isdigit() else 1,
                params=params,
                timeout=_seconds(section.get("timeout", "90")),
                manual="nodefault" in section.get("groups", "").split(),
                arch=section.get("arch", "x86_64"),
                checks=[_path_and_value(c) for c in section.get("check", "").split() if "=" in c],
                accel=section.get("accel", "").strip(),
            )
        )
    return entries


def _path_and_value(check: str) -> tuple[str, str]:
    path, value = check.split("=", 1)
    return path, value


def _cpu(spec: str, plan: Plan) -> None:
    """Apply ``-cpu spec`` to ``plan``, or record it as different."""
    model, *properties = spec.split(",")
    if model not in HOST_MODELS:
        plan.different.append(f"-cpu {spec}")
        return
    vendor = None
    removed: list[str] = []
    unapplied: list[str] = []
    for prop in properties:
        name, _, value = prop.partition("=")
        sign = name[0] if name[:1] in ("+", "-") else ""
        feature = name.lstrip("+-").replace("_", "-")
        if prop in HOST_PROPERTIES:
            continue
        if name == "vendor" and value in VENDORS:
            vendor = value
        elif feature in FEATURES and (sign == "-" or (not sign and value in ("off", "false"))):
            removed.append(feature)
        elif feature in FEATURES and (sign == "+" or (not sign and value in ("", "on", "true"))):
            continue  # host/max already has it wherever the hypervisor does
        else:
            unapplied.append(prop)
    if unapplied:  # the whole -cpu option is reported as written, nothing of it applied
        plan.different.append(f"-cpu {spec}")
        return
    for feature in removed:
        leaf, subleaf, register, bit = FEATURES[feature]
        mask, bits = plan.cpuid.get((leaf, subleaf, register), (0xFFFFFFFF, 0))
        plan.cpuid[(leaf, subleaf, register)] = (mask & ~(1 << bit) & 0xFFFFFFFF, bits & ~(1 << bit))
    if vendor is not None:
        words = [int.from_bytes(vendor[i : i + 4].encode(), "little") for i in (0, 4, 8)]
        for leaf in (0, 0x80000000):
            for register, word in zip(("ebx", "edx", "ecx"), words, strict=True):
                plan.cpuid[(leaf, 0, register)] = (0, word)


def plan(entry: Entry) -> Plan:
    """Translate the entry's QEMU options into pyvmm's, collecting those it lacks."""
    result = Plan(cpus=entry.smp)
    if entry.accel and entry.accel != "kvm":
        result.different.append(f"accel = {entry.accel}")
    params = list(entry.params)
    while params:
        option = params.pop(0)
        if option in FLAGS:
            if option not in NEUTRAL_FLAGS:
                result.different.append(option)
            continue
        if not option.startswith("-") or not params:
            result.different.append(option)
            continue
        value = params.pop(0)
        if option in ("-append", "--append"):
            result.append = f"{result.append} {value}".strip()
        elif option == "-m" and _mib(value) is not None:
            result.memory_mib = _mib(value)
        elif option == "-smp" and value.isdigit():
            result.cpus = int(value)
        elif option == "-initrd":
            result.initrd = value
        elif option == "-cpu":
            _cpu(value, result)
        elif value not in NEUTRAL_VALUES.get(option, ()):
            result.different.append(f"{option} {value}")
    return result


def _failure_line(stderr: str) -> str | None:
    """The last stderr line that does not say "warning", as upstream's
    ``grep -vi warning`` finds them; None if there is none."""
    lines = [line for line in stderr.splitlines() if line.strip() and "warning" not in line.lower()]
    return lines[-1].strip() if lines else None


def decide(returncode: int, stderr: str, summary: str, timeout: float) -> tuple[str, str]:
    """(status, detail) for one run, as upstream's runner decides QEMU's."""
    if returncode == 1:
        error = _failure_line(stderr)
        if error is None:
            return "PASS", summary
        return "FAIL", f"status 1 with errors on stderr: {error}"
    if returncode == 77:
        return "SKIP", summary
    if returncode == 124:
        return "FAIL", f"timeout; duration={timeout:g}s"
    if returncode < 0 or returncode > 128:
        number = -returncode if returncode < 0 else returncode - 128
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return "FAIL", f"terminated on {name}"
    error = _failure_line(stderr) or ""
    reason = "status 0: the guest stopped without writing a result" if returncode == 0 else f"status {returncode}"
    return "FAIL", "; ".join(part for part in (reason, summary, error) if part)


def run_pyvmm(kut: Path, entry: Entry, pyvmm: list[str], *, skip_different: bool = False) -> Outcome:
    kernel = kut / "x86" / entry.file
    if entry.arch != "x86_64":
        return Outcome("SKIP", f"{entry.arch} only", 0.0)
    if entry.manual:
        return Outcome("SKIP", "test marked as manual run only", 0.0)
    for path, wanted in entry.checks:  # host settings the test needs, as the upstream runner checks them
        have = Path(path).read_text().strip() if Path(path).exists() else None
        if have != wanted:
            return Outcome("SKIP", f"{path} not equal to {wanted}", 0.0)
    how = plan(entry)
    if how.different and skip_different:
        return Outcome("SKIP", f"pyvmm cannot apply: {'; '.join(how.different)}", 0.0, how.different)
    with tempfile.TemporaryDirectory(prefix="kut-") as scratch:
        serial = Path(scratch) / "serial.log"
        command = [*pyvmm, "run", "--kernel", str(kernel), "--cpus", str(how.cpus)]
        command += ["--timeout", f"{entry.timeout:g}", "--serial", str(serial)]
        command += ["--memory", f"{how.memory_mib or 128}M"]
        command += ["--testdev"]  # the upstream runner always adds QEMU's pc-testdev
        if how.append:
            command += ["--append", how.append]
        if how.initrd:
            command += ["--initrd", how.initrd]
        if how.cpuid:
            machine = Path(scratch) / "machine.toml"
            machine.write_text(how.machine_file())
            command += ["--config", str(machine)]
        # Only warnings and errors on stderr (not the notice naming the backend):
        # stderr is how upstream's rule tells a failure from a pass.
        env = {**os.environ, "PYVMM_LOG": "warning"}
        started = time.monotonic()
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, check=False, timeout=entry.timeout + GRACE, env=env
            )
            returncode, stderr = done.returncode, done.stderr
        except subprocess.TimeoutExpired:
            seconds = time.monotonic() - started
            detail = f"timeout; pyvmm did not stop itself after --timeout {entry.timeout:g} and was killed"
            return Outcome("FAIL", detail, seconds, how.different)
        except OSError as exc:  # the command itself is missing
            returncode, stderr = 127, f"{command[0]}: {exc.strerror}"
        seconds = time.monotonic() - started
        output = serial.read_text(errors="replace") if serial.exists() else ""
    # upstream's extract_summary: a SUMMARY line among the last three
    summary = [line for line in output.splitlines()[-3:] if line.startswith("SUMMARY: ")]
    detail = f"({summary[-1][len('SUMMARY: ') :].strip()})" if summary else ""
    status, text = decide(returncode, stderr, detail, entry.timeout)
    return Outcome(status, text, seconds, how.different)


def read_qemu_log(path: Path) -> dict[str, tuple[str, str]]:
    results = {}
    for line in path.read_text().splitlines():
        match = RESULT_LINE.match(ANSI.sub("", line).strip())
        if match:
            results[match.group(2)] = (match.group(1), match.group(3).strip("() "))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kut-dir", type=Path, required=True, help="a built kvm-unit-tests tree")
    parser.add_argument("--qemu-log", type=Path, action="append", default=[], help="run_tests.sh output under QEMU")
    parser.add_argument("--python", default=sys.executable, help="the Python that has pyvmm installed")
    parser.add_argument(
        "--pyvmm", metavar="COMMAND", help="the pyvmm command, split as a shell would (default: PYTHON -m pyvmm)"
    )
    parser.add_argument(
        "--skip-different",
        action="store_true",
        help="skip entries with options pyvmm cannot apply, instead of running them",
    )
    parser.add_argument("tests", nargs="*", help="only these cfg entries")
    args = parser.parse_args(argv)
    pyvmm = shlex.split(args.pyvmm) if args.pyvmm else [args.python, "-m", "pyvmm"]
    entries = read_config(args.kut_dir / "x86" / "unittests.cfg")
    if args.tests:
        entries = [e for e in entries if e.name in args.tests]
    qemu: dict[str, tuple[str, str]] = {}
    for log in args.qemu_log:  # later logs (re-runs) override earlier ones
        qemu.update(read_qemu_log(log))
    print(f"{'test':44} {'QEMU':5} {'pyvmm':6} {'secs':>6}  pyvmm detail  (* = run with different options)")
    agree = qemu_passes = both_pass = failed = 0
    different: list[str] = []
    for entry in entries:
        ours = run_pyvmm(args.kut_dir, entry, pyvmm, skip_different=args.skip_different)
        theirs = qemu.get(entry.name, ("-", ""))[0]
        failed += ours.status == "FAIL"
        mark = "*" if ours.different else " "
        if ours.different:
            different.append(entry.name)
        else:
            qemu_passes += theirs == "PASS"
            both_pass += theirs == "PASS" and ours.status == "PASS"
            agree += theirs == ours.status
        detail = ours.detail
        if ours.different and ours.status != "SKIP":
            detail = f"{detail} [not applied: {'; '.join(ours.different)}]".strip()
        print(f"{entry.name:44} {theirs:5} {ours.status + mark:6} {ours.seconds:6.1f}  {detail}", flush=True)
    if different:
        print(
            f"{len(different)} of {len(entries)} entries have options pyvmm does not apply (*): {' '.join(different)}"
        )
    if qemu:
        comparable = len(entries) - len(different)
        print(
            f"QEMU passes {qemu_passes}; pyvmm passes {both_pass} of those; "
            f"same status on {agree} of {comparable} entries run with the same options"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
