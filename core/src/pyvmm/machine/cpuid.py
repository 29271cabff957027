"""The CPUID table each vCPU gets: the backend's supported set (everything the
hypervisor can expose, roughly QEMU's ``-cpu host``), with the vCPU's own APIC
id filled in, the hypervisor-present bit set, and the user's overrides applied
on top.

The hypervisor-present bit (leaf 1, ECX bit 31) is the VMM's to set: the
supported set a hypervisor reports may leave it clear (Linux's in-kernel
hypervisor does; its CPUID code masks leaf 1 ECX without it), which is why
QEMU (target/i386/cpu.c, ``CPUID_EXT_HYPERVISOR``) and the other VMMs on it
set it themselves.  A guest only looks for the hypervisor's
leaves at 0x40000000 when the bit is set, so without it Linux runs as on bare
metal: no paravirtual clock and, with several vCPUs, native spinlocks, whose
waiter spins with interrupts off for as long as the lock's holder is
descheduled on the host, where paravirtual spinlocks halt the waiter and let
the host run the holder.  An override can still clear it."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from pyvmm.arch.x86_64 import CpuidEntry
from pyvmm.machine.config import CpuidOverride

#: CpuidEntry.flags bit: the leaf is indexed by ECX.
SIGNIFICANT_INDEX = 0x1
#: Leaves that carry the x2APIC id in EDX (extended topology).
TOPOLOGY_LEAVES = (0xB, 0x1F)
#: Leaf 1 ECX: "running under a hypervisor" (reserved as 0 on real CPUs).
HYPERVISOR_PRESENT = 1 << 31


def vcpu_cpuid(
    supported: Iterable[CpuidEntry], index: int, overrides: Iterable[CpuidOverride] = ()
) -> list[CpuidEntry]:
    """A fresh table for vCPU ``index``; ``supported`` is left untouched."""
    entries = [dataclasses.replace(entry) for entry in supported]
    for entry in entries:
        if entry.function == 1:
            entry.ebx = (entry.ebx & 0x00FF_FFFF) | (index & 0xFF) << 24
            entry.ecx |= HYPERVISOR_PRESENT
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
