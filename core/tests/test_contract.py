"""The contract as data: spec metadata, what derives from it, the generated
adapter, contract versions and the capability classification."""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any

import pytest

import pyvmm
import pyvmm.hookspecs as hookspecs
from pyvmm.backend import backend_plugin
from pyvmm.capabilities import CORE_READS, INFORMATIONAL, Capability
from pyvmm.config import Arch, VmConfig
from pyvmm.contract import (
    CONTRACT_VERSION,
    INIT_VCPU_HOOK,
    HookSpecInfo,
    hooks_by_capability,
    hooks_markdown,
    required_hooks,
    specs,
)
from pyvmm.errors import PluginContractError, UnsupportedCapability
from pyvmm.exits import HltExit, VcpuExit
from pyvmm.manifest import Availability, BackendManifest
from pyvmm.memory import RamRegion
from pyvmm.plugins import PluginRegistry
from pyvmm.testing.contract_backend import ContractTestBackend
from pyvmm.vm import Backend, _adapted

CORE_SRC = pathlib.Path(pyvmm.__file__).parent
REPO = pathlib.Path(__file__).resolve().parents[2]


def test_every_specification_carries_its_metadata() -> None:
    names = sorted(n for n in dir(hookspecs) if n.startswith("pyvmm_"))
    assert names == sorted(specs())
    for name in names:
        info = getattr(hookspecs, name).pyvmm_contract
        assert isinstance(info, HookSpecInfo) and info.name == name
        assert "Example::" in (getattr(hookspecs, name).__doc__ or ""), f"{name} needs an example"


def test_required_and_gated_hooks_derive_from_the_metadata() -> None:
    assert set(required_hooks()) == {n for n, i in specs().items() if i.required}
    gated = {h for hooks in hooks_by_capability().values() for h in hooks}
    assert gated == {n for n, i in specs().items() if i.capability is not None}
    assert INIT_VCPU_HOOK not in gated and INIT_VCPU_HOOK not in required_hooks()


def test_every_capability_has_exactly_one_role() -> None:
    gates = set(hooks_by_capability())
    for cap in Capability:
        roles = [cap in gates or cap in CORE_READS, cap in INFORMATIONAL]
        assert roles.count(True) == 1, f"{cap.name}: gating/core-read or informational, exactly one"


def _core_sources() -> str:
    return "\n".join(
        p.read_text() for p in CORE_SRC.rglob("*.py") if p.name != "capabilities.py" and "testing" not in p.parts
    )


@pytest.mark.parametrize("cap", sorted(CORE_READS, key=lambda c: c.value))
def test_a_core_read_capability_is_read_by_core(cap: Capability) -> None:
    assert re.search(rf"Capability\.{cap.name}\b", _core_sources()), f"CORE_READS says core reads {cap.name}"


@pytest.mark.parametrize("cap", sorted(INFORMATIONAL, key=lambda c: c.value))
def test_an_informational_capability_is_never_read_by_core(cap: Capability) -> None:
    assert not re.search(rf"Capability\.{cap.name}\b", _core_sources())


def test_the_guide_shows_the_current_hook_table() -> None:
    guide = (REPO / "docs" / "writing-a-backend.md").read_text()
    assert hooks_markdown() in guide, "regenerate the table with pyvmm.contract.hooks_markdown()"


# --- the generated adapter ----------------------------------------------------------


class ToyVm:
    def __init__(self, config: VmConfig) -> None:
        self.config = config
        self.regions: list[RamRegion] = []
        self.closed = False

    @classmethod
    def create(cls, backend: Any, config: VmConfig) -> ToyVm:
        return cls(config)

    def close(self) -> None:
        self.closed = True

    def map_memory(self, region: RamRegion) -> None:
        self.regions.append(region)

    def create_vcpu(self, index: int) -> ToyVcpu:
        return ToyVcpu(index)


