"""The plugin's own behaviour on the model: what it declares, the calls it makes
(and in which order), the registers it sets and never reads, the device tree's
location, protected VMs, the vGIC and interrupt lines, and bad input refused
before anything is created."""

from __future__ import annotations

import ctypes
import mmap
import struct

import pytest
from booting import booted, powers_off

from pyvmm.arch.aarch64 import MPIDR_EL1_ID, PC_ID, PSTATE_EL1H_DAIF, PSTATE_ID, REG_SIZE_U128, core_reg_id, x_reg_id
from pyvmm.boot import Aarch64VcpuInit, BootSpec
from pyvmm.capabilities import Capability
from pyvmm.config import PAGE_SIZE, Arch
from pyvmm.errors import ConfigError, UnsupportedCapability
from pyvmm.host import Event
from pyvmm.testing.conformance import programs_aarch64 as p
from pyvmm.vcpu_state import IoEventAddress, StateKind
from pyvmm.vm import Backend
from pyvmm_geniezone import bindings as g
from pyvmm_geniezone import model as gm
from pyvmm_geniezone.plugin import CAPABILITIES, manifest
from pyvmm_geniezone.vma import claim_own_vma, vma_holding


def vm_calls(model: gm.GenieZoneModel) -> list[str]:
    return [c.name for c in model.calls if c.op == "ioctl" and c.target in ("gzvm-vm", "gzvm-vcpu")]


def test_declares_no_register_access(geniezone: Backend) -> None:
    assert Capability.VCPU_REGISTERS not in CAPABILITIES
    assert Capability.IRQFD_RESAMPLE not in CAPABILITIES
    assert manifest().guest_arches == (Arch.AARCH64,)
    with booted(geniezone, p.PSCI_OFF) as (_, (vcpu,)), pytest.raises(UnsupportedCapability):
        vcpu.get_state(StateKind.CORE_REGS)


def test_boot_sets_core_registers_and_hands_over_the_device_tree(geniezone: Backend, model: gm.GenieZoneModel) -> None:
    with booted(geniezone, p.PSCI_OFF) as (_, (vcpu,)):
        powers_off(vcpu)
    set_regs = [c for c in model.calls if c.name == "GZVM_SET_ONE_REG"]
    assert "GZVM_GET_ONE_REG" not in vm_calls(model), "registers are never read back"
    names = vm_calls(model)
    assert names.index("GZVM_SET_DTB_CONFIG") < names.index("GZVM_SET_ONE_REG") < names.index("GZVM_RUN")
    assert len(set_regs) == 6, "PC, PSTATE and X0..X3"


def test_the_hypervisor_gets_the_boot_registers(geniezone: Backend, model: gm.GenieZoneModel) -> None:
    with booted(geniezone, p.PSCI_OFF) as (vm, (vcpu,)):
        hv_vcpu = model.vms[0].vcpus[0].hv
        assert hv_vcpu.registers == {
            PC_ID: p.CODE_ADDRESS,
            PSTATE_ID: PSTATE_EL1H_DAIF,
            x_reg_id(0): p.FDT_ADDRESS,
            x_reg_id(1): 0,
            x_reg_id(2): 0,
            x_reg_id(3): 0,
        }
        fdt_size = struct.unpack(">I", p.minimal_fdt()[4:8])[0]
        assert model.vms[0].dtb == (p.FDT_ADDRESS, fdt_size), "the device tree's own totalsize"
        assert vm.handle.dtb == (p.FDT_ADDRESS, fdt_size)
        powers_off(vcpu)


def test_a_guest_without_a_device_tree_hands_none_over(geniezone: Backend, model: gm.GenieZoneModel) -> None:
    with geniezone.create_vm({"arch": "aarch64"}) as vm:
        vm.add_memory(p.RAM_BASE, p.RAM_SIZE, contents={p.CODE_ADDRESS: p.PSCI_OFF.code})
        vcpu = vm.create_vcpu()
        vm.boot(BootSpec(arch=Arch.AARCH64, entry=p.CODE_ADDRESS, registers={"x0": p.RAM_BASE + 0x1000}))
        powers_off(vcpu)
    assert "GZVM_SET_DTB_CONFIG" not in vm_calls(model)


def test_memory_slots_are_guest_memory_in_their_own_vma(geniezone: Backend, model: gm.GenieZoneModel) -> None:
    with geniezone.create_vm({"arch": "aarch64"}) as vm:
        first = vm.add_memory(p.RAM_BASE, p.RAM_SIZE)
        second = vm.add_memory(p.RAM_BASE + p.RAM_SIZE, 3 * PAGE_SIZE)
        slots = model.vms[0].slots
        assert [(s.gpa, s.size, s.flags) for s in slots.values()] == [
            (p.RAM_BASE, p.RAM_SIZE, g.GZVM_USER_MEM_REGION_GUEST_MEM),
            (p.RAM_BASE + p.RAM_SIZE, 3 * PAGE_SIZE, g.GZVM_USER_MEM_REGION_GUEST_MEM),
        ]
        for region in (first, second):
            assert vma_holding(region.host_addr) == (region.host_addr, region.host_addr + region.size)


