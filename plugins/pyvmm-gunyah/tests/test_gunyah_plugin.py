"""pyvmm-gunyah through pyvmm's public API, on the driver model: the manifest,
and the calls each hook makes (asserted on the model's call log and state)."""

from __future__ import annotations

import errno
import struct
import types
from collections.abc import Iterator

import pytest
from gunyah_guests import write_device_tree

from pyvmm.boot import BootSpec
from pyvmm.capabilities import Capability
from pyvmm.config import Arch
from pyvmm.errors import (
    ConfigError,
    GuestMemoryError,
    HypervisorError,
    PluginContractError,
    UnsupportedCapability,
    VmStateError,
)
from pyvmm.exits import ExitKind, FailEntryExit, InterruptedExit, SystemEvent, SystemEventExit
from pyvmm.hookspecs import hookimpl
from pyvmm.host import Event
from pyvmm.machine.devicetree import DeviceTree, read_fdt
from pyvmm.plugins import PluginRegistry
from pyvmm.vcpu_state import IoEventAddress
from pyvmm.vm import Backend, Vm
from pyvmm_gunyah import model as gm
from pyvmm_gunyah.devicetree import GUNYAH_SIZE_MAX, VM_CONFIG
from pyvmm_gunyah.plugin import plugin

RAM = 0x8000_0000
RAM_SIZE = 0x20_0000
FDT = RAM + 0x10_0000
ENTRY = RAM + 0x1000

EXPECTED_CAPABILITIES = {
    Capability.HYPERVISOR_INITIALIZED_BOOT_CONTEXT,
    Capability.VM_START,
    Capability.IMMEDIATE_EXIT,
    Capability.USER_MEMORY,
    Capability.STATIC_SWIOTLB_ALLOCATION_REQUIRED,
    Capability.PROTECTED,
    Capability.IOEVENTS,
    Capability.IRQFD,
    Capability.MULTI_VCPU,
    Capability.DEVICE_TREE_NODES,
}


def ioctls(model: gm.GunyahModel, since: int = 0) -> list[str]:
    return [c.name for c in model.calls[since:] if c.op == "ioctl"]


def only_vm(model: gm.GunyahModel) -> gm.ModelVm:
    (vm,) = model.vms
    return vm


@pytest.fixture
def vm(gunyah: Backend, model: gm.GunyahModel) -> Iterator[Vm]:
    with gunyah.create_vm({"arch": "aarch64", "vcpus": 2}) as machine:
        machine.add_memory(RAM, RAM_SIZE)
        yield machine
    model.assert_no_rejections()


@pytest.fixture
def event() -> Iterator[Event]:
    made = Event()
    yield made
    made.close()


def boot_spec(**extra: object) -> BootSpec:
    return BootSpec.from_mapping({"arch": "aarch64", "entry": ENTRY, "fdt_address": FDT, "fdt_size": 0x800, **extra})


def boot(vm: Vm, **extra: object) -> None:
    """Write the device tree the resource manager reads, then boot."""
    write_device_tree(vm, FDT)
    vm.boot(boot_spec(**extra))


# --- manifest --------------------------------------------------------------------


def test_manifest() -> None:
    manifest = plugin.pyvmm_backend_info()
    assert manifest.name == "gunyah"
    assert manifest.host_os == ("linux",)
    assert manifest.guest_arches == (Arch.AARCH64,)
    assert set(manifest.capability_set) == EXPECTED_CAPABILITIES
    for absent in (
        Capability.VCPU_REGISTERS,
        Capability.DIRTY_LOG,
        Capability.READ_ONLY_MEMORY,
        Capability.MEMORY_REMOVAL,
        Capability.LATE_MEMORY,
        Capability.PORT_IO,
        Capability.PIO_IOEVENTS,
    ):
        assert absent not in manifest.capability_set


def test_no_vcpu_init_hook_and_the_registry_refuses_one() -> None:
    assert not hasattr(plugin, "pyvmm_init_vcpu")
    with_init = types.SimpleNamespace(**{n: getattr(plugin, n) for n in dir(plugin) if n.startswith("pyvmm_")})

    def pyvmm_init_vcpu(vcpu: object, boot: object) -> None:
        raise AssertionError("never called")

    with_init.pyvmm_init_vcpu = hookimpl(pyvmm_init_vcpu)
    with pytest.raises(PluginContractError, match="HYPERVISOR_INITIALIZED_BOOT_CONTEXT"):
        PluginRegistry().register(with_init)


