"""x86_64 conformance scenarios.  Each one: a guest program, the exits it must
produce, and what the VMM sees in guest memory and registers afterwards."""

from __future__ import annotations

import struct
import threading
import time

import pytest

from pyvmm.capabilities import Capability
from pyvmm.config import PAGE_SIZE, Arch
from pyvmm.errors import ConfigError, GuestMemoryError, UnsupportedCapability
from pyvmm.exits import ExitKind, InterruptedExit, ShutdownExit
from pyvmm.testing.conformance import programs as p
from pyvmm.testing.conformance.harness import (
    booted,
    expect_io,
    expect_mmio,
    expect_mmio_round_trip,
    port_output_until_halt,
    require,
    require_arch,
    run_to,
)
from pyvmm.vm import Backend


@pytest.fixture
def backend(pyvmm_backend: Backend) -> Backend:
    require_arch(pyvmm_backend, Arch.X86_64)
    return pyvmm_backend


def test_pio_write(backend: Backend) -> None:
    require(backend, Capability.PORT_IO)
    with booted(backend, p.PIO_OUT) as (_, vcpu):
        io = expect_io(vcpu)
        assert (io.port, io.size, io.count, io.is_write) == (p.TEST_PORT, 1, 1, True)
        assert io.data[0] == 0x5A
        run_to(vcpu, ExitKind.HLT)


def test_pio_read_round_trip(backend: Backend) -> None:
    require(backend, Capability.PORT_IO)
    with booted(backend, p.PIO_ROUND_TRIP) as (_, vcpu):
        read = expect_io(vcpu)
        assert (read.port, read.size, read.is_write) == (p.TEST_PORT, 4, False)
        read.data[:4] = struct.pack("<I", 0x41414140)
        write = expect_io(vcpu)
        assert (write.port, write.size, write.is_write) == (p.TEST_PORT, 4, True)
        assert struct.unpack("<I", write.data[:4])[0] == 0x41414141
        run_to(vcpu, ExitKind.HLT)


def test_mmio_round_trip(backend: Backend) -> None:
    with booted(backend, p.MMIO_ROUND_TRIP) as (_, vcpu):
        expect_mmio_round_trip(vcpu, p.MMIO_BASE)
        run_to(vcpu, ExitKind.HLT)


def test_rep_outsb(backend: Backend) -> None:
    require(backend, Capability.PORT_IO)
    with booted(backend, p.REP_OUTSB) as (_, vcpu):
        written, exits = port_output_until_halt(vcpu, p.TEST_PORT)
        assert written == b"hello"
        assert 1 <= exits <= 5


def test_rep_insb(backend: Backend) -> None:
    require(backend, Capability.PORT_IO)
    with booted(backend, p.REP_INSB) as (_, vcpu):
        written, _ = port_output_until_halt(vcpu, p.TEST_PORT, fill=b"pyvm")
        assert written == b"pyvm"


def test_guest_writes_reach_memory(backend: Backend) -> None:
    """Plain RAM writes stay in RAM (no exit) and the VMM sees them."""
    require(backend, Capability.LATE_MEMORY)
    with booted(backend, p.DIRTY_PAGES) as (vm, vcpu):
        vm.add_memory(0x400000, 16 * PAGE_SIZE)
        run_to(vcpu, ExitKind.HLT)
        assert vm.memory.read_u8(0x401000) == 1
        assert vm.memory.read_u8(0x405000) == 1
        assert vm.memory.read_u8(0x402000) == 0


def test_read_only_memory(backend: Backend) -> None:
    require(backend, Capability.READ_ONLY_MEMORY, Capability.PORT_IO, Capability.LATE_MEMORY)
    with booted(backend, p.READ_ONLY_WRITE) as (vm, vcpu):
        vm.add_memory(0x200000, PAGE_SIZE, read_only=True)
        vm.memory.write_u8(0x200000, 0xAB)
        write = expect_mmio(vcpu)
        assert (write.address, write.size, write.is_write) == (0x200000, 1, True)
        assert write.data[0] == 0x77
        io = expect_io(vcpu)
        assert io.data[0] == 0xAB, "the guest must read the unchanged byte"
        assert vm.memory.read_u8(0x200000) == 0xAB


def test_memory_removal(backend: Backend) -> None:
    require(backend, Capability.MEMORY_REMOVAL, Capability.PORT_IO, Capability.LATE_MEMORY)
    with booted(backend, p.READ_TWICE) as (vm, vcpu):
        region = vm.add_memory(0x300000, PAGE_SIZE)
        vm.memory.write_u8(0x300000, 0x99)
        assert expect_io(vcpu).data[0] == 0x99
        vm.remove_memory(region)
        with pytest.raises(GuestMemoryError):
            vm.memory.read_u8(0x300000)
        read = expect_mmio(vcpu)
        assert (read.address, read.is_write) == (0x300000, False)
        read.data[0] = 0x42
        assert expect_io(vcpu).data[0] == 0x42
        again = vm.add_memory(0x300000, PAGE_SIZE)
        assert again.slot == region.slot, "the freed slot is reused"