def test_eleven_slots_are_refused_before_the_driver(geniezone: Backend, model: gm.GenieZoneModel) -> None:
    with geniezone.create_vm({"arch": "aarch64"}) as vm:
        for n in range(g.GZVM_MAX_MEM_REGION):
            vm.add_memory(p.RAM_BASE + n * PAGE_SIZE, PAGE_SIZE)
        with pytest.raises(ConfigError, match="10 memory slots"):
            vm.add_memory(p.RAM_BASE + 10 * PAGE_SIZE, PAGE_SIZE)
    assert vm_calls(model).count("GZVM_SET_USER_MEMORY_REGION") == 10


def test_claim_splits_adjacent_ranges_into_their_own_vmas() -> None:
    area = mmap.mmap(-1, 4 * PAGE_SIZE)
    anchor = ctypes.c_char.from_buffer(area)
    base = ctypes.addressof(anchor)
    del anchor
    claim_own_vma(base + PAGE_SIZE, PAGE_SIZE, "pyvmm-test-a")
    claim_own_vma(base + 2 * PAGE_SIZE, PAGE_SIZE, "pyvmm-test-b")
    assert vma_holding(base + PAGE_SIZE) == (base + PAGE_SIZE, base + 2 * PAGE_SIZE)
    assert vma_holding(base + 2 * PAGE_SIZE) == (base + 2 * PAGE_SIZE, base + 3 * PAGE_SIZE)
    area.close()


