"""``pyvmm run --gdb`` with a real gdb on the software-CPU backend (unicorn), for
both guest architectures: x86_64 with Debian's ``gdb``, aarch64 with
``gdb-multiarch``.  The demo guest waits at its entry, gdb breaks, steps, reads
registers and memory, and continues to the power-off.  (KVM's own run of this
is in plugins/pyvmm-kvm/tests/test_kvm_gdb.py.)"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pyvmm.guests import DEMO_AARCH64_LOAD_ADDRESS, DEMO_LOAD_ADDRESS
from pyvmm.plugins import PluginRegistry

WAIT = 120.0


def _unicorn() -> None:
    registry = PluginRegistry()
    registry.load_entry_points()
    plugin = registry.backends.get("unicorn")
    if plugin is None or not plugin.availability().available:
        pytest.skip("the unicorn backend (examples/pyvmm-unicorn) is not installed or cannot run here")


#: arch: debugger, entry, pc register, another register, a breakpoint (an
#: instruction that is no branch) and where one step from it goes, the greeting.
CASES = {
    "x86_64": ("gdb", DEMO_LOAD_ADDRESS, "rip", "rsp", 0xC, 0x10, "pyvmm demo guest: hello"),
    "aarch64": ("gdb-multiarch", DEMO_AARCH64_LOAD_ADDRESS, "pc", "cpsr", 4, 8, "pyvmm aarch64 demo guest"),
}


@pytest.mark.parametrize("arch", sorted(CASES))
def test_gdb_drives_the_demo_guest(arch: str, tmp_path: Path) -> None:
    debugger, entry, pc, other, stop, stepped, greeting = CASES[arch]
    gdb = shutil.which(debugger)
    if gdb is None:
        pytest.skip(f"no {debugger} here (apt-get install {debugger})")
    _unicorn()
    command = [sys.executable, "-m", "pyvmm", "run", "--backend", "unicorn", "--arch", arch, "--timeout", "200"]
    process = subprocess.Popen(
        [*command, "--gdb", "tcp:127.0.0.1:0"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert process.stderr is not None
        port = None
        while port is None:
            line = process.stderr.readline()
            assert line, "pyvmm did not wait for gdb"
            found = re.search(rb"waiting for gdb on 127\.0\.0\.1:(\d+)", line)
            port = int(found.group(1)) if found else None
        script = tmp_path / "session.gdb"
        script.write_text(
            f"""set pagination off
target remote 127.0.0.1:{port}
print/x ${pc}
info registers {pc} {other}
x/2xw {entry:#x}
break *{entry + stop:#x}
continue
print/x ${pc}
stepi
print/x ${pc}
delete
continue
"""
        )
        session = subprocess.run(
            [gdb, "-nx", "-batch", "-x", str(script)], capture_output=True, text=True, timeout=WAIT, check=False
        )
        out, err = process.communicate(timeout=WAIT)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    text = session.stdout + session.stderr
    assert f"$1 = {entry:#x}" in text, text
    assert re.search(rf"{other}\s+0x", text), text
    assert f"Breakpoint 1, {entry + stop:#018x}" in text, text
    assert f"$2 = {entry + stop:#x}" in text and f"$3 = {entry + stepped:#x}" in text, text
    assert "exited normally" in text, text
    assert process.returncode == 0, err
    assert greeting.encode() in out
