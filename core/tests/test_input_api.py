"""Out-of-range and mistyped values at the API boundary (issue 10, item 8): each
is refused with a pyvmm error (on a record itself, a
:class:`~pyvmm.records.RecordError`) that names the argument and the allowed range -- before
anything is written -- never a ``struct.error``, ``OverflowError`` or a silent
wrap."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from coretests_support import MakeBackend

from pyvmm.arch.aarch64 import CoreRegs, x_reg_id
from pyvmm.arch.x86_64 import CpuidEntry, DebugRegs, DescriptorTable, Fpu, Lapic, MsrEntry, Regs, Segment, Sregs, Xcr
from pyvmm.boot import Aarch64VcpuInit, BootSpec, X86VcpuInit
from pyvmm.capabilities import Capability
from pyvmm.config import MemoryRegionSpec, VmConfig, parse_size
from pyvmm.errors import ConfigError
from pyvmm.machine.config import CpuidOverride, MachineConfig
from pyvmm.records import RecordError
from pyvmm.vm import Vm

U64 = "0xffffffffffffffff"


@pytest.fixture
def vm(make_backend: MakeBackend) -> Iterator[Vm]:
    _, backend = make_backend([Capability.MULTI_VCPU])
    with backend.create_vm() as vm:
        yield vm


def refused(model: Any, values: dict[str, Any]) -> str:
    """The one-line message (``field: problem``) of the record's refusal."""
    with pytest.raises(RecordError) as info:
        model.from_mapping(values)
    return str(info.value)


# --- BootSpec ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("registers", "expected"),
    [
        ({"rax": -1}, f"-1 is out of range: must be from 0 to {U64}"),
        ({"rax": 1 << 64}, f"0x10000000000000000 is out of range: must be from 0 to {U64}"),
        ({"rbx": True}, f"must be an integer from 0 to {U64}, not True"),
        ({"rcx": 1.0}, "not 1.0"),
        ({"rdx": "5"}, "not '5'"),
        ({"ebx": 1 << 32}, "registers.ebx: 0x100000000 is out of range for a 32-bit register"),
    ],
)
def test_boot_register_values(registers: dict[str, Any], expected: str) -> None:
    text = refused(BootSpec, {"arch": "x86_64", "entry": 0x1000, "registers": registers})
    assert "registers" in text and expected in text


def test_a_bad_register_value_writes_nothing(vm: Vm) -> None:
    """The issue's reproduction: the boot tables were written, then the backend
    failed on -1.  Now the spec is refused before set_boot sees it."""
    vm.add_memory(0, "2M")
    with pytest.raises(ConfigError, match=r"invalid boot spec: registers\.rax: -1 is out of range"):
        vm.set_boot({"arch": "x86_64", "entry": 0x10_0000, "registers": {"rax": -1}})
    assert vm.memory.read(0x1000, 0x7000) == bytes(0x7000)  # no boot tables


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"entry": True}, "entry"),
        ({"entry": 0x1000, "stack": 1 << 64}, "stack"),
        ({"entry": 0x1000, "boot_tables": 1 << 52}, "boot_tables"),
        ({"entry": 0x1000, "boot_tables": 0xFFFF_F000}, "boot_tables"),  # 7 pages do not fit below 4 GiB
    ],
)
def test_boot_spec_numbers(values: dict[str, Any], field: str) -> None:
    assert field in refused(BootSpec, {"arch": "x86_64", **values})


def test_aarch64_device_tree_bounds() -> None:
    text = refused(BootSpec, {"arch": "aarch64", "entry": 0, "fdt_address": (1 << 52) - 0x1000, "fdt_size": 0x2000})
    assert "fdt_size" in text and "52-bit" in text
    assert "fdt_address" in refused(BootSpec, {"arch": "aarch64", "entry": 0, "fdt_address": -1, "fdt_size": 1})


