"""Fixtures for pyvmm-core's tests: an isolated registry and contract backends."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from coretests_support import MakeBackend, RecordingBackend, register

from pyvmm import plugins
from pyvmm.capabilities import Capability
from pyvmm.plugins import ENV_BACKEND, PluginRegistry
from pyvmm.vm import Backend


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[PluginRegistry]:
    """A fresh registry that is also the process default for the test, so nothing
    a test does depends on (or touches) the backends installed in this environment."""
    fresh = PluginRegistry()
    fresh._entry_points_loaded = True  # the installed entry points are not part of these tests
    monkeypatch.setattr(plugins, "_default", fresh)
    yield fresh


@pytest.fixture(autouse=True)
def _no_backend_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_BACKEND, raising=False)


@pytest.fixture
def make_backend(registry: PluginRegistry) -> MakeBackend:
    """``make_backend(caps, name=..., **ContractTestBackend kwargs)`` -> (test backend, core Backend)."""

    def make(
        capabilities: Iterable[Capability | str] = (), name: str = "contract-test", **kwargs: Any
    ) -> tuple[RecordingBackend, Backend]:
        test_backend = RecordingBackend(name, capabilities, **kwargs)
        return test_backend, register(registry, test_backend)

    return make
