"""The backend manifest: what a backend says about itself at discovery.

A backend's entry point names a function that returns its
:class:`BackendManifest` (``kvm = "pyvmm_kvm.manifest:manifest"``).  The module
holding it imports nothing of the backend but the manifest (stdlib and this
module), and its availability probe asks the host with the standard library:
``pyvmm backends`` reads every manifest and probes every backend without
importing any backend's bindings, VM or vCPU code.  The manifest's
:attr:`~BackendManifest.plugin` names the object that implements the hooks
(``"pyvmm_kvm.plugin:plugin"``); core imports it, and checks it against the
manifest, when the backend is first used (:mod:`pyvmm.plugins`).  A plugin whose
entry point names the plugin object itself (``pyvmm_backend_info`` returns the
manifest) still works: it is imported at discovery.

Core validates every manifest and availability result it receives *again*, from
the values it holds (:func:`validated_manifest`, :func:`validated_availability`):
a subclass may override properties, and ``object.__setattr__`` gets past a
frozen dataclass, so ``isinstance(x, BackendManifest)`` proves nothing about its
contents.  What core keeps is always an exact :class:`BackendManifest`.

Both records are slotted dataclasses checked by hand (:mod:`pyvmm.records`), not
pydantic models: the manifest is read by every command.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import field
from typing import Any

from pyvmm.capabilities import Capability, CapabilitySet, parse_capabilities
from pyvmm.config import Arch

# The contract version lives with the specifications' metadata; plugins have
# always imported it from here.
from pyvmm.contract import CONTRACT_VERSION
from pyvmm.lean_dataclass import lean_dataclass
from pyvmm.records import MISSING, Checker, RecordError, from_mapping, required, show

__all__ = [
    "CONTRACT_VERSION",
    "Availability",
    "BackendManifest",
    "RecordError",
    "validated_availability",
    "validated_manifest",
]

#: What a backend name looks like (the entry point's name too).
NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,31}$"
_NAME = re.compile(NAME_PATTERN)
#: ``module.path:attribute``, as an entry point's value.
_OBJECT_REFERENCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@lean_dataclass(frozen=True, slots=True, kw_only=True)
class Availability:
    """Result of a backend's availability probe.

    ``missing_capabilities`` narrows the manifest to what this host really offers:
    a manifest declares what the plugin implements, while (say) an older kernel
    may lack some of it.  Core gates optional hooks on the narrowed set.

    :raises RecordError: a field is invalid.
    """

    available: bool = MISSING
    reason: str = ""
    missing_capabilities: tuple[Capability, ...] = ()

    def __post_init__(self) -> None:
        check = Checker("Availability")
        if required(check, "available", self.available):
            check.boolean("available", self.available)
        check.text("reason", self.reason)
        missing = _sequence(check, "missing_capabilities", self.missing_capabilities)
        object.__setattr__(
            self,
            "missing_capabilities",
            tuple(check.choice(f"missing_capabilities.{i}", c, Capability) for i, c in enumerate(missing)),
        )
        check.done()

    @classmethod
    def yes(cls, missing_capabilities: tuple[Capability, ...] = ()) -> Availability:
        return cls(available=True, missing_capabilities=missing_capabilities)

    @classmethod
    def no(cls, reason: str) -> Availability:
        return cls(available=False, reason=reason)


def _sequence(check: Checker, name: str, value: Any) -> tuple[Any, ...]:
    """A list, tuple or set as a tuple; anything else is a problem (a string too:
    it would read as a sequence of letters)."""
    if isinstance(value, (list, tuple, set, frozenset)):
        return tuple(value)
    check.fail(name, f"must be a list{_given(value)}")
    return ()


def _given(value: Any) -> str:
    return f", not {show(value)}" if isinstance(value, (bool, int, float, str, bytes)) else ""


def _never_available() -> Availability:
    return Availability.no("the backend declares no availability probe")


@lean_dataclass(frozen=True, slots=True, kw_only=True)
class BackendManifest:
    """Everything core needs to know about a backend before using it.

    :param name: the backend name users select it by (``[a-z][a-z0-9_-]{0,31}``).
    :param version: the backend's version.
    :param contract_version: the hook contract version the plugin implements.
    :param host_os: ``sys.platform`` prefixes the backend runs on.
    :param guest_arches: the guest architectures it runs.
    :param capabilities: :class:`Capability` members or values; unknown names are
        kept and read as false (a backend written for a newer pyvmm).
    :param priority: higher wins when several backends are available.
    :param auto_select: false for backends only ever chosen by name (test backends, models).
    :param probe: the availability probe; it should need nothing but the standard
        library, as ``pyvmm backends`` runs every backend's.
    :param plugin: ``"module:attribute"`` of the object implementing the hooks,
        imported when the backend is first used; empty when the manifest came
        from that object's own ``pyvmm_backend_info``.
    :raises RecordError: a field is invalid (the message names it).
    """

    name: str = MISSING
    version: str = MISSING
    contract_version: int = MISSING
    description: str = ""
    host_os: tuple[str, ...] = MISSING
    guest_arches: tuple[Arch, ...] = MISSING
    capabilities: tuple[str, ...] = ()
    priority: int = 0
    auto_select: bool = True
    probe: Callable[[], Availability] = field(default=_never_available, repr=False, compare=False)
    plugin: str = ""

    def __post_init__(self) -> None:
        check = Checker("BackendManifest")
        set_field = object.__setattr__
        name: Any = self.name  # as given, like every field below: the annotations are what is checked
        if required(check, "name", name):
            if not isinstance(name, str):
                check.fail("name", f"must be a string{_given(name)}")
            elif not _NAME.match(name):
                check.fail(
                    "name",
                    f"must match the pattern {NAME_PATTERN!r} (lower-case letters, digits, - and _){_given(self.name)}",
                )
        if required(check, "version", self.version):
            check.text("version", self.version, min_length=1)
        if required(check, "contract_version", self.contract_version):
            check.integer("contract_version", self.contract_version, 1, 1 << 31)
        check.text("description", self.description)
        if required(check, "host_os", self.host_os):
            hosts = _sequence(check, "host_os", self.host_os)
            for i, host in enumerate(hosts):
                check.text(f"host_os.{i}", host, min_length=1)
            if not hosts and isinstance(self.host_os, (list, tuple, set, frozenset)):
                check.fail("host_os", "must name at least one host OS")
            set_field(self, "host_os", hosts)
        if required(check, "guest_arches", self.guest_arches):
            arches = _sequence(check, "guest_arches", self.guest_arches)
            if not arches and isinstance(self.guest_arches, (list, tuple, set, frozenset)):
                check.fail("guest_arches", "must name at least one guest arch")
            set_field(
                self, "guest_arches", tuple(check.choice(f"guest_arches.{i}", a, Arch) for i, a in enumerate(arches))
            )
        names = [
            c.value if isinstance(c, Capability) else c for c in _sequence(check, "capabilities", self.capabilities)
        ]
        for i, name in enumerate(names):
            check.text(f"capabilities.{i}", name)
        set_field(self, "capabilities", tuple(sorted(n for n in names if isinstance(n, str))))
        check.integer("priority", self.priority, -(1 << 31), 1 << 31)
        check.boolean("auto_select", self.auto_select)
        probe: Any = self.probe
        if not callable(probe):
            check.fail("probe", f"must be a function returning an Availability{_given(probe)}")
        plugin: Any = self.plugin
        if not isinstance(plugin, str):
            check.fail("plugin", f"must be a string{_given(plugin)}")
        elif plugin and not _OBJECT_REFERENCE.match(plugin):
            check.fail("plugin", f"must name an object as 'package.module:attribute', not {show(self.plugin)}")
        check.done()

    @property
    def capability_set(self) -> CapabilitySet:
        known, _ = parse_capabilities(self.capabilities)
        return CapabilitySet(known)

    def host_capabilities(self, availability: Availability) -> CapabilitySet:
        """The declared capabilities less those the probe found missing on this host."""
        known, _ = parse_capabilities(self.capabilities)
        return CapabilitySet(known - set(availability.missing_capabilities))

    @property
    def unknown_capabilities(self) -> tuple[str, ...]:
        return parse_capabilities(self.capabilities)[1]

    def runs_on_host(self, platform: str | None = None) -> bool:
        platform = sys.platform if platform is None else platform
        return any(platform.startswith(prefix) for prefix in self.host_os)

    def check_availability(self) -> Availability:
        """Run the probe on the calling thread; a probe that raises (``SystemExit``
        and other ``BaseException`` included) or returns something other than a
        valid :class:`Availability` counts as "unavailable", never as a crash.

        This does not bound the probe's time: core calls it through
        :meth:`pyvmm.plugins.BackendPlugin.availability`, which runs it on a
        watchdog thread and caches the answer.

        :raises KeyboardInterrupt: passed on, so that a Ctrl-C still stops the program.
        """
        if not self.runs_on_host() and not _stand_in(self.name):
            return Availability.no(f"runs on {', '.join(self.host_os)}, this host is {sys.platform}")
        try:
            result: object = self.probe()  # plugins are untrusted: check the type at run time
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - a probe must never take discovery down, nor exit
            return Availability.no(f"availability probe raised {type(exc).__name__}: {exc}")
        if not isinstance(result, Availability):
            return Availability.no(f"availability probe returned {type(result).__name__}, not Availability")
        try:
            return validated_availability(result)
        except RecordError as exc:
            return Availability.no(f"availability probe returned an invalid Availability: {exc}")

    def load_plugin(self) -> object:
        """The object :attr:`plugin` names, imported now.

        :raises ImportError, AttributeError: it cannot be imported or lacks the attribute.
        """
        import importlib

        module_name, _, attribute = self.plugin.partition(":")
        found: object = importlib.import_module(module_name)
        for part in attribute.split("."):
            found = getattr(found, part)
        return found


MANIFEST_FIELDS = tuple(f.name for f in dataclasses.fields(BackendManifest))
AVAILABILITY_FIELDS = tuple(f.name for f in dataclasses.fields(Availability))


def _stored_fields(record: object, cls: type, names: Iterable[str]) -> dict[str, Any]:
    """The values an instance holds, read from ``cls``'s slots: a subclass's
    property of the same name is not asked, and a slot never set (an instance
    made without ``__init__``) reads as missing."""
    values: dict[str, Any] = {}
    for name in names:
        try:
            values[name] = getattr(cls, name).__get__(record, cls)
        except AttributeError:
            values[name] = MISSING
    return values


def validated_manifest(raw: object) -> BackendManifest:
    """``raw`` (a manifest or a mapping) validated into an exact
    :class:`BackendManifest`, even when it already is one: a subclass could
    override what it reports, and ``object.__setattr__`` gets past ``frozen``.

    :raises RecordError: the values break the manifest's rules.
    """
    if isinstance(raw, BackendManifest):
        raw = _stored_fields(raw, BackendManifest, MANIFEST_FIELDS)
    return from_mapping(BackendManifest, raw, MANIFEST_FIELDS, "manifest")


def validated_availability(raw: Availability) -> Availability:
    """An :class:`Availability` validated again from the values it holds, as an
    exact :class:`Availability` (see :func:`validated_manifest` for why).

    :raises RecordError: the values break the record's rules.
    """
    return Availability(**_stored_fields(raw, Availability, AVAILABILITY_FIELDS))


def _stand_in(backend: str) -> bool:
    """A driver model (or a test's seam) answers for ``backend`` here: its host
    OS no longer limits where it runs (:mod:`pyvmm.backend.stand_in`)."""
    from pyvmm.backend.stand_in import has_stand_in

    return has_stand_in(backend)
