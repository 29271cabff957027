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
The checks are written by hand (:mod:`pyvmm.records`), not with pydantic:
``pyvmm run`` builds a :class:`MachineConfig` on every start, and importing
pydantic would cost more than the rest of the command.
Files are checked before anything reads them (:func:`check_input_files`): the
machine file, kernel and initrd must be regular files, the machine file at most
:data:`~pyvmm.config.MAX_MACHINE_FILE_SIZE` bytes, a kernel or initrd no larger
than the guest RAM.  A FIFO or device is refused, never opened for reading.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import TYPE_CHECKING, Any, Literal

from pyvmm.config import (
    MAX_GUEST_PHYS,
    MAX_MACHINE_FILE_SIZE,
    PAGE_SIZE,
    U32_MAX,
    Arch,
    InputFileError,
    check_input_file,
    parse_size,
    read_input_file,
    size_text,
)
from pyvmm.errors import ConfigError
from pyvmm.lean_dataclass import lean_dataclass
from pyvmm.machine.layout import MIN_RAM
from pyvmm.records import MAX_PROBLEMS, MISSING, Checker, RecordError, from_mapping, required, show

if TYPE_CHECKING:
    from pathlib import Path

DEFAULT_MEMORY = 128 << 20
#: xAPIC ids are 8 bits and 0xff is the broadcast id.
MAX_CPUS = 254
MAX_MEMORY = 1 << 40
#: The longest --timeout: about 31 years (the run's timers take no more than
#: threading.TIMEOUT_MAX, and a longer wait is "no timeout": leave it out).
MAX_TIMEOUT = 1e9


def _no_nul(check: Checker, field: str, value: Any) -> None:
    # A NUL cannot be in a file name or a C string: open() would raise ValueError.
    if isinstance(value, str) and "\0" in value:
        check.fail(field, "must not contain a NUL character")


def _path(check: Checker, field: str, value: Any) -> Path | None:
    """A file name (a string or a Path) as a Path; None stays None."""
    if value is None:
        return None
    from pathlib import Path  # not at import: ~5 ms of a run given no file

    if isinstance(value, Path):
        return value
    if not isinstance(value, str):
        check.fail(field, f"must be a file name (a string){_given(value)}")
        return None
    _no_nul(check, field, value)
    return Path(value)


