"""The ``kvm`` entry point's manifest module: stdlib-only, agreeing with the
bindings and with the probe that goes through the host seam, and ``pyvmm run``
on KVM importing no other backend's code (start-up, issue 19)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pyvmm.backend.stand_in import standing_in
from pyvmm.capabilities import Capability
from pyvmm_kvm import bindings, manifest, system
from pyvmm_kvm.host_arch import host_is_arm64

pytestmark = pytest.mark.skipif(host_is_arm64(), reason="the x86 manifest's probe: this host is aarch64")


def test_the_probes_numbers_are_the_bindings() -> None:
    for name in dir(manifest):
        if name.startswith(("KVM_CAP_", "KVM_GET_API_VERSION", "KVM_CHECK_EXTENSION", "KVM_API_VERSION")):
            assert getattr(manifest, name) == getattr(bindings, name), name


def test_every_extension_dependent_capability_is_declared() -> None:
    assert set(manifest.CAPABILITY_EXTENSIONS) <= set(manifest.CAPABILITIES)
    for lacking in manifest.DEVIATING_MODULES.values():
        assert set(lacking) <= set(manifest.CAPABILITIES)


def test_the_stdlib_probe_answers_as_the_probe_through_the_seam() -> None:
    light = manifest.probe()
    full = system.probe()
    if not full.available:
        pytest.skip(f"KVM is not usable here: {full.reason}")
    assert light == full


def test_with_a_stand_in_the_probe_goes_through_the_seam(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[bool] = []

    def through_the_seam() -> manifest.Availability:
        asked.append(True)
        return manifest.Availability.yes(missing_capabilities=(Capability.PVCLOCK,))

    monkeypatch.setattr(system, "probe", through_the_seam)
    with standing_in(manifest.BACKEND):
        answer = manifest.probe()
    assert asked == [True]
    assert answer.missing_capabilities == (Capability.PVCLOCK,)


def test_a_missing_device_is_unavailable_without_the_bindings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest, "DEVICE", "/nonexistent/kvm")
    answer = manifest.probe()
    assert not answer.available
    assert "/nonexistent/kvm does not exist" in answer.reason


CHECK = """
import json, sys
from pyvmm.cli import main
status = main(["run", "-q", "--backend", "kvm", "--serial", "none"])
print(json.dumps([status, sorted(sys.modules)]), file=sys.stderr)
"""


def test_a_demo_run_on_kvm_imports_no_other_backend_and_no_pydantic(kvm: object) -> None:
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120, check=False)
    status, modules = json.loads(done.stderr.strip().splitlines()[-1])
    assert status == 0, done.stderr
    others = [m for m in modules if m.startswith("pyvmm_") and not m.startswith("pyvmm_kvm")]
    assert all(m.split(".", 1)[1:] in ([], ["manifest"]) for m in others), others
    assert [m for m in modules if m.split(".")[0] in ("pydantic", "pydantic_core", "pycparser")] == []
    assert "importlib.metadata" not in modules
    assert "pyvmm.machine.loaders.arm64" not in modules  # an x86 demo needs no kernel loader
    # pathlib (with urllib and ipaddress, ~5 ms) is for runs given a file.
    assert [m for m in modules if m in ("pathlib", "urllib.parse", "ipaddress")] == []
    # No snapshot option, the in-kernel irqchip, no vCPU state read beyond the
    # registers, no --stats: none of their modules (nor hashlib, which only
    # snapshots need).
    unused = (
        "pyvmm.snapshot",
        "pyvmm.reset_point",
        "pyvmm.machine.snapshots",
        "hashlib",
        "pyvmm.machine.userspace_irqchip",
        "pyvmm.devices.i8259",
        "pyvmm.devices.i8254",
        "pyvmm.devices.testdev",
        "pyvmm.arch.x86_64_extra_state",
        "pyvmm.machine.stats",
        "pyvmm.machine.legacy_firmware",  # the demo boots without the firmware
        "pyvmm.devices.acpi_pm",
        "ctypes",  # Windows only (pyvmm.host.win32, the Windows RAM allocator)
        "logging",  # no record goes out (-q): pyvmm.lazy_logging never loads it
    )
    assert [m for m in unused if m in modules] == []
