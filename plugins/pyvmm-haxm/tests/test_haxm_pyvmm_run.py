"""``pyvmm run --backend haxm --model`` end to end: the bundled x86 demo guest
runs to power-off on the HAXM driver model, and a guest sleeping in ``hlt`` is
woken by timer interrupts that pyvmm's own 8259s and 8254 raise and
pyvmm-haxm injects (HAXM has no interrupt controller of its own)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
from conftest import make_backend

from pyvmm import plugins
from pyvmm.boot import X86Mode
from pyvmm.cli import main
from pyvmm.machine import GuestImage, Machine, MachineConfig, StopReason
from pyvmm.testing.conformance import programs as p
from pyvmm.testing.conformance.harness import interrupt_gate
from pyvmm.testing.guests.multiboot_pic import EXPECTED_STATUS, multiboot_pic_kernel

#: The 8259s at vectors 0x20/0x28 with only IRQ 0 open, PIT counter 0 at 100 Hz
#: (mode 2, 11932 counts), the IDT's IDTR at 0x122000; sleep in hlt until the
#: tick handler counted 5 at 0x124000, then exit 0x21 through port 0xf4.
PIT_GUEST = p.GuestProgram(
    "haxm_pit_ticks",
    p.Arch.X86_64,
    """
    mov al, 0x11
    out 0x20, al
    out 0xa0, al
    mov al, 0x20
    out 0x21, al
    mov al, 0x28
    out 0xa1, al
    mov al, 0x04
    out 0x21, al
    mov al, 0x02
    out 0xa1, al
    mov al, 0x01
    out 0x21, al
    out 0xa1, al
    mov al, 0xfe
    out 0x21, al
    mov al, 0xff
    out 0xa1, al
    mov al, 0x34
    out 0x43, al
    mov al, 0x9c
    out 0x40, al
    mov al, 0x2e
    out 0x40, al
    lidt [0x122000]
    sti
1:  hlt
    cmp dword ptr [0x124000], 5
    jb 1b
    mov eax, 0x21
    out 0xf4, eax
""",
    bytes.fromhex(
        "b011e620e6a0b020e621b028e6a1b004e621b002e6a1b001e621e6a1b0fee621b0ffe6a1b034e643b09ce640b02ee6400f011c"
        "2500201200fbf4833c25004012000572f5b821000000e7f4"
    ),
)
#: IRQ 0 at vector 0x20: count at 0x124000, non-specific EOI to the master 8259.
TICK_HANDLER = p.GuestProgram(
    "haxm_tick_handler",
    p.Arch.X86_64,
    """
    push rax
    inc dword ptr [0x124000]
    mov al, 0x20
    out 0x20, al
    pop rax
    iretq
""",
    bytes.fromhex("50ff042500401200b020e6205848cf"),
)
HANDLER, IDTR, IDT = 0x121000, 0x122000, 0x123000


@pytest.mark.parametrize("program", [PIT_GUEST, TICK_HANDLER], ids=lambda g: g.name)
def test_guest_sources(program: p.GuestProgram) -> None:
    assembled = program.assembled()
    if assembled is None:
        pytest.skip("no GNU as here")
    assert assembled == program.code


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
    idt = bytes(16 * 0x20) + interrupt_gate(HANDLER)
    image = GuestImage(
        "haxm_pit_ticks",
        ((p.CODE_ADDRESS, PIT_GUEST.code), (HANDLER, TICK_HANDLER.code), (IDT, idt),
         (IDTR, struct.pack("<HQ", len(idt) - 1, IDT))),
        p.CODE_ADDRESS,
        X86Mode.LONG,
        stack=0x90000,
    )  # fmt: skip
    config = MachineConfig.model_validate({"serial": "none", "timeout": 30, "irqchip": "userspace"})
    with Machine(config, backend=make_backend(), image=image) as machine:
        result = machine.run()
        assert (result.reason, result.code) == (StopReason.DEBUG_EXIT, 0x21), result.detail
        assert machine.userspace_irqchip
        chip = machine._board.userspace
        assert chip is not None and chip.injected >= 5
    assert model.rejections == [], [str(r.rule) for r in model.rejections]
    assert model.calls_named("HAX_INTERRUPT"), "the ticks went in through HAX_VCPU_IOCTL_INTERRUPT"
