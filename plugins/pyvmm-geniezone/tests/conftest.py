"""The GenieZone driver model under every test of this directory, and under the
conformance suite with ``pytest --pyvmm-backend geniezone``.

GenieZone runs on MediaTek SoCs only, so the tests talk to the model the plugin
ships (:class:`pyvmm_geniezone.model.GenieZoneModel`) through the plugin's seam.
It is installed when pytest is configured: the conformance suite lives outside
this directory, out of reach of a conftest fixture, but not of a plugin object
registered with pytest -- which then checks after every test that no rule of the
session's model was broken.  Tests that break rules on purpose use a fresh model
(the ``model`` fixture).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest

from pyvmm.plugins import PluginRegistry
from pyvmm.testing.model_session import SessionModel
from pyvmm.vm import Backend

#: tox envs of other backends collect every plugin's tests: without the
#: distribution there is nothing to run here.
INSTALLED = importlib.util.find_spec("pyvmm_geniezone") is not None
if INSTALLED:
    from pyvmm_geniezone.model import GenieZoneModel
else:
    collect_ignore_glob = ["test_*.py"]

SESSION: SessionModel[GenieZoneModel] = SessionModel("geniezone", "the GenieZone driver", lambda: GenieZoneModel())  # noqa: PLW0108 - unbound where the plugin is not installed


def pytest_configure(config: pytest.Config) -> None:
    if INSTALLED:
        SESSION.configure(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    SESSION.unconfigure(config)


def pytest_report_header(config: pytest.Config) -> list[str]:
    if not INSTALLED:
        return ["pyvmm-geniezone: not installed here, its tests are not collected"]
    return ["pyvmm-geniezone: on the GenieZone driver model (pyvmm_geniezone.model)"]


@pytest.fixture(scope="session")
def session_model(pytestconfig: pytest.Config) -> GenieZoneModel:
    return SESSION.model(pytestconfig)


@pytest.fixture
def model() -> Iterator[GenieZoneModel]:
    """A fresh model for this test alone."""
    yield from SESSION.fresh()


def geniezone_backend() -> Backend:
    """The geniezone plugin in a registry of its own, on whatever seam is installed."""
    from pyvmm_geniezone.plugin import plugin

    return Backend(PluginRegistry().register(plugin))


@pytest.fixture
def geniezone(model: GenieZoneModel) -> Backend:
    """The backend on this test's fresh model."""
    backend = geniezone_backend()
    availability = backend.availability()
    assert availability.available, availability.reason
    return backend