def _optional_text(check: Checker, field: str, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        check.fail(field, f"must be a string{_given(value)}")
    else:
        _no_nul(check, field, value)


def _kernel_text(check: Checker, value: Any) -> None:
    """The command line goes to the guest as UTF-8 bytes: a non-UTF-8 argument
    (which Python hands over as lone surrogates) cannot be encoded."""
    if not isinstance(value, str):
        check.fail("append", f"must be a string{_given(value)}")
        return
    if "\0" in value:
        check.fail("append", "must not contain a NUL character")
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = value[exc.start].encode("utf-8", "surrogateescape")
        check.fail(
            "append",
            f"is not valid UTF-8 (byte {bad[0]:#04x} at character {exc.start}); the command line must be UTF-8",
        )


def _serial(check: Checker, value: Any) -> None:
    if not isinstance(value, str):
        check.fail("serial", f"must be a string{_given(value)}")
        return
    if "\0" in value:
        check.fail("serial", "must not contain a NUL character")
        return
    for prefix, example in (("unix:", "unix:/tmp/console.sock"), ("file:", "file:console.log")):
        if value == prefix:
            check.fail("serial", f"{prefix} needs a path ({example})")
            return
    if not value:
        check.fail("serial", "must not be empty")


def _gdb_address(check: Checker, value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, str):
        check.fail("gdb", f"must be a string{_given(value)}")
        return value
    from pyvmm.gdbstub.address import parse_gdb_address

    try:
        host, port = parse_gdb_address(value)
    except ValueError as exc:
        check.fail("gdb", str(exc))
        return value
    return f"tcp:{host}:{port}"


def _given(value: Any) -> str:
    return f", not {show(value)}" if isinstance(value, (bool, int, float, str, bytes)) else ""


#: The ``irqchip`` setting (:func:`pyvmm.machine.board.interrupt_controllers`).
IrqchipMode = Literal["auto", "kernel", "userspace", "none"]
IRQCHIP_MODES: tuple[str, ...] = ("auto", "kernel", "userspace", "none")
CPUID_REGISTERS: tuple[str, ...] = ("eax", "ebx", "ecx", "edx")


def _one_of(check: Checker, field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices or not isinstance(value, str):
        check.fail(field, f"must be {', '.join(choices[:-1])} or {choices[-1]}{_given(value)}")


def _irqchip_mode(value: Any) -> Any:
    # Before the modes there was a switch: true (the hypervisor's if it has them) and false.
    if value is True:
        return "auto"
    if value is False:
        return "none"
    return value


class MachineConfigError(RecordError):
    """A :class:`MachineConfig` (or a :class:`CpuidOverride`) is invalid:
    :attr:`problems` as for every record, and :attr:`needs` the settings given
    without the one they need, ``(field, other, why)``, so that messages can name
    both as the user gave them."""

    def __init__(
        self, record: str, problems: list[tuple[str, str]], needs: tuple[tuple[str, str, str], ...] = ()
    ) -> None:
        words = [(field, f"needs {other} ({why})") for field, other, why in needs]
        super().__init__(record, problems + words)
        self.needs = needs


@lean_dataclass(frozen=True, slots=True, kw_only=True)
class CpuidOverride:
    """Change one register of one CPUID leaf the guest sees.

    With ``value`` only, the register becomes ``value``; with ``mask`` only, it is
    ANDed with ``mask`` (clear the bits you want gone); with both, it becomes
    ``(register & mask) | value``.  A leaf the hypervisor does not report is added.

    :raises MachineConfigError: a field is invalid (the message names it).
    """

    function: int = MISSING
    index: int = 0
    register: str = MISSING
    value: int | None = None
    mask: int | None = None

    def __post_init__(self) -> None:
        check = Checker("CpuidOverride")
        if required(check, "function", self.function):
            check.integer("function", self.function, 0, U32_MAX)
        check.integer("index", self.index, 0, U32_MAX)
        if required(check, "register", self.register):
            _one_of(check, "register", self.register, CPUID_REGISTERS)
        check.integer("value", self.value, 0, U32_MAX, optional=True)
        check.integer("mask", self.mask, 0, U32_MAX, optional=True)
        if not check.problems and self.value is None and self.mask is None:
            check.fail("(record)", "give value, mask, or both")
        if check.problems:
            raise MachineConfigError("CpuidOverride", check.problems)

    @property
    def reg(self) -> str:
        """The register's name (``eax`` .. ``edx``)."""
        return self.register

    @classmethod
    def from_mapping(cls, data: Any) -> CpuidOverride:
        """An override from a machine file's table (unknown keys are refused)."""
        return from_mapping(cls, data, CPUID_OVERRIDE_FIELDS, error=MachineConfigError)

    def apply(self, register: int) -> int:
        if self.mask is None:
            return self.value or 0
        return (register & self.mask) | (self.value or 0)


CPUID_OVERRIDE_FIELDS = ("function", "index", "register", "value", "mask")


@lean_dataclass(frozen=True, slots=True, kw_only=True)
class MachineConfig:
    """Everything ``pyvmm run`` needs to build and run a machine.

    :param arch: guest architecture; default: the backend's only one if it has one, else x86_64.
    :param kernel: guest kernel; none runs the bundled demo guest.
    :param initrd: the initrd (with a kernel only).
    :param load_address: load a flat binary kernel here and enter it there (x86_64: in long mode).
    :param append: kernel command line.
    :param memory: guest RAM in bytes, or '128M'-style.
    :param cpus: vCPUs, 1 to :data:`MAX_CPUS`.
    :param backend: backend name; default: $PYVMM_BACKEND, else the best.
    :param timeout: seconds before the run is stopped (status 124); covers loading the kernel too.
    :param serial: the console (COM1, the PL011): 'stdio' (interactive when stdin is a terminal),
        'none', 'pty', 'unix:PATH' (a socket server), or a file ('file:PATH' or a plain path).
    :param gdb: 'tcp:HOST:PORT' (HOST defaults to localhost): a gdb stub there; the guest waits
        for the debugger before its first instruction.
    :param stats: print exit statistics at the end.
    :param irqchip: the interrupt controllers and timer: 'kernel' the hypervisor's, 'userspace'
        pyvmm's 8259s and 8254 (x86_64, one vCPU), 'none', or 'auto': the hypervisor's if it
        has them, else pyvmm's where the backend can inject interrupts (true means auto, false none).
    :param testdev: x86_64: add QEMU's pc-testdev (kvm-unit-tests use it).
    :param legacy_bios: x86_64: leave the PC as a BIOS would (8259s, PIT, vector table, ACPI,
        S3 resume); default: for Multiboot kernels only.
    :param cpuid_overrides: :class:`CpuidOverride` records (or their tables).
    :raises MachineConfigError: a field is invalid (the message names it).
    """

    arch: Arch | None = None
    kernel: Path | None = None
    initrd: Path | None = None
    load_address: int | None = None
    append: str = ""
    memory: int = DEFAULT_MEMORY
    cpus: int = 1
    backend: str | None = None
    timeout: float | None = None
    serial: str = "stdio"
    gdb: str | None = None
    stats: bool = False
    irqchip: IrqchipMode = "auto"
    testdev: bool = False
    legacy_bios: bool | None = None
    cpuid_overrides: list[CpuidOverride] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        check = Checker("MachineConfig")
        set_field = object.__setattr__
        if self.arch is not None:
            set_field(self, "arch", check.choice("arch", self.arch, Arch))
        set_field(self, "kernel", _path(check, "kernel", self.kernel))
        set_field(self, "initrd", _path(check, "initrd", self.initrd))
        check.integer("load_address", self.load_address, 0, MAX_GUEST_PHYS - 1, optional=True)
        _kernel_text(check, self.append)
        set_field(self, "memory", _memory(check, self.memory))
        check.integer("cpus", self.cpus, 1, MAX_CPUS)
        _optional_text(check, "backend", self.backend)
        if self.timeout is not None:
            set_field(self, "timeout", check.number("timeout", self.timeout, 0, MAX_TIMEOUT))
        _serial(check, self.serial)
        set_field(self, "gdb", _gdb_address(check, self.gdb))
        check.boolean("stats", self.stats)
        set_field(self, "irqchip", _irqchip_mode(self.irqchip))
        _one_of(check, "irqchip", self.irqchip, IRQCHIP_MODES)
        check.boolean("testdev", self.testdev)
        legacy_bios: Any = self.legacy_bios  # as given: the annotation is what is checked
        if legacy_bios is not None and not isinstance(legacy_bios, bool):
            check.fail("legacy_bios", f"must be true or false, not {legacy_bios!r}"[:80])
        set_field(self, "cpuid_overrides", _overrides(check, self.cpuid_overrides))
        if check.problems:
            raise MachineConfigError("MachineConfig", check.problems)
        needs = []
        if self.initrd is not None and self.kernel is None:
            needs.append(("initrd", "kernel", "the demo guest takes no initrd"))
        if self.load_address is not None and self.kernel is None:
            needs.append(("load_address", "kernel", "it says where a flat binary kernel goes"))
        if self.append and self.kernel is None:
            needs.append(("append", "kernel", "the demo guest takes no command line"))
        if needs:
            raise MachineConfigError("MachineConfig", [], tuple(needs))

    @classmethod
    def from_mapping(cls, data: Any) -> MachineConfig:
        """A config from a mapping of its settings, as a machine file holds them
        (unknown keys are refused, naming the closest known one)."""
        return from_mapping(cls, data, MACHINE_CONFIG_FIELDS, error=MachineConfigError)


MACHINE_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(MachineConfig))


def _memory(check: Checker, value: Any) -> Any:
    try:
        memory = parse_size(value)
    except ValueError as exc:
        check.fail("memory", str(exc))
        return value
    if memory % PAGE_SIZE:
        check.fail("memory", f"{size_text(memory)} is not a whole number of {PAGE_SIZE // 1024}K pages")
    elif not MIN_RAM <= memory <= MAX_MEMORY:
        check.fail("memory", f"{size_text(memory)} is outside {size_text(MIN_RAM)}..{size_text(MAX_MEMORY)}")
    return memory


def _overrides(check: Checker, value: Any) -> Any:
    """The CPUID overrides as records; each problem is named by its position."""
    if not isinstance(value, (list, tuple)):
        check.fail("cpuid_overrides", f"must be a list{_given(value)}")
        return value
    records = []
    for i, item in enumerate(value):
        if isinstance(item, CpuidOverride):
            records.append(item)
            continue
        try:
            records.append(CpuidOverride.from_mapping(item))
        except RecordError as exc:
            for where, problem in exc.problems:
                inner = "" if where == "(record)" else f".{where}"
                check.fail(f"cpuid_overrides.{i}{inner}", problem)
    return records


def read_machine_file(path: Path) -> dict[str, Any]:
    """The settings of a TOML machine file, with relative paths made relative to it.

    :raises ConfigError: the file is missing, not a regular file (a FIFO is not
        waited on), over :data:`~pyvmm.config.MAX_MACHINE_FILE_SIZE`, not UTF-8
        or not TOML.
    """
    from pathlib import Path

    # Imported here: a run without a machine file parses no TOML.
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

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
        return MachineConfig.from_mapping(settings)
    except MachineConfigError as exc:
        raise ConfigError(_describe(exc, file, given, option_names or {})) from exc


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


def _describe(error: MachineConfigError, file: Path | None, given: dict[str, Any], option_names: dict[str, str]) -> str:
    problems = []
    in_file = f"{file}: " if file is not None else ""
    for field, other, why in error.needs[:MAX_PROBLEMS]:
        if field in given:
            problems.append(f"{option_names.get(field, field)} needs {option_names.get(other, other)} ({why})")
        else:
            problems.append(f"{in_file}{field} needs {other} ({why})")
    listed = [(field, problem) for field, problem in error.problems if not problem.startswith("needs ")]
    for field, message in listed[: max(0, MAX_PROBLEMS - len(problems))]:
        top = field.split(".", 1)[0]
        if field == "(record)":
            problems.append(f"{in_file}{message}")
        elif top in given:
            problems.append(f"{option_names.get(top, top)}: {message}")
        else:
            problems.append(f"{in_file}{field}: {message}")
    total = len(error.needs) + len(listed)
    if total > MAX_PROBLEMS:
        problems.append(f"and {total - MAX_PROBLEMS} more")
    return "invalid machine configuration: " + "; ".join(problems)
