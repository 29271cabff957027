"""aarch64 conformance scenarios.  Each one: a guest program booted the arm64
Linux way (X0 = device tree), the exits it must produce, and what the VMM sees
in guest memory and registers afterwards.

The halt scenario needs a decision, since an idle aarch64 vCPU executes ``WFI``
and hypervisors differ in what they do with it: KVM keeps the vCPU in the
kernel until an interrupt is due (a kick ends the wait with an interrupted run),
a software CPU with no interrupt source returns a halt exit.  The scenario
accepts exactly these two outcomes, and needs ``IMMEDIATE_EXIT`` so that the
first kind cannot hang the suite.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pyvmm.arch.aarch64 import CoreRegs
from pyvmm.boot import BootSpec
from pyvmm.capabilities import Capability
from pyvmm.config import PAGE_SIZE, Arch
from pyvmm.errors import ConfigError, GuestMemoryError
from pyvmm.exits import ExitKind, SystemEvent, SystemEventExit
from pyvmm.testing.conformance import programs_aarch64 as p
from pyvmm.testing.conformance.harness import (
    check_snapshot_round_trip,
    expect_mmio,
    expect_mmio_round_trip,
    require,
    require_arch,
    run_to,
)
from pyvmm.vcpu_state import StateKind
from pyvmm.vm import Backend, Vcpu, Vm


@pytest.fixture
def backend(pyvmm_backend: Backend) -> Backend:
    require_arch(pyvmm_backend, Arch.AARCH64)
    return pyvmm_backend


@contextmanager
def booted(
    backend: Backend, program: p.Aarch64Program, extra_page: bool = False, read_only: bool = False
) -> Iterator[tuple[Vm, Vcpu]]:
    """RAM at RAM_BASE, ``program`` at CODE_ADDRESS, a device tree at
    FDT_ADDRESS, vCPU 0 booted with X0 = FDT_ADDRESS.  ``extra_page`` maps one
    more page at READ_ONLY_ADDRESS (``read_only`` or not) before the VM starts,
    so that backends without ``LATE_MEMORY`` run the scenario too."""
    with backend.create_vm({"arch": "aarch64"}) as vm:
        # Loaded before mapping: a backend that lends RAM to the guest may take the
        # host's access away when it maps it.
        own_nodes = backend.supports(Capability.DEVICE_TREE_NODES)
        contents = {p.CODE_ADDRESS: program.code}
        if not own_nodes:
            contents[p.FDT_ADDRESS] = p.minimal_fdt()
        vm.add_memory(p.RAM_BASE, p.RAM_SIZE, contents=contents)
        if extra_page:
            vm.add_memory(p.READ_ONLY_ADDRESS, PAGE_SIZE, read_only=read_only)
        if own_nodes:
            vm.memory.write(p.FDT_ADDRESS, p.backend_device_tree(vm))
        vcpu = vm.create_vcpu()
        vm.boot(BootSpec(arch=Arch.AARCH64, entry=p.CODE_ADDRESS, fdt_address=p.FDT_ADDRESS, fdt_size=p.FDT_SIZE))
        yield vm, vcpu


def require_host_access(vm: Vm, address: int) -> None:
    """Skip, saying why, where the backend lent the page to the guest."""
    region = vm.memory.region_at(address)
    if region is not None and not region.host_accessible:
        pytest.skip(f"backend {vm.backend.name!r} lends guest RAM: the host cannot access {address:#x}")


def expect_system_event(vcpu: Vcpu, event: SystemEvent) -> None:
    exit_ = run_to(vcpu, ExitKind.SYSTEM_EVENT)
    assert isinstance(exit_, SystemEventExit)
    assert exit_.event is event, f"expected {event.name}, got {exit_!r}"


def test_mmio_round_trip(backend: Backend) -> None:
    with booted(backend, p.MMIO_ROUND_TRIP) as (_, vcpu):
        expect_mmio_round_trip(vcpu, p.MMIO_BASE)
        wide_read = expect_mmio(vcpu)
        assert (wide_read.address, wide_read.size, wide_read.is_write) == (p.MMIO_BASE + 24, 8, False)
        wide_read.data[:8] = struct.pack("<Q", 0x0123456789ABCDEE)
        echo = expect_mmio(vcpu)
        assert (echo.address, echo.size, echo.is_write) == (p.MMIO_BASE + 32, 8, True)
        assert struct.unpack("<Q", echo.data[:8])[0] == 0x0123456789ABCDEF
        expect_system_event(vcpu, SystemEvent.SHUTDOWN)


def test_psci_system_off_is_shutdown(backend: Backend) -> None:
    with booted(backend, p.PSCI_OFF) as (_, vcpu):
        expect_system_event(vcpu, SystemEvent.SHUTDOWN)


def test_psci_system_reset_is_reset(backend: Backend) -> None:
    with booted(backend, p.PSCI_RESET) as (_, vcpu):
        expect_system_event(vcpu, SystemEvent.RESET)


def test_wfi_idles_the_vcpu(backend: Backend) -> None:
    require(backend, Capability.IMMEDIATE_EXIT)
    with booted(backend, p.WFI) as (_, vcpu):
        kicker = threading.Timer(0.5, vcpu.kick)
        started = time.monotonic()
        kicker.start()
        try:
            exit_ = vcpu.run()
        finally:
            kicker.cancel()
        assert exit_.kind in (ExitKind.HLT, ExitKind.INTERRUPTED), f"WFI must halt or wait for a kick, got {exit_!r}"
        assert time.monotonic() - started < 10


def test_boot_registers(backend: Backend) -> None:
    """X0 holds the device tree address, X1..X3 are zero (arm64 boot protocol)."""
    with booted(backend, p.BOOT_REGISTERS) as (_, vcpu):
        values = []
        for offset in range(0, 32, 8):
            write = expect_mmio(vcpu)
            assert (write.address, write.size, write.is_write) == (p.MMIO_BASE + offset, 8, True)
            values.append(struct.unpack("<Q", write.data[:8])[0])
        assert values == [p.FDT_ADDRESS, 0, 0, 0]
        expect_system_event(vcpu, SystemEvent.SHUTDOWN)


def test_registers(backend: Backend) -> None:
    require(backend, Capability.VCPU_REGISTERS)
    with booted(backend, p.PSCI_OFF) as (_, vcpu):
        regs = vcpu.get_state(StateKind.CORE_REGS)
        assert isinstance(regs, CoreRegs)
        assert regs.pc == p.CODE_ADDRESS
        assert regs.x[0] == p.FDT_ADDRESS
        assert (regs.pstate >> 2) & 3 == 1, "the vCPU starts at EL1"
        expect_system_event(vcpu, SystemEvent.SHUTDOWN)
        # X0 still holds the function id, or the return value KVM preloads for a
        # vCPU resumed after SYSTEM_OFF: PSCI INTERNAL_FAILURE, -6 (arch/arm64/kvm/psci.c).
        assert vcpu.get_state(StateKind.CORE_REGS).x[0] in (p.PSCI_SYSTEM_OFF, (1 << 64) - 6)


def test_set_registers(backend: Backend) -> None:
    require(backend, Capability.VCPU_REGISTERS)
    with booted(backend, p.ADD_REGISTERS) as (_, vcpu):
        regs = vcpu.get_state(StateKind.CORE_REGS)
        regs.x[6], regs.x[7] = 40, 2
        vcpu.set_state(StateKind.CORE_REGS, regs)
        write = expect_mmio(vcpu)
        assert (write.address, write.is_write) == (p.MMIO_BASE, True)
        assert struct.unpack("<Q", write.data[:8])[0] == 42
        expect_system_event(vcpu, SystemEvent.SHUTDOWN)


def test_memory_visible_both_ways(backend: Backend) -> None:
    """The guest reads what the VMM wrote and the VMM reads what the guest wrote."""
    with booted(backend, p.MEMORY) as (vm, vcpu):
        require_host_access(vm, p.DATA_ADDRESS)
        vm.memory.write_u64(p.DATA_ADDRESS, 0x5555AAAA12345678)
        echo = expect_mmio(vcpu)
        assert struct.unpack("<Q", echo.data[:8])[0] == 0x5555AAAA12345678
        expect_system_event(vcpu, SystemEvent.SHUTDOWN)
        assert vm.memory.read_u32(p.DATA_ADDRESS + 8) == 0xDEADBEEF


def test_read_only_memory(backend: Backend) -> None:
    require(backend, Capability.READ_ONLY_MEMORY)
    with booted(backend, p.READ_ONLY_WRITE, extra_page=True, read_only=True) as (vm, vcpu):
        require_host_access(vm, p.READ_ONLY_ADDRESS)
        vm.memory.write_u8(p.READ_ONLY_ADDRESS, 0xAB)
        write = expect_mmio(vcpu)
        assert (write.address, write.size, write.is_write) == (p.READ_ONLY_ADDRESS, 1, True)
        assert write.data[0] == 0x77
        echo = expect_mmio(vcpu)
        assert echo.data[0] == 0xAB, "the guest must read the unchanged byte"
        expect_system_event(vcpu, SystemEvent.SHUTDOWN)
        assert vm.memory.read_u8(p.READ_ONLY_ADDRESS) == 0xAB


def test_memory_removal(backend: Backend) -> None:
    """After removal the guest's reads of the page are MMIO reads."""
    require(backend, Capability.MEMORY_REMOVAL)
    with booted(backend, p.READ_TWICE, extra_page=True) as (vm, vcpu):
        region = vm.memory.region_at(p.READ_ONLY_ADDRESS)
        assert region is not None
        require_host_access(vm, p.READ_ONLY_ADDRESS)
        vm.memory.write_u8(p.READ_ONLY_ADDRESS, 0x99)
        assert expect_mmio(vcpu).data[0] == 0x99
        vm.remove_memory(region)
        with pytest.raises(GuestMemoryError):
            vm.memory.read_u8(p.READ_ONLY_ADDRESS)
        read = expect_mmio(vcpu)
        assert (read.address, read.size, read.is_write) == (p.READ_ONLY_ADDRESS, 1, False)
        read.data[0] = 0x42
        assert expect_mmio(vcpu).data[0] == 0x42
        expect_system_event(vcpu, SystemEvent.SHUTDOWN)
        if backend.supports(Capability.LATE_MEMORY):
            again = vm.add_memory(p.READ_ONLY_ADDRESS, PAGE_SIZE)
            assert again.slot == region.slot, "the freed slot is reused"


def test_boot_spec_arch_must_match(backend: Backend) -> None:
    with backend.create_vm({"arch": "aarch64"}) as vm:
        vm.add_memory(p.RAM_BASE, p.RAM_SIZE)
        vm.create_vcpu()
        with pytest.raises(ConfigError, match="arch"):
            vm.boot(BootSpec(arch=Arch.X86_64, entry=p.CODE_ADDRESS))


def _sums(vcpu: Vcpu, count: int) -> list[int]:
    sums = []
    for _ in range(count):
        write = expect_mmio(vcpu)
        assert (write.address, write.size, write.is_write) == (p.MMIO_BASE, 1, True)
        sums.append(write.data[0])
    return sums


def test_a_snapshot_restored_into_a_new_vm_continues_where_it_stopped(backend: Backend, tmp_path: Path) -> None:
    require(backend, Capability.VCPU_REGISTERS)
    check_snapshot_round_trip(
        backend,
        booted(backend, p.COUNTER),
        tmp_path / "counter.snap",
        reports=_sums,
        counter_address=p.DATA_ADDRESS,
        check_vm=lambda vm: require_host_access(vm, p.DATA_ADDRESS),
    )
