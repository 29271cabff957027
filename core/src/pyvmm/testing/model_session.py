"""A backend's driver model under a whole pytest session, with the rule guard.

A backend that cannot run here (Gunyah, GenieZone, HAXM, WHPX) tests against the
driver model it ships.  The model must be installed when pytest is configured,
not by a fixture: the conformance suite lives outside the backend's test
directory, out of reach of a conftest fixture, but not of a plugin object
registered with pytest.  That object is also the guard: after every test of the
session it fails the test if the session's model recorded a broken rule (tests
that break rules on purpose use a fresh model, :meth:`SessionModel.fresh`).

A backend's ``tests/conftest.py``::

    SESSION = SessionModel("acme", "the Acme driver", AcmeModel)

    def pytest_configure(config: pytest.Config) -> None:
        SESSION.configure(config)

    def pytest_unconfigure(config: pytest.Config) -> None:
        SESSION.unconfigure(config)

    @pytest.fixture(scope="session")
    def session_model(pytestconfig: pytest.Config) -> AcmeModel:
        return SESSION.model(pytestconfig)

    @pytest.fixture
    def model() -> Iterator[AcmeModel]:
        yield from SESSION.fresh()
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack
from typing import Any, Generic, Protocol, TypeVar

import pytest


class InstallableModel(Protocol):
    """What a shipped driver model offers the session: installed behind the
    backend's switch for a block, the rejections it recorded, and a clean-up of
    the software CPUs a test left behind."""

    rejections: list[Any]

    def installed(self) -> AbstractContextManager[Any]: ...

    def close_all(self) -> None: ...


M = TypeVar("M", bound=InstallableModel)


class _RuleGuard:
    """An autouse fixture for every test of the session: the session model
    recorded no rejection while it ran."""

    def __init__(self, model: InstallableModel, backend: str, interface: str) -> None:
        self.model = model
        self.backend = backend
        self.interface = interface

    @pytest.fixture(autouse=True)
    def _session_model_rules_kept(self) -> Iterator[None]:
        first = len(self.model.rejections)
        yield
        broken = self.model.rejections[first:]
        del self.model.rejections[first:]
        if broken:
            listing = "\n".join(f"  {r.call.name}: {r.rule} {r.detail}" for r in broken)
            pytest.fail(f"pyvmm-{self.backend} broke {len(broken)} rule(s) of {self.interface}:\n{listing}")


class SessionModel(Generic[M]):
    """``factory``'s model installed for the session of ``backend``'s tests;
    ``interface`` names what a broken rule breaks ("the Gunyah interface")."""

    def __init__(self, backend: str, interface: str, factory: Callable[[], M]) -> None:
        self.backend = backend
        self.interface = interface
        self.factory = factory
        self._model = pytest.StashKey[Any]()
        self._installed = pytest.StashKey[ExitStack]()

    def configure(self, config: pytest.Config) -> M:
        """Install a model for the session and register its rule guard."""
        model = self.factory()
        installed = ExitStack()
        installed.enter_context(model.installed())
        config.stash[self._model] = model
        config.stash[self._installed] = installed
        config.pluginmanager.register(_RuleGuard(model, self.backend, self.interface), f"pyvmm-{self.backend}-rules")
        return model

    def unconfigure(self, config: pytest.Config) -> None:
        installed = config.stash.get(self._installed, None)
        if installed is not None:
            installed.close()

    def model(self, config: pytest.Config) -> M:
        """The model the whole session runs on (the conformance suite's too)."""
        model: M = config.stash[self._model]
        return model

    def installed_model(self, config: pytest.Config) -> M | None:
        """The session's model, or None before :meth:`configure` (for report headers)."""
        model: M | None = config.stash.get(self._model, None)
        return model

    def fresh(self, factory: Callable[[], M] | None = None) -> Iterator[M]:
        """A model of one test's own, installed for the test (``yield from`` it
        in a fixture); ``factory`` overrides the session's."""
        model = (factory or self.factory)()
        with model.installed():
            yield model
        model.close_all()
