"""Plugin identity: who owns a backend name, the policy by backend name, and
manifests validated however they were built (issue 10, item 4).

Entry points are faked (``name``, ``load()``, ``dist``) as
``importlib.metadata.EntryPoint`` objects are, so each test decides which
distribution ships which plugin without installing anything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import pytest
from coretests_support import RecordingBackend, namespace_plugin, plugin_names

from pyvmm.capabilities import Capability, CapabilitySet
from pyvmm.config import Arch
from pyvmm.errors import BackendNotFound, PluginContractError
from pyvmm.hookspecs import hookimpl
from pyvmm.manifest import Availability, BackendManifest, validated_manifest
from pyvmm.plugins import PluginRegistry, PluginSource
from pyvmm.policy import ENV_ALLOW, ENV_DENY, PluginPolicy
from pyvmm.vm import Backend

# --- fakes -------------------------------------------------------------------------------


@dataclass
class FakeDist:
    """What discovery reads of an ``importlib.metadata.Distribution``."""

    name: str
    version: str = "1.0"
    metadata: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.metadata = {"Name": self.name}

    def locate_file(self, path: str) -> Path:
        return Path("/site-packages") / self.name / path


@dataclass
class FakeEntryPoint:
    """An entry point of group ``pyvmm``: ``load()`` returns ``plugin``."""

    name: str
    plugin: object
    dist: FakeDist
    loads: int = 0

    def load(self) -> object:
        self.loads += 1
        return self.plugin


class Tracked(RecordingBackend):
    """A contract backend that counts its manifest and probe calls (its other
    hooks are recorded in ``calls`` by the base class)."""

    __test__ = False

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.manifests = 0
        self.probes = 0

    def _probe(self) -> Availability:
        self.probes += 1
        return Availability.yes()

    def manifest(self) -> BackendManifest:
        self.manifests += 1
        return dataclasses.replace(super().manifest(), probe=self._probe)

    def ran_nothing_but_its_manifest(self) -> bool:
        return self.calls == [] and self.probes == 0


def entry_point(ep_name: str, backend: Tracked, dist: str) -> FakeEntryPoint:
    return FakeEntryPoint(ep_name, backend.plugin(), FakeDist(dist))


def discover(*eps: FakeEntryPoint, policy: PluginPolicy | None = None) -> PluginRegistry:
    registry = PluginRegistry(policy=policy or PluginPolicy())
    registry.load_entry_points(cast("list[metadata.EntryPoint]", list(eps)))
    return registry


def failures(registry: PluginRegistry) -> dict[str, str]:
    return {f.source.entry_point: f.error for f in registry.failures}


# --- a backend name is owned by one distribution -----------------------------------------


@pytest.mark.parametrize("impostor_ep", ["aaa", "zzz"], ids=["sorts-first", "sorts-last"])
@pytest.mark.parametrize("reverse", [False, True], ids=["given-in-order", "given-reversed"])
def test_an_impostor_never_displaces_the_owner(impostor_ep: str, reverse: bool) -> None:
    real, impostor = Tracked("kvm"), Tracked("kvm")
    eps = [entry_point("kvm", real, "pyvmm-kvm"), entry_point(impostor_ep, impostor, "pyvmm-evil")]
    registry = discover(*(reversed(eps) if reverse else eps))

    assert list(registry.backends) == ["kvm"]
    assert registry.backends["kvm"].source.distribution == "pyvmm-kvm"
    assert registry.get("kvm").plugin is eps[0].plugin
    (failure,) = registry.failures
    assert failure.source.distribution == "pyvmm-evil"
    assert failure.backend == "kvm"
    assert "backend name 'kvm' is provided twice" in failure.error
    assert "pyvmm-kvm 1.0 (entry point 'kvm')" in failure.error, "names the owner's distribution"
    assert f"pyvmm-evil 1.0 (entry point '{impostor_ep}') is refused" in failure.error
    # The impostor was asked for its manifest, and nothing else of it ran, nor stays.
    assert impostor.manifests == 1 and impostor.ran_nothing_but_its_manifest()
    assert all(not name.startswith(f"{impostor_ep}@") for name in plugin_names(registry))

    # Selecting by name runs the real backend's code, not the impostor's.
    with Backend(registry.select("kvm")).create_vm() as vm:
        vm.create_vcpu().run()
    assert real.hook_names() >= {"pyvmm_create_vm", "pyvmm_run_vcpu"}
    assert impostor.ran_nothing_but_its_manifest()


def test_an_impostor_gets_no_name_whose_owner_is_broken() -> None:
    impostor = Tracked("kvm")

    class Broken:
        name = "kvm"
        dist = FakeDist("pyvmm-kvm", "0.1")

        def load(self) -> object:
            raise ImportError("libkvm is missing")

    registry = discover(cast(FakeEntryPoint, Broken()), entry_point("aaa", impostor, "pyvmm-evil"))
    assert registry.backends == {}
    errors = failures(registry)
    assert errors["kvm"] == "import failed: ImportError: libkvm is missing"
    assert "pyvmm-evil 1.0 (entry point 'aaa') claims backend name 'kvm'" in errors["aaa"]
    assert "belongs to the entry point named 'kvm', pyvmm-kvm 0.1 (entry point 'kvm')" in errors["aaa"]
    assert impostor.ran_nothing_but_its_manifest()
    with pytest.raises(BackendNotFound) as info:
        registry.select("kvm")
    assert "pyvmm-kvm 0.1" in str(info.value) and "pyvmm-evil 1.0" in str(info.value)


def test_an_impostor_gets_no_name_whose_owner_claims_another() -> None:
    # The entry point "kvm" exists, so "kvm" is not up for grabs, even though that
    # plugin calls itself something else.
    registry = discover(
        entry_point("kvm", Tracked("kvm-ng"), "pyvmm-kvm"), entry_point("aaa", Tracked("kvm"), "pyvmm-evil")
    )
    assert list(registry.backends) == ["kvm-ng"]
    assert "claims backend name 'kvm'" in failures(registry)["aaa"]


def test_no_owner_among_several_claimants_means_nobody() -> None:
    one, two = Tracked("acme"), Tracked("acme")
    registry = discover(entry_point("acme-a", one, "pyvmm-acme-a"), entry_point("acme-b", two, "pyvmm-acme-b"))
    assert registry.backends == {}
    errors = failures(registry)
    assert set(errors) == {"acme-a", "acme-b"}
    for error in errors.values():
        assert "pyvmm-acme-a 1.0" in error and "pyvmm-acme-b 1.0" in error
        assert "none of them has the entry point named 'acme'" in error
        assert "ambiguous" in error
    assert one.ran_nothing_but_its_manifest() and two.ran_nothing_but_its_manifest()
    assert plugin_names(registry) == set()


def test_two_owners_means_nobody() -> None:
    # Two distributions both ship an entry point "acme" naming backend "acme".
    registry = discover(
        entry_point("acme", Tracked("acme"), "pyvmm-acme"), entry_point("acme", Tracked("acme"), "acme-fork")
    )
    assert registry.backends == {}
    assert len(registry.failures) == 2
    for failure in registry.failures:
        assert "more than one of them has the entry point named 'acme'" in failure.error
        assert "pyvmm-acme 1.0" in failure.error and "acme-fork 1.0" in failure.error


def test_a_sole_claimant_under_another_entry_point_name_keeps_its_name() -> None:
    # The guide asks for equal names, but nobody else wants this one: today's behaviour.
    registry = discover(entry_point("acme-backend", Tracked("acme"), "pyvmm-acme"))
    assert list(registry.backends) == ["acme"]
    assert registry.failures == []


def test_direct_registration_is_first_come_first_served() -> None:
    registry = PluginRegistry()
    first = registry.register(Tracked("acme").plugin(), PluginSource("first", "dist-one"))
    with pytest.raises(PluginContractError) as info:
        registry.register(Tracked("acme").plugin(), PluginSource("acme", "dist-two"))
    assert "'acme' is provided twice" in str(info.value)
    assert "dist-one" in str(info.value) and "dist-two" in str(info.value)
    assert registry.get("acme") is first


def test_a_name_registered_directly_is_not_taken_over_by_discovery() -> None:
    registry = PluginRegistry(policy=PluginPolicy())
    first = registry.register(Tracked("acme").plugin(), PluginSource("embedded"))
    registry.load_entry_points(cast("list[metadata.EntryPoint]", [entry_point("acme", Tracked("acme"), "pyvmm-acme")]))
    assert registry.get("acme") is first
    assert "'acme' is provided twice" in failures(registry)["acme"]


# --- the policy matches backend names too --------------------------------------------------


def test_deny_by_backend_name_stops_an_impostor() -> None:
    real, impostor, other = Tracked("kvm"), Tracked("kvm"), Tracked("other")
    real_ep = entry_point("kvm", real, "pyvmm-kvm")
    registry = discover(
        real_ep,
        entry_point("aaa", impostor, "pyvmm-evil"),
        entry_point("other", other, "pyvmm-other"),
        policy=PluginPolicy(deny=frozenset({"kvm"}), deny_source=ENV_DENY),
    )
    assert list(registry.backends) == ["other"]
    assert registry.failures == []
    denied = {d.source.entry_point: d for d in registry.denied}
    assert denied["kvm"].reason == f"denied by {ENV_DENY}" and denied["kvm"].backend is None
    assert real_ep.loads == 0, "denied by its entry-point name: never imported"
    assert denied["aaa"].backend == "kvm"
    assert denied["aaa"].reason == f"its manifest names backend 'kvm', which is denied by {ENV_DENY}"
    # Imported and asked for its manifest, then refused before anything else ran.
    assert impostor.manifests == 1 and impostor.ran_nothing_but_its_manifest()
    assert all(name.startswith("other@") for name in plugin_names(registry))
    with pytest.raises(BackendNotFound, match="denied by PYVMM_BACKENDS_DENY"):
        registry.select("kvm")


def test_an_allow_list_admits_only_plugins_allowed_under_both_names() -> None:
    policy = PluginPolicy(allow=frozenset({"kvm", "aaa"}), allow_source=ENV_ALLOW)
    renamed = Tracked("evil")
    registry = discover(
        entry_point("kvm", renamed, "pyvmm-evil"),  # allowed entry point, backend name not allowed
        entry_point("aaa", Tracked("unicorn"), "pyvmm-evil2"),
        entry_point("zzz", Tracked("kvm"), "pyvmm-evil3"),  # never imported: "zzz" is not allowed
        policy=policy,
    )
    assert registry.backends == {}
    reasons = {d.source.entry_point: d.reason for d in registry.denied}
    assert reasons["kvm"].startswith("its manifest names backend 'evil', which is not on the allow list")
    assert reasons["aaa"].startswith("its manifest names backend 'unicorn', which is not on the allow list")
    assert reasons["zzz"].startswith("not on the allow list")
    assert renamed.ran_nothing_but_its_manifest()


# --- manifests are validated however they were built ---------------------------------------


def _fields(record: Any) -> dict[str, Any]:
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}


def _tampered(record: Any, **changes: Any) -> Any:
    """A copy of ``record`` with ``changes`` forced in past its checks, as
    ``object.__setattr__`` (or a plugin's own subclass) can."""
    copied = dataclasses.replace(record)
    for key, value in changes.items():
        object.__setattr__(copied, key, value)
    return copied


def _good_manifest(**changes: Any) -> Any:
    """A valid manifest with ``changes`` forced in; for a key it has no field
    for, its fields as a mapping with that key (what a plugin may return too)."""
    manifest = RecordingBackend("copied").manifest()
    if set(changes) - set(_fields(manifest)):
        return _fields(manifest) | changes
    return _tampered(manifest, **changes)


def _half_built_availability() -> Availability:
    """An Availability made without its constructor: only ``reason`` is set."""
    record = object.__new__(Availability)
    object.__setattr__(record, "reason", "never said whether")
    return record


def _info_hook(manifest: object) -> Callable[[], Any]:
    @hookimpl
    def pyvmm_backend_info() -> Any:
        return manifest

    return pyvmm_backend_info


def _plugin_returning(manifest: object) -> object:
    return namespace_plugin(RecordingBackend("copied"), pyvmm_backend_info=_info_hook(manifest))


@pytest.mark.parametrize(
    ("manifest", "words"),
    [
        (_good_manifest(name="Not A Name"), ["name", "pattern"]),
        (_good_manifest(name="kvm", version=""), ["version"]),
        (_good_manifest(guest_arches=()), ["guest_arches"]),
        (_good_manifest(contract_version=0), ["contract_version"]),
        (_good_manifest(priority="high"), ["priority"]),
        (_good_manifest(probe="not callable"), ["probe"]),
        (_good_manifest(nmae="typo"), ["nmae"]),
        ({"name": "half-built"}, ["version"]),
    ],
    ids=["name", "version", "arches", "contract", "priority", "probe", "unknown-key", "half-built"],
)
def test_an_unvalidated_manifest_is_refused(manifest: BackendManifest, words: list[str]) -> None:
    registry = PluginRegistry()
    with pytest.raises(PluginContractError, match="invalid manifest") as info:
        registry.register(_plugin_returning(manifest))
    for word in words:
        assert word in str(info.value)
    assert registry.backends == {} and plugin_names(registry) == set()


def test_a_tampered_manifest_with_a_bad_name_is_refused_at_discovery() -> None:
    ep = FakeEntryPoint("copied", _plugin_returning(_good_manifest(name="Not A Name")), FakeDist("pyvmm-copied"))
    registry = discover(ep)
    assert registry.backends == {}
    assert "invalid manifest" in failures(registry)["copied"]


def test_a_tampered_manifest_is_normalised_and_keeps_its_probe() -> None:
    probed: list[bool] = []

    def probe() -> Availability:
        probed.append(True)
        return Availability.yes(missing_capabilities=(Capability.PVCLOCK,))

    copied = _good_manifest(
        guest_arches=["x86_64"], capabilities=[Capability.PVCLOCK, Capability.MULTI_VCPU], probe=probe
    )
    backend = RecordingBackend("copied", [Capability.PVCLOCK, Capability.MULTI_VCPU])
    plugin = PluginRegistry().register(namespace_plugin(backend, pyvmm_backend_info=_info_hook(copied)))
    assert type(plugin.manifest) is BackendManifest
    assert plugin.manifest.guest_arches == (Arch.X86_64,)
    assert plugin.manifest.capabilities == ("multi_vcpu", "pvclock")
    assert plugin.manifest.probe is probe
    availability = plugin.availability()
    assert availability.available and probed == [True]
    assert Backend(plugin).capabilities == CapabilitySet({Capability.MULTI_VCPU})


class LyingManifest(BackendManifest):
    """A subclass that claims every capability whatever it declares."""

    @property
    def capability_set(self) -> CapabilitySet:
        return CapabilitySet(set(Capability))


def test_core_keeps_an_exact_manifest_not_a_subclass() -> None:
    lying = LyingManifest(**_fields(RecordingBackend("liar").manifest()))
    plugin = PluginRegistry().register(namespace_plugin(RecordingBackend("liar"), pyvmm_backend_info=_info_hook(lying)))
    assert type(plugin.manifest) is BackendManifest
    assert plugin.manifest.capability_set == CapabilitySet()


def test_validated_manifest_accepts_what_the_constructor_accepts() -> None:
    manifest = RecordingBackend("plain").manifest()
    again = validated_manifest(manifest)
    assert again == manifest and again.probe is manifest.probe
    assert validated_manifest(_fields(manifest)) == manifest


@pytest.mark.parametrize(
    "result",
    [
        _tampered(Availability.yes(), missing_capabilities=("no_such_capability",)),
        _half_built_availability(),
    ],
    ids=["tampered", "half-built"],
)
def test_an_unvalidated_availability_reads_as_unavailable(result: Availability) -> None:
    manifest = _good_manifest(probe=lambda: result)
    plugin = PluginRegistry().register(
        namespace_plugin(RecordingBackend("copied"), pyvmm_backend_info=_info_hook(manifest))
    )
    availability = plugin.availability()
    assert not availability.available
    assert "invalid Availability" in availability.reason
