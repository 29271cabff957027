"""How a guest ends a run through a port: isa-debug-exit, Bochs power-off, i8042
reset, PCI reset control."""

from __future__ import annotations

import pytest

from pyvmm.devices import i8042
from pyvmm.devices.base import ALL_ONES
from pyvmm.devices.debug_exit import DebugExit, debug_exit_status
from pyvmm.devices.i8042 import I8042
from pyvmm.devices.poweroff import BochsPoweroff


@pytest.mark.parametrize(
    ("code", "size", "status"),
    [(0, 4, 1), (1, 4, 3), (0x21, 1, 0x43), (38, 2, 77), (63, 4, 127), (0x80, 1, 1), (0x1FF, 1, 0xFF)],
)
def test_debug_exit_status_is_qemus(code: int, size: int, status: int) -> None:
    assert debug_exit_status(code, size) == status


def test_debug_exit_reports_code_and_status_per_write() -> None:
    seen: list[tuple[int, int]] = []
    dev = DebugExit(lambda code, status: seen.append((code, status)))
    dev.write(0, 4, 0x1_0000_0001)  # a 4-byte write only carries 32 bits
    dev.write(0, 1, 0x102)
    assert seen == [(1, 3), (2, 5)]
    assert dev.read(0, 4) == ALL_ONES


def test_poweroff_needs_the_whole_word() -> None:
    calls: list[None] = []
    dev = BochsPoweroff(lambda: calls.append(None))
    for byte in b"Shutdow":
        dev.write(0, 1, byte)
    assert calls == []
    for byte in b"xSShutdown":  # a broken sequence restarts; "SS" still matches
        dev.write(0, 1, byte)
    assert len(calls) == 1


def test_poweroff_accepts_wide_writes() -> None:
    calls: list[None] = []
    dev = BochsPoweroff(lambda: calls.append(None))
    dev.write(0, 4, int.from_bytes(b"Shut", "little"))
    dev.write(0, 4, int.from_bytes(b"down", "little"))
    assert len(calls) == 1


def test_i8042_pulse_reset() -> None:
    resets: list[None] = []
    ctl = I8042(lambda: resets.append(None))
    cmd = ctl.command_port()
    assert cmd.read(0, 1) & i8042.STATUS_OUTPUT_FULL == 0
    cmd.write(0, 1, i8042.CMD_PULSE_RESET)
    assert len(resets) == 1


def test_i8042_reset_through_the_output_port() -> None:
    resets: list[None] = []
    ctl = I8042(lambda: resets.append(None))
    cmd, data = ctl.command_port(), ctl.data_port()
    cmd.write(0, 1, i8042.CMD_WRITE_OUTPUT_PORT)
    data.write(0, 1, 0x03)  # reset line high: nothing happens
    assert resets == []
    cmd.write(0, 1, i8042.CMD_WRITE_OUTPUT_PORT)
    data.write(0, 1, 0x02)
    assert len(resets) == 1


def test_i8042_command_byte_and_self_test() -> None:
    ctl = I8042(lambda: None)
    cmd, data = ctl.command_port(), ctl.data_port()
    cmd.write(0, 1, i8042.CMD_WRITE_COMMAND_BYTE)
    data.write(0, 1, 0x45)
    cmd.write(0, 1, i8042.CMD_READ_COMMAND_BYTE)
    assert cmd.read(0, 1) & i8042.STATUS_OUTPUT_FULL
    assert data.read(0, 1) == 0x45
    assert cmd.read(0, 1) & i8042.STATUS_OUTPUT_FULL == 0
    cmd.write(0, 1, i8042.CMD_SELF_TEST)
    assert data.read(0, 1) == i8042.SELF_TEST_OK
    assert data.read(0, 1) == 0  # empty output buffer
