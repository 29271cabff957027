"""The bundled demo guest: demo.bin is what demo.S assembles to."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pyvmm.boot import X86Mode
from pyvmm.guests import DEMO_LOAD_ADDRESS, demo_binary, demo_image, demo_source


def test_demo_bin_is_demo_s_assembled(tmp_path: Path) -> None:
    if shutil.which("as") is None or shutil.which("objcopy") is None:
        pytest.skip("no GNU as/objcopy on this machine")
    (tmp_path / "demo.S").write_text(demo_source())
    subprocess.run(["as", "--64", "demo.S", "-o", "demo.o"], cwd=tmp_path, check=True, capture_output=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", "demo.o", "demo.bin"], cwd=tmp_path, check=True)
    assert (tmp_path / "demo.bin").read_bytes() == demo_binary()


def test_demo_image_is_entered_in_long_mode_at_its_load_address() -> None:
    image = demo_image()
    assert image.segments == ((DEMO_LOAD_ADDRESS, demo_binary()),)
    assert (image.entry, image.mode) == (DEMO_LOAD_ADDRESS, X86Mode.LONG)
    assert image.stack is not None and image.stack < DEMO_LOAD_ADDRESS


def test_demo_guest_says_what_it_does() -> None:
    binary = demo_binary()
    assert b"pyvmm demo guest: hello" in binary
    assert b"Shutdown" in binary
    assert "rep outsb" in demo_source()
