"""Shared helpers for pyvmm-core's own tests (imported by the test modules and conftest).

The name is deliberately unusual so it cannot clash with a plugin's test helpers
when several test directories run in one pytest session.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from typing import Any

from pyvmm.capabilities import Capability
from pyvmm.hookspecs import hookimpl
from pyvmm.manifest import BackendManifest
from pyvmm.memory import RamRegion
from pyvmm.plugins import PluginRegistry, PluginSource
from pyvmm.testing.contract_backend import ContractTestBackend, TestVm
from pyvmm.vm import Backend

#: Everything a full-featured, KVM-style backend declares: every capability except
#: the two that change *how* core behaves (the hypervisor owning the boot context,
#: CPUID fixed at VM creation).
ALL_CAPS: frozenset[Capability] = frozenset(Capability) - {
    Capability.HYPERVISOR_INITIALIZED_BOOT_CONTEXT,
    Capability.EARLY_INIT_CPUID,
}


class RecordingBackend(ContractTestBackend):
    """The contract backend, plus the :class:`RamRegion` objects its map hook saw
    (the contract backend only records slot, address and size)."""

    __test__ = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mapped: list[RamRegion] = []

    @hookimpl
    def pyvmm_map_memory(self, vm: TestVm, region: RamRegion) -> None:
        self.mapped.append(region)
        super().pyvmm_map_memory(vm, region)

    def hook_names(self) -> set[str]:
        # The base class unpacks each call as (name, arg), which fails for calls
        # recorded with no argument or several (reported to the lead).
        return {call[0] for call in self.calls}

    def hooks_since(self, mark: int) -> list[str]:
        """Names of the hooks called since ``len(self.calls)`` was ``mark``."""
        return [call[0] for call in self.calls[mark:]]

    def calls_of(self, hook: str) -> list[tuple[Any, ...]]:
        return [call for call in self.calls if call[0] == hook]


#: The ``make_backend`` fixture: ``make_backend(capabilities, name=..., **kwargs)``.
MakeBackend = Callable[..., "tuple[RecordingBackend, Backend]"]


class ProbeBackend(RecordingBackend):
    """A contract backend whose manifest carries an arbitrary probe and host list."""

    __test__ = False

    def __init__(
        self,
        *args: Any,
        probe: Callable[[], object] | None = None,
        host_os: tuple[str, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._probe = probe
        self._host_os = host_os

    def manifest(self) -> BackendManifest:
        update: dict[str, Any] = {}
        if self._probe is not None:
            update["probe"] = self._probe
        if self._host_os is not None:
            update["host_os"] = self._host_os
        return dataclasses.replace(super().manifest(), **update)


def register(
    registry: PluginRegistry, backend: ContractTestBackend, source: PluginSource | None = None, **plugin_kw: Any
) -> Backend:
    """Register ``backend``'s plugin object and wrap it as a core :class:`Backend`."""
    return Backend(registry.register(backend.plugin(**plugin_kw), source))


def namespace_plugin(backend: ContractTestBackend, **overrides: Callable[..., Any]) -> types.SimpleNamespace:
    """``backend.plugin()`` with some hooks replaced by the given functions
    (which must already carry the ``hookimpl`` marker)."""
    plugin = backend.plugin()
    for name, func in overrides.items():
        setattr(plugin, name, func)
    return plugin


def plugin_names(registry: PluginRegistry) -> set[str]:
    """Names the registry's pluggy manager holds plugins under.

    Reaches into the registry's private plugin manager on purpose: a refused
    plugin must leave nothing behind there either, and no public API shows it."""
    return {name for name, _ in registry._pm.list_name_plugin()}


def hookimpl_plugins(registry: PluginRegistry) -> list[object]:
    """Every plugin object that still has an implementation of some pyvmm hook."""
    found: list[object] = []
    for name in dir(registry._pm.hook):
        if name.startswith("pyvmm_"):
            found.extend(impl.plugin for impl in getattr(registry._pm.hook, name).get_hookimpls())
    return found
