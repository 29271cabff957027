"""PluginRegistry.load_owner: a command that names its backend imports only that
backend's own entry point, and only when the ownership rule makes that safe."""

from __future__ import annotations

from importlib import metadata
from typing import cast

from test_plugin_identity import FakeEntryPoint, Tracked, entry_point

from pyvmm.plugins import PluginRegistry
from pyvmm.policy import PluginPolicy
from pyvmm.vm import Backend


def _owner_registry(name: str, *eps: FakeEntryPoint, policy: PluginPolicy | None = None) -> tuple[PluginRegistry, bool]:
    registry = PluginRegistry(policy=policy or PluginPolicy())
    loaded = registry.load_owner(name, cast("list[metadata.EntryPoint]", list(eps)))
    return registry, loaded


def test_the_owner_is_loaded_alone() -> None:
    kvm = entry_point("kvm", Tracked("kvm"), "pyvmm-kvm")
    other = entry_point("gunyah", Tracked("gunyah"), "pyvmm-gunyah")
    impostor = entry_point("aaa", Tracked("kvm"), "pyvmm-evil")
    registry, loaded = _owner_registry("kvm", impostor, kvm, other)
    assert loaded
    assert list(registry.backends) == ["kvm"]
    assert registry.get("kvm").source.distribution == "pyvmm-kvm"
    assert (kvm.loads, other.loads, impostor.loads) == (1, 0, 0)
    with Backend(registry.select("kvm")).create_vm() as vm:
        vm.create_vcpu().run()


def test_an_owner_claiming_another_name_leaves_the_registry_empty() -> None:
    registry, loaded = _owner_registry("kvm", entry_point("kvm", Tracked("kvm-ng"), "pyvmm-kvm"))
    assert not loaded
    assert registry.backends == {}
    assert registry.failures == []
    # Full discovery still works on the same registry, and registers it once.
    registry.load_entry_points(cast("list[metadata.EntryPoint]", [entry_point("kvm", Tracked("kvm-ng"), "pyvmm-kvm")]))
    assert list(registry.backends) == ["kvm-ng"]


def test_no_entry_point_or_two_of_that_name_means_full_discovery() -> None:
    registry, loaded = _owner_registry("kvm", entry_point("aaa", Tracked("kvm"), "pyvmm-evil"))
    assert not loaded and registry.backends == {}
    twice = (entry_point("kvm", Tracked("kvm"), "pyvmm-kvm"), entry_point("kvm", Tracked("kvm"), "pyvmm-kvm2"))
    registry, loaded = _owner_registry("kvm", *twice)
    assert not loaded and registry.backends == {}
    assert [ep.loads for ep in twice] == [0, 0]


def test_a_denied_owner_is_not_imported() -> None:
    kvm = entry_point("kvm", Tracked("kvm"), "pyvmm-kvm")
    registry, loaded = _owner_registry("kvm", kvm, policy=PluginPolicy(deny=frozenset({"kvm"})))
    assert not loaded
    assert kvm.loads == 0
    assert [d.source.entry_point for d in registry.denied] == ["kvm"]


def test_a_broken_owner_is_recorded() -> None:
    class Broken:
        name = "kvm"
        dist = None

        def load(self) -> object:
            raise ImportError("libkvm is missing")

    registry, loaded = _owner_registry("kvm", cast(FakeEntryPoint, Broken()))
    assert not loaded
    assert [f.error for f in registry.failures] == ["import failed: ImportError: libkvm is missing"]
