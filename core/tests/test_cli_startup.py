"""What ``pyvmm`` commands import: only what the command needs (start-up time,
issue 19).  Checked in fresh interpreters, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import pyvmm.cli

CHECK = """
import json, sys
from pyvmm.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print(json.dumps(sorted(m for m in sys.modules if m in {modules!r})), file=sys.stderr)
"""

WATCHED = ["pyvmm.cli_run", "pyvmm.machine.machine", "pyvmm.machine.config", "pycparser"]


def _imported(argv: list[str]) -> list[str]:
    code = CHECK.format(argv=argv, modules=WATCHED)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    return list(json.loads(done.stderr.strip().splitlines()[-1]))


def test_pyvmm_backends_imports_neither_the_run_command_nor_the_machine() -> None:
    _imported(["backends", "--json"])  # the first run may fill the cffi cache (and parse)
    assert _imported(["backends", "--json"]) == []


def test_help_lists_run_without_importing_it() -> None:
    assert _imported(["--help"]) == []
    help_text = pyvmm.cli.build_parser(with_run=False).format_help()
    assert "run" in help_text and pyvmm.cli.RUN_HELP in " ".join(help_text.split())


def test_the_run_command_gets_its_real_parser() -> None:
    assert "pyvmm.cli_run" in _imported(["run", "--help"])
    full = pyvmm.cli.build_parser().format_help()
    stand_in = pyvmm.cli.build_parser(with_run=False).format_help()
    assert full == stand_in, "the stand-in lists run exactly as the real parser does"


# --- what `pyvmm backends` imports: manifests, never a plugin's code ----------------------

IMPORTED = """
import json, sys
from pyvmm.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
"""

#: Never imported to list the backends: the validation library, the plugin
#: manager, the C declarations' parser and runtime, the slow entry-point reader,
#: the software CPU.
HEAVY = ("pydantic", "pydantic_core", "pluggy", "cffi", "pycparser", "importlib.metadata", "pyvmm.softcpu", "unicorn")
#: What a plugin may have imported for ``pyvmm backends``: its package, its
#: manifest module, and KVM's host-architecture test.
MANIFEST_ONLY = {"manifest", "host_arch"}


def _all_imported(argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    code = IMPORTED.format(argv=argv)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False, env=env
    )
    return list(json.loads(done.stderr.strip().splitlines()[-1]))


def test_pyvmm_backends_imports_no_plugin_code_and_no_heavy_library() -> None:
    modules = _all_imported(["backends", "--json"])
    heavy = [m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)]
    assert heavy == []
    assert "logging" not in modules, "no record goes out: pyvmm.lazy_logging never loads logging"
    assert "ctypes" not in modules, "guest RAM's address comes from cffi's runtime; ctypes is for Windows"
    plugin_modules = [m for m in modules if m.startswith("pyvmm_") and "." in m]
    if not entry_points(group="pyvmm"):
        pytest.skip("no backend plugin is installed here (core alone): its manifest half runs in the backends' envs")
    assert plugin_modules, "the installed plugins' manifests are read"
    assert [m for m in plugin_modules if m.split(".", 1)[1] not in MANIFEST_ONLY] == []


def test_a_config_file_is_validated_with_pydantic_only_when_it_exists(tmp_path: Path) -> None:
    env = {**os.environ, "PYVMM_CONFIG": str(tmp_path / "absent.toml")}
    assert "pydantic" not in _all_imported(["backends"], env)
    (tmp_path / "present.toml").write_text('[plugins]\ndeny = ["haxm"]\n')
    env["PYVMM_CONFIG"] = str(tmp_path / "present.toml")
    assert "pydantic" in _all_imported(["backends"], env)


# --- what building the demo machine imports: only the parts it uses ----------------------

MACHINE_IMPORTS = """
import json, sys
sys.path[:0] = {paths!r}
from coretests_support import RecordingBackend, register
from machinetests_support import IRQCHIP_CAPS, machine_config
from pyvmm.capabilities import Capability
from pyvmm.machine.machine import Machine
from pyvmm.plugins import PluginRegistry

