"""``pyvmm run`` on the contract backend: options, machine files, errors, exit
statuses.  (The demo guest itself runs on KVM: plugins/pyvmm-kvm/tests.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from coretests_support import MakeBackend
from machinetests_support import MACHINE_CAPS, io_exit

from pyvmm import cli


def test_help_lists_the_options_and_exit_statuses(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    out = capsys.readouterr().out
    for option in ("--kernel", "--initrd", "--append", "--memory", "--cpus", "--backend", "--timeout", "--serial"):
        assert option in out
    assert "--stats" in out and "--config" in out
    assert "(code << 1) | 1" in out and "124" in out


def test_run_on_a_backend_by_name_returns_the_guest_status(
    make_backend: MakeBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    test_backend, _ = make_backend(MACHINE_CAPS, name="scripted")
    test_backend.script_exits(io_exit(0xF4, 4, write=True, value=1))
    assert cli.main(["run", "-q", "--backend", "scripted", "--serial", "none"]) == 3
    assert capsys.readouterr().err == ""  # a debug-exit is reported by the status alone (-q: no backend line)


def test_other_stops_are_reported_on_stderr(make_backend: MakeBackend, capsys: pytest.CaptureFixture[str]) -> None:
    make_backend(MACHINE_CAPS, name="halts")  # runs nothing: its vCPU halts at once
    assert cli.main(["run", "--backend", "halts", "--serial", "none"]) == 0
    assert "pyvmm: halted: every vCPU halted" in capsys.readouterr().err


def test_stats_go_to_stderr(make_backend: MakeBackend, capsys: pytest.CaptureFixture[str]) -> None:
    test_backend, _ = make_backend(MACHINE_CAPS, name="scripted")
    test_backend.script_exits(io_exit(0x3FD), io_exit(0xF4, 1, write=True, value=0))
    assert cli.main(["run", "--backend", "scripted", "--serial", "none", "--stats"]) == 1
    err = capsys.readouterr().err
    assert "pyvmm: stats: backend scripted, 2 exits" in err
    assert "vCPU 0: 2 exits" in err and "io 2" in err


def test_config_file_with_option_override(
    make_backend: MakeBackend, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    test_backend, _ = make_backend(MACHINE_CAPS, name="scripted")
    test_backend.script_exits(io_exit(0x510, 2, write=True, value=3), *[io_exit(0x511) for _ in range(8)])
    file = tmp_path / "machine.toml"
    file.write_text('backend = "scripted"\nmemory = "64M"\nserial = "serial.log"\n')
    assert cli.main(["run", "--config", str(file), "--memory", "96M"]) == 0
    assert (tmp_path / "serial.log").exists()  # relative to the machine file
    ram_size = [call for call in test_backend.calls_of("pyvmm_map_memory")]
    assert ram_size[0][3] == 96 << 20


def test_bad_settings_exit_2_naming_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--memory", "12Q"]) == 2
    assert "pyvmm: error: invalid machine configuration: --memory: not a size: '12Q'" in capsys.readouterr().err
    file = tmp_path / "bad.toml"
    file.write_text("cpus = -1\n")
    assert cli.main(["run", "--config", str(file)]) == 2
    assert f"{file}: cpus:" in capsys.readouterr().err


def test_an_unknown_backend_exits_2(make_backend: MakeBackend, capsys: pytest.CaptureFixture[str]) -> None:
    make_backend(MACHINE_CAPS, name="scripted")
    assert cli.main(["run", "--backend", "nonesuch"]) == 2
    assert "pyvmm: error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("files", "extra", "expected"),
    [
        ({}, [], "missing.bin"),
        ({"junk.bin": b"\x01" * 64}, [], "not a Multiboot, bzImage or ELF kernel"),
        ({"big.bin": b"\xf4" * 0x10000}, ["--load-address", "0x7fff000"], "big.bin"),
        ({"k.bin": b"\xf4"}, ["--load-address", "0x100000", "--initrd", "nope.img"], "k.bin"),
    ],
    ids=["missing", "not-a-kernel", "does-not-fit", "flat-with-initrd"],
)
def test_bad_images_are_refused_before_any_vcpu_runs(
    make_backend: MakeBackend,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    files: dict[str, bytes],
    extra: list[str],
    expected: str,
) -> None:
    test_backend, _ = make_backend(MACHINE_CAPS, name="scripted")
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    kernel = tmp_path / (next(iter(files)) if files else "missing.bin")
    extra = [str(tmp_path / a) if a.endswith(".img") else a for a in extra]
    status = cli.main(["run", "-q", "--backend", "scripted", "--memory", "128M", "--kernel", str(kernel), *extra])
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("pyvmm: error: ")
    assert expected in err
    assert test_backend.calls_of("pyvmm_create_vcpu") == []
    assert test_backend.vms[0].destroyed


def test_a_flat_kernel_runs_from_its_load_address(make_backend: MakeBackend, tmp_path: Path) -> None:
    test_backend, _ = make_backend(MACHINE_CAPS, name="scripted")
    test_backend.script_exits(io_exit(0xF4, 1, write=True, value=4))
    kernel = tmp_path / "k.bin"
    kernel.write_bytes(b"\x90\xf4")
    argv = ["run", "--backend", "scripted", "--serial", "none", "--kernel", str(kernel), "--load-address", "0x200000"]
    assert cli.main(argv) == 9
    init = test_backend.calls_of("pyvmm_init_vcpu")[0][2]
    assert init.regs.rip == 0x200000
