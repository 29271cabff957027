"""Entry points that name a manifest: the plugin it names is imported and checked
on first use, never at discovery (start-up, issue 19); and the reader of the
installed distributions' entry points (:mod:`pyvmm.entry_points`)."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

import pytest

from pyvmm.entry_points import InstalledEntryPoint, distribution_version, entry_points
from pyvmm.errors import BackendNotFound, PluginContractError
from pyvmm.plugins import ENTRY_POINT_GROUP, PluginRegistry
from pyvmm.policy import PluginPolicy
from pyvmm.vm import Backend

MANIFEST_MODULE = """
import dataclasses
from pyvmm.testing.contract_backend import ContractTestBackend

def manifest():
    backend = ContractTestBackend({name!r}, auto_select=True, priority={priority})
    return dataclasses.replace(backend.manifest(), plugin={plugin!r})
"""

PLUGIN_MODULE = """
from pyvmm.testing.contract_backend import ContractTestBackend

plugin = ContractTestBackend({name!r}, auto_select=True, priority={priority}).plugin()
"""

BROKEN_PLUGIN_MODULE = """
raise RuntimeError("this plugin is broken on purpose")
"""

WriteModule = Callable[[str], str]


@pytest.fixture
def write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WriteModule]:
    """``write_module(source)`` -> name of a fresh importable module with that source."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written: list[str] = []

    def write(source: str) -> str:
        name = f"pyvmm_manifest_test_{uuid.uuid4().hex[:12]}"
        (tmp_path / f"{name}.py").write_text(source)
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


def _backend(write: WriteModule, name: str, *, priority: int = 0, plugin_source: str | None = None) -> tuple[str, str]:
    """Modules of a backend ``name``: (its manifest module, its plugin module)."""
    plugin = write(plugin_source or PLUGIN_MODULE.format(name=name, priority=priority))
    manifest = write(MANIFEST_MODULE.format(name=name, priority=priority, plugin=f"{plugin}:plugin"))
    return manifest, plugin


def _ep(name: str, module: str) -> metadata.EntryPoint:
    return metadata.EntryPoint(name=name, value=f"{module}:manifest", group=ENTRY_POINT_GROUP)


def test_discovery_reads_the_manifest_and_leaves_the_plugin_unimported(write_module: WriteModule) -> None:
    manifest, plugin = _backend(write_module, "lazy")
    registry = PluginRegistry(PluginPolicy())
    registry.load_entry_points([_ep("lazy", manifest)])
    backend = registry.backends["lazy"]
    assert registry.failures == []
    assert not backend.loaded and plugin not in sys.modules
    assert backend.availability().available and plugin not in sys.modules

    assert registry.select("lazy") is backend
    assert backend.loaded and plugin in sys.modules
    with Backend(backend).create_vm() as vm:
        assert vm.backend.name == "lazy"


def test_a_plugin_that_describes_itself_otherwise_is_refused_on_first_use(write_module: WriteModule) -> None:
    other = PLUGIN_MODULE.format(name="liar", priority=7)  # the manifest says priority 0
    manifest, _ = _backend(write_module, "liar", plugin_source=other)
    registry = PluginRegistry(PluginPolicy())
    registry.load_entry_points([_ep("liar", manifest)])
    with pytest.raises(PluginContractError, match="describes itself otherwise"):
        registry.select("liar")
    assert "liar" not in registry.backends
    assert [f.backend for f in registry.failures] == ["liar"]
    with pytest.raises(BackendNotFound, match="failed to load"):
        registry.select("liar")


def test_best_available_passes_over_a_plugin_that_fails_to_import(write_module: WriteModule) -> None:
    broken, _ = _backend(write_module, "aaa", priority=50, plugin_source=BROKEN_PLUGIN_MODULE)
    good, _ = _backend(write_module, "bbb", priority=10)
    registry = PluginRegistry(PluginPolicy())
    registry.load_entry_points([_ep("aaa", broken), _ep("bbb", good)])
    assert registry.select(None).name == "bbb"
    (failure,) = registry.failures
    assert failure.backend == "aaa" and "broken on purpose" in failure.error


def test_a_manifest_entry_point_must_name_its_plugin(write_module: WriteModule) -> None:
    source = MANIFEST_MODULE.format(name="orphan", priority=0, plugin="")
    registry = PluginRegistry(PluginPolicy())
    registry.load_entry_points([_ep("orphan", write_module(source))])
    assert registry.backends == {}
    (failure,) = registry.failures
    assert "plugin: is required" in failure.error


def test_a_manifest_naming_a_denied_backend_never_imports_the_plugin(write_module: WriteModule) -> None:
    manifest, plugin = _backend(write_module, "secret")
    policy = PluginPolicy(deny=frozenset({"secret"}), deny_source="a test")
    registry = PluginRegistry(policy)
    registry.load_entry_points([_ep("zzz", manifest)])
    assert registry.backends == {}
    (denied,) = registry.denied
    assert denied.backend == "secret" and "denied by a test" in denied.reason
    assert plugin not in sys.modules


def test_an_invalid_manifest_is_a_failure_naming_the_field(write_module: WriteModule) -> None:
    source = "from pyvmm.manifest import BackendManifest\n\ndef manifest():\n    return {'name': 'x', 'version': ''}\n"
    registry = PluginRegistry(PluginPolicy())
    registry.load_entry_points([_ep("x", write_module(source))])
    (failure,) = registry.failures
    assert "invalid manifest" in failure.error and "version: must not be empty" in failure.error


