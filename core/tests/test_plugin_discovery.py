"""Entry-point discovery: a broken plugin is reported and skipped, the rest work.

The unit tests feed fabricated entry points to ``PluginRegistry.load_entry_points``;
the last test builds and installs two real distributions into a fresh venv and
runs ``python -m pyvmm backends --json`` there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import site
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

import pytest

import pyvmm.entry_points
from pyvmm import plugins
from pyvmm.errors import BackendNotFound
from pyvmm.plugins import ENTRY_POINT_GROUP, PluginRegistry, default_registry, reset_default_registry

GOOD_MODULE = """
from pyvmm.testing.contract_backend import ContractTestBackend

backend = ContractTestBackend({name!r})
plugin = backend.plugin()
"""

BAD_MANIFEST_MODULE = """
from pyvmm.hookspecs import hookimpl
from pyvmm.testing.contract_backend import ContractTestBackend

plugin = ContractTestBackend("bad-manifest").plugin()

@hookimpl
def pyvmm_backend_info():
    return {{"name": "Not A Valid Name", "version": "1", "contract_version": 1,
            "host_os": ["linux"], "guest_arches": ["x86_64"]}}

plugin.pyvmm_backend_info = pyvmm_backend_info
"""

BROKEN_MODULE = """
raise RuntimeError("this plugin is broken on purpose")
"""

WriteModule = Callable[[str], str]


@pytest.fixture
def write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WriteModule]:
    """``write_module(source)`` -> name of a fresh importable module with that source."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written: list[str] = []

    def write(source: str) -> str:
        name = f"pyvmm_discovery_test_{uuid.uuid4().hex[:12]}"
        (tmp_path / f"{name}.py").write_text(source)
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


def _ep(name: str, value: str) -> metadata.EntryPoint:
    return metadata.EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)


def test_broken_plugins_are_recorded_and_skipped(write_module: WriteModule) -> None:
    good = write_module(GOOD_MODULE.format(name="good"))
    twin = write_module(GOOD_MODULE.format(name="good"))
    bad_manifest = write_module(BAD_MANIFEST_MODULE.format())
    broken = write_module(BROKEN_MODULE)
    registry = PluginRegistry()
    registry.load_entry_points(
        [
            _ep("d-duplicate", f"{twin}:plugin"),
            _ep("c-broken-import", broken),
            # Named after its backend, so it owns "good" although "d-duplicate"
            # sorts (and loads) before it.
            _ep("good", f"{good}:plugin"),
            _ep("b-bad-manifest", f"{bad_manifest}:plugin"),
            _ep("e-missing-module", "pyvmm_no_such_module_anywhere:plugin"),
            _ep("f-missing-attribute", f"{good}:no_such_attribute"),
        ]
    )
    assert list(registry.backends) == ["good"]
    assert registry.backends["good"].source.entry_point == "good"
    assert registry.backends["good"].availability().available
    failures = {f.source.entry_point: f.error for f in registry.failures}
    assert sorted(failures) == [
        "b-bad-manifest",
        "c-broken-import",
        "d-duplicate",
        "e-missing-module",
        "f-missing-attribute",
    ]
    assert "invalid manifest" in failures["b-bad-manifest"]
    assert "name" in failures["b-bad-manifest"]
    assert failures["c-broken-import"] == "import failed: RuntimeError: this plugin is broken on purpose"
    assert "'good' is provided twice" in failures["d-duplicate"]
    assert "'good'" in failures["d-duplicate"]
    assert "'d-duplicate'" in failures["d-duplicate"]
    assert failures["e-missing-module"].startswith("import failed: ModuleNotFoundError")
    assert failures["f-missing-attribute"].startswith("import failed: AttributeError")
    # The survivor is fully usable.
    from pyvmm.vm import Backend

    with Backend(registry.get("good")).create_vm() as vm:
        vm.add_memory(0, 0x1000)


