"""The Gunyah driver model, installed for the whole test session.

Gunyah cannot run here, so every test of pyvmm-gunyah -- and the conformance
suite under ``pytest --pyvmm-backend gunyah`` -- talks to the driver model the
plugin ships, :class:`pyvmm_gunyah.model.GunyahModel`, through the plugin's OS
seam.  The model is installed at configure time rather than by a fixture,
because the conformance suite lives outside this directory and a conftest's
fixtures do not reach it.

A guard plugin (registered globally, so it also covers the conformance suite)
checks after every test that the plugin broke no rule of the session model;
tests that break rules on purpose use a fresh model of their own.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest

from pyvmm.plugins import PluginRegistry
from pyvmm.testing.model_session import SessionModel
from pyvmm.vm import Backend

#: An environment without the distribution (tox's envs for other backends that
#: collect every plugin's tests) cannot run these: say so instead of erroring.
INSTALLED = importlib.util.find_spec("pyvmm_gunyah") is not None
if INSTALLED:
    from pyvmm_gunyah.model import GunyahModel
else:
    collect_ignore_glob = ["test_*.py"]

SESSION: SessionModel[GunyahModel] = SessionModel("gunyah", "the Gunyah interface", lambda: GunyahModel())  # noqa: PLW0108 - unbound where the plugin is not installed


def pytest_configure(config: pytest.Config) -> None:
    if INSTALLED:
        SESSION.configure(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    SESSION.unconfigure(config)


@pytest.fixture(scope="session")
def session_model(pytestconfig: pytest.Config) -> GunyahModel:
    """The model the whole session runs on (the conformance suite's too)."""
    return SESSION.model(pytestconfig)


@pytest.fixture
def model() -> Iterator[GunyahModel]:
    """A fresh model of this test's own, installed for the test."""
    yield from SESSION.fresh()


def make_backend() -> Backend:
    """The gunyah backend, registered in a private registry, on the current seam."""
    from pyvmm_gunyah.plugin import plugin

    registry = PluginRegistry()
    return Backend(registry.register(plugin))


@pytest.fixture
def gunyah(model: GunyahModel) -> Backend:
    """The backend on this test's fresh model."""
    backend = make_backend()
    assert backend.availability().available, backend.availability().reason
    return backend


def pytest_report_header(config: pytest.Config) -> list[str]:
    if not INSTALLED:
        return ["pyvmm-gunyah: not installed here, its tests are not collected"]
    model = SESSION.installed_model(config)
    return [f"pyvmm-gunyah: driver model {type(model).__name__} (ABI {model.abi}) installed"] if model else []
