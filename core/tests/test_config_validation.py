"""Every validation error of the boundary models, through the API a VMM uses.

Through ``Backend``/``Vm`` a bad value is a :class:`ConfigError`; on the record
itself it is a :class:`~pyvmm.records.RecordError` (a ConfigError too) whose
``fields`` name the fields at fault.  Either way the message names the field.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from coretests_support import MakeBackend

from pyvmm.boot import BootSpec, X86Mode
from pyvmm.capabilities import Capability
from pyvmm.config import MAX_GUEST_PHYS, Arch, MemoryRegionSpec, VmConfig, parse_size
from pyvmm.errors import ConfigError, PyvmmError
from pyvmm.records import RecordError
from pyvmm.vm import Backend, Vm


@pytest.fixture
def backend(make_backend: MakeBackend) -> Backend:
    return make_backend([Capability.MULTI_VCPU])[1]


@pytest.fixture
def vm(backend: Backend) -> Iterator[Vm]:
    with backend.create_vm() as vm:
        yield vm


@pytest.fixture
def arm_vm(backend: Backend) -> Iterator[Vm]:
    with backend.create_vm({"arch": "aarch64"}) as vm:
        yield vm


# --- VmConfig ---------------------------------------------------------------------

VM_CONFIG_ERRORS = [
    ({"vcpus": 0}, "vcpus"),
    ({"vcpus": 2000}, "vcpus"),
    ({"vcpus": "many"}, "vcpus"),
    ({"arch": "sparc64"}, "arch"),
    ({"ipa_bits": 31}, "ipa_bits"),
    ({"ipa_bits": 53}, "ipa_bits"),
    ({"protection": "sort-of"}, "protection"),
    ({"colour": "red"}, "colour"),
]
VM_CONFIG_IDS = ["vcpus_0", "vcpus_2000", "vcpus_str", "arch", "ipa_bits_31", "ipa_bits_53", "protection", "extra"]


@pytest.mark.parametrize(("config", "field"), VM_CONFIG_ERRORS, ids=VM_CONFIG_IDS)
def test_vm_config_errors_via_backend(make_backend: MakeBackend, config: dict[str, Any], field: str) -> None:
    test_backend, backend = make_backend([Capability.MULTI_VCPU])
    with pytest.raises(ConfigError) as info:
        backend.create_vm(config)
    assert str(info.value).startswith("invalid VM config: ")
    assert f"{field}:" in str(info.value)
    assert isinstance(info.value, ValueError)  # ConfigError is also a ValueError
    assert isinstance(info.value.__cause__, RecordError)
    assert info.value.__cause__.fields == (field,)
    assert test_backend.calls == []


@pytest.mark.parametrize(("config", "field"), VM_CONFIG_ERRORS, ids=VM_CONFIG_IDS)
def test_vm_config_errors_on_the_model(config: dict[str, Any], field: str) -> None:
    with pytest.raises(RecordError) as info:
        VmConfig.from_mapping(config)
    assert info.value.fields == (field,)


def test_vm_config_limits_accepted(backend: Backend) -> None:
    for vcpus in (1, 1024):
        assert backend.create_vm({"vcpus": vcpus}).config.vcpus == vcpus
    for bits in (32, 52):
        assert VmConfig(ipa_bits=bits).ipa_bits == bits
    assert backend.create_vm(VmConfig(arch=Arch.AARCH64)).arch is Arch.AARCH64


def test_arch_the_backend_lacks(make_backend: MakeBackend) -> None:
    test_backend, backend = make_backend(arches=(Arch.X86_64,))
    with pytest.raises(ConfigError, match=r"^arch: backend 'contract-test' runs x86_64 guests, not aarch64$"):
        backend.create_vm({"arch": "aarch64"})
    assert test_backend.calls == []


def test_vcpu_index_out_of_range(backend: Backend) -> None:
    vm = backend.create_vm({"vcpus": 2})
    vm.create_vcpu()
    vm.create_vcpu()
    with pytest.raises(ConfigError, match="out of range"):
        vm.create_vcpu()
    with pytest.raises(ConfigError, match="already exists"):
        vm.create_vcpu(1)
    with pytest.raises(ConfigError, match="out of range"):
        vm.create_vcpu(-1)


# --- MemoryRegionSpec ---------------------------------------------------------------

REGION_ERRORS = [
    (-0x1000, 0x1000, "guest_phys_addr"),
    (0x1234, 0x1000, "guest_phys_addr"),
    (MAX_GUEST_PHYS, 0x1000, "guest_phys_addr"),
    (0, 0, "size"),
    (0, -0x1000, "size"),
    (0, 0x1001, "size"),
    (0, "12 parsecs", "size"),
    (0, "1.5G", "size"),
    (0, True, "size"),
    (0, None, "size"),
    (MAX_GUEST_PHYS - 0x1000, 0x2000, "52-bit"),
]
REGION_IDS = [
    "negative_addr",
    "unaligned_addr",
    "addr_beyond_52_bits",
    "size_0",
    "negative_size",
    "unaligned_size",
    "garbage_size_string",
    "fractional_size_string",
    "bool_size",
    "no_size",
    "end_beyond_52_bits",
]


@pytest.mark.parametrize(("addr", "size", "field"), REGION_ERRORS, ids=REGION_IDS)
def test_region_errors_via_vm(make_backend: MakeBackend, addr: int, size: Any, field: str) -> None:
    test_backend, backend = make_backend()
    vm = backend.create_vm()
    with pytest.raises(ConfigError) as info:
        vm.add_memory(addr, size)
    assert str(info.value).startswith("invalid memory region: ")
    assert field in str(info.value)
    assert len(vm.memory) == 0
    assert "pyvmm_map_memory" not in test_backend.hook_names()


@pytest.mark.parametrize(("addr", "size", "field"), REGION_ERRORS, ids=REGION_IDS)
def test_region_errors_on_the_model(addr: int, size: Any, field: str) -> None:
    with pytest.raises(RecordError) as info:
        MemoryRegionSpec(guest_phys_addr=addr, size=size)
    assert field in str(info.value)


def test_region_unknown_flag(vm: Vm) -> None:
    with pytest.raises(ConfigError, match="executable"):
        vm.add_memory(0, 0x1000, executable=True)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("2M", 2 << 20),
        ("1GiB", 1 << 30),
        ("64k", 64 << 10),
        ("4096", 4096),
        (" 8 MB ", 8 << 20),
        ("1t", 1 << 40),
        (8192, 8192),
    ],
)
def test_size_strings(vm: Vm, size: str | int, expected: int) -> None:
    assert parse_size(size) == expected
    assert MemoryRegionSpec.from_mapping({"guest_phys_addr": 0, "size": size}).size == expected
    if expected <= 1 << 30:  # through the VM too, as long as the mapping stays modest
        region = vm.add_memory(0x1_0000_0000, size)
        assert region.size == expected
        assert len(region.view()) == expected


def test_region_spec_object_is_accepted(vm: Vm) -> None:
    spec = MemoryRegionSpec.from_mapping({"guest_phys_addr": 0x2000, "size": "8K"})
    region = vm.add_memory(spec)
    assert region.spec is spec
    assert (region.guest_phys_addr, region.end) == (0x2000, 0x4000)


# --- BootSpec -----------------------------------------------------------------------

BOOT_ERRORS = [
    ({"arch": "x86_64", "x86_mode": "real", "entry": 1 << 32}, "entry", "real mode"),
    ({"arch": "x86_64", "x86_mode": "protected", "entry": 1 << 32}, "entry", "protected mode"),
    ({"arch": "x86_64", "entry": 0x1000, "boot_tables": 0x1800}, "boot_tables", "page-aligned"),
    ({"arch": "x86_64", "entry": 0x1000, "fdt_address": 0x10_0000, "fdt_size": 0x1000}, "fdt_address", "aarch64"),
    ({"arch": "x86_64", "entry": 0x1000, "x86_mode": "unreal"}, "x86_mode", "x86_mode"),
    ({"arch": "x86_64", "entry": -1}, "entry", "entry"),
    ({"arch": "x86_64", "entry": 1 << 64}, "entry", "entry"),
    ({"arch": "x86_64", "entry": 0x1000, "stack": -8}, "stack", "stack"),
    ({"arch": "x86_64", "entry": 0x1000, "registers": {"rax": "x"}}, "registers", "registers"),
    ({"arch": "x86_64", "entry": 0x1000, "kernel": "bzImage"}, "kernel", "kernel"),
    ({"arch": "aarch64", "entry": 0x4008_0000, "fdt_address": 0x4800_0000}, "fdt_address", "fdt_size"),
    ({"arch": "aarch64", "entry": 0x4008_0000, "fdt_size": 0x1000}, "fdt_address", "fdt_size"),
    ({"arch": "aarch64", "entry": 0x4008_0000, "fdt_address": 0x4800_0000, "fdt_size": 0}, "fdt_size", "fdt_size"),
    ({"entry": 0x1000}, "arch", "arch"),
]
BOOT_IDS = [
    "real_entry_4g",
    "protected_entry_4g",
    "unaligned_boot_tables",
    "fdt_on_x86",
    "bad_mode",
    "negative_entry",
    "entry_65_bits",
    "negative_stack",
    "register_not_int",
    "extra_field",
    "fdt_address_without_size",
    "fdt_size_without_address",
    "fdt_size_0",
    "no_arch",
]


@pytest.mark.parametrize(("spec", "field", "detail"), BOOT_ERRORS, ids=BOOT_IDS)
def test_boot_errors_via_vm(vm: Vm, arm_vm: Vm, spec: dict[str, Any], field: str, detail: str) -> None:
    target = arm_vm if spec.get("arch") == "aarch64" else vm
    with pytest.raises(ConfigError) as info:
        target.set_boot(spec)
    assert str(info.value).startswith("invalid boot spec: ")
    assert field in str(info.value)
    assert detail in str(info.value)


@pytest.mark.parametrize(("spec", "field", "detail"), BOOT_ERRORS, ids=BOOT_IDS)
def test_boot_errors_on_the_model(spec: dict[str, Any], field: str, detail: str) -> None:
    with pytest.raises(RecordError) as info:
        BootSpec.from_mapping(spec)
    assert field in str(info.value)


def test_boot_limits_accepted() -> None:
    top = (1 << 32) - 1
    assert BootSpec(arch=Arch.X86_64, entry=top, x86_mode=X86Mode.REAL).entry == top
    assert BootSpec(arch=Arch.X86_64, entry=top, x86_mode=X86Mode.PROTECTED).entry == top
    assert BootSpec(arch=Arch.X86_64, entry=top).entry == top  # long mode: inside the 4 GiB identity map
    with pytest.raises(RecordError, match="identity map"):
        BootSpec(arch=Arch.X86_64, entry=1 << 32)
    assert BootSpec(arch=Arch.AARCH64, entry=0, boot_tables=0x1800).boot_tables == 0x1800  # x86-only rule


def test_every_config_error_is_a_pyvmm_error() -> None:
    assert issubclass(ConfigError, PyvmmError)
    assert issubclass(ConfigError, ValueError)
