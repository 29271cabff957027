"""pyvmm.testing.model_session: a backend's driver model under a whole pytest
session, and the guard that fails a test which broke one of its rules."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

CONFTEST = """
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from pyvmm.testing.model_session import SessionModel

INSTALLS = []


@dataclass
class Call:
    name: str


@dataclass
class Rejection:
    call: Call
    rule: str
    detail: str


class FakeModel:
    def __init__(self):
        self.rejections = []
        self.closed = False

    @contextmanager
    def installed(self):
        INSTALLS.append(self)
        yield self
        INSTALLS.remove(self)

    def close_all(self):
        self.closed = True


SESSION = SessionModel("acme", "the Acme driver", FakeModel)


def pytest_configure(config):
    SESSION.configure(config)


def pytest_unconfigure(config):
    SESSION.unconfigure(config)


@pytest.fixture
def session_model(pytestconfig):
    return SESSION.model(pytestconfig)


@pytest.fixture
def model():
    yield from SESSION.fresh()
"""

TESTS = """
import conftest


def test_keeps_the_rules(session_model):
    assert conftest.INSTALLS == [session_model]


def test_breaks_one(session_model):
    session_model.rejections.append(conftest.Rejection(conftest.Call("ACME_RUN"), "ACME-1", "bad flags"))


def test_fresh_model_is_installed_over_the_session_one(session_model, model):
    assert conftest.INSTALLS == [session_model, model]
    model.rejections.append(conftest.Rejection(conftest.Call("ACME_RUN"), "ACME-2", "on purpose"))
"""


def test_the_guard_fails_only_the_test_that_broke_a_session_rule(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_acme=TESTS)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(["*pyvmm-acme broke 1 rule(s) of the Acme driver:*", "*ACME_RUN: ACME-1 bad flags*"])
    assert "ACME-2" not in result.stdout.str()
