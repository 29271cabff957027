"""The backend manifest: what a backend says about itself at discovery.

A backend returns a :class:`BackendManifest` from ``pyvmm_backend_info()``.  Core
validates it, checks it against the hooks the plugin implements, and refuses the
plugin (reported, not fatal) when the two disagree.

Core validates every manifest and availability result it receives *again*, from
the values it holds (:func:`validated_manifest`, :func:`validated_availability`):
pydantic's ``model_copy(update=...)`` and ``model_construct()`` build instances
without validation, and a subclass may override validators or properties, so
``isinstance(x, BackendManifest)`` proves nothing about its contents.  What core
keeps is always an exact :class:`BackendManifest` (its ``probe`` callable, which
dumps exclude, carried over).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pyvmm.capabilities import Capability, CapabilitySet, parse_capabilities
from pyvmm.config import Arch, validation_message

# The contract version lives with the specifications' metadata; plugins have
# always imported it from here.
from pyvmm.contract import CONTRACT_VERSION

__all__ = ["CONTRACT_VERSION", "Availability", "BackendManifest", "validated_availability", "validated_manifest"]


class Availability(BaseModel):
    """Result of a backend's availability probe.

    ``missing_capabilities`` narrows the manifest to what this host really offers:
    a manifest declares what the plugin implements, while (say) an older kernel
    may lack some of it.  Core gates optional hooks on the narrowed set.
    """

    model_config = ConfigDict(frozen=True)

    available: bool
    reason: str = ""
    missing_capabilities: tuple[Capability, ...] = ()

    @classmethod
    def yes(cls, missing_capabilities: tuple[Capability, ...] = ()) -> Availability:
        return cls(available=True, missing_capabilities=missing_capabilities)

    @classmethod
    def no(cls, reason: str) -> Availability:
        return cls(available=False, reason=reason)


def _never_available() -> Availability:
    return Availability.no("the backend declares no availability probe")


class BackendManifest(BaseModel):
    """Everything core needs to know about a backend before using it."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$", description="backend name users select it by")
    version: str = Field(min_length=1)
    contract_version: int = Field(ge=1, description="hook contract version the plugin implements")
    description: str = ""
    host_os: tuple[str, ...] = Field(min_length=1, description="sys.platform prefixes the backend runs on")
    guest_arches: tuple[Arch, ...] = Field(min_length=1)
    capabilities: tuple[str, ...] = Field(
        default=(), description="Capability values; unknown names are kept and read as false"
    )
    priority: int = Field(default=0, description="higher wins when several backends are available")
    auto_select: bool = Field(
        default=True, description="false for backends only ever chosen by name (test backends, models)"
    )
    probe: Callable[[], Availability] = Field(default=_never_available, exclude=True, repr=False)

    @field_validator("capabilities", mode="before")
    @classmethod
    def _capability_values(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple, set, frozenset)):
            return tuple(sorted(c.value if isinstance(c, Capability) else c for c in value))
        return value

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
        except ValidationError as exc:
            return Availability.no(f"availability probe returned an invalid Availability: {validation_message(exc)}")


def _stored_fields(model: BaseModel) -> dict[str, Any]:
    """The values an instance holds, however it was built.  Unknown keys that
    ``model_copy(update=...)`` slipped in are kept, so that ``extra="forbid"``
    rejects them instead of their being dropped silently."""
    data = dict(model.__dict__)
    data.update(model.__pydantic_extra__ or {})
    return data


def validated_manifest(raw: object) -> BackendManifest:
    """``raw`` (a manifest or a mapping) validated into an exact
    :class:`BackendManifest`, even when it already is one: ``model_copy`` and
    ``model_construct`` skip validation, and a subclass could override it.

    :raises ValidationError: the values break the manifest's rules.
    """
    if isinstance(raw, BackendManifest):
        raw = _stored_fields(raw)
    # Any other model class goes to pydantic as is, which refuses it.
    return BackendManifest.model_validate(raw)


def validated_availability(raw: Availability) -> Availability:
    """An :class:`Availability` validated again from the values it holds, as an
    exact :class:`Availability` (see :func:`validated_manifest` for why).

    :raises ValidationError: the values break the model's rules.
    """
    return Availability.model_validate(_stored_fields(raw))


def _stand_in(backend: str) -> bool:
    """A driver model (or a test's seam) answers for ``backend`` here: its host
    OS no longer limits where it runs (:mod:`pyvmm.backend.stand_in`)."""
    from pyvmm.backend.stand_in import has_stand_in

    return has_stand_in(backend)
