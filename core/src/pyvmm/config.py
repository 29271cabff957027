"""Validated configuration records: what a VMM asks a backend for.

These are pydantic models because they sit at the boundary (user input, machine
files, plugin arguments).  Nothing on the per-exit path is a pydantic model.
A validation failure raises :class:`pydantic.ValidationError`, whose message
names the field; :func:`validation_message` turns one into a single line.

Integers are strict at this boundary: a boolean, a float or a numeric string is
refused, never coerced (``True`` would otherwise pass as 1), and an integer outside
its field's range is refused with the range in the message (:func:`int_range`),
so a value that a backend's ``struct.pack`` or ioctl would reject, or silently
wrap, never gets that far.

:func:`read_input_file` is how pyvmm reads every file a user names (kernel,
initrd, machine file): it refuses anything but a regular file of bounded size
before reading, and never blocks on a FIFO.
"""

from __future__ import annotations

import enum
import math
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from pyvmm.errors import ConfigError

PAGE_SIZE = 4096
#: Guest-physical addresses are at most 52 bits on x86_64 and aarch64.
MAX_GUEST_PHYS = 1 << 52
#: The most vCPUs a VmConfig may ask for (a backend may allow fewer).
MAX_VCPUS = 1024

#: The largest unsigned 64-bit value: registers, addresses and sizes a backend packs as u64.
U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1

# At most 20 digits: a size is at most 2**64 and a longer number is a typo or an
# attack on int()'s digit limit, either way not a size.
_SIZE_RE = re.compile(r"^\s*(\d{1,20})\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: Any) -> Any:
    """Accept ``4096``, ``"128M"``, ``"1GiB"``, ``"64k"``; bare numbers are bytes."""
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if not match:
            raise ValueError(f"not a size: {value!r} (use bytes or a K/M/G/T suffix)")
        return int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]
    if isinstance(value, bool):
        raise ValueError("a size must be a number, not a boolean")
    if not isinstance(value, int):
        raise ValueError(f"a size must be a whole number of bytes or a string such as '128M', not {_show(value)}")
    return value


#: A byte count; accepts ``"128M"``-style strings.
ByteSize = Annotated[int, BeforeValidator(parse_size)]


def _show(value: Any) -> str:
    """``value`` for an error message, cut short: the input may be huge."""
    text = repr(value) if isinstance(value, (bool, int, float, str, bytes)) else f"a {type(value).__name__}"
    return text if len(text) <= 40 else text[:37] + "..."


def _bound(value: int) -> str:
    # Addresses and register widths read better in hex, counts in decimal.
    return f"{value:#x}" if abs(value) >= 0x10000 else str(value)


def int_range(lo: int, hi: int, *, optional: bool = False) -> BeforeValidator:
    """``Annotated[int, int_range(lo, hi)]``: an integer in ``lo..hi`` inclusive.

    Booleans, floats and strings are refused (pydantic's lax mode would turn
    ``True`` into 1 and ``"7"`` into 7); the message gives the allowed range.
    With ``optional``, None passes (for ``int | None`` fields).
    """

    def check(value: Any) -> Any:
        if value is None and optional:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer from {_bound(lo)} to {_bound(hi)}, not {_show(value)}")
        if not lo <= value <= hi:
            raise ValueError(f"{_bound(value)} is out of range: must be from {_bound(lo)} to {_bound(hi)}")
        return int(value)  # an IntEnum member becomes its plain value

    return BeforeValidator(check)


def float_range(lo_exclusive: float, hi: float, *, optional: bool = False) -> BeforeValidator:
    """``Annotated[float, float_range(lo, hi)]``: a finite number in ``(lo, hi]``;
    booleans, strings, infinities and NaN are refused."""

    def check(value: Any) -> Any:
        if value is None and optional:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a finite number above {lo_exclusive:g} and at most {hi:g}, not {_show(value)}")
        if not math.isfinite(value) or not lo_exclusive < value <= hi:
            raise ValueError(f"{value!r} is out of range: must be above {lo_exclusive:g} and at most {hi:g}")
        return float(value)

    return BeforeValidator(check)


def strict_bool(value: Any) -> Any:
    """A :class:`BeforeValidator` for bool fields: only ``True`` and ``False``
    (lax pydantic would take 1, "yes" or "on")."""
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {_show(value)}")
    return value


#: ``Annotated[bool, StrictBool]``.
StrictBool = BeforeValidator(strict_bool)


class Arch(str, enum.Enum):
    """Guest architecture."""

    X86_64 = "x86_64"
    AARCH64 = "aarch64"


class Protection(str, enum.Enum):
    """Whether the host may access guest memory (crosvm ``ProtectionType``, reduced)."""

    UNPROTECTED = "unprotected"
    PROTECTED = "protected"


class _Record(BaseModel):
    # defer_build: the validator is built on the first validation, not at import;
    # commands that import the types but never validate one (``pyvmm backends``)
    # do not pay for building it.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, defer_build=True)


