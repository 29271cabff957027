"""The arm64 KVM backend's host-independent parts, on any host: one-reg ids and
their sizes, the CoreRegs mapping, the KVM_IRQ_LINE encoding, capability
narrowing from KVM_CHECK_EXTENSION answers, the plugin's manifest against its
hooks, the board's device tree against what KVM emulates, and option errors
that must come before any ioctl."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from pyvmm.arch.aarch64 import MPIDR_EL1_ID, PC_ID, PSTATE_ID, SP_EL1_ID, SP_ID, CoreRegs, MpState, x_reg_id
from pyvmm.capabilities import Capability
from pyvmm.config import VmConfig
from pyvmm.errors import ConfigError
from pyvmm.machine import virt
from pyvmm.machine.devicetree import GIC_PPI, IRQ_TYPE_LEVEL_HIGH, build_fdt, read_fdt
from pyvmm.machine.loaders.arm64 import Chosen
from pyvmm.plugins import PluginRegistry
from pyvmm.testing.conformance import programs_aarch64 as p
from pyvmm_kvm import arm64_plugin, arm64_regs, arm64_vm, host_arch
from pyvmm_kvm import arm64_uapi as a
from pyvmm_kvm import bindings as k
from pyvmm_kvm import plugin as kvm_plugin
from pyvmm_kvm.arm64_vgic import ppi_irq_line, spi_irq_line
from pyvmm_kvm.arm64_vm import KvmArm64Vm
from pyvmm_kvm.manifest import KVM_CAP_MP_STATE

EL1H = 0x3C5
EL1T = 0x3C4
EL0T = 0x0


# --- one-reg ids ---------------------------------------------------------------------


def test_core_and_system_register_ids_are_kvms() -> None:
    # Values from the arm64 uapi: KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE
    # | the u32 offset into struct kvm_regs; sysregs op0:op1:CRn:CRm:op2 in bits 0-15.
    assert x_reg_id(0) == 0x6030_0000_0010_0000
    assert x_reg_id(30) == 0x6030_0000_0010_003C
    assert SP_ID == 0x6030_0000_0010_003E
    assert PC_ID == 0x6030_0000_0010_0040
    assert PSTATE_ID == 0x6030_0000_0010_0042
    assert SP_EL1_ID == 0x6030_0000_0010_0044
    assert MPIDR_EL1_ID == 0x6030_0000_0013_C005
    assert a.KVM_REG_ARM_PSCI_VERSION == 0x6030_0000_0014_0000


def test_register_size_comes_from_the_id() -> None:
    assert arm64_regs.reg_size(PC_ID) == 8
    assert arm64_regs.reg_size(k.KVM_REG_ARM64 | k.KVM_REG_SIZE_U32 | k.KVM_REG_ARM_CORE | 0x48) == 4
    assert arm64_regs.reg_size(k.KVM_REG_ARM64 | k.KVM_REG_SIZE_U128 | k.KVM_REG_ARM_CORE | 0x54) == 16


@pytest.mark.parametrize(
    ("reg_id", "match"),
    [
        (k.KVM_REG_X86 | k.KVM_REG_SIZE_U64, "not an arm64"),
        (k.KVM_REG_ARM64 | 0x00F0_0000_0000_0000, "size field"),
        (1 << 64, "64-bit"),
        (-1, "64-bit"),
        (True, "64-bit"),
    ],
)
def test_bad_register_ids_are_refused(reg_id: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        arm64_regs.reg_size(reg_id)


# --- CoreRegs over one-reg ---------------------------------------------------------------


class RegStore:
    """A vCPU's registers as a dict, recording the order of writes."""

    def __init__(self, values: dict[int, int]) -> None:
        self.values = dict(values)
        self.writes: list[int] = []

    def get(self, reg_id: int) -> int:
        return self.values[reg_id]

    def put(self, reg_id: int, value: int) -> None:
        self.writes.append(reg_id)
        self.values[reg_id] = value


@pytest.mark.parametrize(("pstate", "sp_id"), [(EL1H, SP_EL1_ID), (EL1T, SP_ID), (EL0T, SP_ID)])
def test_sp_is_the_stack_pointer_in_use(pstate: int, sp_id: int) -> None:
    assert arm64_regs.stack_pointer_id(pstate) == sp_id
    values = {reg: n for n, reg in enumerate(arm64_regs.X_IDS)}
    values |= {SP_ID: 0xE0, SP_EL1_ID: 0xE1, PC_ID: 0x4008_0000, PSTATE_ID: pstate}
    regs = arm64_regs.read_core_regs(RegStore(values).get)
    assert regs.x == list(range(31))
    assert regs.sp == values[sp_id]
    assert (regs.pc, regs.pstate) == (0x4008_0000, pstate)


