"""The WHPX driver model, installed for the whole test session.

WHPX cannot run here, so every test of pyvmm-whpx -- and the conformance suite
under ``pytest --pyvmm-backend whpx`` -- talks to the model the plugin ships,
:class:`pyvmm_whpx.model.WhpxModel`, through the plugin's DLL seam.  It is
installed at configure time (the conformance suite lives outside this
directory, where a conftest's fixtures do not reach), and a guard plugin checks
after every test that the session model saw no rule broken; tests that break
rules on purpose use a fresh model of their own.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest

from pyvmm.plugins import PluginRegistry
from pyvmm.testing.model_session import SessionModel
from pyvmm.vm import Backend

INSTALLED = importlib.util.find_spec("pyvmm_whpx") is not None
if INSTALLED:
    from pyvmm_whpx.model import WhpxModel
else:
    collect_ignore_glob = ["test_*.py"]

SESSION: SessionModel[WhpxModel] = SessionModel("whpx", "the WHPX API", lambda: WhpxModel())  # noqa: PLW0108 - unbound where the plugin is not installed


def pytest_configure(config: pytest.Config) -> None:
    if INSTALLED:
        SESSION.configure(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    SESSION.unconfigure(config)


@pytest.fixture(scope="session")
def session_model(pytestconfig: pytest.Config) -> WhpxModel:
    return SESSION.model(pytestconfig)


@pytest.fixture
def model() -> Iterator[WhpxModel]:
    """A fresh model of this test's own, installed for the test."""
    yield from SESSION.fresh()


def make_backend() -> Backend:
    """The whpx backend, registered in a private registry, on the current seam."""
    from pyvmm_whpx.plugin import plugin

    return Backend(PluginRegistry().register(plugin))


@pytest.fixture
def whpx(model: WhpxModel) -> Backend:
    backend = make_backend()
    assert backend.availability().available, backend.availability().reason
    return backend
