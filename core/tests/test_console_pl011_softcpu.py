"""The PL011's receive path end to end: ``pyvmm run --arch aarch64`` with the
aarch64 echo guest on the software-CPU backend (unicorn), its terminal a
pseudo-terminal.  (The 16550's, through its interrupt on KVM, is in
plugins/pyvmm-kvm/tests/test_kvm_console.py.)"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import termios
import time

import pytest

from pyvmm.guests import echo_aarch64_path
from pyvmm.plugins import PluginRegistry

WAIT = 60.0


def test_keys_reach_the_aarch64_guest_and_come_back() -> None:
    registry = PluginRegistry()
    registry.load_entry_points()
    plugin = registry.backends.get("unicorn")
    if plugin is None or not plugin.availability().available:
        pytest.skip("the unicorn backend (examples/pyvmm-unicorn) is not installed or cannot run here")
    master, slave = os.openpty()
    before = termios.tcgetattr(slave)
    command = [sys.executable, "-m", "pyvmm", "run", "-q", "--backend", "unicorn", "--arch", "aarch64"]
    command += ["--kernel", echo_aarch64_path(), "--load-address", "0x80000000", "--timeout", "100"]
    process = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    screen = b""

    def read_until(marker: bytes) -> None:
        nonlocal screen
        end = time.monotonic() + WAIT
        while marker not in screen and time.monotonic() < end:
            if select.select([master], [], [], 0.1)[0]:
                screen += os.read(master, 4096)
        assert marker in screen, screen

    try:
        read_until(b"pyvmm> ")
        os.write(master, b"over PL011\r")
        read_until(b"you typed: over PL011\r\npyvmm> ")
        os.write(master, b"\x04")  # Ctrl-D: the guest powers off
        assert process.wait(WAIT) == 0
        assert termios.tcgetattr(slave) == before
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
        os.close(slave)
