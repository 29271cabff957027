"""The serial console: where a machine's UART writes, and where its input comes from.

``serial`` (``pyvmm run --serial``, the machine file's ``serial``) is one of:

``stdio``
    Output to stdout.  When stdin is a terminal the console is interactive:
    the terminal goes into raw mode while the guest runs (every key goes to the
    guest, Ctrl-C included) and is restored on every way out; ``Ctrl-A x``
    quits, ``Ctrl-A Ctrl-A`` sends one Ctrl-A, ``Ctrl-A h`` lists the keys.  When
    stdin is not a terminal it is not read.
``none``
    Output discarded, no input.
``pty``
    A new pseudo-terminal; its path is logged (``pyvmm: serial console on
    /dev/pts/N``) and a program such as ``screen`` or ``picocom`` attaches to it.
    Output nobody reads for :data:`PTY_WRITE_WAIT` seconds is dropped, so an
    unattended pty never stalls the guest.
``unix:PATH``
    A Unix socket server at PATH; one client at a time is the console (``socat
    -,raw,echo=0 unix-connect:PATH``).  Output before a client connects is kept
    (the last :data:`SOCKET_BACKLOG` bytes) and sent when one does.
``file:PATH`` or ``PATH``
    Output to a file (created or truncated), a FIFO that has a reader, a
    terminal or a device such as ``/dev/null``; no input.

:func:`open_serial` opens it safely: a FIFO without a reader is an error, never
a wait; a directory, a block device or one of the run's own input files is
refused; and a write error (a full disk, ``/dev/full``, a closed pipe) is
reported once, as :class:`SerialOutputError`, instead of a traceback at every
flush.  :meth:`ConsoleOutput.connect` starts feeding input to the UART (any
device with ``receive(bytes) -> int`` and an ``rx`` buffer to wait on).

:class:`StatusLine` is the line ``pyvmm run`` shows on a terminal while the
guest runs and the console has said nothing for a while; it disappears as
soon as the console (or a log message) speaks.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import stat
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn, Protocol, TextIO

from pyvmm.errors import ConfigError, PyvmmError
from pyvmm.lazy_logging import LazyLogger

if TYPE_CHECKING:
    import socket
    from pathlib import Path

# Loads logging only when a record goes out (start-up time).
log = LazyLogger("pyvmm.console")

#: The escape key of the interactive console (Ctrl-A, as QEMU's).
ESCAPE = 0x01
ESCAPE_HELP = (
    b"\r\npyvmm console keys:\r\n"
    b"  Ctrl-A x       quit pyvmm\r\n"
    b"  Ctrl-A Ctrl-A  send Ctrl-A to the guest\r\n"
    b"  Ctrl-A h       this help\r\n"
)
#: Seconds a write to a pty may wait for a reader before the output is dropped.
PTY_WRITE_WAIT = 0.5
#: Output kept for a Unix socket console until a client connects.
SOCKET_BACKLOG = 64 << 10
#: How often the input thread looks at whether it should stop (seconds).
_POLL = 0.2


class SerialOutputError(PyvmmError):
    """The console's output cannot be written (a full disk, ``/dev/full``, a
    closed pipe).  Raised from the UART's write, so it ends the run as a device
    error would: ``pyvmm: error:``, status 2."""


class SerialPort(Protocol):
    """What the console feeds: a UART's receive side."""

    def receive(self, data: bytes) -> int: ...

    @property
    def rx(self) -> Any: ...


def _isatty(stream: BinaryIO) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError, AttributeError):
        return False