class ToyVcpu:
    def __init__(self, index: int) -> None:
        self.index = index
        self.kicks = 0

    def run(self) -> VcpuExit:
        return HltExit()

    def init(self, boot: Any) -> None:
        pass

    def kick(self) -> None:
        self.kicks += 1

    def close(self) -> None:
        pass


def _manifest(*caps: Capability) -> BackendManifest:
    return BackendManifest(
        name="toy",
        version="1",
        contract_version=CONTRACT_VERSION,
        host_os=("linux",),
        guest_arches=(Arch.X86_64,),
        capabilities=caps,
        probe=Availability.yes,
    )


def test_backend_plugin_generates_the_hooks_of_the_methods_the_classes_have() -> None:
    plugin = backend_plugin(
        manifest=lambda: _manifest(Capability.IMMEDIATE_EXIT),
        create_vm=ToyVm.create,
        vm_class=ToyVm,
        vcpu_class=ToyVcpu,
    )
    generated = {n for n in dir(plugin) if n.startswith("pyvmm_")}
    assert generated == set(required_hooks()) | {INIT_VCPU_HOOK, "pyvmm_kick_vcpu"}
    backend = Backend(PluginRegistry().register(plugin))
    with backend.create_vm({"arch": "x86_64"}) as vm:
        region = vm.add_memory(0, 0x10000)
        assert vm.handle.regions == [region], "pyvmm_map_memory reached ToyVm.map_memory"
        vcpu = vm.create_vcpu()
        assert vcpu.run.__self__ is vcpu.handle, "the exit path calls the handle's own run"  # type: ignore[attr-defined]
        vcpu.kick()
        assert vcpu.handle.kicks == 1
    assert vm.handle.closed


def test_a_method_without_its_capability_is_refused_at_registration() -> None:
    plugin = backend_plugin(manifest=_manifest, create_vm=ToyVm.create, vm_class=ToyVm, vcpu_class=ToyVcpu)
    with pytest.raises(PluginContractError, match="implements pyvmm_kick_vcpu but does not declare IMMEDIATE_EXIT"):
        PluginRegistry().register(plugin)


def test_a_capability_without_its_method_is_refused_at_registration() -> None:
    plugin = backend_plugin(
        manifest=lambda: _manifest(Capability.IMMEDIATE_EXIT, Capability.PVCLOCK),
        create_vm=ToyVm.create,
        vm_class=ToyVm,
        vcpu_class=ToyVcpu,
    )
    with pytest.raises(PluginContractError, match="declares PVCLOCK but does not implement"):
        PluginRegistry().register(plugin)


# --- contract versions --------------------------------------------------------------


def test_a_version_1_plugin_without_changed_hooks_still_registers() -> None:
    plugin = ContractTestBackend("old", [Capability.IMMEDIATE_EXIT], contract_version=1).plugin()
    assert PluginRegistry().register(plugin).name == "old"


def test_a_version_1_irqfd_hook_is_refused_naming_the_change() -> None:
    class OldStyle(ContractTestBackend):
        def pyvmm_register_irqfd(self, vm: Any, fd: int, line: int, level: bool) -> None:  # type: ignore[override]
            pass

    OldStyle.pyvmm_register_irqfd = hookspecs.hookimpl(OldStyle.pyvmm_register_irqfd)  # type: ignore[method-assign]
    plugin = OldStyle("old", [Capability.IRQFD], contract_version=1).plugin()
    with pytest.raises(PluginContractError, match=r"pyvmm\.host\.Event as .event."):
        PluginRegistry().register(plugin)


def test_a_hook_newer_than_the_declared_version_is_refused() -> None:
    plugin = ContractTestBackend("old", [Capability.DEVICE_TREE_NODES], contract_version=1).plugin()
    with pytest.raises(PluginContractError, match="added in contract version 2"):
        PluginRegistry().register(plugin)


def test_a_version_below_the_supported_range_is_refused() -> None:
    plugin = ContractTestBackend("ancient", contract_version=1).plugin()
    registry = PluginRegistry()
    registry.register(plugin)  # 1 is the oldest supported
    manifest = ContractTestBackend("x").manifest()
    with pytest.raises(ValueError):
        dataclasses.replace(manifest, contract_version=0)


