"""Backend discovery and registration: the plugin manager.

Backends are found through the entry-point group ``pyvmm`` and loaded only when
first needed (``import pyvmm`` loads none).  Each plugin is checked against the
contract when it is registered:

* its hook implementations take exactly the arguments of the specification;
* it implements every required hook;
* ``pyvmm_backend_info()`` returns a valid manifest for this contract version;
* it implements exactly the optional hooks of the capabilities it declares;
* its backend name is its own (below).

A plugin that fails any of this, or fails to import, is recorded in
:attr:`PluginRegistry.failures` and skipped; the others keep working.

Manifests first, plugins on first use
-------------------------------------
An entry point names either the plugin object (``pyvmm_kvm.plugin:plugin``: it
is imported at discovery and checked as above) or, as every plugin in this
repository does, a function returning the backend's manifest
(``pyvmm_kvm.manifest:manifest``), whose :attr:`~pyvmm.manifest.BackendManifest.plugin`
names the plugin object.  Then discovery imports only the manifest's module
(stdlib-only by the template, ``docs/writing-a-backend.md``), and the plugin is
imported and checked -- the same checks, against that manifest, which its own
``pyvmm_backend_info`` must return -- when the backend is first used
(:meth:`BackendPlugin.load`, which :class:`pyvmm.vm.Backend` and selection
call).  So ``pyvmm backends`` imports no backend's bindings, VM or vCPU code,
and no pluggy; a plugin that breaks the contract is reported when it is used.
Entry points are read from the installed distributions' ``entry_points.txt``
(:mod:`pyvmm.entry_points`), not through :mod:`importlib.metadata`.  A plugin
the policy (:mod:`pyvmm.policy`) denies is recorded in
:attr:`PluginRegistry.denied`: never imported when its entry-point name is
denied, refused right after its manifest when its backend name is.

Who owns a backend name
-----------------------
The owner of a backend name is the plugin whose entry-point name equals it
(``kvm = "pyvmm_kvm.manifest:manifest"`` owns ``kvm``).  Discovery reads every
manifest before it registers any, then settles each name:

* one owner among the plugins claiming the name: the owner keeps it, whatever
  the order the entry points load in, and every other claimant is refused, the
  message naming both distributions;
* no owner and one claimant: it keeps the name, unless an entry point of that
  name is installed at all (one that failed, hung, was denied or claims another
  name): then the claimant is refused -- the real backend being broken is no
  reason to hand its name to another;
* otherwise (several claimants and no owner, or several owners): ambiguous,
  every claimant is refused.  Never silently the wrong one.

So a plugin whose entry point is ``aaa`` but whose manifest says ``kvm`` can
never displace pyvmm-kvm.  :meth:`PluginRegistry.register` without entry points
(tests, embedders) keeps first come, first served: a second plugin with a name
already registered is refused.

Isolation, and its limits
-------------------------
A plugin's import, its ``pyvmm_backend_info()`` and its availability probe run
on a daemon thread, watched for :attr:`PluginRegistry.timeout` seconds
(``$PYVMM_PLUGIN_TIMEOUT``, default :data:`DEFAULT_PLUGIN_TIMEOUT`).  One that
does not finish in time is recorded as broken (import, manifest) or unavailable
(probe), naming what hung, and discovery and selection carry on; its thread is
left blocked, as Python cannot stop a thread.  One that raises any
``BaseException`` -- ``SystemExit`` and ``GeneratorExit`` included -- is
recorded the same way.  ``KeyboardInterrupt`` is passed on: a Ctrl-C must still
stop the program (and is delivered to the main thread, which only waits).  The
availability answer is cached per plugin, so a hung probe costs one timeout,
not one per call.

What a thread cannot contain: ``os._exit()`` (or a crash in C code) ends the
whole process at once, and code that holds the GIL without releasing it (a
long C call) stalls every thread.  Only a separate process could isolate those;
pyvmm does not load plugins in one.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from pyvmm import entry_points as installed_entry_points
from pyvmm.capabilities import Capability
from pyvmm.config import Arch
from pyvmm.contract import (
    CHANGED_HOOKS,
    CONTRACT_VERSION,
    INIT_VCPU_HOOK,
    MIN_CONTRACT_VERSION,
    hooks_by_capability,
    required_hooks,
    specs,
)
from pyvmm.errors import BackendNotFound, BackendUnavailable, ConfigError, PluginContractError
from pyvmm.lean_dataclass import lean_dataclass
from pyvmm.manifest import Availability, BackendManifest, validated_manifest
from pyvmm.records import RecordError

if TYPE_CHECKING:
    import pluggy

    from pyvmm.policy import PluginPolicy

ENTRY_POINT_GROUP = "pyvmm"
ENV_BACKEND = "PYVMM_BACKEND"
ENV_PLUGIN_TIMEOUT = "PYVMM_PLUGIN_TIMEOUT"

#: Seconds a plugin's import, manifest or availability probe may take.  Long
#: enough for a cold import of a cffi-heavy backend on a loaded CI machine,
#: short enough that a hung plugin is noticed.
DEFAULT_PLUGIN_TIMEOUT = 5.0
#: The largest timeout accepted: above it, a hang would pass for a wait.
MAX_PLUGIN_TIMEOUT = 3600.0

_T = TypeVar("_T")


def plugin_timeout(environ: Mapping[str, str] | None = None) -> float:
    """The plugin timeout in force: ``$PYVMM_PLUGIN_TIMEOUT`` seconds, else
    :data:`DEFAULT_PLUGIN_TIMEOUT`.

    :raises ConfigError: the variable is not a number of seconds in (0, 3600].
    """
    env = os.environ if environ is None else environ
    text = env.get(ENV_PLUGIN_TIMEOUT, "").strip()
    if not text:
        return DEFAULT_PLUGIN_TIMEOUT
    try:
        return _checked_timeout(float(text), ENV_PLUGIN_TIMEOUT)
    except ValueError:
        raise ConfigError(
            f"{ENV_PLUGIN_TIMEOUT}: {text!r} is not a number of seconds (0 < seconds <= {MAX_PLUGIN_TIMEOUT:g})"
        ) from None


def _checked_timeout(value: float, what: str) -> float:
    # A NaN or infinite timeout would make every bound meaningless.
    if not (math.isfinite(value) and 0 < value <= MAX_PLUGIN_TIMEOUT):
        raise ConfigError(f"{what}: {value!r} is not a number of seconds (0 < seconds <= {MAX_PLUGIN_TIMEOUT:g})")
    return value


class _Hung(Exception):
    """A plugin call did not finish in time; its thread is still blocked in it."""

    def __init__(self, what: str, timeout: float, thread: threading.Thread) -> None:
        super().__init__(f"{what} did not finish within {timeout:g} s")
        self.timeout = timeout
        self.thread = thread


class _Raised(Exception):
    """A plugin call raised; ``error`` is what it raised (any BaseException)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(_describe(error))
        self.error = error