def test_found_through_its_entry_point() -> None:
    registry = PluginRegistry()
    registry.load_entry_points()
    assert registry.backends["gunyah"].source.distribution == "pyvmm-gunyah"


# --- VM and memory ----------------------------------------------------------------


def test_create_vm_passes_zero(gunyah: Backend, model: gm.GunyahModel) -> None:
    mark = len(model.calls)
    with gunyah.create_vm({"arch": "aarch64"}):
        (create,) = [c for c in model.calls[mark:] if c.name == "GH_CREATE_VM"]
        assert create.arg == 0
    assert model.vms == []


def test_x86_and_odd_ipa_sizes_are_refused(gunyah: Backend) -> None:
    with pytest.raises(ConfigError, match="aarch64"):
        gunyah.create_vm({"arch": "x86_64"})
    with pytest.raises(ConfigError, match="40 bits"):
        gunyah.create_vm({"arch": "aarch64", "ipa_bits": 48})


def test_memory_label_is_the_slot_and_flags_are_rwx(vm: Vm, model: gm.GunyahModel) -> None:
    second = vm.add_memory(0x1_0000_0000, 0x10000)
    bindings = {b.label: b for b in only_vm(model).bindings}
    assert sorted(bindings) == [0, 1]
    first = next(iter(vm.memory))
    assert (bindings[0].gpa, bindings[0].size, bindings[0].host_addr) == (RAM, RAM_SIZE, first.host_addr)
    assert (bindings[1].gpa, bindings[1].host_addr, bindings[1].flags) == (second.guest_phys_addr, second.host_addr, 7)
    assert not any(b.lent for b in bindings.values())


def test_gunyah_memory_cannot_be_removed_or_added_late(vm: Vm) -> None:
    region = next(iter(vm.memory))
    with pytest.raises(UnsupportedCapability, match="MEMORY_REMOVAL"):
        vm.remove_memory(region)
    with pytest.raises(UnsupportedCapability, match="READ_ONLY_MEMORY"):
        vm.add_memory(0x1_0000_0000, 0x1000, read_only=True)
    vm.create_vcpu()
    boot(vm)
    with pytest.raises(UnsupportedCapability, match="LATE_MEMORY"):
        vm.add_memory(0x1_0000_0000, 0x1000)


def test_protected_vm_lends_all_but_swiotlb(gunyah: Backend, model: gm.GunyahModel) -> None:
    config = {"arch": "aarch64", "protection": "protected", "backend_options": {"swiotlb": [0x9000_0000]}}
    with gunyah.create_vm(config) as vm:
        ram = vm.add_memory(RAM, RAM_SIZE)
        swiotlb = vm.add_memory(0x9000_0000, 0x10000)
        names = ioctls(model)
        assert names.count("GH_VM_ANDROID_LEND_USER_MEM") == 1
        assert names.count("GH_VM_SET_USER_MEM_REGION") == 2  # the probe's scratch region + swiotlb
        lent = {b.gpa: b.lent for b in only_vm(model).bindings}
        assert lent == {RAM: True, 0x9000_0000: False}
        # Lending is only a binding: the host still loads the payload, as crosvm does.
        assert model.host_may_access(ram.host_addr, RAM_SIZE)
        assert ram.host_accessible
        assert vm.handle.host_accessible(RAM + 0x100)
        vm.memory.write(ENTRY, b"code")
        vm.create_vcpu()
        boot(vm)
        # START lent the device tree's page, and from now on the guest takes any
        # lent page on first touch: the host gives the whole region up.
        assert not model.host_may_access(ram.host_addr + (FDT - RAM))
        assert ram.host_accessible is False
        with pytest.raises(GuestMemoryError, match="lent"):
            vm.memory.read(ENTRY, 4)
        assert not vm.handle.host_accessible(RAM + 0x100)
        assert swiotlb.host_accessible
        assert model.host_may_access(swiotlb.host_addr, 0x10000)
        assert vm.handle.host_accessible(0x9000_0000)
    model.assert_no_rejections()


