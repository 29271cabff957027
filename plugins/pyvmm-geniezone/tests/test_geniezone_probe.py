"""Which GenieZone interface ``/dev/gzvm`` speaks, and the availability probe:
available on the model, unavailable (with the reason) on this host and on
drivers that answer ``GZVM_CHECK_EXTENSION`` otherwise, narrowed to no
``PROTECTED`` where the protected-VM capability is missing."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from conftest import geniezone_backend

from pyvmm.backend import LibcDeviceSeam
from pyvmm.capabilities import Capability
from pyvmm_geniezone import model as gm
from pyvmm_geniezone import system
from pyvmm_geniezone.host import HOST


def test_available_on_the_model(model: gm.GenieZoneModel) -> None:
    availability = system.probe()
    assert availability.available, availability.reason
    assert availability.missing_capabilities == ()
    assert system.system().interface == system.InterfaceProbe(gpa_bits=48, protected_vm=True)
    names = [c.name for c in model.calls if c.op == "ioctl"]
    assert names == ["GZVM_CHECK_EXTENSION", "GZVM_CHECK_EXTENSION"], "the probe creates no VM"
    model.assert_no_rejections()


def test_unavailable_without_dev_gzvm() -> None:
    with HOST.use(LibcDeviceSeam()):
        availability = system.probe()
    assert not availability.available
    if os.path.exists(system.DEVICE):
        pytest.skip(f"{system.DEVICE} exists on this host")
    assert availability.reason == (
        f"{system.DEVICE} does not exist (no GenieZone hypervisor, or its driver is not loaded)"
    )


def test_pyvmm_backends_lists_geniezone_unavailable_here() -> None:
    """The installed CLI, in a process of its own (no model installed)."""
    if os.path.exists("/dev/gzvm"):
        pytest.skip("/dev/gzvm exists on this host")
    listing = subprocess.run(
        [sys.executable, "-m", "pyvmm", "backends"], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    line = next(line for line in listing.splitlines() if line.startswith("geniezone "))
    assert "[unavailable: /dev/gzvm does not exist" in line


def test_a_driver_without_check_extension_is_refused() -> None:
    bare = gm.GenieZoneModel(check_extension=False)
    with bare.installed():
        availability = system.probe()
    assert not availability.available
    assert "no GZVM_CHECK_EXTENSION (ENOTTY)" in availability.reason
    assert system.SUPPORTED_INTERFACE in availability.reason
    assert bare.open_fds() == [], "the refused device was closed"


class _AnswersByValue(gm.GenieZoneModel):
    """A driver that says yes and writes nothing back through the pointer."""

    def answer_check_extension(self, arg: int) -> int:
        return 0


class _NoProtectedVms(gm.GenieZoneModel):
    def answer_check_extension(self, arg: int) -> int:
        (cap,) = gm.U64.unpack(self.copy_from_user(arg, 8))
        if cap == gm.CAP_PROTECTED_VM:
            return -errno.EOPNOTSUPP
        return super().answer_check_extension(arg)


def test_a_driver_that_writes_no_answer_back_is_refused() -> None:
    driver = _AnswersByValue()
    with driver.installed():
        availability = system.probe()
    assert not availability.available
    assert "leaves 0xa5 in the argument" in availability.reason
    assert driver.open_fds() == []


def test_without_protected_vms_the_manifest_is_narrowed() -> None:
    driver = _NoProtectedVms()
    with driver.installed():
        backend = geniezone_backend()
        assert backend.availability().missing_capabilities == (Capability.PROTECTED,)
        assert not backend.supports(Capability.PROTECTED)
        assert backend.supports(Capability.IRQFD)


@pytest.fixture
def failing_check() -> Iterator[gm.GenieZoneModel]:
    class Failing(gm.GenieZoneModel):
        def answer_check_extension(self, arg: int) -> int:
            return -errno.EIO

    driver = Failing()
    with driver.installed():
        yield driver


def test_a_failing_probe_is_unavailable_with_the_error(failing_check: gm.GenieZoneModel) -> None:
    availability = system.probe()
    assert not availability.available
    assert "GZVM_CHECK_EXTENSION" in availability.reason and "EIO" in availability.reason


def test_pyvmm_backends_lists_geniezone_available_on_the_model(
    model: gm.GenieZoneModel, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pyvmm import plugins
    from pyvmm.cli import main

    monkeypatch.setattr(plugins, "_default", None)  # discover (and probe) afresh, on this model
    assert main(["backends"]) == 0
    listing = capsys.readouterr().out.splitlines()
    line = next(line for line in listing if line.startswith("geniezone "))
    assert line.endswith("[available]"), line