def _describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    if isinstance(error, SystemExit):
        text += " (a plugin may not end the process; it is skipped)"
    return text


def _call_bounded(call: Callable[[], _T], what: str, timeout: float) -> _T:
    """``call()`` run on a daemon thread and waited for at most ``timeout`` seconds.

    The thread runs in a copy of the caller's context, so context variables (a
    driver model installed by a test, say) are seen as on the caller's thread.

    :raises _Hung: it did not finish in time (the thread is left running).
    :raises _Raised: it raised anything but ``KeyboardInterrupt``.
    :raises KeyboardInterrupt: it raised one, or Ctrl-C arrived while waiting.
    """
    outcome: list[tuple[bool, Any]] = []
    done = threading.Event()
    context = contextvars.copy_context()

    def run() -> None:
        try:
            outcome.append((True, context.run(call)))
        except BaseException as exc:  # noqa: BLE001 - carried to the waiting thread, which decides
            outcome.append((False, exc))
        finally:
            done.set()

    thread = threading.Thread(target=run, name=f"pyvmm plugin: {what}", daemon=True)
    thread.start()
    if not done.wait(timeout):
        raise _Hung(what, timeout, thread)
    finished, value = outcome[0]
    if finished:
        return cast(_T, value)
    if isinstance(value, KeyboardInterrupt):
        raise value
    raise _Raised(value)