def test_protected_vm_firmware_window(gunyah: Backend, model: gm.GunyahModel) -> None:
    options = {"firmware": {"address": RAM, "size": 0x10000}}
    with gunyah.create_vm({"arch": "aarch64", "protection": "protected", "backend_options": options}):
        vm = only_vm(model)
        assert vm.firmware == (RAM, 0x10000)
        assert vm.auth == gm.RM_AUTH_ANDROID_PVM
    with pytest.raises(ConfigError, match="protected"):
        gunyah.create_vm({"arch": "aarch64", "backend_options": options})
    with pytest.raises(ConfigError, match="unknown Gunyah option"):
        gunyah.create_vm({"arch": "aarch64", "backend_options": {"cpuid": "host"}})


# --- vCPUs --------------------------------------------------------------------------


def test_vcpu_is_a_function_with_a_mapped_run_page(vm: Vm, model: gm.GunyahModel) -> None:
    mark = len(model.calls)
    vm.create_vcpu()
    vm.create_vcpu()
    assert ioctls(model, mark) == ["GH_VM_ADD_FUNCTION", "GH_VCPU_MMAP_SIZE"] * 2
    assert [c.arg for c in model.calls[mark:] if c.op == "mmap"] == [0, 0]
    assert sorted(only_vm(model).vcpus) == [0, 1]


def test_destroying_a_vcpu_removes_its_function(vm: Vm, model: gm.GunyahModel) -> None:
    vcpu = vm.create_vcpu()
    handle = vcpu.handle
    assert vm.handle.vcpus == [handle]
    mark = len(model.calls)
    vcpu.close()
    assert ioctls(model, mark) == ["GH_VM_REMOVE_FUNCTION"]
    assert only_vm(model).vcpus == {}
    assert [f.kind for f in model.open_fds()] == ["gunyah", "gunyah-vm"]
    # No kick reaches it any more, the VM forgot it, and its run page is unmapped.
    assert handle.kicker.closed
    assert vm.handle.vcpus == []
    assert handle.page.closed
    done = len(model.calls)
    handle.kick()
    handle.close()  # idempotent
    assert len(model.calls) == done


def test_nothing_stays_open_after_close(gunyah: Backend, model: gm.GunyahModel, event: Event) -> None:
    with gunyah.create_vm({"arch": "aarch64", "vcpus": 2}) as vm:
        vm.add_memory(RAM, RAM_SIZE)
        vm.create_vcpu()
        vm.create_vcpu()
        vm.register_irqfd(event, 3)
        boot(vm)
    assert [f.kind for f in model.open_fds()] == ["gunyah"]


# --- boot -----------------------------------------------------------------------------


def test_boot_goes_to_dtb_config_boot_context_and_start(vm: Vm, model: gm.GunyahModel) -> None:
    vm.create_vcpu()
    mark = len(model.calls)
    boot(vm, stack=RAM + 0x8000, registers={"x2": 0x1234})
    assert ioctls(model, mark) == ["GH_VM_SET_DTB_CONFIG"] + ["GH_VM_SET_BOOT_CONTEXT"] * 3 + ["GH_VM_START"]
    state = only_vm(model)
    # The DTB window is rounded up to whole pages (the RM shares pages, docs/backends/gunyah.md §5.2 step 2).
    assert state.dtb == (FDT, 0x1000)
    assert state.boot_context == {gm.REG_SET_PC << 8: ENTRY, gm.REG_SET_SP << 8 | 1: RAM + 0x8000, 2: 0x1234}
    assert state.status == gm.VmStatus.RUNNING


def test_boot_needs_a_device_tree_in_memory(vm: Vm) -> None:
    with pytest.raises(ConfigError, match="fdt_address"):
        vm.boot(BootSpec(arch=Arch.AARCH64, entry=ENTRY))
    with pytest.raises(ConfigError, match="inside one memory region"):
        vm.boot(boot_spec(fdt_address=RAM + RAM_SIZE - 0x400, fdt_size=0x800))


def test_boot_register_names_are_checked(vm: Vm) -> None:
    with pytest.raises(ConfigError, match="x31"):
        vm.boot(boot_spec(registers={"x31": 1}))


def test_start_is_reported_once(vm: Vm, model: gm.GunyahModel) -> None:
    vm.create_vcpu()
    boot(vm)
    vm.start()
    assert ioctls(model).count("GH_VM_START") == 1


# --- doorbells and ioeventfds ------------------------------------------------------------


