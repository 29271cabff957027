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
from collections.abc import Mapping
from dataclasses import field
from typing import TYPE_CHECKING, Any

from pyvmm.config import MAX_GUEST_PHYS, U32_MAX, U64_MAX, Arch
from pyvmm.errors import ConfigError
from pyvmm.lean_dataclass import lean_dataclass
from pyvmm.records import MISSING, Checker, from_mapping, required, show

if TYPE_CHECKING:
    from pyvmm.arch.x86_64 import Fpu, MsrEntry, Regs, Sregs

#: x86 boot tables must lie in the 0..4 GiB identity map the long-mode tables build
#: (and a 32-bit GDT base cannot be higher).
FOUR_GIB = 1 << 32


class X86Mode(str, enum.Enum):
    REAL = "real"
    PROTECTED = "protected"
    LONG = "long"


@lean_dataclass(frozen=True, slots=True, kw_only=True)
class BootSpec:
    """Where and how the boot vCPU starts.

    :param arch: guest architecture (an :class:`~pyvmm.config.Arch` or its value).
    :param entry: the first instruction's guest address.
    :param x86_mode: x86 only: the CPU mode the vCPU starts in.
    :param stack: the initial stack pointer, None to leave it.
    :param registers: argument registers, e.g. ``{'rbx': mbi}`` or ``{'x1': 0}``; x86
        "e" names (``ebx``) set the 64-bit register and take 32-bit values.  Names
        are checked against the arch when the boot is set.
    :param boot_tables: x86: guest address of the 7 pages that hold the GDT and
        the long-mode page tables.
    :param fdt_address: aarch64: where the device tree is, with ``fdt_size``.
    :raises RecordError: a field is invalid (the message names it).
    """

    arch: Arch = MISSING
    entry: int = MISSING
    x86_mode: X86Mode = X86Mode.LONG
    stack: int | None = None
    registers: dict[str, int] = field(default_factory=dict)
    boot_tables: int = 0x1000
    fdt_address: int | None = None
    fdt_size: int | None = None

    def __post_init__(self) -> None:
        check = Checker("BootSpec")
        set_field = object.__setattr__
        if required(check, "arch", self.arch):
            set_field(self, "arch", check.choice("arch", self.arch, Arch))
        if required(check, "entry", self.entry):
            set_field(self, "entry", check.integer("entry", self.entry, 0, U64_MAX))
        set_field(self, "x86_mode", check.choice("x86_mode", self.x86_mode, X86Mode))
        set_field(self, "stack", check.integer("stack", self.stack, 0, U64_MAX, optional=True))
        given: Any = self.registers  # as given: the annotation is what the check ensures
        if not isinstance(given, Mapping):
            check.fail("registers", f"must be a table of register names and values, not {show(given)}")
        else:
            registers = {}
            for name, value in given.items():
                if not isinstance(name, str):
                    check.fail("registers", f"register names must be strings, not {show(name)}")
                registers[name] = check.integer(f"registers.{name}", value, 0, U64_MAX)
            set_field(self, "registers", registers)
        set_field(self, "boot_tables", check.integer("boot_tables", self.boot_tables, 0, MAX_GUEST_PHYS - 1))
        set_field(
            self, "fdt_address", check.integer("fdt_address", self.fdt_address, 0, MAX_GUEST_PHYS - 1, optional=True)
        )
        set_field(self, "fdt_size", check.integer("fdt_size", self.fdt_size, 1, MAX_GUEST_PHYS, optional=True))
        check.done()
        self._check_together(check)
        check.done()

    def _check_together(self, check: Checker) -> None:
        """The rules between fields, once each field is valid on its own."""
        if self.arch is Arch.X86_64:
            for name, value in self.registers.items():
                # eax..edx, esi, edi, esp, ebp: the 32-bit halves (set zero-extended).
                if name.lower().startswith("e") and value > U32_MAX:
                    check.fail(
                        f"registers.{name}",
                        f"{value:#x} is out of range for a 32-bit register: must be from 0 to {U32_MAX:#x}",
                    )
            if self.x86_mode is X86Mode.REAL and self.entry >= 1 << 32:
                check.fail("entry", f"{self.entry:#x} is not reachable in real mode")
            if self.x86_mode is X86Mode.PROTECTED and self.entry >= 1 << 32:
                check.fail("entry", f"{self.entry:#x} is above 4 GiB in 32-bit protected mode")
            if self.x86_mode is X86Mode.LONG and self.entry >= 1 << 32:
                check.fail("entry", f"{self.entry:#x} is above 4 GiB, outside the identity map pyvmm builds")
            if self.boot_tables % 4096:
                check.fail("boot_tables", f"{self.boot_tables:#x} is not page-aligned")
            elif self.x86_mode is not X86Mode.REAL and self.boot_tables + 7 * 4096 > FOUR_GIB:
                check.fail(
                    "boot_tables",
                    f"{self.boot_tables:#x}: the 7 boot-table pages must lie below 4 GiB "
                    "(the identity map pyvmm builds covers 0..4 GiB)",
                )
            if self.fdt_address is not None:
                check.fail("fdt_address", "applies to aarch64 guests only")
        if (self.fdt_address is None) != (self.fdt_size is None):
            check.fail("fdt_address", "fdt_address and fdt_size go together")
        elif self.fdt_address is not None and self.fdt_address + (self.fdt_size or 0) > MAX_GUEST_PHYS:
            check.fail(
                "fdt_size",
                f"the device tree {self.fdt_address:#x}+{self.fdt_size or 0:#x} ends beyond the 52-bit "
                "guest-physical space",
            )

    @classmethod
    def from_mapping(cls, data: Any) -> BootSpec:
        """A boot spec from a mapping of its fields (unknown keys are refused)."""
        return from_mapping(cls, data, BOOT_SPEC_FIELDS)


BOOT_SPEC_FIELDS = ("arch", "entry", "x86_mode", "stack", "registers", "boot_tables", "fdt_address", "fdt_size")

#: EAX at a Multiboot v1 entry: how the machine recognises a Multiboot boot.
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002


def is_multiboot(spec: BootSpec) -> bool:
    """Whether ``spec`` is a Multiboot v1 hand-off (protected mode, EAX = the magic).

    Here rather than in :mod:`pyvmm.machine.legacy_firmware`, which boots such
    kernels: every x86 boot asks, and only some load the firmware (start-up time).
    """
    registers = {name.lower(): value for name, value in spec.registers.items()}
    magic = registers.get("rax", registers.get("eax"))
    return spec.x86_mode is X86Mode.PROTECTED and magic == MULTIBOOT_BOOTLOADER_MAGIC


@lean_dataclass(slots=True)
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


@lean_dataclass(slots=True)
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
