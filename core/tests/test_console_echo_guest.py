"""The bundled echo guest: echo.bin is what echo.S assembles to."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pyvmm.boot import X86Mode
from pyvmm.guests import (
    DEMO_AARCH64_LOAD_ADDRESS,
    ECHO_LOAD_ADDRESS,
    echo_aarch64_binary,
    echo_aarch64_image,
    echo_aarch64_path,
    echo_aarch64_source,
    echo_binary,
    echo_image,
    echo_path,
    echo_source,
)


def test_echo_bin_is_echo_s_assembled(tmp_path: Path) -> None:
    if shutil.which("as") is None or shutil.which("objcopy") is None:
        pytest.skip("no GNU as/objcopy on this machine")
    (tmp_path / "echo.S").write_text(echo_source())
    subprocess.run(["as", "--64", "echo.S", "-o", "echo.o"], cwd=tmp_path, check=True, capture_output=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", "echo.o", "echo.bin"], cwd=tmp_path, check=True)
    assert (tmp_path / "echo.bin").read_bytes() == echo_binary()


def test_echo_image_and_path() -> None:
    image = echo_image()
    assert image.segments == ((ECHO_LOAD_ADDRESS, echo_binary()),)
    assert (image.entry, image.mode) == (ECHO_LOAD_ADDRESS, X86Mode.LONG)
    assert Path(echo_path()).read_bytes() == echo_binary()


def test_echo_guest_says_what_it_does() -> None:
    source = echo_source()
    for word in ("poweroff", "exit N", "Ctrl-D", "irq_com1", "iretq", "hlt"):
        assert word in source
    assert b"pyvmm> " in echo_binary()


def test_aarch64_echo_bin_is_its_source_assembled(tmp_path: Path) -> None:
    assembler, objcopy = shutil.which("aarch64-linux-gnu-as"), shutil.which("aarch64-linux-gnu-objcopy")
    if assembler is None or objcopy is None:
        pytest.skip("no aarch64 binutils here (apt-get install binutils-aarch64-linux-gnu)")
    (tmp_path / "echo.S").write_text(echo_aarch64_source())
    subprocess.run([assembler, "echo.S", "-o", "echo.o"], cwd=tmp_path, check=True, capture_output=True)
    subprocess.run([objcopy, "-O", "binary", "-j", ".text", "echo.o", "echo.bin"], cwd=tmp_path, check=True)
    assert (tmp_path / "echo.bin").read_bytes() == echo_aarch64_binary()


def test_aarch64_echo_image_and_path() -> None:
    image = echo_aarch64_image()
    assert (image.code, image.address) == (echo_aarch64_binary(), DEMO_AARCH64_LOAD_ADDRESS)
    assert Path(echo_aarch64_path()).read_bytes() == echo_aarch64_binary()
