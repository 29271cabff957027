"""Messages in the user's words: options named as typed, sizes in K/M/G/T,
pydantic's errors rewritten, "did you mean" for unknown keys, and the example
machine file (every key, documented, loadable)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from coretests_support import MakeBackend

from pyvmm import cli
from pyvmm.capabilities import Capability
from pyvmm.config import Arch, VmConfig, size_text
from pyvmm.errors import ConfigError
from pyvmm.machine.config import MACHINE_CONFIG_FIELDS, MachineConfig, build_config
from pyvmm.records import RecordError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "machine.toml"
CAPS = (Capability.PORT_IO, Capability.IMMEDIATE_EXIT, Capability.VCPU_REGISTERS, Capability.MULTI_VCPU)


def error_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(["run", "-q", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--smp", "0"], "--smp: 0 is out of range"),
        (["--cpus", "0"], "--cpus: 0 is out of range"),
        (["-m", "3"], "-m: 3 bytes is not a whole number of 4K pages"),
        (["--memory", "5T"], "--memory: 5T is outside 2M..1T"),
        (["--memory", "12Q"], "--memory: not a size: '12Q'"),
        (["--append", "quiet"], "--append needs --kernel (the demo guest takes no command line)"),
        (["--load-address", "0x1000"], "--load-address needs --kernel"),
    ],
)
def test_options_are_named_as_typed(argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert expected in error_of(argv, capsys)


def test_errors_from_the_machine_name_the_option_as_typed(
    make_backend: MakeBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    make_backend(CAPS, name="noirq", arches=(Arch.X86_64,))
    line = error_of(["--backend", "noirq", "--smp", "2", "--serial", "none"], capsys)
    assert line.startswith("pyvmm: error: --smp: 2 vCPUs need the hypervisor's interrupt controllers")
    make_backend(CAPS, name="x86only", arches=(Arch.X86_64,))
    line = error_of(["--backend", "x86only", "--arch", "aarch64"], capsys)
    assert line == "pyvmm: error: --arch: backend 'x86only' runs x86_64 guests, not aarch64"


def test_machine_file_errors_name_the_file_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "m.toml"
    file.write_text('legacy-bios = true\nmemroy = "1G"\nserial = 5\narch = "arm"\n')
    line = error_of(["--config", str(file)], capsys)
    assert f"{file}: legacy-bios: unknown setting (did you mean legacy_bios?)" in line
    assert f"{file}: memroy: unknown setting (did you mean memory?)" in line
    assert f"{file}: serial: must be a string, not 5" in line
    assert f"{file}: arch: must be x86_64 or aarch64, not 'arm'" in line
    assert "Input should" not in line and "Extra inputs" not in line


def test_nested_unknown_keys_get_a_suggestion_too(tmp_path: Path) -> None:
    file = tmp_path / "m.toml"
    file.write_text('[[cpuid_overrides]]\nfunction = 1\nregistr = "ecx"\nmask = 1\n')
    with pytest.raises(ConfigError) as info:
        build_config(file)
    assert "cpuid_overrides.0.registr: unknown setting (did you mean register?)" in str(info.value)


def test_api_records_get_the_same_words() -> None:
    with pytest.raises(RecordError) as info:
        VmConfig.from_mapping({"arch": "x86", "vcpu": 2})
    text = str(info.value)
    assert "arch: must be x86_64 or aarch64, not 'x86'" in text
    assert "vcpu: unknown setting (did you mean vcpus?)" in text


@pytest.mark.parametrize(
    ("count", "text"),
    [(128 << 20, "128M"), (1 << 40, "1T"), (5 << 40, "5T"), (4096, "4K"), (3 << 30, "3G"), (1000, "1000 bytes")],
)
def test_sizes_read_as_written(count: int, text: str) -> None:
    assert size_text(count) == text


def test_the_loaders_load_address_is_the_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x90" * 64)
    line = error_of(["--backend", "nosuch", "--kernel", str(junk)], capsys)
    assert "nosuch" in line  # the backend is looked up before the image is read
    from pyvmm.cli_run import _named
    from pyvmm.machine.loaders import ImageError

    config = MachineConfig(kernel=junk)
    error = ImageError(junk, "not a Multiboot, bzImage or ELF kernel (give load_address to load it as a flat binary)")
    named = _named(error, config, None, {"kernel": junk}, {"kernel": "--kernel", "load_address": "--load-address"})
    assert str(named) == (
        f"--kernel: {junk}: not a Multiboot, bzImage or ELF kernel (give --load-address to load it as a flat binary)"
    )


# --- the example machine file -------------------------------------------------------------


def _keys(text: str) -> tuple[set[str], set[str]]:
    active = set(tomllib.loads(text))
    top = text.split("\n[[", 1)[0]  # the top-level keys, not a table's
    commented = set(re.findall(r"^# ([a-z_]+) = ", top, re.MULTILINE))
    return active, commented


def test_the_example_machine_file_covers_every_key() -> None:
    text = EXAMPLE.read_text()
    active, commented = _keys(text)
    missing = set(MACHINE_CONFIG_FIELDS) - active - commented
    assert not missing, f"examples/machine.toml does not show {sorted(missing)}"
    assert not (active | commented) - set(MACHINE_CONFIG_FIELDS)
    for key in MACHINE_CONFIG_FIELDS:  # each key is explained in a comment before it
        setting = rf"(?:#? ?{key} = |\[\[{key}\]\])"
        assert re.search(rf"^#[^\n]*\n(?:#[^\n]*\n)*{setting}", text, re.MULTILINE), key


def test_the_example_machine_file_loads_as_it_is_and_with_every_key_set(tmp_path: Path) -> None:
    config = build_config(EXAMPLE)
    assert config.kernel is not None and config.kernel.resolve().is_file()  # the echo guest, shipped with pyvmm
    assert config.cpuid_overrides[0].mask == 0xFFDFFFFF
    every = tmp_path / "every.toml"
    every.write_text(re.sub(r"^# ([a-z_]+ = )", r"\1", EXAMPLE.read_text(), flags=re.MULTILINE))
    config = build_config(every)
    assert config.gdb == "tcp:localhost:1234"
    assert config.backend == "kvm" and config.timeout == 60 and config.legacy_bios is True