def test_not_found_mentions_a_broken_plugin_of_that_name(write_module: WriteModule) -> None:
    registry = PluginRegistry()
    registry.load_entry_points([_ep("kvm", write_module(BROKEN_MODULE))])
    with pytest.raises(BackendNotFound) as info:
        registry.select("kvm")
    assert "installed: none" in str(info.value)
    assert "failed to load" in str(info.value)
    assert "pyvmm backends" in str(info.value)


def test_installed_entry_points_are_loaded_once(write_module: WriteModule, monkeypatch: pytest.MonkeyPatch) -> None:
    good = write_module(GOOD_MODULE.format(name="installed"))
    lookups: list[str] = []

    def fake_entry_points(group: str) -> list[metadata.EntryPoint]:
        lookups.append(group)
        return [_ep("installed", f"{good}:plugin")]

    monkeypatch.setattr(pyvmm.entry_points, "entry_points", fake_entry_points)  # what pyvmm.plugins calls
    monkeypatch.setattr(plugins, "_default", None)
    registry = default_registry()
    assert default_registry() is registry
    registry.load_entry_points()
    assert lookups == [ENTRY_POINT_GROUP]
    assert list(registry.backends) == ["installed"]
    assert registry.failures == []
    reset_default_registry()
    assert default_registry() is not registry
    assert lookups == [ENTRY_POINT_GROUP, ENTRY_POINT_GROUP]


# --- real distributions in a fresh venv -------------------------------------------

PYPROJECT = """\
# Built by the tiny in-tree backend below, so the test needs neither network nor
# the wheel package (setuptools < 70 cannot build a wheel without it).
[build-system]
requires = []
build-backend = "tinybuild"
backend-path = ["."]

[project]
name = "{dist}"
version = "0.0.1"

[project.entry-points.pyvmm]
{entry_point} = "{value}"
"""

# A PEP 517 backend that builds the one-module wheel by hand.
TINYBUILD = """\
import base64
import hashlib
import os
import zipfile

DIST, MODULE, ENTRY_POINT, VALUE, VERSION = {dist!r}, {module!r}, {entry_point!r}, {value!r}, "0.0.1"


def _hash(data):
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    stem = DIST.replace("-", "_") + "-" + VERSION
    info = stem + ".dist-info/"
    files = {{
        MODULE + ".py": open(os.path.join(os.path.dirname(os.path.abspath(__file__)), MODULE + ".py"), "rb").read(),
        info + "METADATA": ("Metadata-Version: 2.1\\nName: " + DIST + "\\nVersion: " + VERSION + "\\n").encode(),
        info + "WHEEL": b"Wheel-Version: 1.0\\nGenerator: tinybuild\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n",
        info + "entry_points.txt": ("[pyvmm]\\n" + ENTRY_POINT + " = " + VALUE + "\\n").encode(),
    }}
    record = "".join(f"{{name}},{{_hash(data)}},{{len(data)}}\\n" for name, data in files.items())
    files[info + "RECORD"] = (record + info + "RECORD,,\\n").encode()
    wheel = stem + "-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, wheel), "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return wheel
"""

# A backend written the way a third party would: a module with hook functions.
GOOD_BACKEND = '''\
"""A minimal module-style pyvmm backend, installed by pyvmm-core's tests."""

from pyvmm.exits import HltExit
from pyvmm.hookspecs import hookimpl
from pyvmm.manifest import CONTRACT_VERSION, Availability, BackendManifest


@hookimpl
def pyvmm_backend_info():
    return BackendManifest(
        name="tiny-test",
        version="0.0.1",
        contract_version=CONTRACT_VERSION,
        host_os=("linux", "darwin", "win32"),
        guest_arches=("x86_64",),
        capabilities=("multi_vcpu", "a_capability_from_the_future"),
        auto_select=False,
        probe=Availability.yes,
    )


@hookimpl
def pyvmm_create_vm(backend, config):
    return {"config": config}


@hookimpl
def pyvmm_destroy_vm(vm):
    pass


@hookimpl
def pyvmm_map_memory(vm, region):
    pass


@hookimpl
def pyvmm_create_vcpu(vm, index):
    return index


@hookimpl
def pyvmm_destroy_vcpu(vcpu):
    pass


@hookimpl
def pyvmm_init_vcpu(vcpu, boot):
    pass


@hookimpl
def pyvmm_run_vcpu(vcpu):
    return HltExit()
'''


