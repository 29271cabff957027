"""``pyvmm run --backend gunyah`` end to end on the driver model: the bundled
aarch64 demo guest prints over the PL011 and powers off through PSCI, the boot
entry and device tree reach the hypervisor at VM level, and no vCPU register is
ever touched."""

from __future__ import annotations

from pathlib import Path

import pytest
from gunyah_model import GunyahModel

from pyvmm import plugins
from pyvmm.cli import main

GUNYAH_IOCTLS_FOR_BOOT = ["GH_VM_SET_DTB_CONFIG", "GH_VM_SET_BOOT_CONTEXT", "GH_VM_START"]


@pytest.mark.parametrize("cpus", [1, 2])
def test_demo_guest_through_pyvmm_run(
    model: GunyahModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpus: int
) -> None:
    monkeypatch.setattr(plugins, "_default", None)  # discover the installed entry points afresh
    serial = tmp_path / "serial.log"
    status = main(
        [
            "run",
            "--backend",
            "gunyah",
            "--arch",
            "aarch64",
            "--cpus",
            str(cpus),
            "--serial",
            str(serial),
            "--timeout",
            "60",
        ]
    )
    output = serial.read_text()
    assert status == 0, output
    assert "hello from EL1" in output
    assert "(magic 0xd00dfeed)" in output, "X0 held the device tree address the hypervisor was given"
    assert "powering off through PSCI SYSTEM_OFF" in output
    assert model.rejections == [], [r.rule for r in model.rejections]
    # The availability probe works on a scratch VM first: look at the machine's VM,
    # the last one created.
    last_create = max(i for i, c in enumerate(model.calls) if c.name == "GH_CREATE_VM")
    machine_calls = model.calls[last_create:]
    vm_ioctls = [c.name for c in machine_calls if c.op == "ioctl" and c.target == "gunyah-vm"]
    boot = [name for name in vm_ioctls if name in GUNYAH_IOCTLS_FOR_BOOT]
    assert boot == GUNYAH_IOCTLS_FOR_BOOT, "DTB config, then boot context, then start, once each"
    assert not [c for c in model.calls if "REG" in c.name and c.name != "GH_VM_SET_USER_MEM_REGION"], (
        "Gunyah has no register access: nothing may have tried"
    )
