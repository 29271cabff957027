"""The console's input side: the interactive terminal (raw mode, Ctrl-A keys,
restored on the way out), pty and Unix socket consoles, and the status line.

Driven through real pseudo-terminals and sockets, with a stand-in UART."""

from __future__ import annotations

import io
import os
import re
import socket
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyvmm.devices.serial_line import RxBuffer
from pyvmm.errors import ConfigError
from pyvmm.machine import console as console_module
from pyvmm.machine.console import ConsoleOutput, StatusLine, open_serial, restore_terminals

WAIT = 5.0


class FakeUart:
    def __init__(self) -> None:
        self.rx = RxBuffer(1 << 16)
        self.data = bytearray()

    def receive(self, data: bytes) -> int:
        taken = self.rx.put(data)
        self.data += data[:taken]
        return taken


def eventually(check: Callable[[], bool], timeout: float = WAIT) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.01)
    return check()


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, int]]:
    """A pty whose slave is this process's stdin: (master, slave)."""
    master, slave = os.openpty()
    stdin = os.fdopen(os.dup(slave), "rb", buffering=0)
    monkeypatch.setattr("sys.stdin", stdin)
    try:
        yield master, slave
    finally:
        stdin.close()
        os.close(master)
        os.close(slave)


def test_stdio_on_a_terminal_is_interactive_raw_and_restored(terminal: tuple[int, int]) -> None:
    master, slave = terminal
    before = termios.tcgetattr(slave)
    console = open_serial("stdio", "--serial", {})
    assert console is not None and console.interactive
    uart = FakeUart()
    quits: list[bool] = []
    console.connect(uart, lambda: quits.append(True))
    try:
        raw = termios.tcgetattr(slave)
        assert not raw[3] & (termios.ICANON | termios.ECHO | termios.ISIG)  # every key goes to the guest
        assert raw[1] & termios.OPOST  # the guest's "\n" still starts a new line
        os.write(master, b"ls\r\x03")
        assert eventually(lambda: bytes(uart.data) == b"ls\r\x03")
    finally:
        console.close()
    assert termios.tcgetattr(slave) == before
    assert not quits


def test_ctrl_a_keys(terminal: tuple[int, int]) -> None:
    master, _ = terminal
    console = open_serial("stdio", "--serial", {})
    assert console is not None
    uart = FakeUart()
    quits: list[bool] = []
    console.connect(uart, lambda: quits.append(True))
    try:
        os.write(master, b"a\x01\x01b\x01qc")  # Ctrl-A Ctrl-A: one Ctrl-A; Ctrl-A q: not ours, both go through
        assert eventually(lambda: bytes(uart.data) == b"a\x01b\x01qc")
        os.write(master, b"\x01")
        time.sleep(0.05)
        os.write(master, b"x")  # the key may come in a later read than Ctrl-A
        assert eventually(lambda: bool(quits))
        assert bytes(uart.data) == b"a\x01b\x01qc"
    finally:
        console.close()


def test_an_exit_without_close_is_still_restored_at_exit(terminal: tuple[int, int]) -> None:
    _, slave = terminal
    before = termios.tcgetattr(slave)
    console = open_serial("stdio", "--serial", {})
    assert console is not None
    console.connect(FakeUart(), lambda: None)
    assert termios.tcgetattr(slave) != before
    restore_terminals()  # what atexit runs
    assert termios.tcgetattr(slave) == before
    console.close()
    assert termios.tcgetattr(slave) == before


def test_stdio_without_a_terminal_reads_nothing() -> None:
    # Under pytest stdin is not a terminal.
    console = open_serial("stdio", "--serial", {})
    assert console is not None and not console.has_input
    console.connect(FakeUart(), lambda: None)  # nothing to connect: no thread, no raw mode
    console.close()


def test_the_api_asks_for_no_interactive_console(terminal: tuple[int, int]) -> None:
    console = open_serial("stdio", "serial", {}, interactive=False)
    assert console is not None and not console.has_input


def test_pty_console(tmp_path: Path) -> None:
    console = open_serial("pty", "--serial", {})
    assert console is not None and console.has_input and not console.interactive
    path = console.name
    assert path.startswith("/dev/") and os.path.exists(path)
    uart = FakeUart()
    console.connect(uart, lambda: None)
    client = os.open(path, os.O_RDWR | os.O_NOCTTY)
    try:
        console.write(b"guest says hi\n")
        console.flush()
        assert eventually(lambda: b"guest says hi" in _read_some(client))
        os.write(client, b"typed")
        assert eventually(lambda: bytes(uart.data) == b"typed")
    finally:
        os.close(client)
        console.close()


