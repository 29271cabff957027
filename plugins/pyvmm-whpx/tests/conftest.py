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
from contextlib import ExitStack

import pytest

from pyvmm.plugins import PluginRegistry
from pyvmm.vm import Backend

INSTALLED = importlib.util.find_spec("pyvmm_whpx") is not None
if INSTALLED:
    from pyvmm_whpx.model import WhpxModel
else:
    collect_ignore_glob = ["test_*.py"]

_SESSION_KEY = pytest.StashKey["WhpxModel"]()
_STACK_KEY = pytest.StashKey[ExitStack]()


class _RuleGuard:
    """After each test: the session model saw no rule broken."""

    def __init__(self, model: WhpxModel) -> None:
        self.model = model

    @pytest.fixture(autouse=True)
    def _whpx_session_model_stays_clean(self) -> Iterator[None]:
        before = len(self.model.rejections)
        yield
        broken = self.model.rejections[before:]
        del self.model.rejections[before:]
        if broken:
            lines = "\n".join(f"  {r.call.name}: {r.rule} {r.detail}" for r in broken)
            pytest.fail(f"pyvmm-whpx broke {len(broken)} rule(s) of the WHPX API:\n{lines}")


def pytest_configure(config: pytest.Config) -> None:
    if not INSTALLED:
        return
    model = WhpxModel()
    stack = ExitStack()
    stack.enter_context(model.installed())
    config.stash[_SESSION_KEY] = model
    config.stash[_STACK_KEY] = stack
    config.pluginmanager.register(_RuleGuard(model), "pyvmm-whpx-rule-guard")


def pytest_unconfigure(config: pytest.Config) -> None:
    stack = config.stash.get(_STACK_KEY, None)
    if stack is not None:
        stack.close()


@pytest.fixture(scope="session")
def session_model(pytestconfig: pytest.Config) -> WhpxModel:
    return pytestconfig.stash[_SESSION_KEY]


@pytest.fixture
def model() -> Iterator[WhpxModel]:
    """A fresh model of this test's own, installed for the test."""
    fresh = WhpxModel()
    with fresh.installed():
        yield fresh
    fresh.close_all()


def make_backend() -> Backend:
    """The whpx backend, registered in a private registry, on the current seam."""
    from pyvmm_whpx.plugin import plugin

    return Backend(PluginRegistry().register(plugin))


@pytest.fixture
def whpx(model: WhpxModel) -> Backend:
    backend = make_backend()
    assert backend.availability().available, backend.availability().reason
    return backend
