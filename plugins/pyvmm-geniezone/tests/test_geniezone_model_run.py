"""Guests running on the GenieZone driver model through the plugin: the vGIC
delivering an irqfd's SPI and the virtual timer to the guest's vectors, an idle
vCPU sleeping in the driver, ioeventfds, a hypercall the VMM answers, PSCI
CPU_ON, and the run ioctl's signal cases (no exit lost, no kick lost)."""

from __future__ import annotations

import errno
import threading
import time

from booting import booted, mmio, powers_off, written
from geniezone_guests import (
    CONTEXT_ID,
    HYPERCALL,
    HYPERCALL_FUNCTION,
    IOEVENT,
    IOEVENT_ADDRESS,
    IRQFD_AND_TIMER,
    IRQFD_INTID,
    IRQFD_SPI,
    READ_THEN_WRITE,
    REPORT,
    SMP,
    VTIMER_INTID,
    WFI_THEN_WRITE,
)

from pyvmm.exits import ExitKind, HypercallExit, InterruptedExit
from pyvmm.host import Event
from pyvmm.testing.conformance import programs_aarch64 as p
from pyvmm.vcpu_state import IoEventAddress
from pyvmm.vm import Backend
from pyvmm_geniezone import model as gm


def test_irqfd_and_timer_reach_the_guest_vectors(geniezone: Backend, model: gm.GenieZoneModel) -> None:
    event = Event()
    with booted(geniezone, IRQFD_AND_TIMER, irqchip=True) as (vm, (vcpu,)):
        vm.register_irqfd(event, IRQFD_SPI)
        mmio(vcpu.run(), REPORT, write=True)  # ready: the GIC is set up, IRQs unmasked
        event.signal()
        assert written(vcpu.run(), REPORT + 0x10) == IRQFD_INTID, "the handler acknowledged the irqfd's SPI"
        assert written(vcpu.run(), REPORT + 0x10) == VTIMER_INTID, "then the virtual timer's PPI"
        powers_off(vcpu)
    assert model.stats.spis_raised == 1
    assert model.stats.idle_sleeps >= 1, "the vCPU waited in WFI"
    assert [c.name for c in model.calls if c.name == "GZVM_CREATE_DEVICE"] == ["GZVM_CREATE_DEVICE"] * 2
    model.assert_no_rejections()
    event.close()


def test_an_irqfd_wakes_every_idle_vcpu(geniezone: Backend, model: gm.GenieZoneModel) -> None:
    """``idle_events.virtio_irq``: an irqfd's write wakes a vCPU in WFI even when
    the guest has not enabled that interrupt."""
    event = Event()
    signalled = threading.Event()

    def write_later() -> None:
        time.sleep(0.2)
        signalled.set()
        event.signal()

    with booted(geniezone, WFI_THEN_WRITE, irqchip=True) as (vm, (vcpu,)):
        vm.register_irqfd(event, IRQFD_SPI)
        writer = threading.Thread(target=write_later)
        writer.start()
        try:
            mmio(vcpu.run(), REPORT, write=True)
            assert signalled.is_set(), "the vCPU left WFI before the irqfd was written"
        finally:
            writer.join()
    model.assert_no_rejections()
    event.close()


def test_wfi_sleeps_in_the_driver_until_kicked(geniezone: Backend, model: gm.GenieZoneModel) -> None:
    with booted(geniezone, WFI_THEN_WRITE) as (_, (vcpu,)):
        kicker = threading.Timer(0.3, vcpu.kick)
        kicker.start()
        try:
            exit_ = vcpu.run()
        finally:
            kicker.join()
        assert isinstance(exit_, InterruptedExit)
    assert model.stats.hypervisor_entries <= 3, "the vCPU slept; it did not go round the hypervisor"


def test_ioeventfd_absorbs_the_matching_write(geniezone: Backend, model: gm.GenieZoneModel) -> None:
    event = Event()
    with booted(geniezone, IOEVENT) as (vm, (vcpu,)):
        vm.register_ioevent(event, IoEventAddress.mmio(IOEVENT_ADDRESS), datamatch=0x2A, length=4)
        assert written(vcpu.run(), IOEVENT_ADDRESS) == 0x2B, "0x2a went to the eventfd, 0x2b to the VMM"
        assert event.consume() == 1
        powers_off(vcpu)
    assert model.stats.ioevents_signalled == 1
    event.close()


def test_ioeventfd_of_any_length_takes_every_write(geniezone: Backend, model: gm.GenieZoneModel) -> None:
    event = Event()
    with booted(geniezone, IOEVENT) as (vm, (vcpu,)):
        vm.register_ioevent(event, IoEventAddress.mmio(IOEVENT_ADDRESS), length=0)
        powers_off(vcpu)
        assert event.consume() == 2
        vm.unregister_ioevent(event, IoEventAddress.mmio(IOEVENT_ADDRESS), length=0)
    model.assert_no_rejections()
    event.close()


def test_a_hypercall_is_answered_in_x0(geniezone: Backend, model: gm.GenieZoneModel) -> None:
    with booted(geniezone, HYPERCALL) as (_, (vcpu,)):
        call = vcpu.run()
        assert isinstance(call, HypercallExit)
        assert (call.number, call.args[:2]) == (HYPERCALL_FUNCTION, (5, 6))
        call.result = 0x1234
        assert written(vcpu.run(), REPORT) == 0x1234
        assert written(vcpu.run(), REPORT + 8) == 5, "X1 comes back as the guest left it"
        powers_off(vcpu)
    model.assert_no_rejections()


