"""The console's output: where a machine's serial port writes, opened safely.

Both ``pyvmm run`` and :class:`pyvmm.machine.Machine` open the console through
:func:`open_serial`: a FIFO without a reader is an error, never a wait; a
directory, a block device or one of the run's own input files is refused; and a
write error (a full disk, ``/dev/full``, a closed pipe) is reported once, as
:class:`SerialOutputError`, instead of a traceback at every flush.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from pathlib import Path
from typing import BinaryIO, NoReturn

from pyvmm.errors import ConfigError, PyvmmError


class SerialOutputError(PyvmmError):
    """The console's output cannot be written (a full disk, ``/dev/full``, a
    closed pipe).  Raised from the UART's write, so it ends the run as a device
    error would: ``pyvmm: error:``, status 2."""


class ConsoleOutput:
    """The console's stream, guarded: the first write error raises
    :class:`SerialOutputError` naming the option and the file; after it, writes
    and flushes do nothing, so tearing the machine down (which flushes) cannot
    raise the same error again or print a traceback."""

    def __init__(self, stream: BinaryIO, where: str, name: str, *, owned: bool) -> None:
        self._stream = stream
        self._where = where
        self._name = name
        self._owned = owned
        self.error: SerialOutputError | None = None

    def _fail(self, exc: BaseException) -> NoReturn:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        self.error = SerialOutputError(f"{self._where}: cannot write the console output to {self._name}: {detail}")
        raise self.error from exc

    def write(self, data: bytes) -> int:
        if self.error is not None:
            return len(data)
        try:
            return self._stream.write(data)
        except (OSError, ValueError) as exc:  # ValueError: the stream was closed under us
            self._fail(exc)

    def flush(self) -> None:
        if self.error is not None:
            return
        try:
            self._stream.flush()
        except (OSError, ValueError) as exc:
            self._fail(exc)

    def close(self) -> None:
        """Flush; close the file if it was opened for this run (never stdout).
        An error here is reported once, like a write's."""
        try:
            if self.error is None:
                self.flush()
        finally:
            if self._owned:
                with contextlib.suppress(OSError, ValueError):
                    self._stream.close()


def open_serial(serial: str, where: str, inputs: dict[str, Path]) -> ConsoleOutput | None:
    """The console output ``serial`` names ("stdio", "none" or a file), opened
    without blocking: a FIFO without a reader is an error, never a wait.

    :param where: the option or machine-file field, for messages.
    :param inputs: files the run reads (kernel, initrd, machine file), by their
        option: the console must not overwrite one of them.
    :raises ConfigError: naming ``where``.
    """
    if serial == "none":
        return None
    if serial == "stdio":
        return ConsoleOutput(sys.stdout.buffer, where, "stdout", owned=False)
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
                "a terminal, a FIFO or a device such as /dev/null"
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
        if info is not None and stat.S_ISFIFO(info.st_mode) and exc.errno == 6:  # ENXIO
            raise ConfigError(f"{where}: {serial} is a FIFO with no reader (start the reader first)") from None
        raise ConfigError(f"{where}: cannot open {serial} for writing: {exc.strerror or exc}") from None
    # Opened without blocking (a FIFO's open waits for a reader otherwise); writes
    # block as they would to a pipe or terminal on stdout.
    os.set_blocking(fd, True)
    return ConsoleOutput(os.fdopen(fd, "wb"), where, serial, owned=True)
