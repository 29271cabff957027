"""``pyvmm run --backend gunyah`` end to end on the driver model: the bundled
aarch64 demo guest prints over the PL011 and powers off through PSCI, the boot
entry and device tree reach the hypervisor at VM level, and no vCPU register is
ever touched."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pyvmm import plugins
from pyvmm.cli import main
from pyvmm.machine.devicetree import DeviceTree, read_fdt
from pyvmm.machine.virt import RAM_BASE, UART_SPI
from pyvmm_gunyah.devicetree import VM_CONFIG
from pyvmm_gunyah.model import GunyahModel
from pyvmm_gunyah.vm import GunyahVm

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


def test_the_board_tree_gets_gunyahs_own_nodes(
    model: GunyahModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The board asks the backend for its nodes once its irqfds exist: the UART's
    doorbell and the board's RAM end up in ``/gunyah-vm-config``."""
    monkeypatch.setattr(plugins, "_default", None)
    trees: list[DeviceTree] = []
    add_nodes = GunyahVm.add_device_tree_nodes

    def spy(self: GunyahVm, tree: DeviceTree) -> None:
        trees.append(tree)
        add_nodes(self, tree)

    monkeypatch.setattr(GunyahVm, "add_device_tree_nodes", spy)
    serial = tmp_path / "serial.log"
    status = main(["run", "--backend", "gunyah", "--arch", "aarch64", "--serial", str(serial), "--timeout", "60"])
    assert status == 0, serial.read_text()
    (tree,) = trees
    nodes = read_fdt(tree.to_dtb())
    assert nodes[f"{VM_CONFIG}/memory"]["base-address"] == struct.pack(">Q", RAM_BASE)
    bells = [path for path in nodes if path.startswith(f"{VM_CONFIG}/vdevices/bell-")]
    assert bells == [f"{VM_CONFIG}/vdevices/bell-{UART_SPI:x}"]
    assert nodes["/pl011@9000000"]["interrupts"] == nodes[bells[0]]["interrupts"]
    assert model.rejections == []


def test_pyvmm_run_on_the_shipped_model(tmp_path: Path) -> None:
    """Issue 11: a VMM developer without the hardware runs the demo on the model,
    is told it is a model, and hears at the end whether a rule was broken."""
    import subprocess
    import sys

    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyvmm",
            "run",
            "--backend",
            "gunyah",
            "--arch",
            "aarch64",
            "--model",
            "--timeout",
            "60",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "powering off through PSCI SYSTEM_OFF" in run.stdout
    assert "running on a driver model of gunyah (pyvmm_gunyah.model.GunyahModel)" in run.stderr
    assert "driver model: no interface rule was broken" in run.stderr