@lean_dataclass(frozen=True)
class PluginSource:
    """Where a plugin came from, for ``pyvmm backends`` and error messages."""

    entry_point: str
    distribution: str = "(unknown)"
    version: str = ""
    location: str = ""

    def describe(self) -> str:
        dist = f"{self.distribution} {self.version}".strip()
        return f"{dist} (entry point {self.entry_point!r})"


@lean_dataclass(frozen=True)
class PluginFailure:
    """A plugin that was skipped, and why."""

    source: PluginSource
    error: str
    #: The backend name its manifest claimed, when it got that far.
    backend: str | None = None


@lean_dataclass(frozen=True)
class PluginDenied:
    """An installed plugin the policy kept from loading, and the rule that did."""

    source: PluginSource
    reason: str
    #: The backend name its manifest declared, when it was denied by that name
    #: (it was imported); None when denied by its entry-point name (it was not).
    backend: str | None = None


class EntryPointLike(Protocol):
    """What discovery reads of an entry point: :class:`pyvmm.entry_points.InstalledEntryPoint`
    or :class:`importlib.metadata.EntryPoint` (tests fabricate the latter)."""

    @property
    def name(self) -> str: ...

    def load(self) -> Any: ...


#: Imports the plugin object a manifest names and checks it: ``(impls, plugin)``.
PluginLoader = Callable[[], "tuple[dict[str, Callable[..., Any]], object]"]


class BackendPlugin:
    """A registered backend: its manifest, and the plugin implementing its hooks,
    imported and contract-checked on first use when the entry point named a
    manifest (:meth:`load`).

    :param impls: the checked hook implementations, when the plugin is loaded already.
    :param loader: imports and checks the plugin (for a manifest-only registration).
    """

    def __init__(
        self,
        manifest: BackendManifest,
        source: PluginSource,
        impls: dict[str, Callable[..., Any]] | None = None,
        plugin: object = None,
        timeout: float = DEFAULT_PLUGIN_TIMEOUT,
        *,
        loader: PluginLoader | None = None,
    ) -> None:
        if impls is None and loader is None:
            raise ValueError("a BackendPlugin needs its implementations or a loader")
        self.manifest = manifest
        self.source = source
        #: Seconds the availability probe may take (the registry's timeout).
        self.timeout = timeout
        self._impls = impls
        self._plugin = plugin
        self._loader = loader
        self._load_error: PluginContractError | None = None
        self._load_lock = threading.Lock()
        self._availability: Availability | None = None
        self._stuck_probe: threading.Thread | None = None
        self._probe_lock = threading.Lock()

    def __repr__(self) -> str:
        state = "loaded" if self.loaded else "not loaded"
        return f"BackendPlugin({self.name!r}, {self.source.describe()}, {state})"

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def loaded(self) -> bool:
        """Whether the plugin object is imported and checked."""
        return self._impls is not None

    def load(self) -> None:
        """Import the plugin object the manifest names and check it against the
        manifest, once; a no-op for a plugin registered loaded.

        :raises PluginContractError: it failed to import, hung, or breaks the
            contract (raised again, without retrying, on every later call).
        :raises KeyboardInterrupt: Ctrl-C while waiting, or the plugin raised one.
        """
        with self._load_lock:
            if self._impls is not None:
                return
            if self._load_error is not None:
                raise self._load_error
            assert self._loader is not None  # __init__ demands impls or a loader
            try:
                self._impls, self._plugin = self._loader()
            except PluginContractError as exc:
                self._load_error = exc
                raise

    @property
    def impls(self) -> dict[str, Callable[..., Any]]:
        """The hook implementations by hook name (loads the plugin: :meth:`load`)."""
        self.load()
        assert self._impls is not None
        return self._impls

    @property
    def plugin(self) -> object:
        """The plugin object (loads it: :meth:`load`)."""
        self.load()
        return self._plugin

    @property
    def last_availability(self) -> Availability | None:
        """The answer of the latest :meth:`availability` call (None before the
        first): what :meth:`PluginRegistry.select` found, for its caller."""
        return self._availability

    def availability(self) -> Availability:
        """Whether the backend can run here, asked of its probe each time.

        The probe runs on a watchdog thread (see the module notes): one that
        hangs reads as unavailable after :attr:`timeout` seconds, one that
        raises reads as unavailable.  While a hung probe is still blocked, its
        answer stands and the probe is not started again (that would only hang
        another thread); once it has ended, the next call probes afresh.  Every
        other answer is fresh: a device node may appear, a test may put a
        driver model behind the backend.

        :raises KeyboardInterrupt: Ctrl-C while waiting, or the probe raised one.
        """
        with self._probe_lock:
            if self._stuck_probe is not None and self._stuck_probe.is_alive() and self._availability is not None:
                return self._availability
            try:
                result = _call_bounded(
                    self.manifest.check_availability, f"availability probe of backend {self.name!r}", self.timeout
                )
            except _Hung as hung:
                self._stuck_probe = hung.thread
                result = Availability.no(f"{hung}; the backend is treated as unavailable")
            except _Raised as raised:  # check_availability catches the probe's own errors
                result = Availability.no(f"availability probe raised {raised}")
            self._availability = result
            return result