def test_irqfd_binds_an_event_to_a_doorbell_label(vm: Vm, model: gm.GunyahModel) -> None:
    edge, level = Event(), Event()
    try:
        vm.register_irqfd(edge, 3)
        vm.register_irqfd(level, 4, level=True)
        bells = only_vm(model).doorbells
        assert (bells[3].fd, bells[3].level) == (edge.fileno(), False)
        assert (bells[4].fd, bells[4].level) == (level.fileno(), True)
        assert vm.handle.doorbells() == [(3, False), (4, True)]
    finally:
        edge.close()
        level.close()


def test_a_refused_irqfd_is_not_a_doorbell(vm: Vm, model: gm.GunyahModel, event: Event) -> None:
    vm.register_irqfd(event, 3)
    with pytest.raises(HypervisorError, match="GH_VM_ADD_FUNCTION"):
        vm.register_irqfd(event, 3, level=True)  # the label is taken
    model.rejections.clear()
    assert vm.handle.doorbells() == [(3, False)]


def test_ioevent_uses_datamatch_flag_one(vm: Vm, model: gm.GunyahModel, event: Event) -> None:
    vm.register_ioevent(event, IoEventAddress.mmio(0x9000_0000), datamatch=0xAB, length=4)
    vm.register_ioevent(event, IoEventAddress.mmio(0x9000_1000), length=0)
    handlers = only_vm(model).io_handlers
    assert [(h.addr, h.length, h.datamatch, h.data, h.fd) for h in handlers] == [
        (0x9000_0000, 4, True, 0xAB, event.fileno()),
        (0x9000_1000, 0, False, 0, event.fileno()),
    ]
    vm.unregister_ioevent(event, IoEventAddress.mmio(0x9000_0000), datamatch=0xAB, length=4)
    assert [h.addr for h in only_vm(model).io_handlers] == [0x9000_1000]


def test_port_ioevents_are_refused(vm: Vm, event: Event) -> None:
    with pytest.raises(UnsupportedCapability, match="PIO_IOEVENTS"):
        vm.register_ioevent(event, IoEventAddress.pio(0x10), length=1)


# --- the VM's own device-tree nodes ---------------------------------------------------------------


def vm_config(vm: Vm) -> dict[str, dict[str, bytes]]:
    tree = DeviceTree()
    vm.add_device_tree_nodes(tree)
    return {path: props for path, props in read_fdt(tree.to_dtb()).items() if path.startswith(VM_CONFIG)}


def test_device_tree_nodes_describe_the_mapped_memory_and_the_doorbells(
    vm: Vm, model: gm.GunyahModel, event: Event
) -> None:
    vm.add_memory(0x1_0000_0000, 0x10_0000)
    vm.register_irqfd(event, 0x21, level=True)
    vm.register_irqfd(event, 1)
    nodes = vm_config(vm)
    memory = nodes[f"{VM_CONFIG}/memory"]
    # The lowest mapped guest address, and all mapped memory together.
    assert memory["base-address"] == struct.pack(">Q", RAM)
    assert memory["size-max"] == struct.pack(">Q", GUNYAH_SIZE_MAX)
    assert "firmware-address" not in memory
    assert (vm.handle.ram_base, vm.handle.ram_size) == (RAM, RAM_SIZE + 0x10_0000)
    bells = {path.rsplit("/", 1)[1]: props for path, props in nodes.items() if "/bell-" in path}
    assert sorted(bells) == ["bell-1", "bell-21"]
    assert bells["bell-21"]["interrupts"] == struct.pack(">III", 0, 0x21, 4)  # SPI, level-high
    assert bells["bell-1"]["interrupts"] == struct.pack(">III", 0, 1, 1)  # SPI, edge
    assert vm.handle.doorbells() == [(0x21, True), (1, False)]


def test_device_tree_nodes_refuse_more_memory_than_the_rm_takes(vm: Vm) -> None:
    vm.add_memory(0x1_0000_0000, GUNYAH_SIZE_MAX)  # reserved, never touched
    with pytest.raises(ConfigError, match="Gunyah VMs may have at most"):
        vm_config(vm)


