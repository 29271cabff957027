"""The CPUID table each vCPU gets: the backend's supported set (everything the
hypervisor can expose, roughly QEMU's ``-cpu host``), with the vCPU's own APIC
id filled in and the user's overrides applied on top."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from pyvmm.arch.x86_64 import CpuidEntry
from pyvmm.machine.config import CpuidOverride

#: CpuidEntry.flags bit: the leaf is indexed by ECX.
SIGNIFICANT_INDEX = 0x1
#: Leaves that carry the x2APIC id in EDX (extended topology).
TOPOLOGY_LEAVES = (0xB, 0x1F)


def vcpu_cpuid(
    supported: Iterable[CpuidEntry], index: int, overrides: Iterable[CpuidOverride] = ()
) -> list[CpuidEntry]:
    """A fresh table for vCPU ``index``; ``supported`` is left untouched."""
    entries = [dataclasses.replace(entry) for entry in supported]
    for entry in entries:
        if entry.function == 1:
            entry.ebx = (entry.ebx & 0x00FF_FFFF) | (index & 0xFF) << 24
        elif entry.function in TOPOLOGY_LEAVES:
            entry.edx = index
    for override in overrides:
        target = _find(entries, override.function, override.index)
        if target is None:
            target = CpuidEntry(override.function, override.index, SIGNIFICANT_INDEX if override.index else 0)
            entries.append(target)
        setattr(target, override.reg, override.apply(getattr(target, override.reg)))
    return entries


def _find(entries: list[CpuidEntry], function: int, index: int) -> CpuidEntry | None:
    for entry in entries:
        if entry.function == function and (entry.index == index or not entry.flags & SIGNIFICANT_INDEX):
            return entry
    return None


def lookup(entries: list[CpuidEntry], function: int, index: int) -> CpuidEntry | None:
    """The entry a guest's CPUID(function, index) reads, for backends that forward
    CPUID to the VMM."""
    return _find(entries, function, index)
