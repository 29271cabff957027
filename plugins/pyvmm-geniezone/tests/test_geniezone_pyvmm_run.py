"""``pyvmm run --backend geniezone --arch aarch64 --model``: the bundled demo
guest, on one and on two vCPUs, prints over the PL011 and powers off through
PSCI, and the run breaks no rule of the driver model."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvmm import plugins
from pyvmm.cli import main


@pytest.mark.parametrize("cpus", [1, 2])
def test_demo_guest_on_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], cpus: int
) -> None:
    monkeypatch.setattr(plugins, "_default", None)  # discover the installed entry points afresh
    serial = tmp_path / "serial.log"
    arguments = ["run", "--backend", "geniezone", "--arch", "aarch64", "--model", "--cpus", str(cpus)]
    status = main([*arguments, "--serial", str(serial), "--timeout", "60"])
    output = serial.read_text()
    said = capsys.readouterr().err
    assert status == 0, (output, said)
    assert "hello from EL1" in output
    assert "(magic 0xd00dfeed)" in output, "X0 held the device tree"
    assert "powering off through PSCI SYSTEM_OFF" in output
    assert "running on a driver model of geniezone" in said
    assert "driver model: no interface rule was broken" in said