class ConsoleOutput:
    """The console's stream, guarded: the first write error raises
    :class:`SerialOutputError` naming the option and the file; after it, writes
    and flushes do nothing, so tearing the machine down (which flushes) cannot
    raise the same error again or print a traceback.

    It may also have an input side (an interactive terminal, a pty, a socket):
    :meth:`connect` starts it, :meth:`close` stops it and restores the terminal.
    """

    def __init__(
        self, stream: BinaryIO, where: str, name: str, *, owned: bool, source: _InputSource | None = None
    ) -> None:
        self._stream = stream
        self._where = where
        self._name = name
        self._owned = owned
        self._source = source
        self._pump: _Pump | None = None
        self.error: SerialOutputError | None = None
        #: Bytes written so far (the status line watches it).
        self.written = 0
        #: The last byte written ended a line (the status line only draws then).
        self.at_line_start = True
        #: The status line to wipe before the console speaks, if one is shown.
        self.status: StatusLine | None = None
        # Someone is watching (a terminal, a pty, a socket): every write goes out
        # at once, or a prompt without a newline would sit in the buffer -- and
        # the guest would wait for an answer to a question nobody saw.
        self._write_through = source is not None or _isatty(stream)

    @property
    def name(self) -> str:
        return self._name

    @property
    def interactive(self) -> bool:
        """Input comes from the terminal pyvmm runs in (raw mode, Ctrl-A keys)."""
        return isinstance(self._source, _TerminalInput)

    @property
    def has_input(self) -> bool:
        return self._source is not None

    def _fail(self, exc: BaseException) -> NoReturn:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        self.error = SerialOutputError(f"{self._where}: cannot write the console output to {self._name}: {detail}")
        raise self.error from exc

    def write(self, data: bytes) -> int:
        if self.error is not None:
            return len(data)
        status = self.status
        if status is not None and status.shown:
            status.clear()
        if data:
            self.written += len(data)
            self.at_line_start = data[-1] == 0x0A
        try:
            written = self._stream.write(data)
            if self._write_through:
                self._stream.flush()
            return written
        except (OSError, ValueError) as exc:  # ValueError: the stream was closed under us
            self._fail(exc)

    def flush(self) -> None:
        if self.error is not None:
            return
        try:
            self._stream.flush()
        except (OSError, ValueError) as exc:
            self._fail(exc)

    def connect(self, uart: SerialPort, quit: Callable[[], None]) -> None:
        """Feed the console's input to ``uart`` from a thread of its own until
        :meth:`close`; ``quit()`` is called on ``Ctrl-A x``.  An interactive
        terminal goes into raw mode here.  Nothing happens without an input side."""
        if self._source is None or self._pump is not None:
            return
        self._source.start()  # raw mode, here: close() restores it after the thread is gone
        self._pump = _Pump(self._source, uart, quit)
        self._pump.start()

    def close(self) -> None:
        """Stop the input, restore the terminal, flush; close the file if it was
        opened for this run (never stdout).  An error here is reported once, like
        a write's."""
        try:
            if self._pump is not None:
                self._pump.stop()
        finally:
            try:
                if self._source is not None:
                    self._source.close()
            finally:
                try:
                    if self.error is None:
                        self.flush()
                finally:
                    if self._owned:
                        with contextlib.suppress(OSError, ValueError):
                            self._stream.close()


# --- input sources ----------------------------------------------------------------------