registry = PluginRegistry()
registry._entry_points_loaded = True  # only the contract backend
# As KVM: in-kernel interrupt controllers, and interrupts injectable from userspace.
caps = (*IRQCHIP_CAPS, Capability.INTERRUPT_INJECTION)
backend = register(registry, RecordingBackend("contract-test", caps))
machine = Machine(machine_config(**{settings!r}), backend=backend, **{options!r})
machine.close()
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
"""

#: Loaded only by a machine that saves or restores a snapshot.
SNAPSHOT_MODULES = ("pyvmm.snapshot", "pyvmm.reset_point", "pyvmm.machine.snapshots", "hashlib", "_hashlib")
#: Loaded only by a machine with the board's own interrupt controllers.
USERSPACE_IRQCHIP_MODULES = ("pyvmm.machine.userspace_irqchip", "pyvmm.devices.i8259", "pyvmm.devices.i8254")
#: Loaded only by a machine that boots through the legacy firmware.
LEGACY_FIRMWARE_MODULES = ("pyvmm.machine.legacy_firmware", "pyvmm.devices.acpi_pm")


def _machine_imports(settings: dict[str, object], options: dict[str, object] | None = None) -> set[str]:
    """The modules loaded in a fresh interpreter that builds and closes a machine
    (the demo guest, as ``pyvmm run`` with no image) on a contract backend with
    in-kernel interrupt controllers that can also inject interrupts, as KVM."""
    tests = Path(__file__).parent
    code = MACHINE_IMPORTS.format(paths=[str(tests), str(tests / "machine")], settings=settings, options=options or {})
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stderr.strip().splitlines()[-1]))


def test_the_demo_machine_imports_no_snapshot_machinery_and_no_userspace_irqchip() -> None:
    modules = _machine_imports({"irqchip": "auto"})
    assert "pyvmm.machine.snapshot_port" in modules, "the snapshot request port is still there"
    assert [m for m in SNAPSHOT_MODULES if m in modules] == []
    assert [m for m in USERSPACE_IRQCHIP_MODULES if m in modules] == []
    assert "pyvmm.devices.testdev" not in modules
    assert [m for m in LEGACY_FIRMWARE_MODULES if m in modules] == [], "the demo boots without the firmware"
    assert "logging" not in modules, "no record goes out: pyvmm.lazy_logging never loads logging"
    assert "ctypes" not in modules, "guest RAM's address comes from cffi's runtime; ctypes is for Windows"


def test_the_userspace_irqchip_and_the_snapshot_machinery_load_when_asked_for(tmp_path: Path) -> None:
    assert set(USERSPACE_IRQCHIP_MODULES) <= _machine_imports({"irqchip": "userspace"})
    assert "pyvmm.devices.testdev" in _machine_imports({"testdev": True})
    assert set(LEGACY_FIRMWARE_MODULES) <= _machine_imports({"legacy_bios": True})
    saving = _machine_imports({}, {"snapshot_to": str(tmp_path / "saved.snap")})
    assert {"pyvmm.snapshot", "pyvmm.machine.snapshots"} <= saving


# --- logging: loaded by the first record that goes out, not before ----------------------

LOGS = """
import sys
from pyvmm import cli_log
from pyvmm.lazy_logging import LazyLogger

cli_log.configure(verbose={verbose})
cli_log.notice("backend x (--backend), x86_64 guest")
LazyLogger("pyvmm.machine").debug("a debug record")
print("loaded" if "logging" in sys.modules else "not loaded", file=sys.stderr)
LazyLogger("pyvmm.machine").warning("unhandled port %#x", 0x80)
print("loaded" if "logging" in sys.modules else "not loaded", file=sys.stderr)
"""


def _log_lines(verbose: int) -> list[str]:
    code = LOGS.format(verbose=verbose)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stderr.splitlines()


def test_the_notice_and_dropped_records_load_no_logging_and_a_shown_record_does() -> None:
    assert _log_lines(0) == [
        "pyvmm: backend x (--backend), x86_64 guest",
        "not loaded",
        "pyvmm: warning: unhandled port 0x80",
        "loaded",
    ]


def test_a_debug_record_shown_by_the_level_goes_out_through_logging() -> None:
    assert _log_lines(2) == [
        "pyvmm: backend x (--backend), x86_64 guest",
        "pyvmm: debug: a debug record",
        "loaded",
        "pyvmm: warning: unhandled port 0x80",
        "loaded",
    ]
