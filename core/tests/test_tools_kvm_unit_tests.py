"""tools/kvm_unit_tests.py decides results as kvm-unit-tests' own runner does, and
applies each entry's options or says it did not -- tested with a tiny cfg and a
fake ``pyvmm`` command, without building kvm-unit-tests.

The fake reads its "kernel" (a JSON script: serial output, stderr, exit status,
a signal) and records the command line and machine file it was given.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from pyvmm.arch.x86_64 import CpuidEntry
from pyvmm.machine.config import MachineConfig, read_machine_file
from pyvmm.machine.cpuid import vcpu_cpuid

TOOL = Path(__file__).resolve().parents[2] / "tools" / "kvm_unit_tests.py"

FAKE_PYVMM = """\
import json, os, signal, sys, time

args = sys.argv[1:]
assert args[0] == "run", args
options, rest = {}, args[1:]
while rest:
    name = rest.pop(0)
    options[name] = True if name == "--testdev" else rest.pop(0)
script = json.loads(open(options["--kernel"]).read())
machine = open(options["--config"]).read() if "--config" in options else None
with open(os.environ["FAKE_PYVMM_LOG"], "a") as log:
    record = {"test": script.get("name"), "options": options, "machine": machine, "log": os.environ.get("PYVMM_LOG")}
    log.write(json.dumps(record) + "\\n")
with open(options["--serial"], "w") as serial:
    serial.write(script.get("serial", ""))
sys.stderr.write(script.get("stderr", ""))
if "signal" in script:
    os.kill(os.getpid(), getattr(signal, script["signal"]))
sys.exit(script.get("status", 1))
"""

SUMMARY = "SUMMARY: 4 tests\n"
TRACEBACK = 'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\nRuntimeError: boom\n'


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    if not TOOL.is_file():
        pytest.skip(f"not inside pyvmm's repository ({TOOL} is absent)")
    spec = importlib.util.spec_from_file_location("kvm_unit_tests", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class Kut:
    """A fake kvm-unit-tests tree and a fake pyvmm that logs what it was asked."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        (root / "x86").mkdir(parents=True)
        self.log = root / "pyvmm.log"
        self.log.touch()
        monkeypatch.setenv("FAKE_PYVMM_LOG", str(self.log))
        self.fake = root / "fake_pyvmm.py"
        self.fake.write_text(FAKE_PYVMM)
        self.sections: list[str] = []

    def add(self, name: str, cfg: str = "", **script: Any) -> None:
        (self.root / "x86" / f"{name}.flat").write_text(json.dumps({"name": name, **script}))
        self.sections.append(f"[{name}]\nfile = {name}.flat\n{textwrap.dedent(cfg).strip()}\n")
        (self.root / "x86" / "unittests.cfg").write_text("# a test cfg\n\n" + "\n".join(self.sections))

    def run(self, tool: ModuleType, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, str]]:
        status = tool.main(["--kut-dir", str(self.root), "--pyvmm", f"{sys.executable} {self.fake}", *args])
        lines = capsys.readouterr().out.splitlines()
        rows = {line.split()[0]: line for line in lines[1:] if line and not line[0].isdigit()}
        return status, rows

    def calls(self) -> dict[str, dict[str, Any]]:
        return {record["test"]: record for record in map(json.loads, self.log.read_text().splitlines())}