def test_device_tree_nodes_of_a_pvm_name_its_firmware(gunyah: Backend, model: gm.GunyahModel) -> None:
    firmware = 0x7FE0_0000
    options = {"firmware": {"address": firmware, "size": 0x20_0000}}
    with gunyah.create_vm({"arch": "aarch64", "protection": "protected", "backend_options": options}) as vm:
        vm.add_memory(firmware, 0x20_0000)  # the firmware's own region: not guest RAM
        vm.add_memory(RAM, RAM_SIZE)
        memory = vm_config(vm)[f"{VM_CONFIG}/memory"]
        assert memory["firmware-address"] == struct.pack(">Q", firmware)
        assert memory["base-address"] == struct.pack(">Q", RAM)
        assert vm.handle.ram_size == RAM_SIZE
    model.assert_no_rejections()


def test_device_tree_nodes_need_memory(gunyah: Backend) -> None:
    with gunyah.create_vm({"arch": "aarch64"}) as vm, pytest.raises(VmStateError, match="memory"):
        vm_config(vm)


# --- run without guest code: status exits, kicks, errors ----------------------------------------


def test_run_before_start_is_an_error_naming_the_ioctl(gunyah: Backend) -> None:
    fresh = gm.GunyahModel()
    with fresh.installed(), Backend(PluginRegistry().register(plugin)).create_vm({"arch": "aarch64"}) as vm:
        vm.add_memory(RAM, RAM_SIZE)
        vcpu = vm.create_vcpu()
        with pytest.raises(HypervisorError, match="GH_VCPU_RUN") as caught:
            vcpu.run()
        assert caught.value.errno == errno.ENODEV
        assert fresh.last_rejection is not None
        assert fresh.last_rejection.rule is gm.R_RUN_UNBOUND


@pytest.mark.parametrize(
    ("exit_type", "event"),
    [
        (gm.RM_VM_EXIT, SystemEvent.SHUTDOWN),
        (gm.RM_PSCI_POWER_OFF, SystemEvent.SHUTDOWN),
        (gm.RM_VM_FORCE_STOPPED, SystemEvent.SHUTDOWN),
        (gm.RM_PSCI_SYSTEM_RESET, SystemEvent.RESET),
        (gm.RM_PSCI_SYSTEM_RESET2, SystemEvent.RESET),
        (gm.RM_WDT_BITE, SystemEvent.CRASH),
        (gm.RM_HYP_ERROR, SystemEvent.CRASH),
        (gm.RM_ASYNC_EXT_ABORT, SystemEvent.CRASH),
    ],
)
def test_rm_exit_types_map_to_system_events_and_stick(
    vm: Vm, model: gm.GunyahModel, exit_type: int, event: SystemEvent
) -> None:
    vcpu = vm.create_vcpu()
    boot(vm)
    model.rm_exit(only_vm(model), exit_type, b"\x2a\0\0\0")
    for _ in range(3):  # sticky: every later run reports it again
        exit_ = vcpu.run()
        assert isinstance(exit_, SystemEventExit)
        assert (exit_.event, exit_.data) == (event, (exit_type, 0x2A))


def test_unknown_rm_exit_type_is_an_error(vm: Vm, model: gm.GunyahModel) -> None:
    vcpu = vm.create_vcpu()
    boot(vm)
    model.rm_exit(only_vm(model), 99)
    with pytest.raises(HypervisorError, match="exit type 99"):
        vcpu.run()


def test_load_failed_is_a_failed_entry_and_crashed_a_crash(vm: Vm, model: gm.GunyahModel) -> None:
    first, second = vm.create_vcpu(), vm.create_vcpu()
    boot(vm)
    model.rm_status(only_vm(model), gm.VmStatus.INIT_FAILED)
    exit_ = first.run()
    assert isinstance(exit_, FailEntryExit)
    model.rm_status(only_vm(model), gm.VmStatus.CRASHED)
    crash = second.run()
    assert isinstance(crash, SystemEventExit)
    assert crash.event is SystemEvent.CRASH


def test_kick_on_the_vcpu_thread_interrupts_the_next_run(vm: Vm, model: gm.GunyahModel) -> None:
    vcpu = vm.create_vcpu()
    boot(vm)
    vcpu.kick()
    exit_ = vcpu.run()
    assert isinstance(exit_, InterruptedExit)
    assert exit_.kind is ExitKind.INTERRUPTED
    (run,) = [c for c in model.calls if c.name == "GH_VCPU_RUN"]
    assert run.errno == errno.EINTR
    assert run.rule is None  # EINTR after a kick is the protocol, not a broken rule