class _InputSource:
    """Where console input comes from.  :meth:`fds` are polled; :meth:`read`
    returns the bytes of one that is readable (b"" when it has nothing after all,
    None when it is gone for good)."""

    escape = False

    def start(self) -> None:
        """Called once, before the input thread starts (a terminal goes raw)."""

    def fds(self) -> list[int]:
        raise NotImplementedError

    def read(self, fd: int) -> bytes | None:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the source holds (idempotent)."""


class _TerminalInput(_InputSource):
    """stdin, a terminal: raw mode while the guest runs, Ctrl-A keys."""

    escape = True

    def __init__(self, fd: int, echo: TextIO | None = None) -> None:
        self.fd = fd
        self._saved: list[Any] | None = None
        self._lock = threading.Lock()
        self.echo = echo

    def start(self) -> None:
        self.enter_raw()

    def enter_raw(self) -> None:
        import termios

        with self._lock:
            if self._saved is not None:
                return
            try:
                saved = termios.tcgetattr(self.fd)
            except termios.error:
                return
            raw: list[Any] = [list(item) if isinstance(item, list) else item for item in saved]
            raw[0] &= ~(
                termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
                | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON
            )  # fmt: skip
            # Output processing stays on (OPOST, ONLCR): a guest's "\n" starts a new line.
            raw[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
            raw[2] = (raw[2] & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
            raw[6][termios.VMIN] = 1
            raw[6][termios.VTIME] = 0
            termios.tcsetattr(self.fd, termios.TCSANOW, raw)
            self._saved = saved
            _RESTORE.add(self)

    def restore(self) -> None:
        """Put the terminal back as it was (idempotent; safe from atexit)."""
        import termios

        with self._lock:
            saved, self._saved = self._saved, None
            _RESTORE.discard(self)
            if saved is not None:
                with contextlib.suppress(termios.error, OSError):
                    termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)

    def fds(self) -> list[int]:
        return [self.fd]

    def read(self, fd: int) -> bytes | None:
        try:
            data = os.read(fd, 1024)
        except BlockingIOError:
            return b""
        except OSError:
            return None
        return data or None

    def close(self) -> None:
        self.restore()


class _PtyInput(_InputSource):
    """The master side of a pty made for the console (``serial = "pty"``)."""

    def __init__(self, master: int, slave: int, path: str) -> None:
        self.master = master
        self.slave = slave  # kept open: without it, reading the master fails (EIO) until a client opens it
        self.path = path

    def fds(self) -> list[int]:
        return [self.master]

    def read(self, fd: int) -> bytes | None:
        try:
            return os.read(fd, 1024)
        except BlockingIOError:
            return b""
        except OSError:
            return None

    def close(self) -> None:
        for fd in (self.slave, self.master):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.master = self.slave = -1


class _PtyStream:
    """Writes to a pty master: waits at most :data:`PTY_WRITE_WAIT` for a reader
    to make room, then drops the rest (an unattended pty must not stall the guest)."""

    def __init__(self, source: _PtyInput) -> None:
        self._source = source
        self.dropped = 0

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        deadline: float | None = None
        while view:
            fd = self._source.master
            if fd < 0:
                return len(data)
            try:
                written = os.write(fd, view)
            except BlockingIOError:
                now = time.monotonic()
                deadline = deadline or now + PTY_WRITE_WAIT
                if now >= deadline:
                    if not self.dropped:
                        log.warning("nobody reads the console pty %s: its output is dropped", self._source.path)
                    self.dropped += len(view)
                    return len(data)
                select.select([], [fd], [], deadline - now)
                continue
            view = view[written:]
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class _SocketInput(_InputSource):
    """A Unix socket server (``serial = "unix:PATH"``): one client at a time."""

    def __init__(self, server: socket.socket, path: str) -> None:
        self.server = server
        self.path = path
        self.client: socket.socket | None = None
        self._backlog = bytearray()
        self._lock = threading.Lock()

    def fds(self) -> list[int]:
        with self._lock:
            if self.client is not None:
                return [self.client.fileno()]
        return [self.server.fileno()] if self.server.fileno() >= 0 else []

    def read(self, fd: int) -> bytes | None:
        if fd == self.server.fileno():
            try:
                client, _ = self.server.accept()
            except OSError:
                return b""
            with self._lock:
                backlog, self._backlog = bytes(self._backlog), bytearray()
                self.client = client
            log.info("console client connected to %s", self.path)
            if backlog:
                self._send(backlog)
            return b""
        with self._lock:
            current = self.client
        if current is None:
            return b""
        try:
            data = current.recv(1024)
        except OSError:
            data = b""
        if not data:
            self._drop_client(current)
        return data

    def _drop_client(self, client: socket.socket) -> None:
        with self._lock:
            if self.client is client:
                self.client = None
        with contextlib.suppress(OSError):
            client.close()

    def _send(self, data: bytes) -> None:
        with self._lock:
            client = self.client
            if client is None:
                self._backlog += data
                del self._backlog[:-SOCKET_BACKLOG]
                return
        try:
            client.sendall(data)
        except OSError:  # the client went away: keep the output for the next one
            self._drop_client(client)
            with self._lock:
                self._backlog += data
                del self._backlog[:-SOCKET_BACKLOG]

    def close(self) -> None:
        with self._lock:
            client, self.client = self.client, None
        if client is not None:
            with contextlib.suppress(OSError):
                client.close()
        with contextlib.suppress(OSError):
            self.server.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class _SocketStream:
    def __init__(self, source: _SocketInput) -> None:
        self._source = source

    def write(self, data: bytes) -> int:
        self._source._send(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Pump(threading.Thread):
    """Reads the console input and hands it to the UART, waiting for room;
    handles the Ctrl-A keys of an interactive terminal."""

    def __init__(self, source: _InputSource, uart: SerialPort, quit: Callable[[], None]) -> None:
        super().__init__(name="pyvmm-console-input", daemon=True)
        self.source = source
        self.uart = uart
        self.quit = quit
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._escaped = False
        self.error: BaseException | None = None

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self.is_alive() and threading.current_thread() is not self:
            self.join(5.0)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                fds = self.source.fds()
                try:
                    readable, _, _ = select.select([self._wake_r, *fds], [], [], _POLL)
                except (OSError, ValueError):
                    return
                for fd in readable:
                    if fd == self._wake_r or self._stopping.is_set():
                        return
                    data = self.source.read(fd)
                    if data is None:
                        log.info("the console input closed")
                        return
                    if data:
                        self._feed(self._keys(data) if self.source.escape else data)
        except BaseException as exc:  # noqa: BLE001 - reported, and the run goes on without input
            self.error = exc
            log.warning("the console input failed: %s", exc)

    def _keys(self, data: bytes) -> bytes:
        """``data`` less the Ctrl-A key sequences, which act here."""
        out = bytearray()
        for byte in data:
            if not self._escaped:
                if byte == ESCAPE:
                    self._escaped = True
                else:
                    out.append(byte)
                continue
            self._escaped = False
            if byte in (ord("x"), ord("X"), 0x18):  # x, or Ctrl-X as QEMU also takes
                self.quit()
            elif byte == ESCAPE:
                out.append(ESCAPE)
            elif byte in (ord("h"), ord("H"), ord("?")):
                with contextlib.suppress(OSError, ValueError):
                    sys.stderr.write(ESCAPE_HELP.decode())
                    sys.stderr.flush()
            else:  # not a key of ours: the guest gets both
                out += bytes((ESCAPE, byte))
        return bytes(out)

    def _feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self._stopping.is_set():
            taken = self.uart.receive(bytes(view))
            view = view[taken:]
            if view:
                self.uart.rx.wait_for_room(_POLL)


# --- terminals restored at exit ----------------------------------------------------------

_RESTORE: set[_TerminalInput] = set()


def restore_terminals() -> None:
    """Put every terminal the console made raw back as it was (atexit, signal paths)."""
    for terminal in list(_RESTORE):
        terminal.restore()


def _register_atexit() -> None:
    import atexit

    atexit.register(restore_terminals)


_register_atexit()


# --- opening ------------------------------------------------------------------------------


def _stdin_terminal() -> int | None:
    """stdin's descriptor when it is a terminal (and stdin is the process's own,
    not a test's stand-in), else None."""
    stdin = sys.stdin
    if stdin is None:
        return None
    try:
        fd = stdin.fileno()
    except (OSError, ValueError, AttributeError):
        return None
    try:
        return fd if os.isatty(fd) else None
    except OSError:
        return None


