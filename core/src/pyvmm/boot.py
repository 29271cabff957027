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

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pyvmm.arch.x86_64 import Fpu, MsrEntry, Regs, Sregs
from pyvmm.config import Arch


class X86Mode(str, enum.Enum):
    REAL = "real"
    PROTECTED = "protected"
    LONG = "long"


class BootSpec(BaseModel):
    """Where and how the boot vCPU starts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: Arch
    entry: int = Field(ge=0, lt=1 << 64)
    x86_mode: X86Mode = X86Mode.LONG
    stack: int | None = Field(default=None, ge=0, lt=1 << 64)
    registers: dict[str, int] = Field(
        default_factory=dict, description="argument registers, e.g. {'rbx': mbi} or {'x1': 0}"
    )
    boot_tables: int = Field(
        default=0x1000,
        ge=0,
        description="x86: guest address of the 7 pages that hold the GDT and the long-mode page tables",
    )
    fdt_address: int | None = Field(default=None, ge=0)
    fdt_size: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> BootSpec:
        if self.arch is Arch.X86_64:
            if self.x86_mode is X86Mode.REAL and self.entry >= 1 << 32:
                raise ValueError(f"entry {self.entry:#x} is not reachable in real mode")
            if self.x86_mode is X86Mode.PROTECTED and self.entry >= 1 << 32:
                raise ValueError(f"entry {self.entry:#x} is above 4 GiB in 32-bit protected mode")
            if self.x86_mode is X86Mode.LONG and self.entry >= 1 << 32:
                raise ValueError(f"entry {self.entry:#x} is above 4 GiB, outside the identity map pyvmm builds")
            if self.boot_tables % 4096:
                raise ValueError(f"boot_tables {self.boot_tables:#x} is not page-aligned")
            if self.fdt_address is not None:
                raise ValueError("fdt_address applies to aarch64 guests only")
        if (self.fdt_address is None) != (self.fdt_size is None):
            raise ValueError("fdt_address and fdt_size go together")
        return self


@dataclass(slots=True)
class X86VcpuInit:
    """Register state for one x86_64 vCPU before its first run."""

    regs: Regs
    sregs: Sregs
    fpu: Fpu | None = None
    msrs: list[MsrEntry] = field(default_factory=list)
    boot_cpu: bool = True


@dataclass(slots=True)
class Aarch64VcpuInit:
    """Registers to set on one aarch64 vCPU, by one-reg id.  Registers missing from
    ``regs`` keep the hypervisor's value; a secondary vCPU starts powered off and is
    brought up by the guest through PSCI."""

    regs: dict[int, int] = field(default_factory=dict)
    boot_cpu: bool = True
    power_off: bool = False


VcpuInit = X86VcpuInit | Aarch64VcpuInit
