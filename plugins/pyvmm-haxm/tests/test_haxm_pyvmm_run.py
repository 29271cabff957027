"""``pyvmm run --backend haxm --model`` end to end: the bundled x86 demo guest
runs to power-off on the HAXM driver model, and a guest sleeping in ``hlt`` is
woken by timer interrupts that pyvmm's own 8259s and 8254 raise and
pyvmm-haxm injects (HAXM has no interrupt controller of its own)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import make_backend

from pyvmm import plugins
from pyvmm.cli import main
from pyvmm.machine import Machine, MachineConfig, StopReason
from pyvmm.testing.guests import pit_ticks
from pyvmm.testing.guests.multiboot_pic import EXPECTED_STATUS, multiboot_pic_kernel


def test_demo_guest_through_pyvmm_run_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plugins, "_default", None)  # discover the installed entry points afresh
    serial = tmp_path / "serial.log"
    status = main(
        ["run", "--backend", "haxm", "--model", "--irqchip", "userspace", "--serial", str(serial), "--timeout", "60"]
    )
    output = serial.read_text()
    assert status == 0, output  # 5 would mean a rule of the HAXM interface was broken
    assert "hello from 64-bit long mode" in output
    assert "all good: powering off" in output


def test_multiboot_pic_kernel_through_pyvmm_run_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Multiboot kernel that programs the 8259s and the PIT, counts timer
    ticks and takes a COM1 interrupt boots on the model (its handlers' far
    returns reload CS from the boot GDT: the software CPU must hold the
    descriptor caches SET_REGS gave it)."""
    monkeypatch.setattr(plugins, "_default", None)
    kernel = tmp_path / "pic.bin"
    kernel.write_bytes(multiboot_pic_kernel())
    status = main(
        ["run", "--backend", "haxm", "--model", "--kernel", str(kernel), "--irqchip", "userspace",
         "--serial", "none", "--timeout", "60"]
    )  # fmt: skip
    assert status == EXPECTED_STATUS


def test_timer_interrupts_from_the_userspace_pic(model: Any) -> None:
    config = MachineConfig.from_mapping({"serial": "none", "timeout": 30, "irqchip": "userspace"})
    with Machine(config, backend=make_backend(), image=pit_ticks.pit_ticks_image()) as machine:
        result = machine.run()
        assert (result.reason, result.code) == (StopReason.DEBUG_EXIT, pit_ticks.EXIT_CODE), result.detail
        assert machine.userspace_irqchip
        chip = machine._board.userspace
        assert chip is not None and chip.injected >= pit_ticks.TICKS