def test_an_unread_pty_drops_output_instead_of_stalling_the_guest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console_module, "PTY_WRITE_WAIT", 0.05)
    console = open_serial("pty", "--serial", {})
    assert console is not None
    started = time.monotonic()
    for _ in range(64):
        console.write(b"x" * 4096)
    assert time.monotonic() - started < 10
    console.close()


def _read_some(fd: int) -> bytes:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 4096)
    except BlockingIOError:
        return b""


def test_unix_socket_console_keeps_output_until_a_client_connects(tmp_path: Path) -> None:
    path = tmp_path / "console.sock"
    console = open_serial(f"unix:{path}", "--serial", {})
    assert console is not None and console.has_input
    uart = FakeUart()
    console.connect(uart, lambda: None)
    try:
        console.write(b"early boot\n")
        for round_ in range(2):  # a second client after the first leaves
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.connect(str(path))
            client.settimeout(WAIT)
            if round_ == 0:
                assert client.recv(100) == b"early boot\n"
            client.sendall(b"k%d" % round_)
            assert eventually(lambda round_=round_: bytes(uart.data).endswith(b"k%d" % round_))
            console.write(b"late\n")
            assert client.recv(100) == b"late\n"
            client.close()
            time.sleep(0.1)
    finally:
        console.close()
    assert not path.exists()


def test_unix_socket_refuses_a_file_that_is_not_a_socket_and_takes_over_a_stale_one(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("keep me")
    with pytest.raises(ConfigError, match=r"--serial: .*plain is a regular file|--serial: .*plain is .*not a socket"):
        open_serial(f"unix:{plain}", "--serial", {})
    assert plain.read_text() == "keep me"
    stale = tmp_path / "stale.sock"
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(str(stale))
    old.close()  # left behind, nobody listening
    console = open_serial(f"unix:{stale}", "--serial", {})
    assert console is not None
    console.close()


def test_file_prefix_names_a_file(tmp_path: Path) -> None:
    target = tmp_path / "pty"  # a file called "pty": file: says it is one
    console = open_serial(f"file:{target}", "--serial", {})
    assert console is not None and not console.has_input
    console.write(b"out")
    console.close()
    assert target.read_bytes() == b"out"


# --- the status line ---------------------------------------------------------------------


class Screen(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_status_line_shows_while_the_console_is_quiet_and_goes_when_it_speaks() -> None:
    screen = Screen()
    out = io.BytesIO()
    console = ConsoleOutput(out, "--serial", "stdout", owned=False)
    exits = [0]

    def sample() -> tuple[int, int]:
        exits[0] += 500
        return exits[0], 2_500_000_000

    status = StatusLine(screen, sample, console, quiet=0.05, period=0.02).start()
    try:
        assert eventually(lambda: status.shown)
        shown = screen.getvalue()
        assert re.search(r"pyvmm: guest time \d+ s, \d+ exits/s, \d+ exits", shown)
        console.write(b"x")
        assert not status.shown
        assert screen.getvalue().endswith("\r\x1b[K")  # wiped before the console's byte
        time.sleep(0.2)
        assert not status.shown  # the guest left a line open: no status line over it
        console.write(b"\n")
        assert eventually(lambda: status.shown)
    finally:
        status.stop()
    assert not status.shown and screen.getvalue().endswith("\r\x1b[K")


def test_status_line_without_a_console_on_the_terminal() -> None:
    screen = Screen()
    status = StatusLine(screen, lambda: (10, 0), None, quiet=0.01, period=0.02).start()
    try:
        assert eventually(lambda: status.shown)
        console_module.clear_status()  # what a log message does first
        assert not status.shown
    finally:
        status.stop()


def test_a_prompt_without_a_newline_reaches_a_terminal_at_once() -> None:
    """Console output to a terminal is written through: a guest's prompt with no
    newline must not wait in a buffer (it did whenever PYTHONUNBUFFERED was unset)."""
    import select

    from pyvmm.machine.console import ConsoleOutput

    master, slave = os.openpty()
    stream = os.fdopen(slave, "wb")  # buffered, as sys.stdout.buffer is
    console = ConsoleOutput(stream, "--serial", "the terminal", owned=True)
    try:
        console.write(b"pyvmm> ")
        readable, _, _ = select.select([master], [], [], 5)
        assert readable and os.read(master, 100) == b"pyvmm> "
    finally:
        console.close()
        os.close(master)
