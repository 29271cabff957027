"""The machine's settings: :class:`MachineConfig`, from a TOML machine file and/or
the command line.

A machine file holds the same settings as ``pyvmm run``'s options, at top
level, plus CPUID overrides (``examples/machine.toml`` shows and explains every
key)::

    kernel = "x86/msr.flat"        # relative paths are relative to this file
    arch = "x86_64"                # or "aarch64"; default: the backend's only arch, else x86_64
    memory = "256M"
    cpus = 2
    timeout = 90
    serial = "stdio"               # "stdio", "none", "pty", "unix:PATH" or a file to write
    gdb = "tcp::1234"              # wait for gdb here before the first instruction

    [[cpuid_overrides]]            # clear x2APIC (CPUID.1:ECX bit 21)
    function = 1
    register = "ecx"
    mask = 0xffdfffff

A command-line option overrides the file's value.  Every error names the field
and where the value came from (the file, or the option).

Values are strict: ``cpus = true`` or ``timeout = "5"`` is an error, not 1 or 5.
Files are checked before anything reads them (:func:`check_input_files`): the
machine file, kernel and initrd must be regular files, the machine file at most
:data:`~pyvmm.config.MAX_MACHINE_FILE_SIZE` bytes, a kernel or initrd no larger
than the guest RAM.  A FIFO or device is refused, never opened for reading.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from pyvmm.config import (
    MAX_GUEST_PHYS,
    MAX_MACHINE_FILE_SIZE,
    MAX_PROBLEMS,
    PAGE_SIZE,
    U32_MAX,
    Arch,
    ByteSize,
    InputFileError,
    StrictBool,
    check_input_file,
    error_text,
    float_range,
    int_range,
    known_keys,
    read_input_file,
    size_text,
)
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
#: The longest --timeout: about 31 years (the run's timers take no more than
#: threading.TIMEOUT_MAX, and a longer wait is "no timeout": leave it out).
MAX_TIMEOUT = 1e9


def _no_nul(value: Any) -> Any:
    # A NUL cannot be in a file name or a C string: open() would raise ValueError.
    if isinstance(value, str) and "\0" in value:
        raise ValueError("must not contain a NUL character")
    return value


def _kernel_text(value: Any) -> Any:
    """The command line goes to the guest as UTF-8 bytes: a non-UTF-8 argument
    (which Python hands over as lone surrogates) cannot be encoded."""
    if isinstance(value, str):
        if "\0" in value:
            raise ValueError("must not contain a NUL character")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = value[exc.start].encode("utf-8", "surrogateescape")
            raise ValueError(
                f"is not valid UTF-8 (byte {bad[0]:#04x} at character {exc.start}); the command line must be UTF-8"
            ) from None
    return value


NoNul = BeforeValidator(_no_nul)


def _serial(value: Any) -> Any:
    if isinstance(value, str):
        _no_nul(value)
        for prefix, example in (("unix:", "unix:/tmp/console.sock"), ("file:", "file:console.log")):
            if value == prefix:
                raise ValueError(f"{prefix} needs a path ({example})")
    return value


def _gdb_address(value: Any) -> Any:
    if isinstance(value, str):
        from pyvmm.gdbstub.address import parse_gdb_address

        host, port = parse_gdb_address(value)
        return f"tcp:{host}:{port}"
    return value


def _needs(field: str, other: str, why: str) -> PydanticCustomError:
    """A setting that needs another: messages name both as the user gave them."""
    return PydanticCustomError("needs", "{field} needs {other} ({why})", {"field": field, "other": other, "why": why})


#: The ``irqchip`` setting (:func:`pyvmm.machine.board.interrupt_controllers`).
IrqchipMode = Literal["auto", "kernel", "userspace", "none"]
IRQCHIP_MODES: tuple[str, ...] = ("auto", "kernel", "userspace", "none")


def _irqchip_mode(value: Any) -> Any:
    # Before the modes there was a switch: true (the hypervisor's if it has them) and false.
    if value is True:
        return "auto"
    if value is False:
        return "none"
    return value


def _optional_bool(value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    raise ValueError(f"must be true or false, not {value!r}"[:80])


class CpuidOverride(BaseModel):
    """Change one register of one CPUID leaf the guest sees.

    With ``value`` only, the register becomes ``value``; with ``mask`` only, it is
    ANDed with ``mask`` (clear the bits you want gone); with both, it becomes
    ``(register & mask) | value``.  A leaf the hypervisor does not report is added.
    """

    # "register" would shadow BaseModel.register (from ABCMeta): keep it as the alias.
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    function: Annotated[int, int_range(0, U32_MAX)]
    index: Annotated[int, int_range(0, U32_MAX)] = 0
    reg: Literal["eax", "ebx", "ecx", "edx"] = Field(alias="register")
    value: Annotated[int | None, int_range(0, U32_MAX, optional=True)] = None
    mask: Annotated[int | None, int_range(0, U32_MAX, optional=True)] = None

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
    kernel: Annotated[Path | None, NoNul] = Field(
        default=None, description="guest kernel; none runs the bundled demo guest"
    )
    initrd: Annotated[Path | None, NoNul] = None
    load_address: Annotated[int | None, int_range(0, MAX_GUEST_PHYS - 1, optional=True)] = Field(
        default=None, description="load a flat binary kernel here and enter it there (x86_64: in long mode)"
    )
    append: Annotated[str, BeforeValidator(_kernel_text)] = Field(default="", description="kernel command line")
    memory: ByteSize = Field(default=DEFAULT_MEMORY, description="guest RAM in bytes, or '128M'-style")
    cpus: Annotated[int, int_range(1, MAX_CPUS)] = 1
    backend: Annotated[str | None, NoNul] = Field(
        default=None, description="backend name; default: $PYVMM_BACKEND, else the best"
    )
    timeout: Annotated[float | None, float_range(0, MAX_TIMEOUT, optional=True)] = Field(
        default=None, description="seconds before the run is stopped (status 124); covers loading the kernel too"
    )
    serial: Annotated[str, BeforeValidator(_serial)] = Field(
        default="stdio",
        min_length=1,
        description="the console (COM1, the PL011): 'stdio' (interactive when stdin is a terminal), 'none', "
        "'pty', 'unix:PATH' (a socket server), or a file ('file:PATH' or a plain path)",
    )
    gdb: Annotated[str | None, BeforeValidator(_gdb_address)] = Field(
        default=None,
        description="'tcp:HOST:PORT' (HOST defaults to localhost): a gdb stub there; the guest waits for the "
        "debugger before its first instruction",
    )
    stats: Annotated[bool, StrictBool] = False
    irqchip: Annotated[IrqchipMode, BeforeValidator(_irqchip_mode)] = Field(
        default="auto",
        description="the interrupt controllers and timer: 'kernel' the hypervisor's, 'userspace' pyvmm's 8259s "
        "and 8254 (x86_64, one vCPU), 'none', or 'auto': the hypervisor's if it has them, else pyvmm's where "
        "the backend can inject interrupts (true means auto, false none)",
    )
    testdev: Annotated[bool, StrictBool] = Field(
        default=False, description="x86_64: add QEMU's pc-testdev (kvm-unit-tests use it)"
    )
    legacy_bios: Annotated[bool | None, BeforeValidator(_optional_bool)] = Field(
        default=None,
        description="x86_64: leave the PC as a BIOS would (8259s, PIT, vector table, ACPI, S3 resume); "
        "default: for Multiboot kernels only",
    )
    cpuid_overrides: list[CpuidOverride] = Field(default_factory=list)

    @field_validator("memory")
    @classmethod
    def _check_memory(cls, memory: int) -> int:
        if memory % PAGE_SIZE:
            raise ValueError(f"{size_text(memory)} is not a whole number of {PAGE_SIZE // 1024}K pages")
        if not MIN_RAM <= memory <= MAX_MEMORY:
            raise ValueError(f"{size_text(memory)} is outside {size_text(MIN_RAM)}..{size_text(MAX_MEMORY)}")
        return memory

    @model_validator(mode="after")
    def _check(self) -> MachineConfig:
        if self.initrd is not None and self.kernel is None:
            raise _needs("initrd", "kernel", "the demo guest takes no initrd")
        if self.load_address is not None and self.kernel is None:
            raise _needs("load_address", "kernel", "it says where a flat binary kernel goes")
        if self.append and self.kernel is None:
            raise _needs("append", "kernel", "the demo guest takes no command line")
        return self


def read_machine_file(path: Path) -> dict[str, Any]:
    """The settings of a TOML machine file, with relative paths made relative to it.

    :raises ConfigError: the file is missing, not a regular file (a FIFO is not
        waited on), over :data:`~pyvmm.config.MAX_MACHINE_FILE_SIZE`, not UTF-8
        or not TOML.
    """
    try:
        raw = read_input_file(
            path, what="machine file", limit=MAX_MACHINE_FILE_SIZE, why="a machine file may have at most {limit}"
        )
    except InputFileError as exc:
        raise ConfigError(f"{path}: cannot read the machine file: it {exc.reason.removeprefix('file ')}") from None
    try:
        data: dict[str, Any] = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a valid TOML machine file: {exc}") from exc
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively.
        raise ConfigError(f"{path}: not a valid TOML machine file: nested too deeply") from None
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
    except RecursionError:
        # A machine file nested deeper than pydantic recurses (the TOML parser took it).
        where = f"{file}: " if file is not None else ""
        raise ConfigError(f"invalid machine configuration: {where}values nested too deeply") from None


def where_from(field: str, file: Path | None, given: dict[str, Any], option_names: dict[str, str]) -> str:
    """Where ``field``'s value came from, as messages name it: ``--kernel`` (an
    option), ``machine.toml: kernel`` (the file) or ``kernel`` (neither)."""
    if field in given:
        return option_names.get(field, field)
    return f"{file}: {field}" if file is not None else field


def check_input_files(
    config: MachineConfig,
    file: Path | None = None,
    given: dict[str, Any] | None = None,
    *,
    option_names: dict[str, str] | None = None,
) -> None:
    """Check the kernel and initrd files before anything reads them: each must be
    a regular file (not a FIFO, device or directory) no larger than the guest RAM.
    A file that does not exist (yet) is left to the loader, which reports it.

    :raises ConfigError: naming the option or machine-file field and the file.
    """
    for field in ("kernel", "initrd"):
        path = getattr(config, field)
        if path is None or not os.path.lexists(path):
            continue
        try:
            check_input_file(path, what=field, limit=config.memory, why="it does not fit in guest RAM ({limit})")
        except InputFileError as exc:
            raise ConfigError(f"{where_from(field, file, given or {}, option_names or {})}: {exc}") from None


def _describe(error: ValidationError, file: Path | None, given: dict[str, Any], option_names: dict[str, str]) -> str:
    problems = []
    in_file = f"{file}: " if file is not None else ""
    items = error.errors()
    for item in items[:MAX_PROBLEMS]:
        loc = [str(part) for part in item["loc"]]
        if item["type"] == "needs":
            ctx = item.get("ctx") or {}
            field, other = str(ctx.get("field")), str(ctx.get("other"))
            if field in given:
                problems.append(
                    f"{option_names.get(field, field)} needs {option_names.get(other, other)} ({ctx.get('why')})"
                )
            else:
                problems.append(f"{in_file}{field} needs {other} ({ctx.get('why')})")
            continue
        message = error_text(item, known_keys(MachineConfig, tuple(item["loc"])) if item["loc"] else None)
        if not loc:
            # Checks across fields name their fields in the message.
            problems.append(f"{in_file}{message}")
        elif loc[0] in given:
            problems.append(f"{option_names.get(loc[0], loc[0])}: {message}")
        else:
            problems.append(f"{in_file}{'.'.join(loc)}: {message}")
    if len(items) > MAX_PROBLEMS:
        problems.append(f"and {len(items) - MAX_PROBLEMS} more")
    return "invalid machine configuration: " + "; ".join(problems)
