"""pytest plugin (entry point ``pytest11``): selects the backend under test."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pyvmm")
    group.addoption(
        "--pyvmm-backend",
        action="store",
        default=None,
        metavar="NAME",
        help="run pyvmm's conformance suite against the installed backend NAME",
    )
