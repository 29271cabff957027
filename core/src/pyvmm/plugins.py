"""Backend discovery and registration: the plugin manager.

Backends are found through the entry-point group ``pyvmm`` and loaded only when
first needed (``import pyvmm`` loads none).  Each plugin is checked against the
contract when it is registered:

* its hook implementations take exactly the arguments of the specification;
* it implements every required hook;
* ``pyvmm_backend_info()`` returns a valid manifest for this contract version;
* it implements exactly the optional hooks of the capabilities it declares;
* no other plugin already uses its backend name.

A plugin that fails any of this, or fails to import, is recorded in
:attr:`PluginRegistry.failures` and skipped; the others keep working.  A plugin
the policy (:mod:`pyvmm.policy`) denies is recorded in
:attr:`PluginRegistry.denied` and never imported.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any

import pluggy
from pydantic import ValidationError

from pyvmm import hookspecs
from pyvmm.capabilities import Capability
from pyvmm.config import validation_message
from pyvmm.contract import (
    CHANGED_HOOKS,
    CONTRACT_VERSION,
    INIT_VCPU_HOOK,
    MIN_CONTRACT_VERSION,
    hooks_by_capability,
    required_hooks,
    specs,
)
from pyvmm.errors import BackendNotFound, BackendUnavailable, PluginContractError
from pyvmm.manifest import Availability, BackendManifest

if TYPE_CHECKING:
    from pyvmm.policy import PluginPolicy

ENTRY_POINT_GROUP = "pyvmm"
ENV_BACKEND = "PYVMM_BACKEND"

#: The hooks every backend implements (from the specifications' metadata).
REQUIRED_HOOKS = required_hooks()


@dataclass(frozen=True)
class PluginSource:
    """Where a plugin came from, for ``pyvmm backends`` and error messages."""

    entry_point: str
    distribution: str = "(unknown)"
    version: str = ""
    location: str = ""

    def describe(self) -> str:
        dist = f"{self.distribution} {self.version}".strip()
        return f"{dist} (entry point {self.entry_point!r})"


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that was skipped, and why."""

    source: PluginSource
    error: str


@dataclass(frozen=True)
class PluginDenied:
    """An installed plugin the policy kept from loading, and the rule that did."""

    source: PluginSource
    reason: str


@dataclass
class BackendPlugin:
    """A registered, contract-checked backend."""

    manifest: BackendManifest
    source: PluginSource
    impls: dict[str, Callable[..., Any]]
    plugin: object = field(repr=False)

    @property
    def name(self) -> str:
        return self.manifest.name

    def availability(self) -> Availability:
        return self.manifest.check_availability()