def serial_kind(serial: str) -> str:
    """ "stdio", "none", "pty", "unix" or "file"."""
    if serial in ("stdio", "none", "pty"):
        return serial
    if serial.startswith("unix:"):
        return "unix"
    return "file"


def serial_path(serial: str) -> str:
    """The path of a ``unix:PATH``, ``file:PATH`` or plain ``PATH`` console."""
    for prefix in ("unix:", "file:"):
        if serial.startswith(prefix):
            return serial[len(prefix) :]
    return serial


def open_serial(serial: str, where: str, inputs: dict[str, Path], *, interactive: bool = True) -> ConsoleOutput | None:
    """The console ``serial`` names, opened without blocking: a FIFO without a
    reader is an error, never a wait.

    :param where: the option or machine-file field, for messages.
    :param inputs: files the run reads (kernel, initrd, machine file), by their
        option: the console must not overwrite one of them.
    :param interactive: with ``stdio``, read stdin when it is a terminal.
    :raises ConfigError: naming ``where``.
    """
    kind = serial_kind(serial)
    if kind == "none":
        return None
    if kind == "stdio":
        fd = _stdin_terminal() if interactive else None
        source = _TerminalInput(fd) if fd is not None else None
        return ConsoleOutput(sys.stdout.buffer, where, "stdout", owned=False, source=source)
    if kind == "pty":
        return _open_pty(where)
    if kind == "unix":
        return _open_socket(serial_path(serial), where)
    return _open_file(serial_path(serial), where, inputs)


