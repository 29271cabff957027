"""How a VM boots: the validated boot request and the per-vCPU register records.

A VMM describes the boot once, as a :class:`BootSpec` (entry point, CPU mode,
stack, argument registers, device tree).  Core then does one of two things:

* the backend declares ``HYPERVISOR_INITIALIZED_BOOT_CONTEXT`` (Gunyah): the spec
  goes to ``pyvmm_set_boot_context`` at VM level and no vCPU register is touched;
* otherwise core turns the spec into a register record per vCPU
  (:class:`X86VcpuInit` / :class:`Aarch64VcpuInit`, built by
  :mod:`pyvmm.arch.x86_64_boot` / :mod:`pyvmm.arch.aarch64_boot`) and calls
  ``pyvmm_init_vcpu`` with it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pyvmm.arch.x86_64 import Fpu, MsrEntry, Regs, Sregs
from pyvmm.config import MAX_GUEST_PHYS, U32_MAX, U64_MAX, Arch, int_range
from pyvmm.errors import ConfigError

#: x86 boot tables must lie in the 0..4 GiB identity map the long-mode tables build
#: (and a 32-bit GDT base cannot be higher).
FOUR_GIB = 1 << 32


class X86Mode(str, enum.Enum):
    REAL = "real"
    PROTECTED = "protected"
    LONG = "long"


class BootSpec(BaseModel):
    """Where and how the boot vCPU starts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: Arch
    entry: Annotated[int, int_range(0, U64_MAX)]
    x86_mode: X86Mode = X86Mode.LONG
    stack: Annotated[int | None, int_range(0, U64_MAX, optional=True)] = None
    registers: dict[str, Annotated[int, int_range(0, U64_MAX)]] = Field(
        default_factory=dict,
        description="argument registers, e.g. {'rbx': mbi} or {'x1': 0}; x86 'e' names (ebx) set the "
        "64-bit register and take 32-bit values. Names are checked against the arch when the boot is set.",
    )
    boot_tables: Annotated[int, int_range(0, MAX_GUEST_PHYS - 1)] = Field(
        default=0x1000,
        description="x86: guest address of the 7 pages that hold the GDT and the long-mode page tables",
    )
    fdt_address: Annotated[int | None, int_range(0, MAX_GUEST_PHYS - 1, optional=True)] = None
    fdt_size: Annotated[int | None, int_range(1, MAX_GUEST_PHYS, optional=True)] = None

    @model_validator(mode="after")
    def _check(self) -> BootSpec:
        for name, value in self.registers.items():
            # eax..edx, esi, edi, esp, ebp: the 32-bit halves (set zero-extended).
            if self.arch is Arch.X86_64 and name.lower().startswith("e") and value > U32_MAX:
                raise ValueError(
                    f"registers.{name}: {value:#x} is out of range for a 32-bit register: "
                    f"must be from 0 to {U32_MAX:#x}"
                )
        if self.arch is Arch.X86_64:
            if self.x86_mode is X86Mode.REAL and self.entry >= 1 << 32:
                raise ValueError(f"entry {self.entry:#x} is not reachable in real mode")
            if self.x86_mode is X86Mode.PROTECTED and self.entry >= 1 << 32:
                raise ValueError(f"entry {self.entry:#x} is above 4 GiB in 32-bit protected mode")
            if self.x86_mode is X86Mode.LONG and self.entry >= 1 << 32:
                raise ValueError(f"entry {self.entry:#x} is above 4 GiB, outside the identity map pyvmm builds")
            if self.boot_tables % 4096:
                raise ValueError(f"boot_tables {self.boot_tables:#x} is not page-aligned")
            if self.x86_mode is not X86Mode.REAL and self.boot_tables + 7 * 4096 > FOUR_GIB:
                raise ValueError(
                    f"boot_tables {self.boot_tables:#x}: the 7 boot-table pages must lie below 4 GiB "
                    "(the identity map pyvmm builds covers 0..4 GiB)"
                )
            if self.fdt_address is not None:
                raise ValueError("fdt_address applies to aarch64 guests only")
        if (self.fdt_address is None) != (self.fdt_size is None):
            raise ValueError("fdt_address and fdt_size go together")
        if (
            self.fdt_address is not None
            and self.fdt_size is not None
            and self.fdt_address + self.fdt_size > MAX_GUEST_PHYS
        ):
            raise ValueError(
                f"fdt_size: the device tree {self.fdt_address:#x}+{self.fdt_size:#x} ends beyond the 52-bit "
                "guest-physical space"
            )
        return self


@dataclass(slots=True)
class X86VcpuInit:
    """Register state for one x86_64 vCPU before its first run."""

    regs: Regs
    sregs: Sregs
    fpu: Fpu | None = None
    msrs: list[MsrEntry] = field(default_factory=list)
    boot_cpu: bool = True

    def check(self) -> None:
        """:class:`~pyvmm.errors.ConfigError` unless every register fits its field
        (the records are mutable, so this is checked again before use)."""
        self.regs.check()
        self.sregs.check()
        if self.fpu is not None:
            self.fpu.check()
        for msr in self.msrs:
            msr.check()


@dataclass(slots=True)
class Aarch64VcpuInit:
    """Registers to set on one aarch64 vCPU, by one-reg id.  Registers missing from
    ``regs`` keep the hypervisor's value; a secondary vCPU starts powered off and is
    brought up by the guest through PSCI."""

    regs: dict[int, int] = field(default_factory=dict)
    boot_cpu: bool = True
    power_off: bool = False

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """:class:`~pyvmm.errors.ConfigError` unless every id and value fits in 64 bits."""
        for reg_id, value in self.regs.items():
            for what, number in (("register id", reg_id), ("value", value)):
                if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number <= U64_MAX:
                    raise ConfigError(
                        f"Aarch64VcpuInit.regs: {what} {number!r} is out of range: must be an integer "
                        f"from 0 to {U64_MAX:#x}"
                    )


VcpuInit = X86VcpuInit | Aarch64VcpuInit