def test_a_trailing_argument_added_later_is_not_passed_to_an_older_implementation() -> None:
    info = HookSpecInfo(
        name="pyvmm_example", on="vm", method="example", capability=Capability.PVCLOCK,
        argnames=("vm", "value", "flags"), args_since={"flags": 3},
    )  # fmt: skip
    assert info.argnames_for(2) == ("vm", "value")
    assert info.argnames_for(3) == ("vm", "value", "flags")
    seen: list[tuple[Any, ...]] = []

    def old(vm: Any, value: int) -> None:
        seen.append((vm, value))

    _adapted(old, info, 2)("vm", 5, 0x10)
    assert seen == [("vm", 5)]

    def new(vm: Any, value: int, flags: int) -> None:
        seen.append((vm, value, flags))

    assert _adapted(new, info, 3) is new, "a current implementation is called directly"


# --- contract fixes -----------------------------------------------------------------


def test_a_protected_vm_needs_the_protected_capability() -> None:
    backend = Backend(PluginRegistry().register(ContractTestBackend("plain").plugin()))
    with pytest.raises(UnsupportedCapability, match="PROTECTED"):
        backend.create_vm({"arch": "x86_64", "protection": "protected"})
    test_backend = ContractTestBackend("isolating", [Capability.PROTECTED])
    protected = Backend(PluginRegistry().register(test_backend.plugin()))
    with protected.create_vm({"arch": "x86_64", "protection": "protected"}) as vm:
        assert vm.config.protection.value == "protected"


def test_nothing_shipped_imports_the_testing_package() -> None:
    """Production code never depends on test helpers: the seam protocol, the kit
    and the backends stand without pyvmm.testing.  The one exception is a
    backend's driver model (``pyvmm_<name>/model.py``), which ships with its
    plugin and is built on the driver-model harness -- and only on that: nothing
    else of the backend imports the model, and the model nothing else of
    pyvmm.testing."""
    shipped = [p for p in CORE_SRC.rglob("*.py") if "testing" not in p.relative_to(CORE_SRC).parts]
    shipped += list((REPO / "plugins").glob("*/src/**/*.py")) + list((REPO / "examples").glob("*/src/**/*.py"))
    models = [p for p in shipped if p.name == "model.py" and p.parent.parent.name == "src"]
    offenders = [
        str(p.relative_to(REPO))
        for p in shipped
        if p not in models and re.search(r"^\s*(from|import)\s+pyvmm\.testing\b", p.read_text(), re.M)
    ]
    offenders += [
        str(p.relative_to(REPO))
        for p in models
        if re.search(r"^\s*(from|import)\s+pyvmm\.testing(?!\.driver_model\b)", p.read_text(), re.M)
    ]
    offenders += [
        str(p.relative_to(REPO))
        for p in shipped
        if p not in models
        and re.search(r"^\s*(from|import)\s+pyvmm_\w+(\.model\b|\s+import\s+model\b)", p.read_text(), re.M)
    ]
    assert offenders == []


def test_sources_cite_the_repository_notes_not_the_shared_reference() -> None:
    """Citations point at docs/backends/<name>.md or upstream, never at a file that
    is not in the repository."""
    files = [p for p in REPO.rglob("*") if p.suffix in (".py", ".md", ".toml") and p.is_file()]
    files = [p for p in files if not {".git", "build", ".tox", ".venv"} & set(p.parts) and "egg-info" not in str(p)]
    offenders = [
        str(p.relative_to(REPO)) for p in files if "backend-" + "interfaces.md" in p.read_text(errors="replace")
    ]
    assert offenders == []


def test_core_has_one_typed_call_site_per_specification() -> None:
    from pyvmm.vm import BackendHooks

    declared = set(BackendHooks.__annotations__)
    assert declared == {name.removeprefix("pyvmm_") for name in specs()}