# --- register records ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: Regs(rip=-1), f"Regs.rip: -1 is out of range: must be an integer from 0 to {U64}"),
        (lambda: Regs(rax=1 << 64), "Regs.rax: 18446744073709551616 is out of range"),
        (lambda: Regs(rbx=1.5), "Regs.rbx: 1.5 is out of range"),  # type: ignore[arg-type]
        (
            lambda: Segment(selector=0x1_0000),
            "Segment.selector: 65536 is out of range: must be an integer from 0 to 0xffff",
        ),
        (lambda: Segment(limit=-1), "Segment.limit"),
        (lambda: DescriptorTable(limit=0x1_0000), "DescriptorTable.limit"),
        (lambda: Sregs(cr3=-1), "Sregs.cr3"),
        (lambda: Fpu(mxcsr=1 << 32), "Fpu.mxcsr"),
        (lambda: Fpu(xmm=[b"\0" * 15] * 16), "Fpu.xmm[0]: must be 16 bytes, not 15 bytes"),
        (lambda: DebugRegs(db=(0, 0, 0, -1)), "DebugRegs.db[3]"),
        (lambda: MsrEntry(index=1 << 32), "MsrEntry.index"),
        (lambda: CpuidEntry(function=0, eax=1 << 32), "CpuidEntry.eax"),
        (lambda: Xcr(index=0, value=-1), "Xcr.value"),
        (lambda: Lapic(regs=b"\0" * 10), "Lapic.regs: must be 1024 bytes"),
        (lambda: CoreRegs(pc=-1), "CoreRegs.pc: -1 is out of range"),
        (lambda: CoreRegs(x=[0] * 30), "CoreRegs.x: must be a list of 31 registers"),
        (lambda: Aarch64VcpuInit(regs={x_reg_id(0): -1}), "Aarch64VcpuInit.regs: value -1 is out of range"),
        (lambda: x_reg_id(31), "X31 does not exist"),
    ],
)
def test_register_records_refuse_what_does_not_fit(build: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        build()
    assert expected in str(info.value)
    assert isinstance(info.value, ValueError)  # code that caught ValueError still does


def test_mutated_records_are_caught_by_check() -> None:
    """Fields are mutable, so backends (and Vcpu.set_regs) check again before use."""
    regs = Regs()
    regs.rip = -1
    with pytest.raises(ConfigError, match=r"Regs\.rip"):
        regs.check()
    sregs = Sregs()
    sregs.cs.base = 1 << 64
    with pytest.raises(ConfigError, match=r"Segment\.base"):
        sregs.check()
    init = X86VcpuInit(regs=Regs(), sregs=Sregs())
    init.regs.rflags = -2
    with pytest.raises(ConfigError, match=r"Regs\.rflags"):
        init.check()
    assert Regs(rip=(1 << 64) - 1).rip == (1 << 64) - 1  # the top value fits


# --- VmConfig, MemoryRegionSpec --------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"vcpus": True}, "vcpus: must be an integer from 1 to 1024, not True"),
        ({"vcpus": 2.0}, "not 2.0"),
        ({"ipa_bits": True}, "ipa_bits"),
        (
            {"backend_options": {"tss_address": 1 << 64}},
            "backend_options.tss_address: 0x10000000000000000 does not fit",
        ),
        ({"backend_options": {"identity_map_address": -(1 << 64)}}, "does not fit in 64 bits"),
    ],
)
def test_vm_config(values: dict[str, Any], expected: str) -> None:
    assert expected in refused(VmConfig, values)


def test_vm_config_through_the_backend_is_a_config_error(make_backend: MakeBackend) -> None:
    test_backend, backend = make_backend()
    with pytest.raises(ConfigError, match="tss_address"):
        backend.create_vm({"backend_options": {"tss_address": 1 << 64}})
    assert test_backend.calls == []
    assert VmConfig(backend_options={"tss_address": 0xFFFB_D000, "cpuid": "host"}).backend_options["cpuid"] == "host"


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"guest_phys_addr": True, "size": 0x1000}, "guest_phys_addr: must be an integer"),
        ({"guest_phys_addr": 0, "size": 4096.0}, "size: a size must be a whole number of bytes"),
        ({"guest_phys_addr": 0, "size": "9" * 30}, "not a size"),
        ({"guest_phys_addr": 0, "size": 0x1000, "read_only": 1}, "read_only: must be true or false, not 1"),
    ],
)
def test_memory_region_spec(values: dict[str, Any], expected: str) -> None:
    assert expected in refused(MemoryRegionSpec, values)


