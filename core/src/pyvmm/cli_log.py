"""How the ``pyvmm`` command logs: one ``pyvmm: ...`` line per record on stderr.

Levels, from quiet to chatty: ``error``, ``warning``, ``notice`` (the default:
pyvmm's own one-line notes, such as which backend runs the guest and where the
console is), ``info``, ``debug``.  ``-q`` is ``warning``, ``-v`` is ``info``,
``-vv`` is ``debug``; ``--log-level LEVEL`` sets it outright.  Without an option
the environment variable ``PYVMM_LOG`` is read: a level (``PYVMM_LOG=debug``),
optionally followed by per-logger levels (``PYVMM_LOG=info,pyvmm.gdbstub=debug``).

Warnings read ``pyvmm: warning: ...`` (kvm-unit-tests' runner accepts stderr
lines that say "warning"); notices read ``pyvmm: ...``.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from pyvmm import lazy_logging

if TYPE_CHECKING:
    import logging

ENV_LOG = "PYVMM_LOG"
# logging's own numbers (DEBUG, INFO, WARNING, ERROR), written out: choosing a
# level must not import logging, which a plain run never needs (start-up time).
DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40
#: pyvmm's one-line notes: shown by default, silenced by ``-q``.
NOTICE = 25

LEVELS = {
    "debug": DEBUG,
    "info": INFO,
    "notice": NOTICE,
    "warning": WARNING,
    "error": ERROR,
}
DEFAULT_LEVEL = NOTICE


class LogSettingError(ValueError):
    """A ``--log-level`` or ``PYVMM_LOG`` value pyvmm does not know."""


def parse_levels(text: str, where: str) -> tuple[int | None, dict[str, int]]:
    """``"info,pyvmm.gdbstub=debug"`` -> (INFO, {"pyvmm.gdbstub": DEBUG}).

    :raises LogSettingError: naming ``where`` and the known levels.
    """
    level: int | None = None
    loggers: dict[str, int] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, value = item.rpartition("=")
        number = LEVELS.get(value.strip().lower())
        if number is None:
            known = ", ".join(LEVELS)
            raise LogSettingError(f"{where}: unknown log level {value.strip()!r} (use {known})")
        if name:
            loggers[name.strip()] = number
        else:
            level = number
    return level, loggers


def _handler() -> logging.Handler:
    """The stderr handler (its classes derive from logging's, so they are made
    only once logging is loaded)."""
    global _handler_type
    if _handler_type is None:
        _handler_type = _handler_class()
    handler = _handler_type()
    return handler


def _handler_class() -> type[logging.Handler]:
    import logging

    logging.addLevelName(NOTICE, "NOTICE")

    class Formatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return _line(record.levelno, record.getMessage())

    class StderrHandler(logging.Handler):
        """Writes to whatever ``sys.stderr`` is when a record comes (tests swap
        it), wiping the run's status line first."""

        def __init__(self) -> None:
            super().__init__()
            self.setFormatter(Formatter())

        def emit(self, record: logging.LogRecord) -> None:
            try:
                _write(self.format(record))
            except Exception:  # noqa: BLE001 - logging must never take the VMM down
                self.handleError(record)

    return StderrHandler


_handler_type: type[logging.Handler] | None = None


def _line(level: int, message: str) -> str:
    if level == NOTICE:
        return f"pyvmm: {message}"
    name = {DEBUG: "debug", INFO: "info", WARNING: "warning", ERROR: "error"}.get(level)
    if name is None:
        import logging

        name = logging.getLevelName(level).lower()
    return f"pyvmm: {name}: {message}"


def _write(line: str) -> None:
    if "pyvmm.machine.console" in sys.modules:
        sys.modules["pyvmm.machine.console"].clear_status()
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


#: What :func:`configure` chose: the level of the ``pyvmm`` logger (None:
#: never configured) and the per-logger levels.
_level: int | None = None
_loggers: dict[str, int] = {}
#: Per-logger levels set in logging by the last configuration applied.
_configured: dict[str, int] = {}


def configure(*, verbose: int = 0, quiet: bool = False, level: str | None = None) -> None:
    """Send pyvmm's records to stderr at the level the options (else
    ``PYVMM_LOG``, else ``notice``) ask for.  Called on every ``pyvmm`` command.

    Applied to :mod:`logging` when it is loaded, or when the first record of a
    pyvmm logger loads it (:mod:`pyvmm.lazy_logging`); per-logger levels are
    applied at once.

    :raises LogSettingError: a bad ``--log-level`` or ``PYVMM_LOG``.
    """
    global _level, _loggers
    chosen: int | None = None
    loggers: dict[str, int] = {}
    env = os.environ.get(ENV_LOG, "")
    if env.strip():
        chosen, loggers = parse_levels(env, f"${ENV_LOG}")
    if level is not None:
        chosen, extra = parse_levels(level, "--log-level")
        loggers.update(extra)
    if quiet:
        chosen = WARNING
    elif verbose:
        chosen = INFO if verbose == 1 else DEBUG
    _level = chosen if chosen is not None else DEFAULT_LEVEL
    _loggers = loggers
    if loggers:
        lazy_logging.load()
    lazy_logging.when_loaded(_apply, floor=_level)


def configured() -> bool:
    """Whether :func:`configure` ran in this process."""
    return _level is not None


def _apply() -> None:
    """Make logging match the last :func:`configure`: the stderr handler on the
    ``pyvmm`` logger and the chosen levels."""
    import logging

    if _level is None:
        return
    logger = logging.getLogger("pyvmm")
    if _handler_type is None or not any(isinstance(handler, _handler_type) for handler in logger.handlers):
        logger.addHandler(_handler())
    # Levels a previous command in this process set for single loggers go back.
    for name in list(_configured):
        logging.getLogger(name).setLevel(logging.NOTSET)
        del _configured[name]
    logger.setLevel(_level)
    for name, number in _loggers.items():
        logging.getLogger(name).setLevel(number)
        _configured[name] = number


def enabled(level: int) -> bool:
    if "logging" in sys.modules or _level is None:
        lazy_logging.load()
        import logging

        return logging.getLogger("pyvmm").isEnabledFor(level)
    return level >= _level


def notice(message: str) -> None:
    """A ``pyvmm: ...`` note on stderr, at the ``notice`` level.

    Through logging when it is loaded (handlers, ``caplog`` and per-logger
    levels see the record as before); else written here, as the stderr handler
    would, so that a plain run does not load logging for its one note.
    """
    if "logging" in sys.modules or _level is None:
        lazy_logging.load()
        import logging

        logging.getLogger("pyvmm.cli").log(NOTICE, "%s", message)
    elif _level <= NOTICE:
        _write(_line(NOTICE, message))
