"""The machine's settings: :class:`MachineConfig`, from a TOML machine file and/or
the command line.

A machine file holds the same settings as ``pyvmm run``'s options, at top
level, plus CPUID overrides::

    kernel = "x86/msr.flat"        # relative paths are relative to this file
    arch = "x86_64"                # or "aarch64"; default: the backend's only arch, else x86_64
    memory = "256M"
    cpus = 2
    timeout = 90
    serial = "stdio"               # "stdio", "none" or a file to write

    [[cpuid_overrides]]            # clear x2APIC (CPUID.1:ECX bit 21)
    function = 1
    register = "ecx"
    mask = 0xffdfffff

A command-line option overrides the file's value.  Every error names the field
and where the value came from (the file, or the option).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pyvmm.config import PAGE_SIZE, Arch, ByteSize
from pyvmm.errors import ConfigError
from pyvmm.machine.layout import MIN_RAM

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

DEFAULT_MEMORY = 128 << 20
#: xAPIC ids are 8 bits and 0xff is the broadcast id.
MAX_CPUS = 254
MAX_MEMORY = 1 << 40


class CpuidOverride(BaseModel):
    """Change one register of one CPUID leaf the guest sees.

    With ``value`` only, the register becomes ``value``; with ``mask`` only, it is
    ANDed with ``mask`` (clear the bits you want gone); with both, it becomes
    ``(register & mask) | value``.  A leaf the hypervisor does not report is added.
    """

    # "register" would shadow BaseModel.register (from ABCMeta): keep it as the alias.
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    function: int = Field(ge=0, le=0xFFFF_FFFF)
    index: int = Field(default=0, ge=0, le=0xFFFF_FFFF)
    reg: Literal["eax", "ebx", "ecx", "edx"] = Field(alias="register")
    value: int | None = Field(default=None, ge=0, le=0xFFFF_FFFF)
    mask: int | None = Field(default=None, ge=0, le=0xFFFF_FFFF)

    @model_validator(mode="after")
    def _value_or_mask(self) -> CpuidOverride:
        if self.value is None and self.mask is None:
            raise ValueError("give value, mask, or both")
        return self

    def apply(self, register: int) -> int:
        if self.mask is None:
            return self.value or 0
        return (register & self.mask) | (self.value or 0)


class MachineConfig(BaseModel):
    """Everything ``pyvmm run`` needs to build and run a machine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: Arch | None = Field(
        default=None, description="guest architecture; default: the backend's only one if it has one, else x86_64"
    )
    kernel: Path | None = Field(default=None, description="guest kernel; none runs the bundled demo guest")
    initrd: Path | None = None
    load_address: int | None = Field(
        default=None, ge=0, description="load a flat binary kernel here and enter it there (x86_64: in long mode)"
    )
    append: str = Field(default="", description="kernel command line")
    memory: ByteSize = Field(default=DEFAULT_MEMORY, description="guest RAM in bytes, or '128M'-style")
    cpus: int = Field(default=1, ge=1, le=MAX_CPUS)
    backend: str | None = Field(default=None, description="backend name; default: $PYVMM_BACKEND, else the best")
    timeout: float | None = Field(default=None, gt=0, description="seconds before the run is stopped (status 124)")
    serial: str = Field(default="stdio", min_length=1, description="'stdio', 'none', or a file for COM1's output")
    stats: bool = False
    irqchip: bool = Field(default=True, description="use the hypervisor's interrupt controllers and PIT if it has them")
    testdev: bool = Field(default=False, description="x86_64: add QEMU's pc-testdev (kvm-unit-tests use it)")
    legacy_bios: bool | None = Field(
        default=None,
        description="x86_64: leave the PC as a BIOS would (8259s, PIT, vector table, ACPI, S3 resume); "
        "default: for Multiboot kernels only",
    )
    cpuid_overrides: list[CpuidOverride] = Field(default_factory=list)

    @field_validator("memory")
    @classmethod
    def _check_memory(cls, memory: int) -> int:
        if memory % PAGE_SIZE:
            raise ValueError(f"{memory} bytes is not a multiple of {PAGE_SIZE}")
        if not MIN_RAM <= memory <= MAX_MEMORY:
            raise ValueError(f"{memory:#x} bytes is outside {MIN_RAM:#x}..{MAX_MEMORY:#x}")
        return memory

    @model_validator(mode="after")
    def _check(self) -> MachineConfig:
        if self.initrd is not None and self.kernel is None:
            raise ValueError("initrd: needs a kernel (the demo guest takes no initrd)")
        if self.load_address is not None and self.kernel is None:
            raise ValueError("load_address: needs a kernel")
        if self.append and self.kernel is None:
            raise ValueError("append: needs a kernel (the demo guest takes no command line)")
        return self


def read_machine_file(path: Path) -> dict[str, Any]:
    """The settings of a TOML machine file, with relative paths made relative to it."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the machine file: {exc.strerror or exc}") from exc
    try:
        data: dict[str, Any] = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a valid TOML machine file: {exc}") from exc
    for key in ("kernel", "initrd"):
        value = data.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            data[key] = str(path.parent / value)
    serial = data.get("serial")
    if isinstance(serial, str) and serial not in ("stdio", "none") and not Path(serial).is_absolute():
        data["serial"] = str(path.parent / serial)
    return data


def build_config(
    file: Path | None = None, overrides: dict[str, Any] | None = None, *, option_names: dict[str, str] | None = None
) -> MachineConfig:
    """Validate the machine file's settings with ``overrides`` (None values are
    "not given") on top.

    :raises ConfigError: naming each bad field and where its value came from:
        the file, or the option (``option_names`` maps fields to option spellings).
    """
    settings: dict[str, Any] = read_machine_file(file) if file is not None else {}
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    settings.update(given)
    try:
        return MachineConfig.model_validate(settings)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, file, given, option_names or {})) from exc


def _describe(error: ValidationError, file: Path | None, given: dict[str, Any], option_names: dict[str, str]) -> str:
    problems = []
    in_file = f"{file}: " if file is not None else ""
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        message = item["msg"].removeprefix("Value error, ")
        if not loc:
            # Checks across fields name their fields in the message.
            problems.append(f"{in_file}{message}")
        elif loc[0] in given:
            problems.append(f"{option_names.get(loc[0], loc[0])}: {message}")
        else:
            problems.append(f"{in_file}{'.'.join(loc)}: {message}")
    return "invalid machine configuration: " + "; ".join(problems)