@lean_dataclass(frozen=True)
class _Claim:
    """A discovered plugin that passed every check but the ownership of its
    backend name; registered with pluggy (as ``internal_name``) until settled."""

    backend: BackendPlugin
    #: None for a manifest-only claim: nothing is registered with pluggy yet.
    internal_name: str | None


class PluginRegistry:
    """Holds the registered backends of one process (or one test).

    :param policy: the allow/deny policy; read from the environment and config
        file when entry points are first loaded unless one is given.
    :param timeout: seconds a plugin's import, manifest or availability probe
        may take; ``$PYVMM_PLUGIN_TIMEOUT``, else :data:`DEFAULT_PLUGIN_TIMEOUT`,
        unless given.
    :raises ConfigError: the timeout (argument or variable) is not in (0, 3600].
    """

    def __init__(self, policy: PluginPolicy | None = None, *, timeout: float | None = None) -> None:
        self._manager: pluggy.PluginManager | None = None
        self.backends: dict[str, BackendPlugin] = {}
        self.failures: list[PluginFailure] = []
        self.policy = policy
        self.denied: list[PluginDenied] = []
        self.timeout: float = plugin_timeout() if timeout is None else _checked_timeout(timeout, "timeout")
        self._entry_points_loaded = False

    @property
    def _pm(self) -> pluggy.PluginManager:
        """The pluggy manager, made when the first plugin object is registered:
        a registry that only reads manifests (``pyvmm backends``) needs neither
        pluggy nor the hook specifications."""
        if self._manager is None:
            import pluggy

            from pyvmm import hookspecs

            manager = pluggy.PluginManager(hookspecs.PROJECT)
            manager.add_hookspecs(hookspecs)
            self._manager = manager
        return self._manager

    @property
    def _specs(self) -> dict[str, Any]:
        return specs()

    # --- registration -------------------------------------------------------
    def register(self, plugin: object, source: PluginSource | None = None) -> BackendPlugin:
        """Register one backend plugin (a module or object with hook functions).

        Without entry points there is no name to prove ownership by, so the
        first plugin to register a backend name keeps it and a later one is
        refused (see the module notes for discovery's rule).

        :raises PluginContractError: the plugin breaks the contract, its manifest
            hung, or its backend name is taken; it is not kept.
        """
        source = source or PluginSource(entry_point=getattr(plugin, "__name__", type(plugin).__name__))
        internal_name = self._add_to_manager(plugin, source)
        try:
            backend = self._checked(plugin, source, self._manifest_of(plugin, source))
            self._refuse_taken_name(backend)
        except BaseException:
            self._pm.unregister(name=internal_name)
            raise
        self.backends[backend.name] = backend
        return backend

    def _add_to_manager(self, plugin: object, source: PluginSource) -> str:
        """Register with pluggy (which checks the hook names); the internal name."""
        import pluggy

        try:
            internal_name = self._pm.register(plugin, name=f"{source.entry_point}@{id(plugin):x}")
        except (pluggy.PluginValidationError, ValueError) as exc:
            hint = "".join(f" ({hook}: {why})" for hook, why in CHANGED_HOOKS.items() if hook in str(exc))
            raise PluginContractError(f"{source.describe()}: {exc}{hint}") from exc
        assert internal_name is not None  # pluggy returns None only for a blocked name, which we never block
        return internal_name

    def _manifest_of(self, plugin: object, source: PluginSource) -> BackendManifest:
        where = source.describe()
        info = self._implementation(plugin, "pyvmm_backend_info")
        if info is None:
            raise PluginContractError(f"{where}: required hook(s) not implemented: pyvmm_backend_info")
        return self._manifest(info, where)

    def _checked(self, plugin: object, source: PluginSource, manifest: BackendManifest) -> BackendPlugin:
        """The contract checks that need no plugin code to run."""
        impls = self._checked_impls(plugin, source, manifest)
        return BackendPlugin(manifest=manifest, source=source, impls=impls, plugin=plugin, timeout=self.timeout)

    def _checked_impls(
        self, plugin: object, source: PluginSource, manifest: BackendManifest
    ) -> dict[str, Callable[..., Any]]:
        where = source.describe()
        impls = self._implementations(plugin, where, manifest.contract_version)
        missing = [hook for hook in required_hooks() if hook not in impls]
        if missing:
            raise PluginContractError(f"{where}: required hook(s) not implemented: {', '.join(missing)}")
        self._check_capabilities(manifest, impls, where)
        return impls

    def _load_plugin(
        self, manifest: BackendManifest, source: PluginSource
    ) -> tuple[dict[str, Callable[..., Any]], object]:
        """Import the plugin object ``manifest`` names (bounded, as an entry
        point's import) and check it: its own ``pyvmm_backend_info`` must return
        this manifest, and its hooks must match it.

        :raises PluginContractError: it fails to import, hangs, or breaks the contract.
        """
        where = source.describe()
        what = f"import of plugin {manifest.plugin!r}"
        try:
            plugin = _call_bounded(manifest.load_plugin, what, self.timeout)
        except _Hung as hung:
            raise PluginContractError(f"{where}: {hung}; the backend cannot be used") from None
        except _Raised as raised:
            raise PluginContractError(f"{where}: {what} failed: {raised}") from raised.error
        internal_name = self._add_to_manager(plugin, source)
        try:
            own = self._manifest_of(plugin, source)
            if dataclasses.replace(own, plugin=manifest.plugin) != manifest:
                raise PluginContractError(
                    f"{where}: plugin {manifest.plugin!r} describes itself otherwise than its entry point's "
                    f"manifest does ({own!r}, not {manifest!r})"
                )
            impls = self._checked_impls(plugin, source, manifest)
        except BaseException:
            self._pm.unregister(name=internal_name)
            raise
        return impls, plugin

    def _refuse_taken_name(self, backend: BackendPlugin) -> None:
        clash = self.backends.get(backend.name)
        if clash is not None:
            raise PluginContractError(
                f"backend name {backend.name!r} is provided twice: by {clash.source.describe()} "
                f"and by {backend.source.describe()}"
            )

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

    def _manifest(self, info: Callable[[], object], where: str, what: str = "pyvmm_backend_info") -> BackendManifest:
        try:
            raw = _call_bounded(info, what, self.timeout)
        except _Hung as hung:
            raise PluginContractError(f"{where}: {hung}; the plugin is skipped") from None
        except _Raised as raised:
            raise PluginContractError(f"{where}: {what} raised {raised}") from raised.error
        return self._checked_manifest(raw, where)

    @staticmethod
    def _checked_manifest(raw: object, where: str) -> BackendManifest:
        """``raw``, what a plugin gave as its manifest, validated and within the
        contract versions this pyvmm supports."""
        try:
            # Validated even when it is a BackendManifest: object.__setattr__
            # gets past a frozen dataclass, and a subclass may report otherwise.
            manifest = validated_manifest(raw)
        except RecordError as exc:
            raise PluginContractError(f"{where}: invalid manifest: {exc}") from exc
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
    def load_entry_points(self, entry_points: Iterable[EntryPointLike] | None = None) -> None:
        """Import and register every backend in the ``pyvmm`` entry-point group
        the policy allows, settling who owns each backend name (module notes).
        Failures, hangs and refusals are recorded, never raised.  Runs once.

        :raises ConfigError: the policy's config file or variables are malformed.
        :raises KeyboardInterrupt: Ctrl-C (or a plugin raising one).
        """
        if self._entry_points_loaded and entry_points is None:
            return
        if self.policy is None:
            from pyvmm.policy import load_policy

            self.policy = load_policy()
        self._entry_points_loaded = True
        if entry_points is None:
            entry_points = installed_entry_points.entry_points(ENTRY_POINT_GROUP)
        ordered = sorted(entry_points, key=lambda e: e.name)
        # Every installed entry point, loaded or not: an entry point named after a
        # backend owns that name even when it is broken, hung or denied.
        installed: dict[str, list[PluginSource]] = {}
        claims: list[_Claim] = []
        for ep in ordered:
            source = _source_of(ep)
            installed.setdefault(ep.name, []).append(source)
            claim = self._claim(ep, source, self.policy)
            if claim is not None:
                claims.append(claim)
        self._settle(claims, installed)

    def load_owner(self, name: str, entry_points: Iterable[EntryPointLike] | None = None) -> bool:
        """Import only the entry point named ``name``, and register it when it
        claims backend ``name``: True when ``name`` is then registered.

        The owner of a name keeps it whatever other plugins claim (module
        notes), so a command that names its backend needs no other plugin
        imported.  False -- with nothing registered, and the registry left for
        :meth:`load_entry_points` to fill -- when there is no single entry point
        of that name, the policy denies it, it fails to load, or it claims
        another name: only full discovery can say what happened then.
        Failures met on the way are recorded as usual.

        :raises ConfigError: the policy's config file or variables are malformed.
        :raises KeyboardInterrupt: Ctrl-C (or a plugin raising one).
        """
        if self._entry_points_loaded:
            return name in self.backends
        if self.policy is None:
            from pyvmm.policy import load_policy

            self.policy = load_policy()
        if entry_points is None:
            entry_points = installed_entry_points.entry_points(ENTRY_POINT_GROUP)
        named = [ep for ep in entry_points if ep.name == name]
        if len(named) != 1:
            return False
        source = _source_of(named[0])
        claim = self._claim(named[0], source, self.policy)
        if claim is None:
            return False
        if claim.backend.name != name:
            if claim.internal_name is not None:
                self._pm.unregister(name=claim.internal_name)
            return False
        self._settle([claim], {name: [source]})
        return name in self.backends

    def _claim(self, ep: EntryPointLike, source: PluginSource, policy: PluginPolicy) -> _Claim | None:
        """Import one entry point and read and check its manifest; None (with the
        reason recorded) when it is denied, broken or hung."""
        denial = policy.denial(ep.name)
        if denial is not None:
            self.denied.append(PluginDenied(source, denial))
            return None
        read_what = f"manifest function of entry point {ep.name!r}"
        reading: list[bool] = []

        def import_and_read() -> tuple[object, object]:
            loaded = ep.load()
            if callable(loaded) and not hasattr(loaded, "pyvmm_backend_info"):
                # A manifest function: read it in the same bounded call, one
                # thread for both (each costs a thread switch, ~3 ms on a busy host).
                reading.append(True)
                return loaded, loaded()
            return loaded, None

        try:
            plugin, raw = _call_bounded(import_and_read, f"import of entry point {ep.name!r}", self.timeout)
        except _Hung as hung:
            if reading:
                hung = _Hung(read_what, hung.timeout, hung.thread)
                self.failures.append(PluginFailure(source, f"{source.describe()}: {hung}; the plugin is skipped"))
            else:
                self.failures.append(PluginFailure(source, f"{hung}; the plugin is skipped"))
            return None
        except _Raised as raised:
            if reading:
                self.failures.append(PluginFailure(source, f"{source.describe()}: {read_what} raised {raised}"))
            else:
                self.failures.append(PluginFailure(source, f"import failed: {raised}"))
            return None
        if reading:
            return self._manifest_claim(raw, ep, source, policy)
        try:
            internal_name = self._add_to_manager(plugin, source)
        except PluginContractError as exc:
            self.failures.append(PluginFailure(source, str(exc)))
            return None
        backend_name: str | None = None
        try:
            manifest = self._manifest_of(plugin, source)
            backend_name = manifest.name
            # The entry-point name passed above; the backend name must pass too,
            # before anything but the manifest of the plugin has run.
            denial = policy.denial(manifest.name) if manifest.name != ep.name else None
            if denial is not None:
                self._pm.unregister(name=internal_name)
                reason = f"its manifest names backend {manifest.name!r}, which is {denial}"
                self.denied.append(PluginDenied(source, reason, backend=manifest.name))
                return None
            return _Claim(self._checked(plugin, source, manifest), internal_name)
        except PluginContractError as exc:
            self._pm.unregister(name=internal_name)
            self.failures.append(PluginFailure(source, str(exc), backend=backend_name))
            return None
        except BaseException:
            self._pm.unregister(name=internal_name)
            raise

    def _manifest_claim(
        self, raw: object, ep: EntryPointLike, source: PluginSource, policy: PluginPolicy
    ) -> _Claim | None:
        """An entry point that names a manifest function, which returned ``raw``:
        check the manifest; the plugin it names is imported on first use (module notes)."""
        where = source.describe()
        try:
            manifest = self._checked_manifest(raw, where)
            if not manifest.plugin:
                raise PluginContractError(
                    f"{where}: invalid manifest: plugin: is required when the entry point names the manifest "
                    "(the 'package.module:attribute' of the plugin object)"
                )
        except PluginContractError as exc:
            self.failures.append(PluginFailure(source, str(exc)))
            return None
        denial = policy.denial(manifest.name) if manifest.name != ep.name else None
        if denial is not None:
            reason = f"its manifest names backend {manifest.name!r}, which is {denial}"
            self.denied.append(PluginDenied(source, reason, backend=manifest.name))
            return None

        def load() -> tuple[dict[str, Callable[..., Any]], object]:
            return self._load_plugin(manifest, source)

        return _Claim(BackendPlugin(manifest, source, timeout=self.timeout, loader=load), None)

    def _settle(self, claims: list[_Claim], installed: dict[str, list[PluginSource]]) -> None:
        """Give each claimed backend name to its owner, or to nobody (module notes)."""
        by_name: dict[str, list[_Claim]] = {}
        for claim in claims:
            by_name.setdefault(claim.backend.name, []).append(claim)
        for name, group in by_name.items():
            owners = [c for c in group if c.backend.source.entry_point == name]
            winner: _Claim | None = None
            why = ""
            if len(owners) == 1:
                winner = owners[0]
                why = (
                    f"the name belongs to the plugin whose entry point is named {name!r}, "
                    f"{winner.backend.source.describe()}"
                )
            elif len(group) == 1 and name not in installed:
                winner = group[0]
            elif len(group) == 1:
                holders = ", ".join(source.describe() for source in installed[name])
                why = (
                    f"the name belongs to the entry point named {name!r}, {holders}, "
                    "which did not load as that backend (see its own entry)"
                )
            else:
                qualified = "more than one" if owners else "none"
                why = (
                    f"{qualified} of them has the entry point named {name!r} that would own it, "
                    "so the name is ambiguous and every claimant is refused"
                )
            claimants = " and by ".join(c.backend.source.describe() for c in group)
            for claim in group:
                if claim is winner:
                    try:
                        self._refuse_taken_name(claim.backend)  # registered directly, or by an earlier call
                    except PluginContractError as exc:
                        self._refuse(claim, str(exc))
                        continue
                    self.backends[name] = claim.backend
                    continue
                this = claim.backend.source.describe()
                if len(group) > 1:
                    self._refuse(
                        claim, f"backend name {name!r} is provided twice: by {claimants}; {why}; {this} is refused"
                    )
                else:
                    self._refuse(claim, f"{this} claims backend name {name!r}, but {why}; it is refused")

    def _refuse(self, claim: _Claim, error: str) -> None:
        if claim.internal_name is not None:
            self._pm.unregister(name=claim.internal_name)
        self.failures.append(PluginFailure(claim.backend.source, error, backend=claim.backend.name))

    # --- selection ----------------------------------------------------------
    def get(self, name: str) -> BackendPlugin:
        try:
            return self.backends[name]
        except KeyError:
            raise BackendNotFound(self._not_found_message(name)) from None

    def _load(self, backend: BackendPlugin) -> None:
        """:meth:`BackendPlugin.load`; a plugin that fails is dropped from
        :attr:`backends` and recorded in :attr:`failures`, then the error raised."""
        try:
            backend.load()
        except PluginContractError as exc:
            if self.backends.get(backend.name) is backend:
                del self.backends[backend.name]
                self.failures.append(PluginFailure(backend.source, str(exc), backend=backend.name))
            raise

    def _not_found_message(self, name: str) -> str:
        installed = ", ".join(sorted(self.backends)) or "none"
        text = f"no backend named {name!r} (installed: {installed})"
        broken = [f.source.describe() for f in self.failures if name in f.source.entry_point or f.backend == name]
        if broken:
            text += f"; a plugin that may be it failed to load: {', '.join(broken)} (see 'pyvmm backends')"
        denied = [d for d in self.denied if name in (d.source.entry_point, d.backend)]
        if denied:
            text += f"; {denied[0].source.describe()} is installed but {denied[0].reason}"
        return text

    def select(self, name: str | None = None, *, arch: Arch | None = None) -> BackendPlugin:
        """The backend to use: ``name`` if given, else ``$PYVMM_BACKEND``, else the
        highest-priority auto-selectable backend available on this host that runs
        ``arch`` guests (any arch when None; a named backend is not filtered: the
        caller reports a mismatch).

        :raises BackendNotFound: no such backend, or none available.
        :raises BackendUnavailable: the named backend cannot run here.
        """
        name = name or os.environ.get(ENV_BACKEND) or None
        if name is not None:
            backend = self.get(name)
            availability = backend.availability()
            if not availability.available:
                raise BackendUnavailable(name, availability.reason)
            self._load(backend)
            return backend
        candidates = sorted(
            (b for b in self.backends.values() if b.manifest.auto_select),
            key=lambda b: (-b.manifest.priority, b.name),
        )
        reasons = []
        for backend in candidates:
            if arch is not None and arch not in backend.manifest.guest_arches:
                reasons.append(f"{backend.name}: runs no {arch.value} guests")
                continue
            availability = backend.availability()
            if not availability.available:
                reasons.append(f"{backend.name}: {availability.reason}")
                continue
            try:
                self._load(backend)
            except PluginContractError as exc:
                reasons.append(f"{backend.name}: failed to load ({exc})")
                continue
            return backend
        detail = "; ".join(reasons) if reasons else "no backend is installed (pip install pyvmm-kvm, ...)"
        what = (
            f"no backend available on this host runs {arch.value} guests"
            if arch
            else "no backend is available on this host"
        )
        raise BackendNotFound(f"{what} ({detail})")


def _source_of(ep: EntryPointLike) -> PluginSource:
    if isinstance(ep, installed_entry_points.InstalledEntryPoint):
        return PluginSource(ep.name, ep.distribution, ep.version, ep.location)
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


def registry_for(name: str) -> PluginRegistry:
    """A registry holding backend ``name`` if any can: the process-wide one
    when it is loaded already, else a new one that imported only ``name``'s own
    entry point (:meth:`PluginRegistry.load_owner`), else the process-wide one
    with every entry point loaded (which also explains a missing backend)."""
    if _default is None:
        registry = PluginRegistry()
        if registry.load_owner(name):
            return registry
    return default_registry()


def reset_default_registry() -> None:
    """Forget the process-wide registry (tests, and after installing a plugin)."""
    global _default
    _default = None


__all__ = [
    "DEFAULT_PLUGIN_TIMEOUT",
    "ENV_PLUGIN_TIMEOUT",
    "BackendPlugin",
    "PluginDenied",
    "PluginFailure",
    "PluginRegistry",
    "PluginSource",
    "default_registry",
    "plugin_timeout",
    "registry_for",
    "reset_default_registry",
]
