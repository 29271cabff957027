"""x86_64 conformance scenarios.  Each one: a guest program, the exits it must
produce, and what the VMM sees in guest memory and registers afterwards."""

from __future__ import annotations

import struct
import threading
import time
from pathlib import Path

import pytest

from pyvmm.arch.x86_64 import VcpuEvents
from pyvmm.capabilities import Capability
from pyvmm.config import PAGE_SIZE, Arch
from pyvmm.errors import ConfigError, GuestMemoryError, InterruptNotReady, UnsupportedCapability
from pyvmm.exits import ExitKind, InterruptedExit, ShutdownExit
from pyvmm.host import Event
from pyvmm.interrupts import MsiRoute
from pyvmm.testing.conformance import programs as p
from pyvmm.testing.conformance.harness import (
    booted,
    check_snapshot_round_trip,
    expect_io,
    expect_mmio,
    expect_mmio_round_trip,
    expect_port_write,
    install_idt,
    port_output_until_halt,
    require,
    require_arch,
    run_to,
)
from pyvmm.vm import Backend, Vcpu

#: vCPU 0's local APIC in the MSI address window.
MSI_ADDRESS = 0xFEE00000
#: A GSI past the IOAPIC's 24 inputs, for an MSI route.
MSI_GSI = 24


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


# --- interrupts from userspace: INTERRUPT_INJECTION, NMI, VCPU_EVENTS --------------


def test_interrupt_injection_when_ready(backend: Backend) -> None:
    """Four vectors injected in a row, each at an exit where the vCPU can take one:
    each handler runs before the guest's next instruction."""
    require(backend, Capability.INTERRUPT_INJECTION, Capability.PORT_IO)
    with booted(backend, p.INTERRUPTS_ON) as (vm, vcpu):
        install_idt(vm)
        assert not vcpu.ready_for_interrupt(), "nothing can be injected before the first run"
        for count, vector in zip((4, 3, 2, 1), (0x20, 0x21, 0x40, 0xFE), strict=True):
            expect_port_write(vcpu, p.TEST_PORT, count)
            assert vcpu.ready_for_interrupt()
            vcpu.interrupt(vector)
            expect_port_write(vcpu, p.REPORT_PORT, vector)
        run_to(vcpu, ExitKind.HLT)


def test_interrupt_refused_when_not_ready(backend: Backend) -> None:
    """With interrupts off an injection is refused, typed, and nothing is queued:
    the guest runs on without the handler, and takes the next injection once
    interrupts are on."""
    require(backend, Capability.INTERRUPT_INJECTION, Capability.PORT_IO)
    with booted(backend, p.INTERRUPTS_OFF_THEN_ON) as (vm, vcpu):
        install_idt(vm)
        expect_port_write(vcpu, p.TEST_PORT, 1)
        assert not vcpu.ready_for_interrupt()
        with pytest.raises(InterruptNotReady) as info:
            vcpu.interrupt(0x21)
        assert (info.value.vcpu, info.value.vector) == (0, 0x21)
        expect_port_write(vcpu, p.TEST_PORT, 2)  # no handler ran in between
        expect_port_write(vcpu, p.TEST_PORT, 3)
        assert vcpu.ready_for_interrupt()
        vcpu.interrupt(0x22)
        expect_port_write(vcpu, p.REPORT_PORT, 0x22)
        run_to(vcpu, ExitKind.HLT)


