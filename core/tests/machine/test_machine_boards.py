"""The board interface: one board per guest architecture, and only the board files
(with the PC's firmware) know concrete devices, so a new device touches its device
file and one board file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from coretests_support import MakeBackend
from machinetests_support import MACHINE_CAPS, TINY_IMAGE, machine_config

import pyvmm.machine
from pyvmm.config import Arch
from pyvmm.machine import Machine
from pyvmm.machine.board import Board
from pyvmm.machine.machine import board_class
from pyvmm.machine.pc import PcBoard
from pyvmm.machine.virt import VirtBoard

#: The modules that may place concrete devices: the boards, and the PC's firmware
#: (which adds the ACPI PM block and reads the RTC).
BOARD_FILES = {"pc.py", "virt.py", "legacy_firmware.py"}
#: What every machine module may use: the device protocol and its helpers
#: (the access protocol, and the state protocol snapshots use).
DEVICE_PROTOCOL = ("pyvmm.devices.base", "pyvmm.devices.state")


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_only_board_files_know_concrete_devices() -> None:
    root = Path(pyvmm.machine.__file__).parent
    knows = {
        path.name: sorted(
            name
            for name in imported_modules(path)
            if name.startswith("pyvmm.devices.") and not name.startswith(DEVICE_PROTOCOL)
        )
        for path in root.glob("*.py")
    }
    assert {name for name, devices in knows.items() if devices} <= BOARD_FILES
    assert knows["pc.py"] and knows["virt.py"]


@pytest.mark.parametrize(("arch", "board"), [(Arch.X86_64, PcBoard), (Arch.AARCH64, VirtBoard)])
def test_each_architecture_has_its_board(arch: Arch, board: type[Board]) -> None:
    assert board_class(arch) is board
    assert issubclass(board, Board) and board.arch is arch
    assert not getattr(board, "__abstractmethods__", None)


def test_the_machine_exposes_the_boards_parts(make_backend: MakeBackend) -> None:
    _, backend = make_backend(MACHINE_CAPS)
    with Machine(machine_config(), backend=backend, image=TINY_IMAGE) as machine:
        assert machine.image is TINY_IMAGE
        assert machine.devices.uart is machine.pio.find(0x3F8)
        assert machine.firmware is None  # not a Multiboot kernel