def test_psci_cpu_on_starts_the_second_vcpu(geniezone: Backend, model: gm.GenieZoneModel) -> None:
    with booted(geniezone, SMP, vcpus=2) as (_, (first, second)):
        seen: list[object] = []
        secondary = threading.Thread(target=lambda: seen.extend([second.run(), second.run()]))
        secondary.start()
        try:
            assert written(first.run(), REPORT) == 0, "CPU_ON: SUCCESS"
            assert written(first.run(), REPORT + 8) == (-4) & (2**64 - 1), "again: ALREADY_ON"
            powers_off(first)
            time.sleep(0.1)
            second.kick()
        finally:
            secondary.join(10)
        assert written(seen[0], REPORT + 0x20) == CONTEXT_ID  # type: ignore[arg-type]
        assert isinstance(seen[1], InterruptedExit)
    model.assert_no_rejections()


def test_an_exit_made_as_a_signal_arrives_is_not_lost(geniezone: Backend, model: gm.GenieZoneModel) -> None:
    """The driver copies the exit out and *then* returns ERESTARTSYS (EINTR): the
    plugin returns the exit, and the read's data reaches the guest."""
    with booted(geniezone, READ_THEN_WRITE) as (_, (vcpu,)):
        model.signal_at(gm.HYPERVISOR_RETURNED)
        read = mmio(vcpu.run(), REPORT, write=False)
        runs = [c for c in model.calls if c.name == "GZVM_RUN"]
        assert runs[-1].errno == errno.EINTR, "the run ioctl itself failed with EINTR"
        read.data[:4] = (0xC0FFEE).to_bytes(4, "little")
        assert written(vcpu.run(), REPORT + 8) == 0xC0FFEE
        powers_off(vcpu)
    model.assert_no_rejections()


def test_a_kick_while_the_guest_runs_survives_the_copy_out(geniezone: Backend, model: gm.GenieZoneModel) -> None:
    """The driver's copy out writes the entry value of immediate_exit over a kick
    made meanwhile: the plugin puts it back, so the next run stops at once."""
    with booted(geniezone, READ_THEN_WRITE) as (_, (vcpu,)):
        model.at(gm.HYPERVISOR_RETURNED, vcpu.kick)
        read = mmio(vcpu.run(), REPORT, write=False)
        entries = model.stats.hypervisor_entries
        assert isinstance(vcpu.run(), InterruptedExit)
        assert model.stats.hypervisor_entries == entries, "the interrupted run did not enter the guest"
        read.data[:4] = (7).to_bytes(4, "little")
        assert written(vcpu.run(), REPORT + 8) == 7, "the read's completion waited for the next run"
        powers_off(vcpu)
    model.assert_no_rejections()


def test_a_kick_before_the_run_never_enters_the_guest(geniezone: Backend, model: gm.GenieZoneModel) -> None:
    with booted(geniezone, READ_THEN_WRITE) as (_, (vcpu,)):
        vcpu.kick()
        assert isinstance(vcpu.run(), InterruptedExit)
        assert model.stats.hypervisor_entries == 0
        assert vcpu.run().kind is ExitKind.MMIO
    model.assert_no_rejections()


def test_the_guest_sees_the_memory_the_vmm_wrote(geniezone: Backend, model: gm.GenieZoneModel) -> None:
    with booted(geniezone, READ_THEN_WRITE) as (vm, (vcpu,)):
        assert vm.memory.read(p.CODE_ADDRESS, len(READ_THEN_WRITE.code)) == READ_THEN_WRITE.code
        assert vcpu.run().kind is ExitKind.MMIO


def test_a_kick_that_ends_a_wfi_sleep_is_an_interruption(geniezone: Backend, model: gm.GenieZoneModel) -> None:
    """The hypervisor wrote IDLE into the run struct; the signal ends the driver's
    loop and the copy out hands that reason to the VMM with EINTR: no exit."""
    with booted(geniezone, WFI_THEN_WRITE) as (_, (vcpu,)):
        kicker = threading.Timer(0.2, vcpu.kick)
        kicker.start()
        try:
            exit_ = vcpu.run()
        finally:
            kicker.join()
        assert isinstance(exit_, InterruptedExit)
        assert model.stats.idle_sleeps >= 1, "the vCPU was asleep in the driver when the kick came"
    model.assert_no_rejections()


def test_a_write_an_ioeventfd_took_is_not_delivered_again(geniezone: Backend, model: gm.GenieZoneModel) -> None:
    """A signal as the hypervisor returns a write the driver hands to an
    ioeventfd: the driver signals the eventfd, its loop ends, and the copy out
    carries that MMIO write with EINTR.  The VMM must not perform it twice."""
    event = Event()
    with booted(geniezone, IOEVENT) as (vm, (vcpu,)):
        vm.register_ioevent(event, IoEventAddress.mmio(IOEVENT_ADDRESS), datamatch=0x2A, length=4)
        model.signal_at(gm.HYPERVISOR_RETURNED)
        assert isinstance(vcpu.run(), InterruptedExit), "0x2a went to the eventfd only"
        assert model.stats.ioevents_signalled == 1 and event.consume() == 1
        assert written(vcpu.run(), IOEVENT_ADDRESS) == 0x2B
        powers_off(vcpu)
    model.assert_no_rejections()
    event.close()