def test_size_strings_stay_bounded() -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size("1" * 100_000)  # no int() of a 100,000-digit number


# --- machine config ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"cpus": True}, "cpus: must be an integer from 1 to 254, not True"),
        ({"timeout": float("inf")}, "timeout: inf is out of range"),
        ({"timeout": float("nan")}, "timeout: nan is out of range"),
        ({"timeout": True}, "timeout: must be a finite number"),
        ({"stats": 1}, "stats: must be true or false"),
        ({"legacy_bios": "yes"}, "legacy_bios: must be true or false"),
        ({"kernel": "k\0", "append": "x"}, "kernel: must not contain a NUL character"),
        ({"serial": "out\0.log"}, "serial: must not contain a NUL character"),
        ({"kernel": "k", "append": "\udcff"}, "append: is not valid UTF-8"),
        ({"kernel": "k", "load_address": 1 << 64}, "load_address"),
    ],
)
def test_machine_config(values: dict[str, Any], expected: str) -> None:
    assert expected in refused(MachineConfig, values)


def test_cpuid_override() -> None:
    assert "function: must be an integer from 0 to 0xffffffff, not True" in refused(
        CpuidOverride, {"function": True, "register": "eax", "value": 1}
    )
    assert "mask: 0x100000000 is out of range" in refused(
        CpuidOverride, {"function": 1, "register": "eax", "mask": 1 << 32}
    )


def test_an_in_memory_image_with_a_bad_entry_writes_nothing() -> None:
    from pyvmm.boot import X86Mode
    from pyvmm.machine.images import GuestImage
    from pyvmm.memory import GuestMemory

    memory = GuestMemory()
    memory.insert(memory.allocate(MemoryRegionSpec(guest_phys_addr=0, size=0x20_0000)))
    try:
        bad_entry = GuestImage("bad", ((0x10_0000, b"\xf4"),), -1, X86Mode.LONG)
        with pytest.raises(ConfigError, match=r"bad: cannot start it: entry: -1 is out of range"):
            bad_entry.load(memory, ram_size=0x20_0000, cpus=1)
        second_misses = GuestImage("bad", ((0x10_0000, b"\xf4"), (0x40_0000, b"\xf4")), 0x10_0000)
        with pytest.raises(ConfigError, match="do not fit in guest RAM"):
            second_misses.load(memory, ram_size=0x20_0000, cpus=1)
        assert memory.read(0x10_0000, 1) == b"\0"  # the first segment was not written either
    finally:
        memory.close()


def test_out_of_range_registers_are_refused_before_the_backend_sees_them(make_backend: MakeBackend) -> None:
    """Issue 10: a mutated ``regs.rip = -1`` reached KVM and raised OverflowError."""
    from pyvmm.arch.x86_64 import MsrEntry, Regs
    from pyvmm.capabilities import Capability
    from pyvmm.errors import ConfigError

    test_backend, backend = make_backend([Capability.VCPU_REGISTERS, Capability.MSRS, Capability.GUEST_DEBUG])
    with backend.create_vm() as vm:
        vcpu = vm.create_vcpu()
        regs = Regs()
        regs.rip = -1
        with pytest.raises(ConfigError, match="rip"):
            vcpu.set_regs(regs)
        entry = MsrEntry(0x10, 0)
        entry.data = 1 << 64
        with pytest.raises(ConfigError):
            vcpu.set_msrs([entry])
        with pytest.raises(ConfigError, match="breakpoints"):
            vcpu.set_guest_debug(breakpoints=[-1])
        assert not {"pyvmm_set_vcpu_state", "pyvmm_set_msrs", "pyvmm_set_guest_debug"} & test_backend.hook_names()