def test_interrupt_window_exit_after_sti(backend: Backend) -> None:
    """A window requested while interrupts are off opens after ``sti`` and the
    instruction it shadows: an IrqWindowOpenExit there, and the vector injected
    then is taken before the guest's next instruction."""
    require(backend, Capability.INTERRUPT_INJECTION, Capability.PORT_IO)
    if not backend.supports(Capability.INTERRUPT_SHADOW):
        pytest.skip(
            f"backend {backend.name!r} does not declare INTERRUPT_SHADOW: its hypervisor does not model the "
            "STI shadow, so where the window opens after sti is not defined there"
        )
    with booted(backend, p.WINDOW_AFTER_STI) as (vm, vcpu):
        install_idt(vm)
        expect_port_write(vcpu, p.TEST_PORT, 1)
        assert not vcpu.ready_for_interrupt()
        vcpu.request_interrupt_window()
        expect_port_write(vcpu, p.TEST_PORT, 2)  # interrupts still off: no window yet
        run_to(vcpu, ExitKind.IRQ_WINDOW_OPEN)
        if backend.supports(Capability.VCPU_REGISTERS):
            assert vcpu.get_regs().rip == p.CODE_ADDRESS + p.WINDOW_OFFSET, "the window opens after sti's shadow"
        assert vcpu.ready_for_interrupt()
        vcpu.interrupt(0x23)
        vcpu.request_interrupt_window(False)
        expect_port_write(vcpu, p.REPORT_PORT, 0x23)
        expect_port_write(vcpu, p.TEST_PORT, 3)
        run_to(vcpu, ExitKind.HLT)


def test_nmi_with_interrupts_off(backend: Backend) -> None:
    """An NMI is taken with interrupts off (vector 2), and blocks further NMIs
    until its handler's iretq."""
    require(backend, Capability.NMI, Capability.PORT_IO)
    events = backend.supports(Capability.VCPU_EVENTS)
    with booted(backend, p.NMI_WITH_INTERRUPTS_OFF) as (vm, vcpu):
        install_idt(vm)
        expect_port_write(vcpu, p.TEST_PORT, 1)
        vcpu.inject_nmi()
        expect_port_write(vcpu, p.REPORT_PORT, 2)
        if events:
            assert vcpu.get_events().nmi.masked, "NMIs are blocked inside the NMI handler"
        expect_port_write(vcpu, p.TEST_PORT, 2)
        if events:
            assert not vcpu.get_events().nmi.masked, "the handler's iretq unblocks NMIs"
        run_to(vcpu, ExitKind.HLT)


def test_vcpu_events_are_read_and_written(backend: Backend) -> None:
    """The pending-event state reads back as the typed record, writes back
    unchanged without effect, and an NMI made pending through it is taken."""
    require(backend, Capability.VCPU_EVENTS, Capability.PORT_IO)
    with booted(backend, p.NMI_WITH_INTERRUPTS_OFF) as (vm, vcpu):
        install_idt(vm)
        expect_port_write(vcpu, p.TEST_PORT, 1)
        events = vcpu.get_events()
        assert isinstance(events, VcpuEvents)
        assert not (events.exception.injected or events.interrupt.injected or events.nmi.injected)
        assert not events.nmi.masked and not events.nmi.pending
        vcpu.set_events(events)
        assert vcpu.get_events() == events
        events.nmi.pending = True
        vcpu.set_events(events)
        expect_port_write(vcpu, p.REPORT_PORT, 2)
        expect_port_write(vcpu, p.TEST_PORT, 2)
        run_to(vcpu, ExitKind.HLT)


# --- the hypervisor's interrupt controllers: MSIs, GSI routing, resampled irqfds -----


def _lapic_handler() -> dict[int, bytes]:
    code = bytearray(p.LAPIC_HANDLER.code)
    code[p.LAPIC_HANDLER_VECTOR_OFFSET] = p.LAPIC_VECTOR
    return {p.LAPIC_VECTOR: bytes(code)}


def _expect_lapic_handler(vcpu: Vcpu) -> None:
    expect_port_write(vcpu, p.REPORT_PORT, p.LAPIC_VECTOR)
    expect_port_write(vcpu, p.REPORT_PORT + 1, p.LAPIC_VECTOR)  # after its EOI


