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

import logging
import os
import sys

ENV_LOG = "PYVMM_LOG"
#: pyvmm's one-line notes: shown by default, silenced by ``-q``.
NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "notice": NOTICE,
    "warning": logging.WARNING,
    "error": logging.ERROR,
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


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == NOTICE:
            return f"pyvmm: {record.getMessage()}"
        return f"pyvmm: {record.levelname.lower()}: {record.getMessage()}"


class StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is when a record comes (tests swap it),
    wiping the run's status line first."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if "pyvmm.machine.console" in sys.modules:
                sys.modules["pyvmm.machine.console"].clear_status()
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never take the VMM down
            self.handleError(record)


_configured: dict[str, int] = {}


def configure(*, verbose: int = 0, quiet: bool = False, level: str | None = None) -> None:
    """Send pyvmm's records to stderr at the level the options (else
    ``PYVMM_LOG``, else ``notice``) ask for.  Called on every ``pyvmm`` command.

    :raises LogSettingError: a bad ``--log-level`` or ``PYVMM_LOG``.
    """
    logger = logging.getLogger("pyvmm")
    if not any(isinstance(handler, StderrHandler) for handler in logger.handlers):
        handler = StderrHandler()
        handler.setFormatter(_Formatter())
        logger.addHandler(handler)
    chosen: int | None = None
    loggers: dict[str, int] = {}
    env = os.environ.get(ENV_LOG, "")
    if env.strip():
        chosen, loggers = parse_levels(env, f"${ENV_LOG}")
    if level is not None:
        chosen, extra = parse_levels(level, "--log-level")
        loggers.update(extra)
    if quiet:
        chosen = logging.WARNING
    elif verbose:
        chosen = logging.INFO if verbose == 1 else logging.DEBUG
    # Levels a previous command in this process set for single loggers go back.
    for name in list(_configured):
        logging.getLogger(name).setLevel(logging.NOTSET)
        del _configured[name]
    logger.setLevel(chosen if chosen is not None else DEFAULT_LEVEL)
    for name, number in loggers.items():
        logging.getLogger(name).setLevel(number)
        _configured[name] = number


def enabled(level: int) -> bool:
    return logging.getLogger("pyvmm").isEnabledFor(level)