def test_write_core_regs_sets_pstate_first_then_the_right_sp() -> None:
    store = RegStore({})
    regs = CoreRegs(x=[n * 3 for n in range(31)], sp=0x8000, pc=0x4008_0010, pstate=EL1T)
    arm64_regs.write_core_regs(regs, store.put)
    assert store.writes[0] == PSTATE_ID
    assert store.values[SP_ID] == 0x8000 and SP_EL1_ID not in store.values
    assert arm64_regs.read_core_regs(store.get) == regs


def test_write_core_regs_refuses_a_bad_value_before_writing() -> None:
    store = RegStore({})
    regs = CoreRegs()
    regs.pc = 1 << 64
    with pytest.raises(ConfigError, match="pc"):
        arm64_regs.write_core_regs(regs, store.put)
    assert store.writes == []


def test_boot_registers_go_pstate_first() -> None:
    order = arm64_regs.boot_order({x_reg_id(0): 1, PC_ID: 2, PSTATE_ID: EL1H, SP_EL1_ID: 3})
    assert order[0] == (PSTATE_ID, EL1H)
    assert sorted(order) == sorted({x_reg_id(0): 1, PC_ID: 2, PSTATE_ID: EL1H, SP_EL1_ID: 3}.items())
    with pytest.raises(ConfigError, match="not an arm64"):
        arm64_regs.boot_order({k.KVM_REG_X86 | k.KVM_REG_SIZE_U64: 0})


# --- KVM_IRQ_LINE ---------------------------------------------------------------------


def test_spi_lines_are_intid_plus_32_of_type_spi() -> None:
    assert spi_irq_line(0) == 0x0100_0020
    assert spi_irq_line(1) == 0x0100_0021
    assert spi_irq_line(987) == 0x0100_0000 | 1019


def test_ppi_lines_split_the_vcpu_index_over_two_fields() -> None:
    # vCPU 0x123: low byte 0x23 in bits 16-23, the rest (1) in bits 28-31.
    assert ppi_irq_line(0x123, 11) == 0x1 << 28 | 0x2 << 24 | 0x23 << 16 | 27


@pytest.mark.parametrize("spi", [-1, 988, True])
def test_spi_out_of_range_is_refused(spi: Any) -> None:
    with pytest.raises(ConfigError, match="SPI"):
        spi_irq_line(spi)


def test_ppi_out_of_range_is_refused() -> None:
    with pytest.raises(ConfigError, match="PPI"):
        ppi_irq_line(0, 16)
    with pytest.raises(ConfigError, match="vCPU"):
        ppi_irq_line(4096, 0)


# --- capabilities narrowed to what KVM answers ---------------------------------------------


def answers(*absent: int) -> Any:
    return lambda extension: 0 if extension in absent else 1


def test_a_full_kvm_keeps_every_capability() -> None:
    availability = arm64_plugin.availability(answers(), machine="aarch64")
    assert availability.available
    assert availability.missing_capabilities == ()


def test_without_an_irqchip_every_interrupt_capability_goes() -> None:
    missing = arm64_plugin.missing_capabilities(answers(k.KVM_CAP_IRQCHIP))
    assert set(missing) == {
        Capability.IRQCHIP,
        Capability.IRQ_LINE,
        Capability.IRQFD,
        Capability.IRQFD_REMOVAL,
        Capability.IRQFD_RESAMPLE,
        Capability.VM_STATE,
    }


def test_each_extension_narrows_only_its_capabilities() -> None:
    assert arm64_plugin.missing_capabilities(answers(k.KVM_CAP_IRQFD_RESAMPLE)) == (Capability.IRQFD_RESAMPLE,)
    assert arm64_plugin.missing_capabilities(answers(k.KVM_CAP_READONLY_MEM)) == (Capability.READ_ONLY_MEMORY,)
    assert arm64_plugin.missing_capabilities(answers(k.KVM_CAP_IMMEDIATE_EXIT)) == (Capability.IMMEDIATE_EXIT,)
    without_devices = arm64_plugin.missing_capabilities(answers(k.KVM_CAP_DEVICE_CTRL))
    assert without_devices == (Capability.IRQCHIP, Capability.VM_STATE)
    assert arm64_plugin.missing_capabilities(answers(KVM_CAP_MP_STATE)) == (Capability.MP_STATE,)


def test_without_psci_0_2_the_backend_is_unavailable() -> None:
    availability = arm64_plugin.availability(answers(k.KVM_CAP_ARM_PSCI_0_2), machine="aarch64")
    assert not availability.available
    assert "PSCI 0.2" in availability.reason


def test_on_another_host_the_arm64_backend_says_why_not() -> None:
    availability = arm64_plugin.availability(answers(), machine="x86_64")
    assert not availability.available
    assert "x86_64" in availability.reason