# --- the installed distributions' entry points ----------------------------------------


def _dist(site: Path, folder: str, entry_points_txt: str | None, metadata_file: str, header: str) -> None:
    path = site / folder
    path.mkdir(parents=True)
    if entry_points_txt is not None:
        (path / "entry_points.txt").write_text(entry_points_txt)
    (path / metadata_file).write_text(header + "\n\nThe long description: Name: not this\n")


def test_entry_points_are_read_from_dist_info_and_egg_info(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    _dist(
        first,
        "acme_vmm-1.2.dist-info",
        "# a comment\n[console_scripts]\nacme = acme:main\n\n[pyvmm]\nacme = pyvmm_acme.manifest:manifest\n"
        "; another comment\nacme-two = pyvmm_acme.manifest:other [extra]\n",
        "METADATA",
        "Metadata-Version: 2.1\nName: acme-vmm\nVersion: 1.2",
    )
    _dist(first, "nothing-1.0.dist-info", None, "METADATA", "Name: nothing\nVersion: 1.0")
    _dist(
        second,
        "old_vmm.egg-info",
        "[pyvmm]\nold = pyvmm_old.plugin:plugin\n",
        "PKG-INFO",
        "Name: old-vmm\nVersion: 0.9",
    )
    # Shadowed by the first path entry's distribution of the same (normalised) name.
    _dist(second, "Acme.VMM-9.9.dist-info", "[pyvmm]\nshadow = x:y\n", "METADATA", "Name: Acme.VMM\nVersion: 9.9")
    found = entry_points("pyvmm", [str(first), str(tmp_path / "missing"), str(second)])
    assert found == [
        InstalledEntryPoint("acme", "pyvmm_acme.manifest:manifest", "pyvmm", "acme-vmm", "1.2", str(first)),
        InstalledEntryPoint("acme-two", "pyvmm_acme.manifest:other [extra]", "pyvmm", "acme-vmm", "1.2", str(first)),
        InstalledEntryPoint("old", "pyvmm_old.plugin:plugin", "pyvmm", "old-vmm", "0.9", str(second)),
    ]
    assert distribution_version("acme_vmm", [str(first), str(second)]) == "1.2"
    assert distribution_version("old-vmm", [str(first), str(second)]) == "0.9"
    assert distribution_version("absent", [str(first), str(second)]) is None


def test_the_reader_agrees_with_importlib_metadata_here() -> None:
    for group in (ENTRY_POINT_GROUP, "pyvmm.models", "console_scripts"):
        ours = sorted((e.name, e.value) for e in entry_points(group))
        theirs = sorted((e.name, e.value) for e in metadata.entry_points(group=group))
        assert ours == theirs, group


def test_an_installed_entry_point_loads_what_it_names() -> None:
    assert InstalledEntryPoint("x", "pyvmm.plugins:PluginRegistry", "pyvmm").load() is PluginRegistry
    assert InstalledEntryPoint("x", "pyvmm.plugins", "pyvmm").load() is sys.modules["pyvmm.plugins"]
    with pytest.raises(ImportError, match="not 'module:attribute'"):
        InstalledEntryPoint("x", "not a value!", "pyvmm").load()
    with pytest.raises(AttributeError):
        InstalledEntryPoint("x", "pyvmm.plugins:NoSuchThing", "pyvmm").load()


def test_a_zip_on_the_path_falls_back_to_importlib_metadata(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "some.zip"
    archive.write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip archive
    asked: list[str] = []

    def fake(*, group: str) -> list[metadata.EntryPoint]:
        asked.append(group)
        return [metadata.EntryPoint(name="z", value="m:o", group=group)]

    monkeypatch.setattr(metadata, "entry_points", fake)
    (point,) = entry_points("pyvmm", [str(archive)])
    assert asked == ["pyvmm"] and (point.name, point.value, point.distribution) == ("z", "m:o", "(unknown)")


RAISING_MANIFEST_MODULE = """
def manifest():
    raise OSError(5, "the manifest read a file, against the contract")
"""

HANGING_MANIFEST_MODULE = """
import threading
release = threading.Event()

def manifest():
    release.wait(30)
"""


def test_a_manifest_function_that_raises_is_named_as_such(write_module: WriteModule) -> None:
    module = write_module(RAISING_MANIFEST_MODULE)
    registry = PluginRegistry(PluginPolicy())
    registry.load_entry_points([_ep("raises", module)])
    (failure,) = registry.failures
    assert "manifest function of entry point 'raises' raised OSError" in failure.error
    assert "import failed" not in failure.error
    assert registry.backends == {}


def test_a_manifest_function_that_hangs_is_bounded_and_named_as_such(write_module: WriteModule) -> None:
    module = write_module(HANGING_MANIFEST_MODULE)
    registry = PluginRegistry(PluginPolicy(), timeout=0.3)
    try:
        registry.load_entry_points([_ep("hangs", module)])
        (failure,) = registry.failures
        assert "manifest function of entry point 'hangs' did not finish within 0.3 s" in failure.error
        assert registry.backends == {}
    finally:
        sys.modules[module].release.set()  # type: ignore[attr-defined]