def _open_pty(where: str) -> ConsoleOutput:
    import termios
    import tty

    try:
        master, slave = os.openpty()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot make a pty: {exc.strerror or exc}") from None
    try:
        path = os.ttyname(slave)
    except OSError as exc:
        os.close(master)
        os.close(slave)
        raise ConfigError(f"{where}: cannot name the new pty: {exc.strerror or exc}") from None
    with contextlib.suppress(termios.error):
        tty.setraw(slave)  # a client sees the guest's bytes as they are
    os.set_blocking(master, False)
    for fd in (master, slave):
        os.set_inheritable(fd, False)
    source = _PtyInput(master, slave, path)
    return ConsoleOutput(_PtyStream(source), where, path, owned=True, source=source)  # type: ignore[arg-type]


def _open_socket(path: str, where: str) -> ConsoleOutput:
    import socket  # here: only a unix: console needs it

    if not path:
        raise ConfigError(f"{where}: unix: needs a path (unix:/tmp/console.sock)")
    try:
        info: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        info = None
    except OSError as exc:
        raise ConfigError(f"{where}: {path}: cannot look it up: {exc.strerror or exc}") from None
    if info is not None:
        if not stat.S_ISSOCK(info.st_mode):
            from pyvmm.config import file_kind

            raise ConfigError(f"{where}: {path} is {file_kind(info.st_mode)}, not a socket; it is left alone")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # a socket nobody listens on: left over from an earlier run
        else:
            raise ConfigError(f"{where}: {path}: another program listens on this socket")
        finally:
            probe.close()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(path)
        server.listen(1)
    except OSError as exc:
        server.close()
        raise ConfigError(f"{where}: cannot listen on {path}: {exc.strerror or exc}") from None
    source = _SocketInput(server, path)
    return ConsoleOutput(_SocketStream(source), where, path, owned=True, source=source)  # type: ignore[arg-type]