def _expect_nothing_more(vcpu: Vcpu) -> None:
    """The guest sleeps in hlt and nothing wakes it: a kick is the next exit."""
    kicker = threading.Timer(0.3, vcpu.kick)
    kicker.start()
    try:
        exit_ = vcpu.run()
    finally:
        kicker.cancel()
    assert isinstance(exit_, InterruptedExit), f"expected no interrupt, got {exit_!r}"


def test_msi_reaches_the_local_apic(backend: Backend) -> None:
    require(backend, Capability.IRQCHIP, Capability.MSI, Capability.PORT_IO)
    with booted(backend, p.LAPIC_WAIT, irqchip=True) as (vm, vcpu):
        install_idt(vm, _lapic_handler())
        expect_port_write(vcpu, p.TEST_PORT, 1)
        assert vm.signal_msi(MSI_ADDRESS, p.LAPIC_VECTOR) is True
        _expect_lapic_handler(vcpu)


def test_gsi_routed_to_an_msi(backend: Backend) -> None:
    """The routing table replaced by one MSI route; an irqfd on its GSI delivers it."""
    require(backend, Capability.IRQCHIP, Capability.GSI_ROUTING, Capability.IRQFD, Capability.PORT_IO)
    with booted(backend, p.LAPIC_WAIT, irqchip=True) as (vm, vcpu), Event() as event:
        install_idt(vm, _lapic_handler())
        vm.set_gsi_routing([MsiRoute(MSI_GSI, MSI_ADDRESS, p.LAPIC_VECTOR)])
        vm.register_irqfd(event, MSI_GSI)
        expect_port_write(vcpu, p.TEST_PORT, 1)
        event.signal()
        _expect_lapic_handler(vcpu)


def test_resampled_level_irqfd(backend: Backend) -> None:
    """A level-triggered irqfd: the line stays raised until the guest acknowledges
    the interrupt, then the hypervisor lowers it and signals the resample event;
    raised again, it interrupts again; not raised, nothing comes.  Unregistered
    (where the backend can), a signal raises nothing."""
    require(backend, Capability.IRQCHIP, Capability.IRQFD, Capability.IRQFD_RESAMPLE, Capability.PORT_IO)
    require(backend, Capability.IMMEDIATE_EXIT)
    with booted(backend, p.IOAPIC_LEVEL_WAIT, irqchip=True) as (vm, vcpu), Event() as irq, Event() as resample:
        install_idt(vm, _lapic_handler())
        vm.register_irqfd(irq, p.IOAPIC_PIN, level=True, resample=resample)
        expect_port_write(vcpu, p.TEST_PORT, 1)
        for _ in range(2):
            irq.signal()  # the device raises its line
            expect_port_write(vcpu, p.REPORT_PORT, p.LAPIC_VECTOR)
            expect_port_write(vcpu, p.REPORT_PORT + 1, p.LAPIC_VECTOR)  # the handler wrote EOI
            # (Not before the EOI, on hardware KVM; this machine's software KVM
            # signals it when the interrupt is delivered: test_kvm_interrupts.py.)
            assert resample.wait(5), "the interrupt was acknowledged, yet the resample event never came"
            resample.consume()
        _expect_nothing_more(vcpu)  # lowered at the EOI, and not raised again
        if backend.supports(Capability.IRQFD_REMOVAL):
            vm.unregister_irqfd(irq, p.IOAPIC_PIN)
            irq.signal()
            _expect_nothing_more(vcpu)


def _sums(vcpu: Vcpu, count: int) -> list[int]:
    return [expect_io(vcpu).data[0] for _ in range(count)]


def test_a_snapshot_restored_into_a_new_vm_continues_where_it_stopped(backend: Backend, tmp_path: Path) -> None:
    require(backend, Capability.VCPU_REGISTERS)
    check_snapshot_round_trip(
        backend, booted(backend, p.COUNTER), tmp_path / "counter.snap", reports=_sums, counter_address=p.COUNTER_ADDRESS
    )
