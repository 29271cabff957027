"""The bundled aarch64 demo guest: demo.bin is what demo.S assembles to, and it
runs to a PSCI power-off on the software CPU backend."""

from __future__ import annotations

import io
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from pyvmm import cli
from pyvmm.guests import DEMO_AARCH64_LOAD_ADDRESS, demo_aarch64_binary, demo_aarch64_image, demo_aarch64_source
from pyvmm.machine import Machine, MachineConfig, StopReason
from pyvmm.machine.virt import RAM_BASE
from pyvmm.plugins import PluginRegistry
from pyvmm.vm import Backend

GREETING = b"pyvmm aarch64 demo guest: hello from EL1\n"


def aarch64_tools() -> tuple[str, str] | None:
    cross = shutil.which("aarch64-linux-gnu-as"), shutil.which("aarch64-linux-gnu-objcopy")
    if cross[0] and cross[1]:
        return cross[0], cross[1]
    native = shutil.which("as"), shutil.which("objcopy")
    if platform.machine() in ("aarch64", "arm64") and native[0] and native[1]:
        return native[0], native[1]
    return None


def test_demo_bin_is_demo_s_assembled(tmp_path: Path) -> None:
    tools = aarch64_tools()
    if tools is None:
        pytest.skip("no aarch64 GNU as/objcopy (apt-get install binutils-aarch64-linux-gnu)")
    assembler, objcopy = tools
    (tmp_path / "demo.S").write_text(demo_aarch64_source())
    subprocess.run([assembler, "demo.S", "-o", "demo.o"], cwd=tmp_path, check=True, capture_output=True)
    subprocess.run([objcopy, "-O", "binary", "-j", ".text", "demo.o", "demo.bin"], cwd=tmp_path, check=True)
    assert (tmp_path / "demo.bin").read_bytes() == demo_aarch64_binary()


def test_demo_image_runs_from_the_start_of_ram() -> None:
    image = demo_aarch64_image()
    assert image.address == DEMO_AARCH64_LOAD_ADDRESS == RAM_BASE
    assert image.code == demo_aarch64_binary()


def test_demo_guest_says_what_it_does() -> None:
    binary = demo_aarch64_binary()
    assert GREETING.rstrip(b"\n") in binary
    source = demo_aarch64_source()
    assert "hvc #0" in source and "0x84000008" in source  # PSCI SYSTEM_OFF
    assert binary[:4] == bytes.fromhex("f30300aa")  # mov x19, x0: keeps the device tree address


@pytest.fixture
def unicorn(registry: PluginRegistry) -> Backend:
    hooks = pytest.importorskip("pyvmm_unicorn.plugin", reason="the unicorn example backend is not installed")
    backend = Backend(registry.register(hooks.plugin))
    if not backend.availability().available:
        pytest.skip(f"unicorn cannot run here: {backend.availability().reason}")
    return backend


def test_demo_guest_powers_off_on_the_software_cpu(unicorn: Backend) -> None:
    out = io.BytesIO()
    config = MachineConfig(arch="aarch64", serial="none", timeout=120)
    with Machine(config, backend=unicorn, serial_output=out) as machine:
        result = machine.run()
        fdt = machine.vm._boot.fdt_address if machine.vm._boot is not None else None
    text = out.getvalue()
    assert (result.reason, result.status) == (StopReason.POWEROFF, 0), (result, text)
    assert text.startswith(GREETING)
    assert f"device tree at {fdt:#018x} (magic 0xd00dfeed)".encode() in text
    assert b"MMIO round trips ok" in text
    assert text.endswith(b"powering off through PSCI SYSTEM_OFF\n")


def test_pyvmm_run_arch_aarch64_runs_the_demo(unicorn: Backend, tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    status = cli.main(["run", "--backend", "unicorn", "--arch", "aarch64", "--serial", str(log), "--timeout", "120"])
    assert status == 0
    assert log.read_bytes().startswith(GREETING)
