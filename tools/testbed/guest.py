"""The bed's program inside the guest (``python3.11 -m testbed.guest run.json``,
started by /init): checks that KVM came up in the mode asked for, runs the
pytest selection with the junit report, sends the result to the host framed on
the console, and powers the guest off.  Standard library only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .framing import encode

JUNIT = Path("/tmp/junit.xml")
#: Lines the guest's tests want in the host's summary (boot times): $PYVMM_TESTBED_NOTES.
NOTES = Path("/tmp/testbed-notes.txt")


def kernel_log() -> str:
    return subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout


def kvm_lines(dmesg: str) -> list[str]:
    """dmesg's lines about KVM (arm64 prints ``kvm [1]: ...``, x86 ``kvm_amd: ...``)."""
    return [line for line in dmesg.splitlines() if "kvm" in line.lower()]


def send(payload: dict[str, Any]) -> None:
    # Only emergencies on the console from here on: a kernel message in the
    # middle of the frame would damage it.
    Path("/proc/sys/kernel/printk").write_text("1\n")
    sys.stdout.write(encode(payload))
    sys.stdout.flush()


def run(settings: dict[str, Any]) -> dict[str, Any]:
    lines = kvm_lines(kernel_log())
    marker = settings["kvm_marker"]
    mode_lines = [line for line in lines if marker in line]
    result: dict[str, Any] = {"kvm_lines": lines, "kvm_mode_line": mode_lines[0] if mode_lines else None}
    if not mode_lines:
        result["error"] = f"KVM did not report {marker!r} in dmesg (mode {settings['mode']!r})"
        return result
    if not os.path.exists("/dev/kvm"):
        result["error"] = "no /dev/kvm although KVM reported its mode"
        return result
    print(f"testbed: KVM is up: {mode_lines[0].strip()}", flush=True)
    if settings.get("command"):  # a shell command instead of pytest (looking around in the bed)
        looked = subprocess.run(["sh", "-c", settings["command"]], capture_output=True, text=True, check=False)
        result["output"] = looked.stdout + looked.stderr
        result["exit_status"] = looked.returncode
        return result
    pytest = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--color=no", f"--junitxml={JUNIT}"]
    command = [*pytest, *settings["pytest"]]
    print("testbed: " + " ".join(command), flush=True)
    started = time.monotonic()
    done = subprocess.run(command, check=False, env={**os.environ, "PYVMM_TESTBED_NOTES": str(NOTES)})
    result["pytest_seconds"] = round(time.monotonic() - started, 1)
    result["exit_status"] = done.returncode
    result["junit"] = JUNIT.read_text() if JUNIT.is_file() else None
    result["notes"] = NOTES.read_text().splitlines() if NOTES.is_file() else []
    return result


def main(argv: list[str]) -> None:
    started = time.monotonic()
    try:
        settings = json.loads(Path(argv[0]).read_text())
        result = run(settings)
    except Exception as error:  # noqa: BLE001 -- whatever broke must reach the host, not a hung guest
        result = {"error": f"the guest program failed: {type(error).__name__}: {error}"}
    result["guest_seconds"] = round(time.monotonic() - started, 1)
    result["uptime_seconds"] = float(Path("/proc/uptime").read_text().split()[0])
    send(result)
    os.sync()
    subprocess.run(["poweroff", "-f"], check=False)


if __name__ == "__main__":
    main(sys.argv[1:])
