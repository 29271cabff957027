"""The interactive serial console on KVM: ``pyvmm run`` with the echo guest
(input through the 16550's receive interrupt, via the in-kernel 8259) driven
through a pseudo-terminal, as a person at a terminal would, and through the
pty and Unix socket consoles."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.guests import echo_path
from pyvmm.vm import Backend

PROMPT = b"pyvmm> "
WAIT = 60.0  # generous: a loaded machine slows the interpreted guest a lot


class Terminal:
    """``pyvmm run`` with a pty as its terminal (stdin, stdout and stderr)."""

    def __init__(self, *args: str) -> None:
        self.master, self.slave = os.openpty()
        self.before = termios.tcgetattr(self.slave)
        command = [sys.executable, "-m", "pyvmm", "run", "--backend", "kvm", "--timeout", "120", *args]
        self.process = subprocess.Popen(
            command, stdin=self.slave, stdout=self.slave, stderr=self.slave, start_new_session=True
        )
        self.screen = b""

    def read_until(self, marker: bytes, timeout: float = WAIT) -> bytes:
        end = time.monotonic() + timeout
        while marker not in self.screen and time.monotonic() < end:
            readable, _, _ = select.select([self.master], [], [], 0.1)
            if readable:
                try:
                    self.screen += os.read(self.master, 4096)
                except OSError:
                    break
        assert marker in self.screen, f"no {marker!r} on the screen: {self.screen!r}"
        return self.screen

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def wait(self) -> int:
        status = self.process.wait(WAIT)
        self.read_rest()
        return status

    def read_rest(self) -> None:
        while True:
            readable, _, _ = select.select([self.master], [], [], 0.2)
            if not readable:
                return
            try:
                data = os.read(self.master, 4096)
            except OSError:
                return
            if not data:
                return
            self.screen += data

    def restored(self) -> bool:
        return termios.tcgetattr(self.slave) == self.before

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def echo(kvm: Backend) -> Iterator[Terminal]:
    terminal = Terminal("--kernel", echo_path(), "--load-address", "0x100000")
    try:
        yield terminal
    finally:
        terminal.close()


def test_a_line_typed_at_the_terminal_reaches_the_guest_and_comes_back(echo: Terminal) -> None:
    screen = echo.read_until(PROMPT)
    assert screen.startswith(b"pyvmm: backend kvm (--backend), x86_64 guest\r\n")
    assert not termios.tcgetattr(echo.slave)[3] & termios.ICANON  # raw while the guest runs
    echo.type(b"hello, guest\r")
    assert b"hello, guest\r\nyou typed: hello, guest\r\n" in echo.read_until(b"you typed: hello, guest\r\npyvmm> ")
    echo.type(b"abx\x7fc\r")  # DEL rubs out the x
    assert b"abx\x08 \x08c\r\nyou typed: abc\r\n" in echo.read_until(b"you typed: abc\r\n")
    echo.type(b"\x03")  # Ctrl-C goes to the guest, not to pyvmm
    echo.read_until(b"^C\r\n")
    echo.type(b"poweroff\r")
    assert echo.wait() == 0
    assert b"powering off" in echo.screen
    assert echo.restored()


def test_ctrl_a_x_quits_and_restores_the_terminal(echo: Terminal) -> None:
    echo.read_until(PROMPT)
    echo.type(b"\x01\x01")  # Ctrl-A Ctrl-A: the guest gets one Ctrl-A (it ignores it)
    echo.type(b"\x01x")
    assert echo.wait() == 0
    assert b"pyvmm: interrupted: quit from the console (Ctrl-A x)" in echo.screen
    assert echo.restored()


def test_the_guest_exit_status_comes_through(echo: Terminal) -> None:
    echo.read_until(PROMPT)
    echo.type(b"exit 5\r")
    assert echo.wait() == (5 << 1) | 1
    assert echo.restored()


@pytest.mark.parametrize(
    ("signum", "message"),
    [
        (signal.SIGTERM, b"terminated by SIGTERM"),
        (signal.SIGHUP, b"terminated by SIGHUP"),
        (signal.SIGINT, b"interrupted (Ctrl-C)"),  # kill -INT: the terminal's own Ctrl-C goes to the guest
    ],
)
def test_a_signal_ends_the_run_and_restores_the_terminal(echo: Terminal, signum: int, message: bytes) -> None:
    echo.read_until(PROMPT)
    echo.process.send_signal(signum)
    assert echo.wait() == 128 + signum
    assert message in echo.screen
    assert echo.restored()


def test_pty_console(kvm: Backend) -> None:
    command = [sys.executable, "-m", "pyvmm", "run", "--backend", "kvm", "--timeout", "120", "--serial", "pty"]
    command += ["--kernel", echo_path(), "--load-address", "0x100000"]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stderr is not None
        line = b""
        while b"serial console on" not in line:
            line = process.stderr.readline()
            assert line, "pyvmm did not say where the pty is"
        path = re.search(rb"serial console on (\S+)", line).group(1).decode()  # type: ignore[union-attr]
        client = os.open(path, os.O_RDWR | os.O_NOCTTY)
        try:
            screen = _read_until(client, PROMPT)
            assert b"echo guest" in screen
            os.write(client, b"over the pty\r")
            _read_until(client, b"you typed: over the pty")
            os.write(client, b"poweroff\r")
            assert process.wait(WAIT) == 0
        finally:
            os.close(client)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def _read_until(fd: int, marker: bytes) -> bytes:
    data = b""
    end = time.monotonic() + WAIT
    while marker not in data and time.monotonic() < end:
        readable, _, _ = select.select([fd], [], [], 0.1)
        if readable:
            data += os.read(fd, 4096)
    assert marker in data, data
    return data


def test_unix_socket_console(kvm: Backend, tmp_path: Path) -> None:
    path = tmp_path / "console.sock"
    command = [sys.executable, "-m", "pyvmm", "run", "--backend", "kvm", "--timeout", "120", "--serial", f"unix:{path}"]
    command += ["--kernel", echo_path(), "--load-address", "0x100000"]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        end = time.monotonic() + WAIT
        while not path.exists() and time.monotonic() < end:
            time.sleep(0.05)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))
        data = b""
        client.settimeout(WAIT)
        while PROMPT not in data:
            data += client.recv(4096)
        assert data.startswith(b"pyvmm echo guest")  # the banner, kept until the client came
        client.sendall(b"via socket\r")
        while b"you typed: via socket" not in data:
            data += client.recv(4096)
        client.sendall(b"poweroff\r")
        assert process.wait(WAIT) == 0
        client.close()
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    assert not path.exists()


def test_the_machine_api_serves_a_socket_console(kvm: Backend, tmp_path: Path) -> None:
    import threading

    from pyvmm.machine import Machine, MachineConfig

    path = tmp_path / "api.sock"
    config = MachineConfig(kernel=Path(echo_path()), load_address=0x100000, serial=f"unix:{path}", timeout=60)
    results: list[object] = []
    with Machine(config, backend=kvm) as machine:
        runner = threading.Thread(target=lambda: results.append(machine.run()))
        runner.start()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))
        client.settimeout(WAIT)
        data = b""
        while PROMPT not in data:
            data += client.recv(4096)
        client.sendall(b"exit 3\r")
        runner.join(WAIT)
        client.close()
    assert getattr(results[0], "status", None) == 7
