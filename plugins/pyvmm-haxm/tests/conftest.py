"""The HAXM driver model, installed for the whole test session.

HAXM cannot run here, so every test of pyvmm-haxm -- and the conformance suite
under ``pytest --pyvmm-backend haxm`` -- talks to the driver model the plugin
ships (:class:`pyvmm_haxm.model.HaxmModel`, the Linux driver) through the
plugin's seam.  It is installed at configure time rather than by a fixture,
because the conformance suite lives outside this directory and a conftest's
fixtures do not reach it.  ``PYVMM_HAXM_MODEL_OS=win32`` (or ``darwin``) runs
the whole session, conformance suite included, on that host's driver instead.

A guard plugin (registered globally, so it also covers the conformance suite)
checks after every test that the plugin broke no rule of the session model;
tests that break rules on purpose use a fresh model of their own.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from typing import Any

import pytest

from pyvmm.plugins import PluginRegistry
from pyvmm.testing.model_session import SessionModel
from pyvmm.vm import Backend

INSTALLED = importlib.util.find_spec("pyvmm_haxm") is not None
if INSTALLED:
    from pyvmm_haxm.model import HaxmModel, HaxmWindowsModel
else:
    collect_ignore_glob = ["test_*.py"]

SESSION_OS = os.environ.get("PYVMM_HAXM_MODEL_OS", "linux")


def make_model(host_os: str, **options: Any) -> HaxmModel | HaxmWindowsModel:
    """A model of the HAXM driver of ``host_os``."""
    if host_os == "win32":
        return HaxmWindowsModel(**options)
    return HaxmModel(host_os, **options)


SESSION: SessionModel[Any] = SessionModel("haxm", "the HAXM interface", lambda: make_model(SESSION_OS))


def pytest_configure(config: pytest.Config) -> None:
    if INSTALLED:
        SESSION.configure(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    SESSION.unconfigure(config)


@pytest.fixture(scope="session")
def session_model(pytestconfig: pytest.Config) -> Any:
    """The model the whole session runs on (the conformance suite's too)."""
    return SESSION.model(pytestconfig)


@pytest.fixture(params=["linux", "darwin", "win32"])
def host_os(request: pytest.FixtureRequest) -> str:
    """Each host HAXM ran on: Linux and macOS ioctls, Windows DeviceIoControl."""
    return str(request.param)


@pytest.fixture
def model(host_os: str) -> Iterator[Any]:
    """A fresh model of this test's own, of each host OS, installed for the test."""
    yield from SESSION.fresh(lambda: make_model(host_os))


def make_backend() -> Backend:
    """The haxm backend, registered in a private registry, on the current seam."""
    from pyvmm_haxm.plugin import plugin

    registry = PluginRegistry()
    return Backend(registry.register(plugin))


@pytest.fixture
def haxm(model: Any) -> Backend:
    """The backend on this test's fresh model."""
    backend = make_backend()
    assert backend.availability().available, backend.availability().reason
    return backend


def pytest_report_header(config: pytest.Config) -> list[str]:
    if not INSTALLED:
        return ["pyvmm-haxm: not installed here, its tests are not collected"]
    model = SESSION.installed_model(config)
    return [f"pyvmm-haxm: driver model {type(model).__name__} ({SESSION_OS}) installed"] if model else []