@pytest.fixture
def kut(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Kut:
    return Kut(tmp_path / "kvm-unit-tests", monkeypatch)


def status_of(row: str) -> str:
    return row.split()[2]


def test_status_1_passes_only_with_no_stderr_but_warnings(
    tool: ModuleType, kut: Kut, capsys: pytest.CaptureFixture[str]
) -> None:
    kut.add("clean", serial="hello\n" + SUMMARY, status=1)
    kut.add("warned", serial=SUMMARY, status=1, stderr="pyvmm: warning: unhandled port 0x80\nWARNING: slow\n\n")
    kut.add("crashed", serial="hello\n", status=1, stderr=TRACEBACK)
    kut.add("errored", status=1, stderr="pyvmm: error: --kernel: no such file\n")
    status, rows = kut.run(tool, capsys)
    assert status_of(rows["clean"]) == "PASS" and rows["clean"].endswith("(4 tests)")
    assert status_of(rows["warned"]) == "PASS"
    assert status_of(rows["crashed"]) == "FAIL"
    assert rows["crashed"].endswith("status 1 with errors on stderr: RuntimeError: boom")
    assert status_of(rows["errored"]) == "FAIL" and "no such file" in rows["errored"]
    assert status == 1, "a FAIL makes the tool fail"


def test_a_python_without_pyvmm_fails_every_entry(
    tool: ModuleType, kut: Kut, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The false PASS of old: ``python -m pyvmm`` where pyvmm is not installed exits 1."""
    kut.add("one")
    kut.add("two")
    bare = tmp_path / "python-without-pyvmm"
    bare.write_text(f'#!/bin/sh\nexec "{sys.executable}" -I -S "$@"\n')  # no site-packages: no pyvmm
    bare.chmod(0o755)
    status = tool.main(["--kut-dir", str(kut.root), "--python", str(bare)])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("one ", "two "))]
    assert [status_of(row) for row in rows] == ["FAIL", "FAIL"], out
    assert all("No module named pyvmm" in row for row in rows), out
    assert status == 1


@pytest.mark.parametrize(
    ("script", "status", "detail"),
    [
        ({"status": 77, "serial": "SUMMARY: skipped\n"}, "SKIP", "(skipped)"),
        ({"status": 0}, "FAIL", "status 0: the guest stopped without writing a result"),
        ({"status": 3, "serial": "SUMMARY: 4 tests, 1 unexpected failures\n"}, "FAIL", "status 3; (4 tests, 1"),
        ({"status": 124}, "FAIL", "timeout; duration=7s"),
        ({"signal": "SIGSEGV"}, "FAIL", "terminated on SIGSEGV"),
        ({"status": 130}, "FAIL", "terminated on SIGINT"),
    ],
)
def test_other_statuses_as_upstream_maps_them(
    tool: ModuleType, kut: Kut, capsys: pytest.CaptureFixture[str], script: dict[str, Any], status: str, detail: str
) -> None:
    kut.add("t", "timeout = 7s", **script)
    _, rows = kut.run(tool, capsys)
    assert status_of(rows["t"]) == status
    assert detail in rows["t"]


def test_options_pyvmm_has_are_applied(tool: ModuleType, kut: Kut, capsys: pytest.CaptureFixture[str]) -> None:
    kut.add(
        "msr",
        """
        smp = $MAX_SMP
        extra_params = -cpu max,-x2apic,tsc_deadline=off,+vmx,vendor=GenuineIntel,migratable=no -m 4g
                       -append "one `echo two`" -machine accel=kvm
        timeout = 2m
        """,
    )
    kut.add("plain", "smp = 2\nextra_params = -smp 3\ntest_args = 'cpuid'")
    kut.add("old_style", "extra_params = -append 'ple_round_robin' -m 256")
    status, rows = kut.run(tool, capsys)
    assert status == 0
    assert all(status_of(row) == "PASS" for row in rows.values()), rows  # no "*": nothing was left out
    calls = kut.calls()

    msr = calls["msr"]["options"]
    assert msr["--cpus"] == str(tool.read_config(kut.root / "x86" / "unittests.cfg")[0].smp)
    assert (msr["--memory"], msr["--append"], msr["--timeout"]) == ("4096M", "one two", "120")
    assert msr["--testdev"] is True
    assert calls["msr"]["log"] == "warning", "pyvmm's notices (the backend it chose) would read as errors"
    machine = kut.root / "machine.toml"
    machine.write_text(calls["msr"]["machine"])
    overrides = MachineConfig(**read_machine_file(machine)).cpuid_overrides  # pyvmm accepts the file
    host = [
        CpuidEntry(0, eax=0xD, ebx=0x68747541, edx=0x69746E65, ecx=0x444D4163),  # AuthenticAMD
        CpuidEntry(1, ecx=0xFFFFFFFF),
        CpuidEntry(0x80000000, eax=0x80000008),
    ]
    table = {entry.function: entry for entry in vcpu_cpuid(host, 0, overrides)}
    vendor = b"".join(getattr(table[0], reg).to_bytes(4, "little") for reg in ("ebx", "edx", "ecx"))
    assert vendor == b"GenuineIntel"
    assert table[0].eax == 0xD, "the maximum leaf stays the hypervisor's"
    assert table[1].ecx == 0xFFFFFFFF & ~(1 << 21) & ~(1 << 24), "x2apic and tsc-deadline removed, the rest kept"

    plain = calls["plain"]["options"]
    assert (plain["--cpus"], plain["--append"], calls["plain"]["machine"]) == ("3", "cpuid", None)
    old = calls["old_style"]["options"]
    assert (old["--append"], old["--memory"]) == ("ple_round_robin", "256M")


def test_options_pyvmm_lacks_are_reported(tool: ModuleType, kut: Kut, capsys: pytest.CaptureFixture[str]) -> None:
    kut.add("apic-split", "extra_params = -cpu qemu64,+x2apic,+tsc-deadline -machine kernel_irqchip=split")
    kut.add("reduced", "extra_params = -cpu max,phys-bits=36,-x2apic")
    kut.add("hyperv", "extra_params = -device hyperv-testdev -global kvm-pit.lost_tick_policy=discard")
    kut.add("tcg_only", "accel = tcg")
    kut.add("same", "extra_params = -cpu host")
    status, rows = kut.run(tool, capsys)
    assert status == 0
    assert status_of(rows["same"]) == "PASS"
    assert status_of(rows["apic-split"]) == "PASS*"
    assert rows["apic-split"].endswith(
        "[not applied: -cpu qemu64,+x2apic,+tsc-deadline; -machine kernel_irqchip=split]"
    )
    assert rows["reduced"].endswith("[not applied: -cpu max,phys-bits=36,-x2apic]")
    assert kut.calls()["reduced"]["machine"] is None, "a -cpu option is applied whole or not at all"
    assert rows["hyperv"].endswith("[not applied: -device hyperv-testdev; -global kvm-pit.lost_tick_policy=discard]")
    assert rows["tcg_only"].endswith("[not applied: accel = tcg]")
    out_again = kut.run(tool, capsys, "--skip-different")
    skipped = out_again[1]
    assert status_of(skipped["apic-split"]) == "SKIP*"
    assert "pyvmm cannot apply: -cpu qemu64" in skipped["apic-split"]
    assert status_of(skipped["same"]) == "PASS"


def test_the_summary_counts_entries_with_different_options_apart(
    tool: ModuleType, kut: Kut, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kut.add("same", status=1)
    kut.add("split", "extra_params = -machine kernel_irqchip=split", status=1)
    kut.add("broken", status=4)
    qemu = tmp_path / "qemu.log"
    qemu.write_text("\x1b[32mPASS\x1b[0m same (4 tests)\nPASS split (3 tests)\nPASS broken (1 tests)\n")
    status = tool.main(["--kut-dir", str(kut.root), "--pyvmm", f"{sys.executable} {kut.fake}", "--qemu-log", str(qemu)])
    last = capsys.readouterr().out.splitlines()[-2:]
    assert last == [
        "1 of 3 entries have options pyvmm does not apply (*): split",
        "QEMU passes 2; pyvmm passes 1 of those; same status on 1 of 2 entries run with the same options",
    ]
    assert status == 1


def test_skips_before_running(tool: ModuleType, kut: Kut, capsys: pytest.CaptureFixture[str]) -> None:
    kut.add("i386_only", "arch = i386")
    kut.add("manual", "groups = vmx nodefault")
    kut.add("needs_setting", "check = /nonexistent/parameter=Y")
    _, rows = kut.run(tool, capsys)
    assert [status_of(row) for row in rows.values()] == ["SKIP", "SKIP", "SKIP"]
    assert rows["needs_setting"].endswith("/nonexistent/parameter not equal to Y")
    assert kut.calls() == {}
