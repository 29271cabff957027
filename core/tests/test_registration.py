"""Registration: the contract checks, and that a refused plugin leaves nothing behind."""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from coretests_support import RecordingBackend, hookimpl_plugins, namespace_plugin, plugin_names, register

from pyvmm.capabilities import HOOKS_BY_CAPABILITY, Capability
from pyvmm.config import Arch
from pyvmm.contract import MIN_CONTRACT_VERSION, required_hooks
from pyvmm.errors import PluginContractError
from pyvmm.hookspecs import hookimpl
from pyvmm.manifest import CONTRACT_VERSION, BackendManifest
from pyvmm.plugins import PluginRegistry, PluginSource
from pyvmm.vm import Backend


@pytest.fixture
def refused(registry: PluginRegistry) -> Iterator[Callable[[object], PluginContractError]]:
    """``refused(plugin)`` registers ``plugin``, expects PluginContractError, checks that
    the registry is exactly as before, and returns the error."""
    good = RecordingBackend("already-there")
    register(registry, good)

    def attempt(plugin: object) -> PluginContractError:
        backends_before = dict(registry.backends)
        names_before = plugin_names(registry)
        with pytest.raises(PluginContractError) as info:
            registry.register(plugin, PluginSource(entry_point="under-test", distribution="pyvmm-under-test"))
        assert registry.backends == backends_before
        assert plugin_names(registry) == names_before
        assert all(p is not plugin for p in hookimpl_plugins(registry))
        assert "pyvmm-under-test" in str(info.value)  # every refusal says which plugin
        return info.value

    yield attempt
    # After any refusal a correct plugin still registers and works.
    late = RecordingBackend("registered-after")
    backend = register(registry, late)
    assert set(registry.backends) == {"already-there", "registered-after"}
    with backend.create_vm() as vm:
        vm.create_vcpu()
    assert "pyvmm_create_vcpu" in late.hook_names()
    assert "pyvmm_create_vcpu" not in good.hook_names()


OPTIONAL = [(cap, hooks) for cap, hooks in HOOKS_BY_CAPABILITY.items()]


@pytest.mark.parametrize(("cap", "hooks"), OPTIONAL, ids=[c.name for c, _ in OPTIONAL])
def test_declared_capability_without_its_hooks(
    refused: Callable[[object], PluginContractError], cap: Capability, hooks: tuple[str, ...]
) -> None:
    backend = RecordingBackend("broken", [cap])
    error = refused(backend.plugin(omit=hooks[-1:]))
    assert f"declares {cap.name} but does not implement {hooks[-1]}" in str(error)


@pytest.mark.parametrize(("cap", "hooks"), OPTIONAL, ids=[c.name for c, _ in OPTIONAL])
def test_hook_without_declaring_its_capability(
    refused: Callable[[object], PluginContractError], cap: Capability, hooks: tuple[str, ...]
) -> None:
    backend = RecordingBackend("broken", [])
    error = refused(backend.plugin(extra=hooks[:1]))
    assert f"implements {hooks[0]} but does not declare {cap.name}" in str(error)


@pytest.mark.parametrize("hook", required_hooks())
def test_missing_required_hook(refused: Callable[[object], PluginContractError], hook: str) -> None:
    error = refused(RecordingBackend("broken").plugin(omit=[hook]))
    assert "required hook(s) not implemented" in str(error)
    assert hook in str(error)


def test_init_hook_next_to_boot_context_capability(refused: Callable[[object], PluginContractError]) -> None:
    backend = RecordingBackend("broken", [Capability.HYPERVISOR_INITIALIZED_BOOT_CONTEXT])
    error = refused(backend.plugin(extra=["pyvmm_init_vcpu"]))
    assert "pyvmm_init_vcpu would never be called" in str(error)


