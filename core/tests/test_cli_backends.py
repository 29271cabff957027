"""The ``pyvmm`` command: --version, help, ``backends`` and ``backends --json``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from coretests_support import ProbeBackend, RecordingBackend, register

import pyvmm
from pyvmm import cli, plugins
from pyvmm.capabilities import Capability
from pyvmm.errors import BackendNotFound
from pyvmm.manifest import Availability
from pyvmm.plugins import PluginFailure, PluginRegistry, PluginSource


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"pyvmm {pyvmm.__version__}"


def test_version_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pyvmm", "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0
    assert result.stdout.strip() == f"pyvmm {pyvmm.__version__}"


def test_no_command_prints_help_and_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: pyvmm")
    assert "backends" in out


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_backends_with_none_installed(registry: PluginRegistry, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["backends"]) == 0
    assert capsys.readouterr().out.startswith("no backends installed")


def test_backends_json_with_none_installed(registry: PluginRegistry, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["backends", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "pyvmm_version": pyvmm.__version__,
        "backends": [],
        "failures": [],
    }


@pytest.fixture
def populated(registry: PluginRegistry) -> PluginRegistry:
    register(
        registry,
        ProbeBackend(
            "listed",
            [Capability.PVCLOCK, "from_the_future", Capability.MULTI_VCPU, Capability.IRQCHIP],
            priority=3,
            probe=lambda: Availability.yes(missing_capabilities=(Capability.IRQCHIP,)),
        ),
        PluginSource(entry_point="listed", distribution="pyvmm-listed", version="1.2", location="/opt/site"),
    )
    register(registry, RecordingBackend("switched-off", available=False))
    registry.failures.append(
        PluginFailure(PluginSource(entry_point="broken", distribution="pyvmm-broken", version="0.1"), "import failed")
    )
    return registry


def test_backends_json_lists_backends_and_failures(
    populated: PluginRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["backends", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    listed, off = report["backends"]
    assert listed == {
        "name": "listed",
        "version": "0",
        "distribution": "pyvmm-listed",
        "distribution_version": "1.2",
        "location": "/opt/site",
        "contract_version": pyvmm.CONTRACT_VERSION,
        "available": True,
        "reason": "",
        "host_os": ["linux", "darwin", "win32"],
        "guest_arches": ["x86_64", "aarch64"],
        "capabilities": ["multi_vcpu", "pvclock"],
        "missing_on_host": ["irqchip"],
        "unknown_capabilities": ["from_the_future"],
        "priority": 3,
        "auto_select": False,
    }
    assert off["name"] == "switched-off"
    assert off["available"] is False
    assert off["reason"] == "switched off by the test"
    assert report["failures"] == [
        {"entry_point": "broken", "distribution": "pyvmm-broken", "version": "0.1", "error": "import failed"}
    ]


def test_backends_text(populated: PluginRegistry, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "listed 0  [available]" in out
    assert "from:         pyvmm-listed 1.2  /opt/site" in out
    assert "capabilities: multi_vcpu, pvclock" in out
    assert "declared but missing on this host: irqchip" in out
    assert "unknown to this pyvmm (ignored): from_the_future" in out
    assert "switched-off 0  [unavailable: switched off by the test]" in out
    assert "BROKEN broken from pyvmm-broken 0.1: import failed" in out
    assert "no backends installed" not in out


def test_pyvmm_errors_become_exit_code_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def no_registry() -> PluginRegistry:
        raise BackendNotFound("registry exploded")

    monkeypatch.setattr(plugins, "default_registry", no_registry)
    assert cli.main(["backends"]) == 2
    assert capsys.readouterr().err.strip() == "pyvmm: error: registry exploded"