class VmConfig(_Record):
    """What a VM is created with.  Memory is mapped afterwards, region by region."""

    arch: Arch = Arch.X86_64
    vcpus: Annotated[int, int_range(1, MAX_VCPUS)] = Field(default=1, description="vCPUs the VM may have")
    protection: Protection = Protection.UNPROTECTED
    ipa_bits: Annotated[int | None, int_range(32, 52, optional=True)] = Field(
        default=None, description="guest-physical address width (aarch64), None = backend default"
    )
    backend_options: dict[str, Any] = Field(
        default_factory=dict,
        description="backend-specific settings, passed through to the backend (which validates them); "
        "an integer in them must fit in 64 bits",
    )

    @model_validator(mode="after")
    def _check_options(self) -> VmConfig:
        # Backend options end up in ioctl arguments and C structs: an integer that
        # fits in no 64-bit field would be wrapped or truncated there, silently.
        for name, value in self.backend_options.items():
            if isinstance(value, int) and not isinstance(value, bool) and not -(1 << 63) <= value <= U64_MAX:
                raise ValueError(
                    f"backend_options.{name}: {_bound(value)} does not fit in 64 bits "
                    f"(must be from {_bound(-(1 << 63))} to {_bound(U64_MAX)})"
                )
        return self


class MemoryRegionSpec(_Record):
    """A guest-physical range to back with host memory.

    Both the address and the size must be page-aligned: a VMM that passes an odd
    size almost always has a bug, so it is reported rather than rounded.
    """

    guest_phys_addr: Annotated[int, int_range(0, MAX_GUEST_PHYS - 1)]
    size: ByteSize = Field(gt=0)
    read_only: Annotated[bool, StrictBool] = False
    log_dirty: Annotated[bool, StrictBool] = False

    @model_validator(mode="after")
    def _check_alignment(self) -> MemoryRegionSpec:
        if self.guest_phys_addr % PAGE_SIZE:
            raise ValueError(f"guest_phys_addr {self.guest_phys_addr:#x} is not {PAGE_SIZE}-byte aligned")
        if self.size % PAGE_SIZE:
            raise ValueError(f"size {self.size:#x} is not a multiple of {PAGE_SIZE}")
        if self.guest_phys_addr + self.size > MAX_GUEST_PHYS:
            raise ValueError(
                f"size: region {self.guest_phys_addr:#x}+{self.size:#x} ends beyond the 52-bit guest-physical space"
            )
        return self

    @property
    def end(self) -> int:
        """First address after the region."""
        return self.guest_phys_addr + self.size


#: At most this many problems are listed in one message (a random machine file can have thousands).
MAX_PROBLEMS = 10


