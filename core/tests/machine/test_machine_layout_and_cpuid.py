"""RAM layout around the MMIO hole, and the per-vCPU CPUID table."""

from __future__ import annotations

import pytest

from pyvmm.arch.x86_64 import CpuidEntry
from pyvmm.machine.config import CpuidOverride
from pyvmm.machine.cpuid import HYPERVISOR_PRESENT, lookup, vcpu_cpuid
from pyvmm.machine.layout import FOUR_GIB, LAPIC_BASE, MMIO_HOLE_START, in_mmio_hole, ram_ranges


def test_small_ram_is_one_range_from_zero() -> None:
    assert [(r.start, r.size) for r in ram_ranges(128 << 20)] == [(0, 128 << 20)]


def test_large_ram_skips_the_hole_and_continues_at_4_gib() -> None:
    ranges = ram_ranges(4 << 30)
    assert [(r.start, r.end) for r in ranges] == [(0, MMIO_HOLE_START), (FOUR_GIB, FOUR_GIB + (768 << 20))]
    assert sum(r.size for r in ranges) == 4 << 30
    assert MMIO_HOLE_START == 0xD000_0000
    assert in_mmio_hole(LAPIC_BASE)
    assert not in_mmio_hole(FOUR_GIB)


def test_unaligned_ram_is_refused() -> None:
    with pytest.raises(ValueError, match="multiple of 4096"):
        ram_ranges(4097)


SUPPORTED = [
    CpuidEntry(0, eax=0xD, ebx=0x68747541),
    CpuidEntry(1, eax=0x800F12, ebx=0x0001_0800, ecx=0x7ED8_320B),
    CpuidEntry(0xB, index=0, flags=1, edx=0),
    CpuidEntry(0xB, index=1, flags=1, edx=0),
]


def test_each_vcpu_gets_its_apic_id() -> None:
    table = vcpu_cpuid(SUPPORTED, 3)
    leaf1 = lookup(table, 1, 0)
    assert leaf1 is not None
    assert leaf1.ebx == 0x0301_0800
    assert [e.edx for e in table if e.function == 0xB] == [3, 3]
    assert SUPPORTED[1].ebx == 0x0001_0800  # the supported set is not modified


def test_the_guest_is_told_it_runs_under_a_hypervisor() -> None:
    """CPUID.1:ECX[31], which KVM's supported set leaves clear: without it Linux
    never reads the KVM leaves (no kvm-clock, no paravirtual spinlocks)."""
    assert not SUPPORTED[1].ecx & HYPERVISOR_PRESENT
    for index in (0, 1):
        leaf1 = lookup(vcpu_cpuid(SUPPORTED, index), 1, 0)
        assert leaf1 is not None
        assert leaf1.ecx == SUPPORTED[1].ecx | HYPERVISOR_PRESENT
    assert not SUPPORTED[1].ecx & HYPERVISOR_PRESENT  # the supported set is not modified


def test_an_override_can_hide_the_hypervisor() -> None:
    table = vcpu_cpuid(
        SUPPORTED, 0, [CpuidOverride(function=1, register="ecx", mask=~HYPERVISOR_PRESENT & 0xFFFF_FFFF)]
    )
    leaf1 = lookup(table, 1, 0)
    assert leaf1 is not None
    assert leaf1.ecx == SUPPORTED[1].ecx


def test_overrides_value_mask_and_both() -> None:
    overrides = [
        CpuidOverride(function=1, register="ecx", mask=0xFFDF_FFFF),  # no x2APIC
        CpuidOverride(function=0, register="ebx", value=0x756E6547),
        CpuidOverride(function=1, register="eax", mask=0xFFFF_0000, value=0x0F12 - 0x12),
    ]
    table = vcpu_cpuid(SUPPORTED, 0, overrides)
    leaf0, leaf1 = lookup(table, 0, 0), lookup(table, 1, 0)
    assert leaf0 is not None and leaf1 is not None
    assert leaf1.ecx == (0x7ED8_320B | HYPERVISOR_PRESENT) & ~(1 << 21)
    assert leaf0.ebx == 0x756E6547
    assert leaf1.eax == 0x0080_0F00


def test_an_override_adds_a_missing_indexed_leaf() -> None:
    table = vcpu_cpuid(SUPPORTED, 0, [CpuidOverride(function=0x4000_0001, index=2, register="eax", value=5)])
    added = lookup(table, 0x4000_0001, 2)
    assert added is not None
    assert (added.eax, added.flags) == (5, 1)
    assert lookup(table, 0x4000_0001, 0) is None
    assert lookup(table, 0xB, 1) is table[3]


def test_an_override_needs_value_or_mask() -> None:
    with pytest.raises(ValueError, match="value, mask, or both"):
        CpuidOverride(function=1, register="ecx")