def test_init_hook_missing_without_boot_context_capability(refused: Callable[[object], PluginContractError]) -> None:
    error = refused(RecordingBackend("broken").plugin(omit=["pyvmm_init_vcpu"]))
    assert "must implement pyvmm_init_vcpu" in str(error)


def test_several_disagreements_are_reported_together(refused: Callable[[object], PluginContractError]) -> None:
    backend = RecordingBackend("broken", [Capability.PVCLOCK])
    error = refused(backend.plugin(omit=["pyvmm_set_clock", "pyvmm_init_vcpu"], extra=["pyvmm_kick_vcpu"]))
    text = str(error)
    assert "PVCLOCK" in text
    assert "IMMEDIATE_EXIT" in text
    assert "pyvmm_init_vcpu" in text


@hookimpl
def create_vm_renamed_arg(backend: Any, cfg: Any) -> Any:
    raise AssertionError("never called")


@hookimpl
def create_vm_missing_arg(backend: Any) -> Any:
    raise AssertionError("never called")


@hookimpl
def create_vm_swapped_args(config: Any, backend: Any) -> Any:
    raise AssertionError("never called")


@pytest.mark.parametrize(
    "impl",
    [create_vm_renamed_arg, create_vm_missing_arg, create_vm_swapped_args],
    ids=["renamed", "missing", "swapped"],
)
def test_wrong_hook_argument_names(refused: Callable[[object], PluginContractError], impl: Any) -> None:
    plugin = namespace_plugin(RecordingBackend("broken"), pyvmm_create_vm=impl)
    error = refused(plugin)
    assert "pyvmm_create_vm" in str(error)


def test_wrong_argument_names_message_shows_both_signatures(
    refused: Callable[[object], PluginContractError],
) -> None:
    error = refused(namespace_plugin(RecordingBackend("broken"), pyvmm_create_vm=create_vm_swapped_args))
    assert "must take (backend, config), it takes (config, backend)" in str(error)


def test_unknown_pyvmm_hook(refused: Callable[[object], PluginContractError]) -> None:
    @hookimpl
    def pyvmm_frobnicate(vm: Any) -> None:
        raise AssertionError("never called")

    plugin = namespace_plugin(RecordingBackend("broken"), pyvmm_frobnicate=pyvmm_frobnicate)
    error = refused(plugin)
    assert "pyvmm_frobnicate is not a pyvmm hook" in str(error)


def _manifest_dict(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "fine",
        "version": "1.0",
        "contract_version": CONTRACT_VERSION,
        "host_os": ["linux"],
        "guest_arches": ["x86_64"],
    }
    raw.update(changes)
    return raw


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"name": "Bad Name"}, "name"),
        ({"name": "9lives"}, "name"),
        ({"name": "x" * 40}, "name"),
        ({"version": ""}, "version"),
        ({"contract_version": 0}, "contract_version"),
        ({"host_os": []}, "host_os"),
        ({"guest_arches": []}, "guest_arches"),
        ({"guest_arches": ["sparc64"]}, "guest_arches"),
        ({"colour": "red"}, "colour"),
        ({"priority": "high"}, "priority"),
    ],
    ids=[
        "name_pattern",
        "name_leading_digit",
        "name_too_long",
        "empty_version",
        "contract_version_0",
        "empty_host_os",
        "empty_guest_arches",
        "bad_arch",
        "extra_field",
        "priority_not_int",
    ],
)
def test_invalid_manifest(
    refused: Callable[[object], PluginContractError], changes: dict[str, Any], field: str
) -> None:
    raw = _manifest_dict(**changes)

    @hookimpl
    def pyvmm_backend_info() -> Any:
        return raw

    error = refused(namespace_plugin(RecordingBackend("broken"), pyvmm_backend_info=pyvmm_backend_info))
    assert "invalid manifest" in str(error)
    assert field in str(error)