def _open_file(serial: str, where: str, inputs: dict[str, Path]) -> ConsoleOutput:
    if not serial:
        raise ConfigError(f"{where}: file: needs a path (file:console.log)")
    try:
        info: os.stat_result | None = os.stat(serial)
    except FileNotFoundError:
        info = None
    except OSError as exc:
        raise ConfigError(f"{where}: {serial}: cannot look it up: {exc.strerror or exc}") from None
    if info is not None:
        if stat.S_ISDIR(info.st_mode) or stat.S_ISBLK(info.st_mode) or stat.S_ISSOCK(info.st_mode):
            from pyvmm.config import file_kind

            raise ConfigError(
                f"{where}: {serial} is {file_kind(info.st_mode)}; the console goes to a regular file, "
                "a terminal, a FIFO or a device such as /dev/null (or use unix:PATH for a socket)"
            )
        for option, path in inputs.items():
            with contextlib.suppress(OSError):
                if os.path.samefile(serial, path):
                    raise ConfigError(
                        f"{where}: {serial} is the {option} file; writing the console there would overwrite it"
                    )
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(serial, flags | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as exc:
        if info is not None and stat.S_ISFIFO(info.st_mode) and exc.errno == errno.ENXIO:
            raise ConfigError(f"{where}: {serial} is a FIFO with no reader (start the reader first)") from None
        raise ConfigError(f"{where}: cannot open {serial} for writing: {exc.strerror or exc}") from None
    # Opened without blocking (a FIFO's open waits for a reader otherwise); writes
    # block as they would to a pipe or terminal on stdout.
    os.set_blocking(fd, True)
    return ConsoleOutput(os.fdopen(fd, "wb"), where, serial, owned=True)


# --- the status line ------------------------------------------------------------------------

_active_status: StatusLine | None = None


def clear_status() -> None:
    """Wipe the status line, if one is shown (before anything else goes to stderr)."""
    status = _active_status
    if status is not None and status.shown:
        status.clear()


class StatusLine:
    """``pyvmm: guest time 12 s, 3400 exits/s, 40800 exits`` on a terminal,
    shown once the console has been quiet for ``quiet`` seconds and redrawn
    every ``period`` seconds; wiped as soon as the console writes.

    :param sample: returns (exits so far, nanoseconds spent in the guest so far).
    :param console: the console whose writes wipe the line (and whose silence it
        waits for); None: the guest has no console on this terminal.
    """

    def __init__(
        self,
        stream: TextIO,
        sample: Callable[[], tuple[int, int]],
        console: ConsoleOutput | None,
        *,
        quiet: float = 3.0,
        period: float = 1.0,
    ) -> None:
        self.stream = stream
        self.sample = sample
        self.console = console
        self.quiet = quiet
        self.period = period
        self.shown = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pyvmm-status", daemon=True)
        self._started = 0.0

    def start(self) -> StatusLine:
        global _active_status
        self._started = time.monotonic()
        if self.console is not None:
            self.console.status = self
        _active_status = self
        self._thread.start()
        return self

    def stop(self) -> None:
        global _active_status
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)
        if self.console is not None:
            self.console.status = None
        if _active_status is self:
            _active_status = None
        self.clear()

    def clear(self) -> None:
        with self._lock:
            if not self.shown:
                return
            self.shown = False
            with contextlib.suppress(OSError, ValueError):
                self.stream.write("\r\x1b[K")
                self.stream.flush()

    def text(self, elapsed: float, rate: float, exits: int) -> str:
        """The line: how long the guest has run, and how often it exits."""
        return f"pyvmm: guest time {elapsed:.0f} s, {rate:.0f} exits/s, {exits} exits"

    def _run(self) -> None:
        console = self.console
        last_written = console.written if console is not None else 0
        quiet_since = time.monotonic()
        last_exits, _ = self.sample()
        last_time = time.monotonic()
        while not self._stop.wait(self.period):
            now = time.monotonic()
            if console is not None and console.written != last_written:
                last_written = console.written
                quiet_since = now
                continue
            exits, _ = self.sample()
            rate = (exits - last_exits) / max(now - last_time, 1e-9)
            last_exits, last_time = exits, now
            if now - quiet_since < self.quiet or (console is not None and not console.at_line_start):
                continue
            line = self.text(now - self._started, rate, exits)
            with self._lock:
                if self._stop.is_set():
                    return
                # Shown only while nothing else wrote: a console write wipes it first.
                if console is not None and console.written != last_written:
                    continue
                with contextlib.suppress(OSError, ValueError):
                    self.stream.write("\r\x1b[K" + line)
                    self.stream.flush()
                self.shown = True
