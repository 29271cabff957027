"""Fuzz the machine-file parser and the option values (hypothesis; see
fuzz_support for the CI budget and ``PYVMM_FUZZ=long``).

Random TOML documents over the machine file's keys (and unknown ones), with
values of every TOML type and boundary numbers, and byte-level mutations of a
valid file: :func:`build_config` either returns a config whose every value is in
its documented range, or raises :class:`ConfigError` -- never another exception.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import fuzz_support  # noqa: F401 - selects the hypothesis profile
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.config import PAGE_SIZE, U32_MAX
from pyvmm.errors import ConfigError
from pyvmm.machine.config import IRQCHIP_MODES, MAX_CPUS, MAX_MEMORY, MAX_TIMEOUT, MachineConfig, build_config
from pyvmm.machine.layout import MIN_RAM

KEYS = [
    "arch", "kernel", "initrd", "load_address", "append", "memory", "cpus", "backend", "timeout", "serial",
    "stats", "irqchip", "testdev", "legacy_bios", "cpuid_overrides", "memroy",
]  # fmt: skip
CPUID_KEYS = ["function", "index", "register", "value", "mask", "colour"]
NUMBERS = [0, 1, -1, 2, 254, 255, 4096, 0xFFFF_FFFF, 1 << 32, 1 << 40, (1 << 63) - 1, -(1 << 63)]
STRINGS = [
    "", "x86_64", "aarch64", "stdio", "none", "userspace", "128M", "1G", "4097", "1.5G", "a\0b", "k.bin", "é", "\\",
]  # fmt: skip

scalars = (
    st.sampled_from(NUMBERS)
    | st.integers(-(1 << 63), (1 << 63) - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
    | st.sampled_from(STRINGS)
    | st.text(max_size=40)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(CPUID_KEYS), inner, max_size=4),
    max_leaves=12,
)


def toml_value(value: Any) -> str:
    """``value`` in TOML (the values the strategies make, nothing more)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes are TOML basic-string escapes, except that TOML
        # spells the 8-hex-digit form differently; ensure_ascii keeps it to \\uXXXX.
        return json.dumps(value, ensure_ascii=True)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return "{" + ", ".join(f"{key} = {toml_value(item)}" for key, item in value.items()) + "}"


@st.composite
def machine_files(draw: st.DrawFn) -> str:
    lines = [f"{key} = {toml_value(draw(values))}" for key in draw(st.lists(st.sampled_from(KEYS), unique=True))]
    for _ in range(draw(st.integers(0, 3))):
        lines.append("[[cpuid_overrides]]")
        for key in draw(st.lists(st.sampled_from(CPUID_KEYS), unique=True, max_size=5)):
            lines.append(f"{key} = {toml_value(draw(values))}")
    return "\n".join(lines) + "\n"


VALID = (
    b'kernel = "k.bin"\nmemory = "256M"\ncpus = 2\ntimeout = 9.5\nserial = "out.log"\nstats = true\n'
    b'[[cpuid_overrides]]\nfunction = 1\nregister = "ecx"\nmask = 0xffdfffff\n'
)


@st.composite
def mutated_files(draw: st.DrawFn) -> bytes:
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 6))):
        where = draw(st.integers(0, len(data)))
        data[where : where + draw(st.integers(0, 4))] = draw(st.binary(max_size=6))
    return bytes(data)


def check_config(config: MachineConfig) -> None:
    """Every value of an accepted config is in its documented range and of its type."""
    assert type(config.cpus) is int and 1 <= config.cpus <= MAX_CPUS
    assert type(config.memory) is int and MIN_RAM <= config.memory <= MAX_MEMORY and config.memory % PAGE_SIZE == 0
    assert config.timeout is None or (type(config.timeout) is float and 0 < config.timeout <= MAX_TIMEOUT)
    assert config.load_address is None or (type(config.load_address) is int and config.load_address >= 0)
    for flag in (config.stats, config.testdev):
        assert type(flag) is bool
    assert config.irqchip in IRQCHIP_MODES
    assert config.legacy_bios is None or type(config.legacy_bios) is bool
    config.append.encode("utf-8")  # encodable: the loaders will not meet a UnicodeEncodeError
    for text in (config.append, config.serial, str(config.kernel or ""), str(config.initrd or "")):
        assert "\0" not in text
    for override in config.cpuid_overrides:
        for number in (override.function, override.index, override.value, override.mask):
            assert number is None or (type(number) is int and 0 <= number <= U32_MAX)


@pytest.fixture(scope="module")
def machine_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-machine-file") / "machine.toml"


@given(text=machine_files())
def test_fuzz_random_machine_files(machine_file: Path, text: str) -> None:
    machine_file.write_text(text, encoding="utf-8")
    try:
        config = build_config(machine_file)
    except ConfigError as exc:
        assert "\n" not in str(exc), "an error is one line"
        return
    check_config(config)


@given(data=mutated_files())
def test_fuzz_mutated_machine_files(machine_file: Path, data: bytes) -> None:
    machine_file.write_bytes(data)
    try:
        config = build_config(machine_file)
    except ConfigError:
        return
    check_config(config)


@given(
    overrides=st.fixed_dictionaries(
        {},
        optional={
            "memory": st.sampled_from(STRINGS) | st.text(max_size=24),
            "cpus": st.sampled_from(NUMBERS) | st.integers(),
            "timeout": st.floats(allow_nan=True, allow_infinity=True),
            "append": st.text(max_size=16) | st.sampled_from(["bad\udcffbyte", "a\0b"]),
            "load_address": st.integers(-(1 << 70), 1 << 70),
            "serial": st.sampled_from(STRINGS),
            "kernel": st.sampled_from(STRINGS[1:]),
        },
    )
)
def test_fuzz_option_values(overrides: dict[str, Any]) -> None:
    """What the command line hands build_config (argparse has parsed the types)."""
    try:
        config = build_config(None, overrides, option_names={key: f"--{key}" for key in overrides})
    except ConfigError:
        return
    check_config(config)


def test_the_generators_reach_valid_configs_and_errors(machine_file: Path) -> None:
    """The valid seed is accepted and its values survive the TOML writer."""
    machine_file.write_bytes(VALID)
    assert build_config(machine_file).cpus == 2
    machine_file.write_text(f"cpus = {toml_value(True)}\ntimeout = {toml_value(math.inf)}\n")
    with pytest.raises(ConfigError, match=r"cpus: must be an integer from 1 to 254, not True.*timeout: inf"):
        build_config(machine_file)
