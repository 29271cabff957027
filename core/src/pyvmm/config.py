"""Validated configuration records: what a VMM asks a backend for.

These are pydantic models because they sit at the boundary (user input, machine
files, plugin arguments).  Nothing on the per-exit path is a pydantic model.
A validation failure raises :class:`pydantic.ValidationError`, whose message
names the field; :func:`validation_message` turns one into a single line.
"""

from __future__ import annotations

import enum
import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

PAGE_SIZE = 4096
#: Guest-physical addresses are at most 52 bits on x86_64 and aarch64.
MAX_GUEST_PHYS = 1 << 52

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
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
    return value


#: A byte count; accepts ``"128M"``-style strings.
ByteSize = Annotated[int, BeforeValidator(parse_size)]


class Arch(str, enum.Enum):
    """Guest architecture."""

    X86_64 = "x86_64"
    AARCH64 = "aarch64"


class Protection(str, enum.Enum):
    """Whether the host may access guest memory (crosvm ``ProtectionType``, reduced)."""

    UNPROTECTED = "unprotected"
    PROTECTED = "protected"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class VmConfig(_Record):
    """What a VM is created with.  Memory is mapped afterwards, region by region."""

    arch: Arch = Arch.X86_64
    vcpus: int = Field(default=1, ge=1, le=1024, description="vCPUs the VM may have")
    protection: Protection = Protection.UNPROTECTED
    ipa_bits: int | None = Field(
        default=None, ge=32, le=52, description="guest-physical address width (aarch64), None = backend default"
    )
    backend_options: dict[str, Any] = Field(
        default_factory=dict, description="backend-specific settings, passed through unvalidated"
    )


class MemoryRegionSpec(_Record):
    """A guest-physical range to back with host memory.

    Both the address and the size must be page-aligned: a VMM that passes an odd
    size almost always has a bug, so it is reported rather than rounded.
    """

    guest_phys_addr: int = Field(ge=0, lt=MAX_GUEST_PHYS)
    size: ByteSize = Field(gt=0)
    read_only: bool = False
    log_dirty: bool = False

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


def validation_message(error: ValidationError) -> str:
    """One line per problem: ``field.path: message``."""
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(record)"
        lines.append(f"{where}: {item['msg']}")
    return "; ".join(lines)
