"""Interrupts on the Gunyah model: the hypervisor owns the GIC.  With a device
tree that names a GICv3 (the virt board's ``/intc`` node, which the
``/gunyah-vm-config/interrupts`` ``config`` phandle points at), the guest
programs the distributor and redistributor without an exit to the VMM, takes
the virtual timer's PPI and a doorbell's SPI (the VMM signals the irqfd's
Event) through its own vectors, and powers off through PSCI."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import gunyah_guests as guests
import pytest

from pyvmm.boot import BootSpec
from pyvmm.config import Arch
from pyvmm.exits import InterruptedExit, MmioExit, SystemEvent, SystemEventExit
from pyvmm.host import Event
from pyvmm.machine.virt import (
    GIC_DISTRIBUTOR_BASE,
    GIC_REDISTRIBUTOR_BASE,
)
from pyvmm.softcpu.gic import Gic
from pyvmm.testing.conformance.programs_aarch64 import Aarch64Program
from pyvmm.testing.driver_model import ModelGap
from pyvmm.vm import Backend, Vcpu, Vm
from pyvmm_gunyah import model as gm

pytest.importorskip("unicorn", reason="the Gunyah model runs guests on the software CPU (unicorn)")

SPEC = BootSpec(arch=Arch.AARCH64, entry=guests.CODE_ADDRESS, fdt_address=guests.FDT_ADDRESS, fdt_size=guests.FDT_SIZE)


@contextmanager
def booted(
    backend: Backend, guest: Aarch64Program, setup: Callable[[Vm], object], *, gic: bool = True
) -> Iterator[tuple[Vm, Vcpu]]:
    with backend.create_vm({"arch": "aarch64", "vcpus": 1}) as vm:
        vm.add_memory(guests.RAM_BASE, guests.RAM_SIZE)
        vm.memory.write(guests.CODE_ADDRESS, guest.code)
        setup(vm)
        if gic:
            guests.write_device_tree(vm, gic=True)
        else:
            guests.write_device_tree(vm)
        vcpu = vm.create_vcpu()
        vm.boot(SPEC)
        yield vm, vcpu


@pytest.fixture
def event() -> Iterator[Event]:
    made = Event()
    yield made
    made.close()


def _bell(event: Event) -> Callable[[Vm], object]:
    return lambda vm: vm.register_irqfd(event, guests.DOORBELL_LABEL)


def logged(vcpu: Vcpu) -> int:
    """The next exit is the guest writing an INTID to MMIO_BASE -- no GIC access
    before it became an exit."""
    exit_ = vcpu.run()
    assert isinstance(exit_, MmioExit), f"expected the guest's log write, got {exit_!r}"
    assert (exit_.address, exit_.is_write, exit_.size) == (guests.MMIO_BASE, True, 4), exit_
    return int.from_bytes(exit_.data[:4], "little")


def _gic(model: gm.GunyahModel) -> Gic:
    gic = model.vms[0].gic
    assert gic is not None
    return gic


def test_timer_and_doorbell_interrupts_through_the_guest_vectors(
    gunyah: Backend, model: gm.GunyahModel, event: Event
) -> None:
    with booted(gunyah, guests.TIMER_AND_DOORBELL, _bell(event)) as (_, vcpu):
        gic = _gic(model)
        assert (gic.distributor_base, gic.redistributor_base) == (GIC_DISTRIBUTOR_BASE, GIC_REDISTRIBUTOR_BASE)
        # The guest programmed the distributor and redistributor (no exit), armed
        # the timer and slept in WFI until the timer's PPI.
        assert logged(vcpu) == guests.VTIMER_INTID
        assert gic.ctlr == 0x12 and gic.spis[guests.DOORBELL_INTID - 32].enabled
        state = gic.cpus[0]
        assert state.private[guests.VTIMER_INTID].enabled and state.pmr == 0xF0
        # Back in WFI after the handler masked the timer: the doorbell, rung from
        # another thread while the vCPU sleeps, is its SPI.
        ring = threading.Timer(0.1, event.signal)
        ring.start()
        try:
            assert logged(vcpu) == guests.DOORBELL_INTID
        finally:
            ring.cancel()
        exit_ = vcpu.run()
        assert isinstance(exit_, SystemEventExit) and exit_.event is SystemEvent.SHUTDOWN, exit_
        assert model.stats.psci_calls[-1] == gm.PSCI_SYSTEM_OFF
        assert model.vms[0].doorbells[guests.DOORBELL_LABEL].rung == 1
        assert not state.active_stack and state.timer_ctl == 2


def test_gic_reads_are_answered_by_the_hypervisor(gunyah: Backend, model: gm.GunyahModel, event: Event) -> None:
    with booted(gunyah, guests.GIC_READS, _bell(event)) as (_, vcpu):
        gicd_typer = logged(vcpu)
        assert gicd_typer & 0x1F == len(_gic(model).spis) // 32 and gicd_typer >> 19 & 0x1F == 9
        exit_ = vcpu.run()
        assert isinstance(exit_, MmioExit) and (exit_.address, exit_.size) == (guests.MMIO_BASE + 8, 8)
        # GICR_TYPER: affinity 0, processor 0, Last (the only redistributor).
        assert int.from_bytes(exit_.data[:8], "little") == 1 << 4
        assert isinstance(vcpu.run(), SystemEventExit)


def test_a_doorbell_the_guest_never_enabled_does_not_wake_it(
    gunyah: Backend, model: gm.GunyahModel, event: Event
) -> None:
    """DOORBELL_WAKE never programs the GIC: with a GIC its doorbell's SPI stays
    pending and disabled, so nothing signals the CPU and WFI sleeps on (only a
    kick ends the run)."""
    with booted(gunyah, guests.DOORBELL_WAKE, _bell(event)) as (_, vcpu):
        event.signal()
        kicker = threading.Timer(0.2, vcpu.kick)
        kicker.start()
        try:
            assert isinstance(vcpu.run(), InterruptedExit)
        finally:
            kicker.join()
        irq = _gic(model).spis[guests.DOORBELL_INTID - 32]
        assert irq.pending and not irq.enabled
        assert model.vms[0].doorbells[guests.DOORBELL_LABEL].rung == 1


def test_a_doorbell_in_a_vm_whose_tree_names_no_gic_is_a_model_gap(
    gunyah: Backend, model: gm.GunyahModel, event: Event
) -> None:
    """A tree whose ``interrupts { config }`` names no node: Gunyah still has its
    vGIC (the RM places it by platform), the model does not know where or how the
    guest programmed it, so a ring is a ``ModelGap`` -- not a guessed wake-up."""
    with booted(gunyah, guests.DOORBELL_WAKE, _bell(event), gic=False) as (_, vcpu):
        assert model.vms[0].gic is None
        event.signal()
        with pytest.raises(ModelGap, match="names no GIC"):
            vcpu.run()