def test_the_arm64_plugin_passes_the_contract_checks() -> None:
    # Registration refuses a manifest whose capabilities and hooks disagree.
    plugin = PluginRegistry().register(arm64_plugin.plugin)
    assert set(plugin.manifest.guest_arches) == {virt.Arch.AARCH64}
    declared = plugin.manifest.capability_set
    assert Capability.VM_START in declared and Capability.PORT_IO not in declared


def test_the_entry_point_serves_this_hosts_architecture() -> None:
    plugin = PluginRegistry().register(kvm_plugin.plugin)
    expected = virt.Arch.AARCH64 if host_arch.host_is_arm64() else virt.Arch.X86_64
    assert plugin.manifest.guest_arches == (expected,)


# --- the board's device tree against what KVM emulates ------------------------------------


def _cells(raw: bytes) -> list[int]:
    return list(struct.unpack(f">{len(raw) // 4}I", raw))


def test_the_board_describes_the_vgic_where_kvm_puts_it() -> None:
    tree = read_fdt(build_fdt(virt.board_tree(2, 64 << 20), Chosen(bootargs="")))
    gic = tree[f"/intc@{virt.GIC_DISTRIBUTOR_BASE:x}"]
    cells = _cells(gic["reg"])
    regs = [cells[i] << 32 | cells[i + 1] for i in range(0, len(cells), 2)]
    # Where the backend places the vGIC by default, with KVM's frame sizes (a
    # 64 KiB distributor, 128 KiB of redistributor per vCPU).
    placed = [arm64_vm.GIC_DISTRIBUTOR_BASE, arm64_vm.GIC_REDISTRIBUTOR_BASE]
    assert regs == [placed[0], a.KVM_VGIC_V3_DIST_SIZE, placed[1], 2 * a.KVM_VGIC_V3_REDIST_SIZE]
    assert gic["compatible"].startswith(b"arm,gic-v3\0")


def test_the_board_gives_the_timer_kvms_interrupts() -> None:
    tree = read_fdt(build_fdt(virt.board_tree(1, 64 << 20), Chosen(bootargs="")))
    cells = _cells(tree["/timer"]["interrupts"])
    # arm,armv8-timer order: secure physical, non-secure physical, virtual, hypervisor.
    specifiers = [tuple(cells[i : i + 3]) for i in range(0, len(cells), 3)]
    assert specifiers[1] == (GIC_PPI, a.PTIMER_INTID - 16, IRQ_TYPE_LEVEL_HIGH)
    assert specifiers[2] == (GIC_PPI, a.VTIMER_INTID - 16, IRQ_TYPE_LEVEL_HIGH)


# --- options checked before any ioctl ---------------------------------------------------------


class NoIoctlHost:
    def ioctl(self, *args: object, **kwargs: object) -> int:
        raise AssertionError(f"ioctl {args!r} made for a VM that was refused")


class FakeSystem:
    host = NoIoctlHost()

    def check_extension(self, extension: int) -> int:
        return 40 if extension == k.KVM_CAP_ARM_VM_IPA_SIZE else 1

    def max_vcpus(self) -> int:
        return 8


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"gic_distributor": 0x0800_1000}, "64 KiB-aligned"),
        ({"gic_redistributors": -0x10000}, "64 KiB-aligned"),
        ({"ipa_bits": 48}, "at most 40"),
        ({"ipa_bits": 12}, "from 32 to 52"),
        ({"colour": "blue"}, "unknown KVM option"),
    ],
)
def test_bad_options_are_refused_before_the_vm_exists(options: dict[str, object], match: str) -> None:
    config = VmConfig.from_mapping({"arch": "aarch64", "backend_options": options})
    with pytest.raises(ConfigError, match=match):
        KvmArm64Vm(FakeSystem(), config)  # type: ignore[arg-type]


def test_too_many_vcpus_are_refused_before_the_vm_exists() -> None:
    config = VmConfig.from_mapping({"arch": "aarch64", "vcpus": 9})
    with pytest.raises(ConfigError, match="at most 8"):
        KvmArm64Vm(FakeSystem(), config)  # type: ignore[arg-type]


# --- the arm64 guest programs of the KVM tests match their source -----------------------------


def test_guest_programs_match_their_source() -> None:
    import test_kvm_arm64_guests as guests

    if p.aarch64_assembler() is None:
        pytest.skip("no aarch64 assembler (apt-get install binutils-aarch64-linux-gnu)")
    for program in guests.PROGRAMS:
        assert program.assembled() == program.code, program.name


def test_core_mp_states_are_kvms_numbers() -> None:
    """The arm64 MP states a snapshot records are KVM's own (checked against the uapi by test_arm64_layout)."""
    assert (MpState.RUNNABLE, MpState.STOPPED, MpState.SUSPENDED) == (
        k.KVM_MP_STATE_RUNNABLE,
        k.KVM_MP_STATE_STOPPED,
        a.KVM_MP_STATE_SUSPENDED,
    )