def test_manifest_as_a_dict_is_accepted(registry: PluginRegistry) -> None:
    @hookimpl
    def pyvmm_backend_info() -> Any:
        return _manifest_dict(name="from-a-dict", capabilities=["pvclock"])

    backend = RecordingBackend("ignored", [Capability.PVCLOCK])
    plugin = registry.register(namespace_plugin(backend, pyvmm_backend_info=pyvmm_backend_info))
    assert plugin.name == "from-a-dict"
    assert isinstance(plugin.manifest, BackendManifest)
    assert plugin.manifest.guest_arches == (Arch.X86_64,)


def test_backend_info_raising(refused: Callable[[object], PluginContractError]) -> None:
    @hookimpl
    def pyvmm_backend_info() -> Any:
        raise RuntimeError("no manifest today")

    error = refused(namespace_plugin(RecordingBackend("broken"), pyvmm_backend_info=pyvmm_backend_info))
    assert "pyvmm_backend_info raised RuntimeError: no manifest today" in str(error)


def test_contract_version_mismatch(refused: Callable[[object], PluginContractError]) -> None:
    error = refused(RecordingBackend("from-the-future", contract_version=CONTRACT_VERSION + 1).plugin())
    assert f"version {CONTRACT_VERSION + 1}" in str(error)
    assert f"versions {MIN_CONTRACT_VERSION} to {CONTRACT_VERSION}" in str(error)
    assert "'from-the-future'" in str(error)


def test_duplicate_backend_name_names_both_sources(registry: PluginRegistry) -> None:
    first = RecordingBackend("twin")
    register(registry, first, PluginSource(entry_point="twin", distribution="pyvmm-twin-a", version="1.0"))
    before = dict(registry.backends)
    second = RecordingBackend("twin")
    second_plugin = second.plugin()
    with pytest.raises(PluginContractError) as info:
        registry.register(second_plugin, PluginSource(entry_point="twin2", distribution="pyvmm-twin-b", version="2.0"))
    text = str(info.value)
    assert "'twin' is provided twice" in text
    assert "pyvmm-twin-a 1.0" in text
    assert "pyvmm-twin-b 2.0" in text
    assert registry.backends == before
    assert all(p is not second_plugin for p in hookimpl_plugins(registry))
    # The first one is the one that stays in use.
    with Backend(registry.get("twin")).create_vm():
        pass
    assert "pyvmm_create_vm" in first.hook_names()
    assert second.calls == []


def test_registering_the_same_object_twice(registry: PluginRegistry) -> None:
    plugin = RecordingBackend("once").plugin()
    registry.register(plugin)
    with pytest.raises(PluginContractError):
        registry.register(plugin)
    assert list(registry.backends) == ["once"]


def test_unknown_capabilities_are_kept_and_read_as_false(registry: PluginRegistry) -> None:
    test_backend = RecordingBackend("newer", ["warp_drive", Capability.PVCLOCK, "teleport"])
    backend = register(registry, test_backend)
    manifest = backend.manifest
    assert manifest.unknown_capabilities == ("teleport", "warp_drive")
    assert "warp_drive" in manifest.capabilities
    assert list(backend.capabilities) == [Capability.PVCLOCK]
    assert len(backend.capabilities) == 1
    assert backend.supports(Capability.PVCLOCK)
    assert not backend.capabilities[Capability.IMMEDIATE_EXIT]
    assert "warp_drive" not in backend.capabilities
    with backend.create_vm() as vm:
        assert vm.get_clock() == 0


def test_module_plugin_registers() -> None:
    """A module (not an object) with module-level hook functions is a plugin too."""
    module = types.ModuleType("pyvmm_module_style_test")
    test_backend = RecordingBackend("module-style")
    for name, func in vars(test_backend.plugin()).items():
        setattr(module, name, func)
    registry = PluginRegistry()
    plugin = registry.register(module)
    assert plugin.name == "module-style"
    assert plugin.source.entry_point == "pyvmm_module_style_test"
    assert set(plugin.impls) == set(required_hooks()) | {"pyvmm_init_vcpu"}