class PluginRegistry:
    """Holds the registered backends of one process (or one test)."""

    def __init__(self, policy: PluginPolicy | None = None) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._specs = specs()
        self.backends: dict[str, BackendPlugin] = {}
        self.failures: list[PluginFailure] = []
        #: The allow/deny policy; read from the environment and config file when
        #: entry points are first loaded unless one is given.
        self.policy = policy
        self.denied: list[PluginDenied] = []
        self._entry_points_loaded = False

    # --- registration -------------------------------------------------------
    def register(self, plugin: object, source: PluginSource | None = None) -> BackendPlugin:
        """Register one backend plugin (a module or object with hook functions).

        :raises PluginContractError: the plugin breaks the contract; it is not kept.
        """
        source = source or PluginSource(entry_point=getattr(plugin, "__name__", type(plugin).__name__))
        try:
            internal_name = self._pm.register(plugin, name=f"{source.entry_point}@{id(plugin):x}")
        except (pluggy.PluginValidationError, ValueError) as exc:
            hint = "".join(f" ({hook}: {why})" for hook, why in CHANGED_HOOKS.items() if hook in str(exc))
            raise PluginContractError(f"{source.describe()}: {exc}{hint}") from exc
        try:
            backend = self._check(plugin, source)
        except BaseException:
            self._pm.unregister(name=internal_name)
            raise
        self.backends[backend.name] = backend
        return backend

    def _check(self, plugin: object, source: PluginSource) -> BackendPlugin:
        where = source.describe()
        info = self._implementation(plugin, "pyvmm_backend_info")
        if info is None:
            raise PluginContractError(f"{where}: required hook(s) not implemented: pyvmm_backend_info")
        manifest = self._manifest(info, where)
        impls = self._implementations(plugin, where, manifest.contract_version)
        missing = [hook for hook in REQUIRED_HOOKS if hook not in impls]
        if missing:
            raise PluginContractError(f"{where}: required hook(s) not implemented: {', '.join(missing)}")
        self._check_capabilities(manifest, impls, where)
        clash = self.backends.get(manifest.name)
        if clash is not None:
            raise PluginContractError(
                f"backend name {manifest.name!r} is provided twice: by {clash.source.describe()} and by {where}"
            )
        return BackendPlugin(manifest=manifest, source=source, impls=impls, plugin=plugin)

    def _implementation(self, plugin: object, hook_name: str) -> Any:
        for impl in getattr(self._pm.hook, hook_name).get_hookimpls():
            if impl.plugin is plugin:
                return impl.function
        return None

    def _implementations(self, plugin: object, where: str, version: int) -> dict[str, Callable[..., Any]]:
        """The plugin's implementations, each checked against the argument names of
        the contract version the plugin declares (or of the current one)."""
        impls: dict[str, Callable[..., Any]] = {}
        for hook_name in dir(plugin):
            if hook_name.startswith("pyvmm_") and hook_name not in self._specs:
                candidate = getattr(plugin, hook_name, None)
                if callable(candidate) and self._pm.parse_hookimpl_opts(plugin, hook_name) is not None:
                    raise PluginContractError(f"{where}: {hook_name} is not a pyvmm hook")
        for hook_name, info in self._specs.items():
            caller = getattr(self._pm.hook, hook_name)
            for impl in caller.get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                if info.since > version:
                    raise PluginContractError(
                        f"{where}: {hook_name} was added in contract version {info.since}, "
                        f"but the plugin declares version {version}"
                    )
                accepted = {info.argnames_for(version), info.argnames}
                if tuple(impl.argnames) not in accepted:
                    expected = info.argnames_for(version)
                    raise PluginContractError(
                        f"{where}: {hook_name} must take ({', '.join(expected)}), it takes ({', '.join(impl.argnames)})"
                    )
                impls[hook_name] = impl.function
        return impls

    @staticmethod
    def _manifest(info: Callable[..., Any], where: str) -> BackendManifest:
        try:
            raw = info()
        except Exception as exc:
            raise PluginContractError(f"{where}: pyvmm_backend_info raised {type(exc).__name__}: {exc}") from exc
        try:
            manifest = raw if isinstance(raw, BackendManifest) else BackendManifest.model_validate(raw)
        except ValidationError as exc:
            raise PluginContractError(f"{where}: invalid manifest: {validation_message(exc)}") from exc
        if not MIN_CONTRACT_VERSION <= manifest.contract_version <= CONTRACT_VERSION:
            raise PluginContractError(
                f"{where}: backend {manifest.name!r} implements hook contract version "
                f"{manifest.contract_version}, this pyvmm supports versions {MIN_CONTRACT_VERSION} "
                f"to {CONTRACT_VERSION}"
            )
        return manifest

    @staticmethod
    def _check_capabilities(manifest: BackendManifest, impls: dict[str, Any], where: str) -> None:
        caps = manifest.capability_set
        problems: list[str] = []
        for cap, all_hooks in hooks_by_capability().items():
            # A hook newer than the plugin's contract version is not expected of it.
            hooks = tuple(h for h in all_hooks if specs()[h].since <= manifest.contract_version)
            if not hooks:
                continue
            have = [h for h in hooks if h in impls]
            if cap in caps and len(have) != len(hooks):
                absent = sorted(set(hooks) - set(have))
                problems.append(f"declares {cap.name} but does not implement {', '.join(absent)}")
            if cap not in caps and have:
                problems.append(f"implements {', '.join(have)} but does not declare {cap.name}")
        boot_by_hypervisor = Capability.HYPERVISOR_INITIALIZED_BOOT_CONTEXT in caps
        if boot_by_hypervisor and INIT_VCPU_HOOK in impls:
            problems.append(
                f"declares HYPERVISOR_INITIALIZED_BOOT_CONTEXT, so {INIT_VCPU_HOOK} would never be called; remove it"
            )
        if not boot_by_hypervisor and INIT_VCPU_HOOK not in impls:
            problems.append(f"must implement {INIT_VCPU_HOOK} (or declare HYPERVISOR_INITIALIZED_BOOT_CONTEXT)")
        if problems:
            raise PluginContractError(f"{where}: manifest and hooks disagree: " + "; ".join(problems))

    # --- discovery ----------------------------------------------------------
    def load_entry_points(self, entry_points: Iterable[metadata.EntryPoint] | None = None) -> None:
        """Import and register every backend in the ``pyvmm`` entry-point group
        the policy allows.  Failures are recorded, never raised.  Runs once.

        :raises ConfigError: the policy's config file or variables are malformed.
        """
        if self._entry_points_loaded and entry_points is None:
            return
        if self.policy is None:
            from pyvmm.policy import load_policy

            self.policy = load_policy()
        self._entry_points_loaded = True
        if entry_points is None:
            entry_points = metadata.entry_points(group=ENTRY_POINT_GROUP)
        for ep in sorted(entry_points, key=lambda e: e.name):
            source = _source_of(ep)
            denial = self.policy.denial(ep.name)
            if denial is not None:
                self.denied.append(PluginDenied(source, denial))
                continue
            try:
                plugin = ep.load()
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - isolate broken plugins, even one that exits
                self.failures.append(PluginFailure(source, f"import failed: {type(exc).__name__}: {exc}"))
                continue
            try:
                self.register(plugin, source)
            except PluginContractError as exc:
                self.failures.append(PluginFailure(source, str(exc)))

    # --- selection ----------------------------------------------------------
    def get(self, name: str) -> BackendPlugin:
        try:
            return self.backends[name]
        except KeyError:
            raise BackendNotFound(self._not_found_message(name)) from None

    def _not_found_message(self, name: str) -> str:
        installed = ", ".join(sorted(self.backends)) or "none"
        text = f"no backend named {name!r} (installed: {installed})"
        broken = [f.source.describe() for f in self.failures if name in f.source.entry_point]
        if broken:
            text += f"; a plugin that may be it failed to load: {', '.join(broken)} (see 'pyvmm backends')"
        denied = [d for d in self.denied if d.source.entry_point == name]
        if denied:
            text += f"; {denied[0].source.describe()} is installed but {denied[0].reason}"
        return text

    def select(self, name: str | None = None) -> BackendPlugin:
        """The backend to use: ``name`` if given, else ``$PYVMM_BACKEND``, else the
        highest-priority auto-selectable backend available on this host.

        :raises BackendNotFound: no such backend, or none available.
        :raises BackendUnavailable: the named backend cannot run here.
        """
        name = name or os.environ.get(ENV_BACKEND) or None
        if name is not None:
            backend = self.get(name)
            availability = backend.availability()
            if not availability.available:
                raise BackendUnavailable(name, availability.reason)
            return backend
        candidates = sorted(
            (b for b in self.backends.values() if b.manifest.auto_select),
            key=lambda b: (-b.manifest.priority, b.name),
        )
        reasons = []
        for backend in candidates:
            availability = backend.availability()
            if availability.available:
                return backend
            reasons.append(f"{backend.name}: {availability.reason}")
        detail = "; ".join(reasons) if reasons else "no backend is installed (pip install pyvmm-kvm, ...)"
        raise BackendNotFound(f"no backend is available on this host ({detail})")


def _source_of(ep: metadata.EntryPoint) -> PluginSource:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return PluginSource(entry_point=ep.name)
    location = ""
    with contextlib.suppress(Exception):  # the location is informational only
        location = str(dist.locate_file(""))
    return PluginSource(
        entry_point=ep.name, distribution=dist.metadata["Name"] or "(unknown)", version=dist.version, location=location
    )


_default: PluginRegistry | None = None


def default_registry() -> PluginRegistry:
    """The process-wide registry, with the installed entry points loaded."""
    global _default
    if _default is None:
        registry = PluginRegistry()
        registry.load_entry_points()
        _default = registry
    return _default


def reset_default_registry() -> None:
    """Forget the process-wide registry (tests, and after installing a plugin)."""
    global _default
    _default = None


__all__ = [
    "BackendPlugin",
    "PluginDenied",
    "PluginFailure",
    "PluginRegistry",
    "PluginSource",
    "default_registry",
    "reset_default_registry",
]