def size_text(count: int) -> str:
    """A byte count as a user writes it: ``128M``, ``1T``, ``4K``; ``12345 bytes``
    when it is no whole number of KiB."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if count >= 1 << shift and count % (1 << shift) == 0:
            return f"{count >> shift}{unit}"
    if count >= 1 << 40:
        return f"{count} bytes (about {count / (1 << 40):.1f}T)"
    return f"{count} bytes"


#: pydantic's wording, by error type, as one clause: "must be ...".
_PYDANTIC_WORDS = {
    "missing": "is required",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "list_type": "must be a list",
    "dict_type": "must be a table",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
    "path_type": "must be a file name (a string)",
    "string_too_short": "must not be empty",
    "string_too_long": "is too long",
    "greater_than": "must be above {gt}",
    "greater_than_equal": "must be at least {ge}",
    "less_than": "must be below {lt}",
    "less_than_equal": "must be at most {le}",
    "enum": "must be {expected}",
    "literal_error": "must be {expected}",
    "int_parsing": "must be an integer",
    "float_parsing": "must be a number",
    "bool_parsing": "must be true or false",
    "frozen_instance": "cannot be changed",
}


def _given(value: Any) -> str:
    return f", not {_show(value)}" if isinstance(value, (bool, int, float, str, bytes)) else ""


def error_text(item: Any, known: list[str] | None = None) -> str:
    """One pydantic error in pyvmm's words: our validators' messages as they are
    (without pydantic's "Value error, " prefix), pydantic's own rewritten
    ("must be a string, not 5"), and an unknown key with the closest known one
    (``known``: the keys allowed where it was found)."""
    kind = item.get("type", "")
    if kind == "value_error":
        return str(item["msg"]).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        key = str(item["loc"][-1]) if item.get("loc") else ""
        hint = did_you_mean(key, known or [])
        return "unknown setting" + (f" (did you mean {hint}?)" if hint else "")
    template = _PYDANTIC_WORDS.get(kind)
    if template is None:
        text = str(item["msg"])
        text = text.replace("Input should be", "must be").replace("Value error, ", "")
        return text[:1].lower() + text[1:]
    context = {k: str(v).replace("'", "") for k, v in (item.get("ctx") or {}).items()}
    try:
        text = template.format(**context)
    except (KeyError, IndexError):
        text = template
    return text + ("" if kind == "missing" else _given(item.get("input")))


def did_you_mean(word: str, known: list[str]) -> str | None:
    """The known key ``word`` was probably meant to be (``legacy-bios`` ->
    ``legacy_bios``), or None."""
    import difflib

    normal = word.replace("-", "_").lower()
    if normal in known:
        return normal
    close = difflib.get_close_matches(normal, known, n=1, cutoff=0.6)
    return close[0] if close else None


def known_keys(model: Any, loc: tuple[Any, ...]) -> list[str]:
    """The keys a pydantic model allows at ``loc`` (the location of an unknown
    key, which is its last part), following nested models and lists of them."""
    import typing

    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        current = None
        for candidate in (annotation, *typing.get_args(annotation)):
            if isinstance(candidate, type) and hasattr(candidate, "model_fields"):
                current = candidate
                break
        if current is None:
            return []
    fields = getattr(current, "model_fields", None) or {}
    return [field.alias or name for name, field in fields.items()]


def validation_message(error: ValidationError, model: Any = None) -> str:
    """One line for all problems: ``field.path: message; ...`` (the first
    :data:`MAX_PROBLEMS`, then how many more), in pyvmm's words
    (:func:`error_text`); ``model`` lets an unknown key get a "did you mean"."""
    items = error.errors()
    lines = []
    for item in items[:MAX_PROBLEMS]:
        where = ".".join(str(part) for part in item["loc"]) or "(record)"
        known = known_keys(model, tuple(item["loc"])) if model is not None and item["loc"] else None
        lines.append(f"{where}: {error_text(item, known)}")
    if len(items) > MAX_PROBLEMS:
        lines.append(f"and {len(items) - MAX_PROBLEMS} more")
    return "; ".join(lines)


# --- files named by the user ----------------------------------------------------------

#: A machine file larger than this is not a machine file.
MAX_MACHINE_FILE_SIZE = 1 << 20

_FILE_KINDS: tuple[tuple[Callable[[int], bool], str], ...] = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class InputFileError(ConfigError):
    """A file the user named cannot be used.  ``what`` names the file's role
    ("kernel", "initrd", "machine file"), ``reason`` says what is wrong with it,
    ``problem`` is both: "kernel is a FIFO (named pipe), not a regular file"."""

    def __init__(self, path: Path | str, what: str, reason: str) -> None:
        self.path = str(path)
        self.what = what
        self.reason = reason
        self.problem = f"{what} {reason}"
        super().__init__(f"{self.path}: {self.problem}")


def file_kind(mode: int) -> str:
    """What a ``st_mode`` describes, for "is X, not a regular file"."""
    for test, name in _FILE_KINDS:
        if test(mode):
            return name
    return "a special file"


def byte_count(count: int) -> str:
    """``count`` bytes for a message: "128 MiB", or exact when not a round unit."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if count >= 1 << shift and count % (1 << shift) == 0:
            return f"{count >> shift} {unit}"
    return f"{count} bytes"


def check_input_file(path: Path | str, *, what: str, limit: int, why: str) -> int:
    """Check that ``path`` is a regular file of at most ``limit`` bytes, without
    opening it (opening a FIFO blocks; opening some devices has side effects).
    Returns its size.

    :param what: the file's role in messages ("kernel", "initrd").
    :param why: what the limit is, with ``{limit}`` for it: "it does not fit in
        guest RAM ({limit})".
    :raises InputFileError: missing, unreadable, not a regular file, too large.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise InputFileError(path, what, "file does not exist") from None
    except ValueError:  # a NUL in the name: no file can have it
        raise InputFileError(repr(str(path)), what, "file name contains a NUL character") from None
    except OSError as exc:
        raise InputFileError(path, what, f"cannot be looked up: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise InputFileError(path, what, f"is {file_kind(info.st_mode)}, not a regular file")
    if info.st_size > limit:
        raise InputFileError(path, what, f"is {byte_count(info.st_size)}: {why.format(limit=byte_count(limit))}")
    return info.st_size


def read_input_file(path: Path | str, *, what: str, limit: int, why: str) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them.

    Checked before opening (:func:`check_input_file`), then opened with
    ``O_NONBLOCK`` and checked again on the open file, so that a file swapped for
    a FIFO or a device in between neither blocks nor is read; the read itself
    stops after ``limit + 1`` bytes (a file that grows, or a ``/proc`` file whose
    size says 0, cannot make it read without end).

    :raises InputFileError: as :func:`check_input_file`, or opening or reading failed.
    """
    check_input_file(path, what=what, limit=limit, why=why)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise InputFileError(path, what, "file does not exist") from None
    except OSError as exc:
        raise InputFileError(path, what, f"cannot be opened: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InputFileError(path, what, f"is {file_kind(info.st_mode)}, not a regular file")
        chunks: list[bytes] = []
        total = 0
        want = min(info.st_size, limit) + 1
        while total <= limit:
            try:
                chunk = os.read(fd, min(want, limit + 1 - total))
            except OSError as exc:
                raise InputFileError(path, what, f"cannot be read: {exc.strerror or exc}") from None
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            want = 1 << 20
        if total > limit:
            raise InputFileError(path, what, f"is over {byte_count(limit)}: {why.format(limit=byte_count(limit))}")
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    finally:
        os.close(fd)
