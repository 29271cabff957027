"""Loggers that load :mod:`logging` at their first record, not at import.

``import logging`` costs several milliseconds of every start-up (it pulls in
``traceback``, ``linecache``, ``tokenize`` and more), and a plain run of a guest
emits no record from most of the modules that may log.  pyvmm's modules hold a
:class:`LazyLogger` instead of a :class:`logging.Logger`: the same records, at
the same names and levels, reaching the same handlers (``caplog`` included),
but :mod:`logging` is imported only when one is really emitted.

A configuration chosen before :mod:`logging` is loaded (the ``pyvmm`` command's
level and stderr handler, :mod:`pyvmm.cli_log`) is registered with
:func:`when_loaded` and applied just before the first record goes out.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import logging

_pending: list[Callable[[], None]] = []
#: Records below this level are dropped without loading logging, while it is
#: not loaded: set by whoever configures logging through :func:`when_loaded`
#: (the ``pyvmm`` command's level), so that a debug record nobody would see
#: does not cost the import.  None: every record loads logging.
_floor: int | None = None


def when_loaded(apply: Callable[[], None], floor: int | None = None) -> None:
    """Run ``apply`` now if :mod:`logging` is loaded, else before the first
    record of a :class:`LazyLogger` (or :func:`load`); until then records below
    ``floor`` are dropped unloaded (``apply`` gives them no handler anyway)."""
    global _floor
    if "logging" in sys.modules:
        apply()
        return
    _floor = floor
    if apply not in _pending:
        _pending.append(apply)


def load() -> None:
    """Import :mod:`logging` and apply what :func:`when_loaded` held back."""
    global _floor
    import logging  # noqa: F401 - the import is the point

    _floor = None
    while _pending:
        _pending.pop(0)()


# logging's level numbers, written out so that choosing one loads nothing.
_DEBUG, _INFO, _WARNING, _ERROR = 10, 20, 30, 40


class LazyLogger:
    """The :class:`logging.Logger` called ``name``, fetched at the first record."""

    __slots__ = ("_logger", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._logger: logging.Logger | None = None

    @property
    def logger(self) -> logging.Logger:
        if self._logger is None:
            load()
            import logging

            self._logger = logging.getLogger(self.name)
        return self._logger

    def log(self, level: int, msg: str, *args: Any, **kwargs: Any) -> None:
        self._emit(level, msg, args, kwargs)

    def debug(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self._emit(_DEBUG, msg, args, kwargs)

    def info(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self._emit(_INFO, msg, args, kwargs)

    def warning(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self._emit(_WARNING, msg, args, kwargs)

    def error(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self._emit(_ERROR, msg, args, kwargs)

    def exception(self, msg: str, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("exc_info", True)
        self._emit(_ERROR, msg, args, kwargs)

    def _emit(self, level: int, msg: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if _floor is not None and level < _floor and "logging" not in sys.modules:
            return
        # The record names the caller of debug() & co., not this wrapper.
        kwargs.setdefault("stacklevel", 3)
        self.logger.log(level, msg, *args, **kwargs)