def _make_dist(root: Path, dist: str, module: str, source: str, entry_point: str, value: str) -> Path:
    project = root / dist
    project.mkdir()
    (project / "pyproject.toml").write_text(PYPROJECT.format(dist=dist, entry_point=entry_point, value=value))
    (project / f"{module}.py").write_text(source)
    fields = {"dist": dist, "module": module, "entry_point": entry_point, "value": value}
    (project / "tinybuild.py").write_text(TINYBUILD.format(**fields))
    return project


def _make_venv(path: Path) -> Path:
    """A fresh venv that sees pyvmm-core (and pip/setuptools) from this environment."""
    with_pip = importlib.util.find_spec("pip") is None
    cmd = [sys.executable, "-m", "venv", "--system-site-packages", str(path)]
    if not with_pip:
        cmd.insert(4, "--without-pip")  # pip is borrowed from this environment below
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    python = path / "bin" / "python"
    if sys.prefix != sys.base_prefix:
        # We run inside a venv, so --system-site-packages reaches the base
        # interpreter, not this environment.  Chain this environment's
        # site-packages (processing their .pth files, e.g. an editable core).
        purelib = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        lines = [f"import site; site.addsitedir({d!r})" for d in site.getsitepackages()]
        (Path(purelib) / "zz_pyvmm_parent_env.pth").write_text("\n".join(lines) + "\n")
    return python


def test_real_distributions_broken_one_isolated(tmp_path: Path) -> None:
    dists = tmp_path / "dists"
    dists.mkdir()
    good = _make_dist(
        dists, "pyvmm-tiny-testbackend", "pyvmm_tiny_testbackend", GOOD_BACKEND, "tiny-test", "pyvmm_tiny_testbackend"
    )
    broken = _make_dist(
        dists,
        "pyvmm-broken-testbackend",
        "pyvmm_broken_testbackend",
        textwrap.dedent(BROKEN_MODULE),
        "broken-test",
        "pyvmm_broken_testbackend",
    )
    python = _make_venv(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "PYVMM_"))}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1", PIP_NO_INPUT="1")
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", str(good), str(broken)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr

    result = subprocess.run(
        [str(python), "-m", "pyvmm", "backends", "--json"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    backends = {b["name"]: b for b in report["backends"]}
    assert "tiny-test" in backends, report
    tiny = backends["tiny-test"]
    assert tiny["available"] is True
    assert tiny["distribution"] == "pyvmm-tiny-testbackend"
    assert tiny["distribution_version"] == "0.0.1"
    assert tiny["capabilities"] == ["multi_vcpu"]
    assert tiny["unknown_capabilities"] == ["a_capability_from_the_future"]
    assert str(tmp_path / "venv") in tiny["location"]
    failures = {f["entry_point"]: f for f in report["failures"]}
    assert "broken-test" in failures, report
    assert failures["broken-test"]["distribution"] == "pyvmm-broken-testbackend"
    assert failures["broken-test"]["error"] == "import failed: RuntimeError: this plugin is broken on purpose"

    # The human-readable listing shows the same, and the good backend really works there.
    text = subprocess.run(
        [str(python), "-m", "pyvmm", "backends"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert text.returncode == 0, text.stderr
    assert "tiny-test 0.0.1  [available]" in text.stdout
    assert "BROKEN broken-test from pyvmm-broken-testbackend 0.0.1: import failed: RuntimeError" in text.stdout
    use = subprocess.run(
        [
            str(python),
            "-c",
            "import pyvmm; vm = pyvmm.get_backend('tiny-test').create_vm(); vcpu = vm.create_vcpu(); "
            "print(vcpu.run().kind.name); vm.close()",
        ],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert use.returncode == 0, use.stderr
    assert use.stdout.strip() == "HLT"
