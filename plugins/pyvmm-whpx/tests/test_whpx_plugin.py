"""The plugin as pyvmm sees it: availability, honest capabilities, bad input,
and ``pyvmm run --backend whpx --model`` end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pyvmm.backend import DllSwitch
from pyvmm.capabilities import Capability
from pyvmm.errors import ConfigError, HypervisorError
from pyvmm.plugins import PluginRegistry
from pyvmm.vm import Backend
from pyvmm_whpx import system
from pyvmm_whpx.host import HOST, WindowsDlls
from pyvmm_whpx.model import WhpxModel


def make_backend() -> Backend:
    from pyvmm_whpx.plugin import plugin

    return Backend(PluginRegistry().register(plugin))


@pytest.mark.skipif(sys.platform.startswith("win"), reason="the DLLs exist on Windows")
def test_the_real_dlls_are_refused_off_windows_with_the_reason() -> None:
    with pytest.raises(HypervisorError, match=r"WinHvPlatform\.dll") as info:
        WindowsDlls()
    assert "Windows" in str(info.value)
    switch = DllSwitch("whpx", WindowsDlls)
    with pytest.raises(HypervisorError):
        switch.current()


def test_the_probe_says_why_it_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a host without the DLLs the probe answers no, naming the DLL."""
    monkeypatch.setattr(HOST, "_host", None)
    monkeypatch.setattr(HOST, "_make_seam", WindowsDlls)
    if sys.platform.startswith("win"):
        pytest.skip("this host may have WHPX")
    answer = system.probe()
    assert not answer.available
    assert "WinHvPlatform.dll" in answer.reason


def test_capabilities_on_the_model(whpx: Backend) -> None:
    assert whpx.supports(Capability.DIRTY_LOG)
    assert whpx.supports(Capability.PORT_IO)
    assert whpx.supports(Capability.IOEVENTS)
    assert not whpx.supports(Capability.PIO_IOEVENTS), "doorbells match memory writes only"
    assert not whpx.supports(Capability.IRQCHIP), "the local APIC emulation is not used"


def test_a_windows_without_dirty_tracking_narrows_the_capabilities() -> None:
    with WhpxModel(dirty_tracking=False).installed():
        backend = make_backend()
        assert backend.availability().available
        assert not backend.supports(Capability.DIRTY_LOG)


def test_a_windows_without_the_dirty_bitmap_export_narrows_the_capabilities() -> None:
    with WhpxModel(missing=frozenset({"WHvQueryGpaRangeDirtyBitmap"})).installed():
        backend = make_backend()
        assert not backend.supports(Capability.DIRTY_LOG)


def test_unknown_backend_options_are_refused(whpx: Backend, model: WhpxModel) -> None:
    with pytest.raises(ConfigError, match="backend_options"):
        whpx.create_vm({"arch": "x86_64", "backend_options": {"turbo": True}})
    assert model.partitions == {}, "nothing was created"


def test_pyvmm_run_on_the_shipped_model(tmp_path: Path) -> None:
    """The demo guest runs to power-off on the model and no rule is broken."""
    run = subprocess.run(
        [sys.executable, "-m", "pyvmm", "run", "--backend", "whpx", "--model", "--timeout", "120"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "all good: powering off" in run.stdout
    assert "running on a driver model of whpx (pyvmm_whpx.model.WhpxModel)" in run.stderr
    assert "driver model: no interface rule was broken" in run.stderr


def test_a_windows_without_doorbells_has_no_ioevents() -> None:
    missing = frozenset({"WHvRegisterPartitionDoorbellEvent", "WHvUnregisterPartitionDoorbellEvent"})
    with WhpxModel(missing=missing).installed():
        backend = make_backend()
        assert backend.availability().available
        assert not backend.supports(Capability.IOEVENTS)
        assert backend.supports(Capability.DIRTY_LOG)