def test_claim_refuses_a_range_that_is_not_mapped() -> None:
    area = mmap.mmap(-1, PAGE_SIZE)
    anchor = ctypes.c_char.from_buffer(area)
    base = ctypes.addressof(anchor)
    del anchor
    area.close()
    with pytest.raises(ConfigError, match="no mapping"):
        claim_own_vma(base, PAGE_SIZE, "pyvmm-test-gone")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"vcpus": 9}, "at most 8 vCPUs"),
        ({"backend_options": {"turbo": True}}, "unknown GenieZone option"),
        ({"backend_options": {"firmware": {"address": 0x4000_0000}}}, "only a protected VM"),
        ({"ipa_bits": 52}, "48-bit guest-physical"),
        ({"backend_options": {"gic": {"distributor": "x"}}}, "backend_options.gic"),
    ],
)
def test_bad_configuration_creates_no_vm(
    geniezone: Backend, model: gm.GenieZoneModel, config: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        geniezone.create_vm({"arch": "aarch64", **config})
    assert "GZVM_CREATE_VM" not in [c.name for c in model.calls]


def test_vms_and_vcpus_leave_no_fd_behind(geniezone: Backend, model: gm.GenieZoneModel) -> None:
    with booted(geniezone, p.PSCI_OFF, vcpus=2, irqchip=True) as (_, (vcpu, _second)):
        powers_off(vcpu)
    assert [f.kind for f in model.open_fds()] == ["gzvm"], "only the shared /dev/gzvm stays open"
    model.assert_no_rejections()


def test_protected_vm_with_firmware(model: gm.GenieZoneModel) -> None:
    model.pvmfw_size = 0x20_0000
    from conftest import geniezone_backend

    backend = geniezone_backend()
    firmware = p.RAM_BASE + p.RAM_SIZE
    config = {"arch": "aarch64", "protection": "protected", "backend_options": {"firmware": {"address": firmware}}}
    with backend.create_vm(config) as vm:
        vm.add_memory(p.RAM_BASE, p.RAM_SIZE)
        vm.add_memory(firmware, 0x20_0000)
        vm.create_vcpu()
        vm_model = model.vms[0]
        assert vm_model.protected and vm_model.pvmfw_gpa == firmware
        assert [s.flags for s in vm_model.slots.values()] == [
            g.GZVM_USER_MEM_REGION_GUEST_MEM,
            g.GZVM_USER_MEM_REGION_PROTECT_FW,
        ]
    enable_caps = [c for c in model.calls if c.name == "GZVM_ENABLE_CAP"]
    assert len(enable_caps) == 2, "GET_PVMFW_SIZE, then SET_PVMFW_GPA"
    model.assert_no_rejections()


def test_protected_vm_without_firmware(geniezone: Backend, model: gm.GenieZoneModel) -> None:
    with geniezone.create_vm({"arch": "aarch64", "protection": "protected", "vcpus": 2}) as vm:
        vm.add_memory(p.RAM_BASE, p.RAM_SIZE)
        vm.create_vcpu()
        vm.create_vcpu()
        assert model.vms[0].protected and model.vms[0].pvmfw_gpa is None
    assert [c.name for c in model.calls].count("GZVM_ENABLE_CAP") == 1, "once, before the first vCPU"


def test_protected_vm_needs_the_hypervisors_firmware(model: gm.GenieZoneModel) -> None:
    model.pvmfw_size = 0
    from conftest import geniezone_backend

    config = {"arch": "aarch64", "protection": "protected", "backend_options": {"firmware": {"address": 0x5000_0000}}}
    with geniezone_backend().create_vm(config) as vm:
        vm.add_memory(p.RAM_BASE, p.RAM_SIZE)
        with pytest.raises(ConfigError, match="no protected-VM firmware"):
            vm.create_vcpu()
        assert not model.vms[0].vcpus, "no vCPU was created"


def test_the_vgic_goes_where_the_board_puts_it(geniezone: Backend, model: gm.GenieZoneModel) -> None:
    from pyvmm.machine.virt import GIC_DISTRIBUTOR_BASE, GIC_REDISTRIBUTOR_BASE

    with booted(geniezone, p.PSCI_OFF, irqchip=True) as (vm, (vcpu,)):
        devices = model.vms[0].devices
        assert devices == {
            gm.DEV_VGIC_V3_DIST: (GIC_DISTRIBUTOR_BASE, 0x1_0000),
            gm.DEV_VGIC_V3_REDIST: (GIC_REDISTRIBUTOR_BASE, 0x2_0000),
        }
        vm.set_irq_line(3, True)
        gic = model.vms[0].gic
        assert gic is not None and gic.spis[3].pending
        powers_off(vcpu)


def test_irqfds_are_edges_and_can_be_removed(geniezone: Backend, model: gm.GenieZoneModel) -> None:
    event = Event()
    with booted(geniezone, p.PSCI_OFF, irqchip=True) as (vm, (vcpu,)):
        with pytest.raises(ConfigError, match="level-triggered"):
            vm.register_irqfd(event, 4, level=True)
        vm.register_irqfd(event, 4)
        assert [(i.gsi, i.fd) for i in model.vms[0].irqfds] == [(4, event.fileno())]
        vm.unregister_irqfd(event, 4)
        assert model.vms[0].irqfds == []
        powers_off(vcpu)
    event.close()


def test_ioevents_are_mmio_only(geniezone: Backend, model: gm.GenieZoneModel) -> None:
    event = Event()
    with geniezone.create_vm({"arch": "aarch64"}) as vm:
        with pytest.raises(UnsupportedCapability):
            vm.register_ioevent(event, IoEventAddress.pio(0x3F8), length=1)
        vm.register_ioevent(event, IoEventAddress.mmio(0x0A00_0100), datamatch=9, length=2)
        (registered,) = model.vms[0].ioevents
        assert (registered.addr, registered.length, registered.datamatch, registered.wildcard) == (
            0x0A00_0100,
            2,
            9,
            False,
        )
    event.close()


@pytest.mark.parametrize(
    "reg_id",
    [MPIDR_EL1_ID, core_reg_id(2 * 36, REG_SIZE_U128)],
    ids=["system-register", "128-bit-core"],
)
def test_only_64_bit_core_registers_are_set(geniezone: Backend, model: gm.GenieZoneModel, reg_id: int) -> None:
    with geniezone.create_vm({"arch": "aarch64"}) as vm:
        vm.add_memory(p.RAM_BASE, p.RAM_SIZE)
        vcpu = vm.create_vcpu()
        with pytest.raises(ConfigError, match="64-bit core registers only"):
            vcpu.init(Aarch64VcpuInit(regs={PC_ID: p.CODE_ADDRESS, reg_id: 0}))
    assert "GZVM_SET_ONE_REG" not in vm_calls(model), "nothing was set"


def test_ioevents_match_writes_as_the_driver_does() -> None:
    from pyvmm_geniezone.ioevents import IoEvent, IoEvents

    events = IoEvents()
    exact = IoEvent(5, 0x1000, 4, 0x2A)
    events.add(exact)
    events.add(IoEvent(6, 0x2000, 0, None))
    events.add(IoEvent(7, 0x3000, 2, None))
    assert events.take_write(0x1000, (0x2A).to_bytes(4, "little"))
    assert not events.take_write(0x1000, (0x2B).to_bytes(4, "little")), "another value"
    assert not events.take_write(0x1000, (0x2A).to_bytes(8, "little")), "another length"
    assert events.take_write(0x2000, bytes(8)), "length 0: any write at the address"
    assert events.take_write(0x3000, b"\1\2") and not events.take_write(0x3000, b"\1"), "any value, its length"
    assert not events.take_write(0x1004, bytes(4)), "the address must be exact"
    events.remove(exact)
    assert not events.take_write(0x1000, (0x2A).to_bytes(4, "little"))


def test_slots_follow_the_host_page_size(
    geniezone: Backend, model: gm.GenieZoneModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver aligns slots to the kernel's page size, which on arm64 may be
    16 KiB: a guest address aligned to 4 KiB only is refused before the driver."""
    from pyvmm_geniezone import vm as gz_vm

    monkeypatch.setattr(gz_vm, "HOST_PAGE_SIZE", 16384)
    with geniezone.create_vm({"arch": "aarch64"}) as vm, pytest.raises(ConfigError, match="16 KiB pages"):
        vm.add_memory(0x4000_1000, 0x4000)
    assert not [c for c in model.calls if c.name == "GZVM_SET_USER_MEMORY_REGION"]