def test_dirty_log(backend: Backend) -> None:
    require(backend, Capability.DIRTY_LOG, Capability.LATE_MEMORY)
    with booted(backend, p.DIRTY_PAGES) as (vm, vcpu):
        region = vm.add_memory(0x400000, 16 * PAGE_SIZE, log_dirty=True)
        assert vm.dirty_pages(region) == []
        run_to(vcpu, ExitKind.HLT)
        assert vm.dirty_pages(region) == [0x401000, 0x405000]
        assert vm.dirty_pages(region) == [], "reading the log resets it"


def test_halt(backend: Backend) -> None:
    with booted(backend, p.HLT) as (_, vcpu):
        run_to(vcpu, ExitKind.HLT)


def test_triple_fault_is_shutdown(backend: Backend) -> None:
    with booted(backend, p.TRIPLE_FAULT) as (_, vcpu):
        exit_ = run_to(vcpu, ExitKind.SHUTDOWN)
        assert isinstance(exit_, ShutdownExit)


def test_registers(backend: Backend) -> None:
    require(backend, Capability.VCPU_REGISTERS)
    with booted(backend, p.SET_RAX) as (_, vcpu):
        regs = vcpu.get_regs()
        assert regs.rip == p.CODE_ADDRESS
        assert regs.rsp == p.STACK_TOP
        run_to(vcpu, ExitKind.HLT)
        assert vcpu.get_regs().rax == 0x123456789ABCDEF0
        sregs = vcpu.get_sregs()
        assert sregs.cs.l == 1 and sregs.efer & (1 << 10), "the vCPU runs in long mode"


def test_set_registers(backend: Backend) -> None:
    require(backend, Capability.VCPU_REGISTERS)
    with booted(backend, p.ADD_REGS) as (_, vcpu):
        regs = vcpu.get_regs()
        regs.rax, regs.rbx = 40, 2
        vcpu.set_regs(regs)
        run_to(vcpu, ExitKind.HLT)
        assert vcpu.get_regs().rax == 42


def test_kick_stops_a_spinning_guest(backend: Backend) -> None:
    require(backend, Capability.IMMEDIATE_EXIT)
    with booted(backend, p.SPIN) as (_, vcpu):
        kicker = threading.Timer(0.2, vcpu.kick)
        started = time.monotonic()
        kicker.start()
        try:
            exit_ = vcpu.run()
        finally:
            kicker.cancel()
        assert isinstance(exit_, InterruptedExit), f"expected an interrupted run, got {exit_!r}"
        assert time.monotonic() - started < 10


def test_kick_before_run(backend: Backend) -> None:
    """A kick that lands before run() still makes that run return at once."""
    require(backend, Capability.IMMEDIATE_EXIT)
    with booted(backend, p.SPIN) as (_, vcpu):
        vcpu.kick()
        assert vcpu.run().kind is ExitKind.INTERRUPTED


# --- bad input: refused with a typed error, nothing half-made ----------------------


def test_overlapping_region_refused(backend: Backend) -> None:
    require(backend, Capability.LATE_MEMORY)
    with booted(backend, p.HLT) as (vm, _):
        with pytest.raises(GuestMemoryError, match="overlaps"):
            vm.add_memory(0x1FF000, 2 * PAGE_SIZE)
        assert len(vm.memory) == 1


def test_misaligned_region_refused(backend: Backend) -> None:
    with backend.create_vm({"arch": "x86_64"}) as vm:
        with pytest.raises(ConfigError, match="guest_phys_addr"):
            vm.add_memory(0x1001, PAGE_SIZE)
        with pytest.raises(ConfigError, match="size"):
            vm.add_memory(0x1000, 100)
        assert len(vm.memory) == 0


def test_undeclared_capabilities_refused(backend: Backend) -> None:
    with backend.create_vm({"arch": "x86_64"}) as vm:
        if not backend.supports(Capability.READ_ONLY_MEMORY):
            with pytest.raises(UnsupportedCapability):
                vm.add_memory(0, PAGE_SIZE, read_only=True)
        if not backend.supports(Capability.DIRTY_LOG):
            with pytest.raises(UnsupportedCapability):
                vm.add_memory(0, PAGE_SIZE, log_dirty=True)
        assert len(vm.memory) == 0


def test_vcpu_index_out_of_range(backend: Backend) -> None:
    with backend.create_vm({"arch": "x86_64", "vcpus": 1}) as vm, pytest.raises(ConfigError, match="out of range"):
        vm.create_vcpu(1)
