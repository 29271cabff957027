"""MachineConfig from a TOML machine file and/or the command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvmm.errors import ConfigError
from pyvmm.machine.config import DEFAULT_MEMORY, MachineConfig, build_config, read_machine_file

OPTIONS = {"memory": "--memory", "cpus": "--cpus", "kernel": "--kernel"}


def test_defaults_run_the_demo_on_one_vcpu() -> None:
    config = MachineConfig()
    assert (config.kernel, config.cpus, config.memory, config.serial) == (None, 1, DEFAULT_MEMORY, "stdio")
    assert config.timeout is None


def test_sizes_accept_suffixes() -> None:
    assert MachineConfig.from_mapping({"memory": "1G"}).memory == 1 << 30
    assert MachineConfig.from_mapping({"memory": "64M"}).memory == 64 << 20


def test_file_values_with_cli_overrides(tmp_path: Path) -> None:
    file = tmp_path / "m.toml"
    file.write_text(
        'kernel = "k/test.flat"\nmemory = "256M"\ncpus = 2\ntimeout = 9.5\nserial = "out/serial.log"\n'
        '[[cpuid_overrides]]\nfunction = 1\nregister = "ecx"\nmask = 0xffdfffff\n'
    )
    config = build_config(file, {"cpus": 4, "memory": None}, option_names=OPTIONS)
    assert config.cpus == 4  # the option wins
    assert config.memory == 256 << 20  # None means "not given"
    assert config.kernel == tmp_path / "k" / "test.flat"  # relative to the file
    assert config.serial == str(tmp_path / "out" / "serial.log")
    assert config.timeout == 9.5
    assert config.cpuid_overrides[0].mask == 0xFFDF_FFFF
    assert config.cpuid_overrides[0].reg == "ecx"


def test_a_bad_file_value_names_the_file_and_the_field(tmp_path: Path) -> None:
    file = tmp_path / "m.toml"
    file.write_text('memory = "lots"\ncpus = 0\n')
    with pytest.raises(ConfigError) as info:
        build_config(file, {}, option_names=OPTIONS)
    text = str(info.value)
    assert f"{file}: memory: not a size: 'lots'" in text
    assert f"{file}: cpus:" in text


def test_a_bad_option_names_the_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--memory: 5000 bytes is not a whole number of 4K pages"):
        build_config(None, {"memory": "5000"}, option_names=OPTIONS)


def test_nested_errors_name_the_path(tmp_path: Path) -> None:
    file = tmp_path / "m.toml"
    file.write_text('[[cpuid_overrides]]\nfunction = 1\nregister = "esp"\nvalue = 1\n')
    with pytest.raises(ConfigError, match=r"m\.toml: cpuid_overrides\.0\.register"):
        build_config(file)


def test_unknown_keys_are_refused(tmp_path: Path) -> None:
    file = tmp_path / "m.toml"
    file.write_text("memroy = 5\n")
    with pytest.raises(ConfigError, match=r"m\.toml: memroy: unknown setting \(did you mean memory\?\)"):
        build_config(file)


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    file = tmp_path / "m.toml"
    file.write_text("memory = \n")
    with pytest.raises(ConfigError, match=r"m\.toml: not a valid TOML machine file"):
        read_machine_file(file)
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read the machine file"):
        read_machine_file(tmp_path / "nope.toml")


def test_initrd_and_append_need_a_kernel() -> None:
    with pytest.raises(ConfigError, match="initrd needs kernel"):
        build_config(None, {"initrd": "x.img"})
    with pytest.raises(ConfigError, match="append needs kernel"):
        build_config(None, {"append": "console=ttyS0"})


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="timeout"):
        build_config(None, {"timeout": 0})
