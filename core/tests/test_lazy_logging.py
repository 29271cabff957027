"""pyvmm.lazy_logging: the same records as a logging.Logger, loaded late."""

from __future__ import annotations

import logging

import pytest

from pyvmm.lazy_logging import LazyLogger


def _emit_from_here(log: LazyLogger) -> None:
    log.warning("port %#x unhandled", 0x80)
    try:
        raise OSError("boom")
    except OSError:
        log.exception("closing %s failed", "uart")
    log.debug("kick failed: %s", "EBADF")


def test_records_reach_the_handlers_with_the_callers_place(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="pyvmm.lazytest"):
        _emit_from_here(LazyLogger("pyvmm.lazytest"))
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("pyvmm.lazytest", logging.WARNING, "port 0x80 unhandled"),
        ("pyvmm.lazytest", logging.ERROR, "closing uart failed"),
        ("pyvmm.lazytest", logging.DEBUG, "kick failed: EBADF"),
    ]
    assert {r.funcName for r in caplog.records} == {"_emit_from_here"}, "the caller, not the wrapper"
    assert caplog.records[1].exc_info is not None and caplog.records[1].exc_info[0] is OSError


def test_the_level_of_the_logger_still_filters(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pyvmm.lazytest"):
        LazyLogger("pyvmm.lazytest").info("hidden")
    assert caplog.records == []
