"""The API's configuration records: what a VMM asks a backend for.

:class:`VmConfig` and :class:`MemoryRegionSpec` sit at the boundary (user
input, plugin arguments) and are checked when they are made: they are slotted
dataclasses with hand-written checks (:mod:`pyvmm.records`), not pydantic models,
so that ``pyvmm run`` and ``pyvmm backends`` never import pydantic.  A bad value
raises :class:`~pyvmm.records.RecordError` (a :class:`~pyvmm.errors.ConfigError`)
naming the field.  Nothing on the per-exit path is checked this way.

Integers are strict at this boundary: a boolean, a float or a numeric string is
refused, never coerced (``True`` would otherwise pass as 1), and an integer outside
its field's range is refused with the range in the message, so a value that a
backend's ``struct.pack`` or ioctl would reject, or silently wrap, never gets
that far.

:func:`read_input_file` is how pyvmm reads every file a user names (kernel,
initrd, machine file): it refuses anything but a regular file of bounded size
before reading, and never blocks on a FIFO.
"""

from __future__ import annotations

import enum
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import field
from typing import TYPE_CHECKING, Any

from pyvmm.errors import ConfigError
from pyvmm.lean_dataclass import lean_dataclass
from pyvmm.records import Checker, bound, from_mapping, show

if TYPE_CHECKING:
    from pathlib import Path

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
        raise ValueError(f"a size must be a whole number of bytes or a string such as '128M', not {show(value)}")
    return value


class Arch(str, enum.Enum):
    """Guest architecture."""

    X86_64 = "x86_64"
    AARCH64 = "aarch64"


class Protection(str, enum.Enum):
    """Whether the host may access guest memory (crosvm ``ProtectionType``, reduced)."""

    UNPROTECTED = "unprotected"
    PROTECTED = "protected"


@lean_dataclass(frozen=True, slots=True, kw_only=True)
class VmConfig:
    """What a VM is created with.  Memory is mapped afterwards, region by region.

    :param arch: guest architecture (an :class:`Arch` or its value).
    :param vcpus: vCPUs the VM may have, 1 to :data:`MAX_VCPUS`.
    :param protection: whether the host may access guest memory.
    :param ipa_bits: guest-physical address width (aarch64), None = backend default.
    :param backend_options: backend-specific settings, passed through to the
        backend (which validates them); an integer in them must fit in 64 bits.
    :raises RecordError: a field is invalid (the message names it).
    """

    arch: Arch = Arch.X86_64
    vcpus: int = 1
    protection: Protection = Protection.UNPROTECTED
    ipa_bits: int | None = None
    backend_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check = Checker("VmConfig")
        set_field = object.__setattr__
        set_field(self, "arch", check.choice("arch", self.arch, Arch))
        set_field(self, "vcpus", check.integer("vcpus", self.vcpus, 1, MAX_VCPUS))
        set_field(self, "protection", check.choice("protection", self.protection, Protection))
        set_field(self, "ipa_bits", check.integer("ipa_bits", self.ipa_bits, 32, 52, optional=True))
        options: Any = self.backend_options  # as given: the annotation is what the check ensures
        if type(options) is not dict and not isinstance(options, Mapping):  # a dict skips the ABC check
            check.fail("backend_options", f"must be a table, not {show(options)}")
        else:
            set_field(self, "backend_options", dict(self.backend_options))
            # Backend options end up in ioctl arguments and C structs: an integer that
            # fits in no 64-bit field would be wrapped or truncated there, silently.
            for name, value in self.backend_options.items():
                if isinstance(value, int) and not isinstance(value, bool) and not -(1 << 63) <= value <= U64_MAX:
                    check.fail(
                        f"backend_options.{name}",
                        f"{bound(value)} does not fit in 64 bits "
                        f"(must be from {bound(-(1 << 63))} to {bound(U64_MAX)})",
                    )
        check.done()

    @classmethod
    def from_mapping(cls, data: Any) -> VmConfig:
        """A config from a mapping of its fields (unknown keys are refused)."""
        return from_mapping(cls, data, VM_CONFIG_FIELDS)


VM_CONFIG_FIELDS = ("arch", "vcpus", "protection", "ipa_bits", "backend_options")


@lean_dataclass(frozen=True, slots=True, kw_only=True)
class MemoryRegionSpec:
    """A guest-physical range to back with host memory.

    Both the address and the size must be page-aligned: a VMM that passes an odd
    size almost always has a bug, so it is reported rather than rounded.  The size
    may be given as a string such as ``"128M"`` (:func:`parse_size`).

    :raises RecordError: a field is invalid (the message names it).
    """

    guest_phys_addr: int
    size: int
    read_only: bool = False
    log_dirty: bool = False

    def __post_init__(self) -> None:
        check = Checker("MemoryRegionSpec")
        set_field = object.__setattr__
        address = check.integer("guest_phys_addr", self.guest_phys_addr, 0, MAX_GUEST_PHYS - 1)
        set_field(self, "guest_phys_addr", address)
        try:
            size = parse_size(self.size)
        except ValueError as exc:
            check.fail("size", str(exc))
            size = None
        if isinstance(size, int) and size <= 0:
            check.fail("size", f"must be above 0, not {show(size)}")
        set_field(self, "size", size)
        check.boolean("read_only", self.read_only)
        check.boolean("log_dirty", self.log_dirty)
        check.done()
        if address % PAGE_SIZE:
            check.fail("guest_phys_addr", f"{address:#x} is not {PAGE_SIZE}-byte aligned")
        elif size % PAGE_SIZE:
            check.fail("size", f"{size:#x} is not a multiple of {PAGE_SIZE}")
        elif address + size > MAX_GUEST_PHYS:
            check.fail("size", f"region {address:#x}+{size:#x} ends beyond the 52-bit guest-physical space")
        check.done()

    @classmethod
    def from_mapping(cls, data: Any) -> MemoryRegionSpec:
        """A region from a mapping of its fields (unknown keys are refused)."""
        return from_mapping(cls, data, MEMORY_REGION_FIELDS)

    @property
    def end(self) -> int:
        """First address after the region."""
        return self.guest_phys_addr + self.size


MEMORY_REGION_FIELDS = ("guest_phys_addr", "size", "read_only", "log_dirty")


def size_text(count: int) -> str:
    """A byte count as a user writes it: ``128M``, ``1T``, ``4K``; ``12345 bytes``
    when it is no whole number of KiB."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if count >= 1 << shift and count % (1 << shift) == 0:
            return f"{count >> shift}{unit}"
    if count >= 1 << 40:
        return f"{count} bytes (about {count / (1 << 40):.1f}T)"
    return f"{count} bytes"


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
