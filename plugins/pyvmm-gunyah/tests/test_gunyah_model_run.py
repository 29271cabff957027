"""Guest code on the Gunyah model, through pyvmm-gunyah: the run loop, MMIO
completion on the next run, what the hypervisor handles itself (PSCI, WFI,
doorbells, ioeventfds), status exits, kicks, signals (an exit that comes back
with EINTR), the run lock.  Plus the run-loop rules, broken on purpose through
the raw seam."""

from __future__ import annotations

import dataclasses
import errno
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import gunyah_guests as guests
import pytest
from gunyah_raw import PAGE, RawVcpu, RawVm, raw_fdt

from pyvmm.arch.aarch64 import PC_ID
from pyvmm.boot import BootSpec
from pyvmm.config import Arch
from pyvmm.errors import HypervisorError
from pyvmm.exits import ExitKind, InternalErrorExit, InterruptedExit, MmioExit, SystemEvent, SystemEventExit
from pyvmm.host import Event
from pyvmm.testing.conformance.programs_aarch64 import Aarch64Program
from pyvmm.testing.driver_model import ModelGap, Rule
from pyvmm.vcpu_state import IoEventAddress
from pyvmm.vm import Backend, Vcpu, Vm
from pyvmm_gunyah import model as gm

#: Run-loop rules; test_gunyah_model_rules checks every rule has a negative test.
RUN_RULES: tuple[Rule, ...] = (gm.R_RESUME_ACTION,)


SPEC = BootSpec(arch=Arch.AARCH64, entry=guests.CODE_ADDRESS, fdt_address=guests.FDT_ADDRESS, fdt_size=guests.FDT_SIZE)


@contextmanager
def booted(
    backend: Backend,
    guest: Aarch64Program,
    *,
    vcpus: int = 1,
    setup: Callable[[Vm], object] | None = None,
    gic: bool = False,
    **boot: object,
) -> Iterator[tuple[Vm, list[Vcpu]]]:
    """A VM with ``guest`` at CODE_ADDRESS and a device tree (naming a GIC with
    ``gic``), booted; ``setup`` runs before the vCPUs exist (doorbells, ioeventfds)."""
    with backend.create_vm({"arch": "aarch64", "vcpus": vcpus}) as vm:
        vm.add_memory(guests.RAM_BASE, guests.RAM_SIZE)
        vm.memory.write(guests.CODE_ADDRESS, guest.code)
        if setup is not None:
            setup(vm)
        guests.write_device_tree(vm, gic=gic)  # the RM makes the vCPUs and doorbells it names
        cpus = [vm.create_vcpu() for _ in range(vcpus)]
        vm.boot(dataclasses.replace(SPEC, **boot))
        yield vm, cpus


def mmio(vcpu: Vcpu) -> MmioExit:
    exit_ = vcpu.run()
    assert isinstance(exit_, MmioExit), f"expected an MMIO exit, got {exit_!r}"
    return exit_


def written(vcpu: Vcpu, address: int) -> int:
    exit_ = mmio(vcpu)
    assert (exit_.address, exit_.is_write) == (address, True)
    return int.from_bytes(exit_.data[: exit_.size], "little")


def system_event(vcpu: Vcpu) -> SystemEventExit:
    exit_ = vcpu.run()
    assert isinstance(exit_, SystemEventExit), f"expected a system event, got {exit_!r}"
    return exit_


def runs(model: gm.GunyahModel) -> int:
    return len(model.calls_named("GH_VCPU_RUN"))


@pytest.fixture(autouse=True)
def _no_rule_broken(model: gm.GunyahModel) -> Iterator[None]:
    yield
    model.assert_no_rejections()


# --- MMIO -----------------------------------------------------------------------------


def test_mmio_read_is_completed_by_the_next_run(gunyah: Backend, model: gm.GunyahModel) -> None:
    with booted(gunyah, guests.READ_THEN_WRITE) as (_, (vcpu,)):
        read = mmio(vcpu)
        assert (read.address, read.size, read.is_write) == (guests.MMIO_BASE, 4, False)
        (state,) = model.vms[0].vcpus.values()
        assert state.state == state.MMIO_READ  # the driver waits for the next RUN
        read.data[:4] = struct.pack("<I", 0x1234_5678)
        before = runs(model)
        assert written(vcpu, guests.MMIO_BASE + 8) == 0x1234_5678
        assert runs(model) == before + 1
        assert system_event(vcpu).event is SystemEvent.SHUTDOWN


def test_the_plugin_sets_resume_action_handled(gunyah: Backend, model: gm.GunyahModel) -> None:
    with booted(gunyah, guests.READ_THEN_WRITE) as (_, (vcpu,)):
        read = mmio(vcpu)
        read.data[:4] = struct.pack("<I", 7)
        # Whatever the page held (the driver presets HANDLED), the completion says HANDLED.
        (state,) = model.vms[0].vcpus.values()
        state.page.view[gm.RUN_MMIO_RESUME] = gm.RESUME_RETRY
        assert written(vcpu, guests.MMIO_BASE + 8) == 7


def test_a_kick_between_read_and_run_keeps_the_data(gunyah: Backend, model: gm.GunyahModel) -> None:
    with booted(gunyah, guests.READ_THEN_WRITE) as (_, (vcpu,)):
        read = mmio(vcpu)
        read.data[:4] = struct.pack("<I", 0xABCD)
        vcpu.kick()
        before = runs(model)
        assert isinstance(vcpu.run(), InterruptedExit)
        # The driver would have consumed the completion and then returned EINTR,
        # losing the data: the plugin must not have called RUN.
        assert runs(model) == before
        assert written(vcpu, guests.MMIO_BASE + 8) == 0xABCD


def test_the_raw_driver_loses_a_read_completed_under_immediate_exit() -> None:
    """What the plugin works around (gunyah_vcpu.c gunyah_vcpu_run): the
    completion is taken from the page before immediate_exit is checked."""
    raw = RawVm.create(gm.GunyahModel())
    try:
        vcpu = RawVcpu.of(raw, raw.startable(code=guests.READ_THEN_WRITE.code))
        assert raw.start() == 0
        assert vcpu.run() == 0
        assert vcpu.mmio() == (guests.MMIO_BASE, 4, False, bytes(4))
        vcpu.complete_read(struct.pack("<I", 0xABCD))
        vcpu.page[gm.RUN_IMMEDIATE_EXIT] = 1
        assert vcpu.run() == -errno.EINTR
        vcpu.page[gm.RUN_IMMEDIATE_EXIT] = 0
        assert vcpu.run() == 0
        assert vcpu.mmio() == (guests.MMIO_BASE + 8, 4, True, bytes(4))
        raw.model.assert_no_rejections()
    finally:
        raw.close()


def test_resume_action_must_be_handled_or_fault() -> None:
    raw = RawVm.create(gm.GunyahModel())
    try:
        vcpu = RawVcpu.of(raw, raw.startable(code=guests.READ_THEN_WRITE.code))
        assert raw.start() == 0
        assert vcpu.run() == 0
        vcpu.complete_read(bytes(4), resume_action=gm.RESUME_RETRY)
        assert vcpu.run() == -errno.EINVAL
        rejection = raw.model.last_rejection
        assert rejection is not None
        assert rejection.rule is gm.R_RESUME_ACTION
    finally:
        raw.close()


def test_a_broken_rule_with_a_signal_pending_leaves_through_out_as_eintr() -> None:
    """gunyah_vcpu_run's ``out:`` returns ERESTARTSYS whenever a signal is pending,
    whatever error the checks set: the caller sees EINTR, the rule still counts."""
    raw = RawVm.create(gm.GunyahModel())
    try:
        vcpu = RawVcpu.of(raw, raw.startable(code=guests.READ_THEN_WRITE.code))
        assert raw.start() == 0
        assert vcpu.run() == 0
        vcpu.complete_read(bytes(4), resume_action=gm.RESUME_RETRY)
        raw.model.signal_at(gm.RUN_LOCK_TAKEN)
        assert vcpu.run() == -errno.EINTR
        (rejection,) = raw.model.rejections
        assert rejection.rule is gm.R_RESUME_ACTION
        assert vcpu.run() == -errno.EINVAL  # no signal now: the rule's own errno
    finally:
        raw.close()


def test_fault_injection_is_not_modelled() -> None:
    raw = RawVm.create(gm.GunyahModel())
    try:
        vcpu = RawVcpu.of(raw, raw.startable(code=guests.READ_THEN_WRITE.code))
        assert raw.start() == 0
        assert vcpu.run() == 0
        vcpu.complete_read(bytes(4), resume_action=gm.RESUME_FAULT)
        with pytest.raises(ModelGap, match="fault injection"):
            vcpu.run()
    finally:
        raw.close()


# --- boot registers --------------------------------------------------------------------


def test_the_hypervisor_sets_the_boot_registers(gunyah: Backend) -> None:
    stack = guests.STACK_TOP
    with booted(gunyah, guests.REPORT_REGISTERS, stack=stack, registers={"x1": 0x5EED}) as (_, (vcpu,)):
        assert written(vcpu, guests.MMIO_BASE) == guests.FDT_ADDRESS  # X0: the RM passes the DTB
        assert written(vcpu, guests.MMIO_BASE + 8) == 0x5EED  # X1: from the boot context
        assert written(vcpu, guests.MMIO_BASE + 16) == stack  # SP_EL1: from the boot context
        assert system_event(vcpu).event is SystemEvent.SHUTDOWN


def test_without_a_boot_context_pc_is_the_start_of_the_dtb_region() -> None:
    raw = RawVm.create(gm.GunyahModel())
    try:
        vcpu = RawVcpu.of(raw, raw.startable(code=guests.REPORT_REGISTERS.code))
        assert raw.start() == 0
        assert vcpu.run() == 0
        (dtb, _) = raw.model.vms[0].dtb or (0, 0)
        assert vcpu.mmio() == (guests.MMIO_BASE, 8, True, struct.pack("<Q", dtb))
    finally:
        raw.close()


def test_a_protected_vm_with_firmware_starts_in_it(gunyah: Backend, model: gm.GunyahModel) -> None:
    # docs/backends/gunyah.md §5.2 step 7: the boot context applies to unauthenticated VMs only.
    firmware = {"address": guests.RAM_BASE, "size": 0x10000}
    config = {"arch": "aarch64", "protection": "protected", "backend_options": {"firmware": firmware}}
    with gunyah.create_vm(config) as vm:
        vm.add_memory(guests.RAM_BASE, guests.RAM_SIZE)
        vm.create_vcpu()
        guests.write_device_tree(vm)
        vm.boot(SPEC)
        (state,) = model.vms
        assert state.applied_boot_context() == {}
        boot = state.hv_vcpus[0].boot_registers
        assert boot is not None
        assert boot[PC_ID] == guests.RAM_BASE


# --- what the hypervisor handles itself --------------------------------------------------


def test_psci_queries_are_answered_by_the_hypervisor(gunyah: Backend) -> None:
    with booted(gunyah, guests.PSCI_QUERIES) as (_, (vcpu,)):
        assert written(vcpu, guests.MMIO_BASE) == gm.PSCI_VERSION_1_1
        assert written(vcpu, guests.MMIO_BASE + 8) == gm.PSCI_SUCCESS  # FEATURES(CPU_ON)
        assert written(vcpu, guests.MMIO_BASE + 16) == (1 << 64) - 1  # not implemented: -1
        assert system_event(vcpu).event is SystemEvent.SHUTDOWN


def test_smccc_queries_get_gunyahs_answers(gunyah: Backend) -> None:
    # hyp/vm/smccc (SMCCC 1.3), psci_features: SYSTEM_OFF has no SMC64 entry in
    # psci.ev, AFFINITY_INFO reads its table constant 0, ARCH_FEATURES(VERSION) 0.
    minus_one = (1 << 64) - 1
    with booted(gunyah, guests.SMCCC_QUERIES) as (_, (vcpu,)):
        assert written(vcpu, guests.MMIO_BASE) == gm.SMCCC_VERSION_1_3
        assert written(vcpu, guests.MMIO_BASE + 8) == minus_one
        assert written(vcpu, guests.MMIO_BASE + 16) == gm.PSCI_SUCCESS
        assert written(vcpu, guests.MMIO_BASE + 24) == gm.PSCI_SUCCESS
        assert written(vcpu, guests.MMIO_BASE + 32) == minus_one  # PSCI_VERSION is SMC32-only
        assert system_event(vcpu).event is SystemEvent.SHUTDOWN


@pytest.mark.parametrize(
    ("guest", "gap"),
    [(guests.AFFINITY_INFO, "PSCI AFFINITY_INFO"), (guests.VENDOR_HYPERCALL, "hypervisor service call")],
    ids=["psci-affinity-info", "vendor-hypercall"],
)
def test_calls_gunyah_answers_but_the_model_does_not_are_model_gaps(
    gunyah: Backend, guest: Aarch64Program, gap: str
) -> None:
    with booted(gunyah, guest) as (_, (vcpu,)), pytest.raises(ModelGap, match=gap):
        vcpu.run()


def test_system_reset2_is_a_reset_carrying_its_type(gunyah: Backend) -> None:
    with booted(gunyah, guests.RESET2) as (_, (vcpu,)):
        for _ in range(2):
            event = system_event(vcpu)
            assert (event.event, event.data) == (SystemEvent.RESET, (gm.RM_PSCI_SYSTEM_RESET2, guests.RESET2_TYPE))


def test_power_off_is_sticky(gunyah: Backend, model: gm.GunyahModel) -> None:
    with booted(gunyah, guests.REPORT_REGISTERS) as (_, (vcpu,)):
        for _ in range(3):
            mmio(vcpu)
        for _ in range(3):
            event = system_event(vcpu)
            assert (event.event, event.data) == (SystemEvent.SHUTDOWN, (gm.RM_PSCI_POWER_OFF, 0))
        assert model.vms[0].status == gm.VmStatus.EXITED


def test_an_exception_the_software_cpu_cannot_deliver_is_a_model_gap(gunyah: Backend, model: gm.GunyahModel) -> None:
    # The guest would take it at its own vectors; the model does not invent a crash.
    with booted(gunyah, guests.UNDEFINED) as (_, (vcpu,)):
        with pytest.raises(ModelGap, match="guest exception"):
            vcpu.run()
        assert model.vms[0].status == gm.VmStatus.RUNNING


def test_fetch_from_unbacked_memory_is_a_page_fault(gunyah: Backend) -> None:
    with booted(gunyah, guests.FETCH_FAULT) as (_, (vcpu,)):
        exit_ = vcpu.run()
        assert isinstance(exit_, InternalErrorExit)
        assert exit_.suberror == gm.EXIT_PAGE_FAULT
        assert exit_.data == (guests.UNBACKED, -errno.ENOENT)
        with pytest.raises(ModelGap, match="page-fault exit"):
            vcpu.run()


def test_the_driver_never_reads_page_fault_resume_action() -> None:
    """gunyah_handle_page_fault presets the action and keeps no state: the next
    RUN is an ordinary one, whatever the page's page_fault.resume_action holds."""
    raw = RawVm.create(gm.GunyahModel())
    try:
        vcpu = RawVcpu.of(raw, raw.startable(code=guests.FETCH_FAULT.code))
        assert raw.start() == 0
        assert vcpu.run() == 0
        assert vcpu.exit_reason == gm.EXIT_PAGE_FAULT
        assert vcpu.page[gm.RUN_PF_RESUME] == gm.RESUME_FAULT
        vcpu.page[gm.RUN_PF_RESUME] = 0x7F  # no valid action at all
        vcpu.page[gm.RUN_IMMEDIATE_EXIT] = 1
        assert vcpu.run() == -errno.EINTR  # straight to the run loop
        raw.model.assert_no_rejections()
    finally:
        raw.close()


@pytest.fixture
def event() -> Iterator[Event]:
    made = Event()
    yield made
    made.close()


def _ioevent(event: Event, datamatch: int | None) -> Callable[[Vm], object]:
    return lambda vm: vm.register_ioevent(event, IoEventAddress.mmio(guests.IOEVENT_ADDRESS), datamatch, length=4)


def test_ioeventfd_write_signals_without_an_exit(gunyah: Backend, event: Event) -> None:
    with booted(gunyah, guests.IOEVENT, setup=_ioevent(event, 0x2A)) as (_, (vcpu,)):
        assert written(vcpu, guests.MMIO_BASE) == 0x2A  # the first write never reached the VMM
        assert event.consume() == 1
        assert system_event(vcpu).event is SystemEvent.SHUTDOWN


def test_a_completion_reaches_the_guest_once(gunyah: Backend, event: Event) -> None:
    """The read's data goes to the first hypercall only; the driver zeroes the
    resume data after each one (gunyah_vcpu_run), so the ioeventfd write the
    hypervisor then hands back to the driver does not carry it again."""
    with booted(gunyah, guests.READ_IOEVENT_WRITE, setup=_ioevent(event, None)) as (_, (vcpu,)):
        read = mmio(vcpu)
        read.data[:4] = struct.pack("<I", 0x1234)
        assert written(vcpu, guests.MMIO_BASE + 8) == 0x1234
        assert event.consume() == 1


def test_ioeventfd_with_other_data_lets_the_write_exit(gunyah: Backend, event: Event) -> None:
    with booted(gunyah, guests.IOEVENT, setup=_ioevent(event, 0x2B)) as (_, (vcpu,)):
        assert written(vcpu, guests.IOEVENT_ADDRESS) == 0x2A
        assert event.consume() == 0


def _doorbell(event: Event, ring_before_start: bool = False) -> Callable[[Vm], object]:
    def setup(vm: Vm) -> None:
        vm.register_irqfd(event, guests.DOORBELL_LABEL)
        if ring_before_start:
            event.signal()  # no doorbell resource yet: dropped

    return setup


def test_a_doorbell_wakes_a_vcpu_in_wfi(gunyah: Backend, model: gm.GunyahModel, event: Event) -> None:
    with booted(gunyah, guests.DOORBELL_ENABLED_WAKE, setup=_doorbell(event, ring_before_start=True), gic=True) as (
        _,
        (vcpu,),
    ):
        ring = threading.Timer(0.2, event.signal)
        ring.start()
        try:
            assert written(vcpu, guests.MMIO_BASE) == guests.MMIO_BASE & 0xFFFFFFFF
        finally:
            ring.cancel()
        bell = model.vms[0].doorbells[guests.DOORBELL_LABEL]
        assert (bell.dropped, bell.rung) == (1, 1)


def test_a_kick_from_another_thread_ends_a_wfi_sleep(gunyah: Backend, event: Event) -> None:
    with booted(gunyah, guests.DOORBELL_ENABLED_WAKE, setup=_doorbell(event), gic=True) as (_, (vcpu,)):
        kicker = threading.Timer(0.2, vcpu.kick)
        kicker.start()
        assert isinstance(vcpu.run(), InterruptedExit)
        kicker.join()
        event.signal()
        assert written(vcpu, guests.MMIO_BASE) == guests.MMIO_BASE & 0xFFFFFFFF


def test_the_kick_follows_the_thread_that_runs_the_vcpu(gunyah: Backend, event: Event) -> None:
    """Created here, run on a worker: the signal must reach the worker, the only
    thing that wakes a vCPU sleeping in WFI (immediate_exit is not read there)."""
    with booted(gunyah, guests.DOORBELL_ENABLED_WAKE, setup=_doorbell(event), gic=True) as (_, (vcpu,)):
        results: list[object] = []
        running = threading.Event()

        def worker() -> None:
            running.set()
            try:
                results.append(vcpu.run())
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                results.append(exc)

        thread = threading.Thread(target=worker)
        thread.start()
        assert running.wait(5)
        threading.Event().wait(0.2)  # let it fall asleep in WFI
        vcpu.kick()
        thread.join(10)
        assert not thread.is_alive()
        (exit_,) = results
        assert isinstance(exit_, InterruptedExit), exit_
        assert vcpu.handle.kicker.thread == thread.ident
        # Back on this thread, the kick follows again.
        event.signal()
        assert written(vcpu, guests.MMIO_BASE) == guests.MMIO_BASE & 0xFFFFFFFF
        assert vcpu.handle.kicker.thread == threading.get_ident()


def test_a_kick_from_another_thread_stops_a_running_guest(gunyah: Backend, model: gm.GunyahModel) -> None:
    with booted(gunyah, guests.LOOP) as (_, (vcpu,)):
        for _ in range(2):
            kicker = threading.Timer(0.1, vcpu.kick)
            kicker.start()
            exit_ = vcpu.run()
            kicker.join()
            assert exit_.kind is ExitKind.INTERRUPTED
        signals = [c for c in model.calls if c.op == "signal"]
        assert len(signals) == 2


def test_psci_cpu_on_starts_the_secondary_vcpu(gunyah: Backend, model: gm.GunyahModel) -> None:
    with gunyah.create_vm({"arch": "aarch64", "vcpus": 2}) as vm:
        vm.add_memory(guests.RAM_BASE, guests.RAM_SIZE)
        vm.memory.write(guests.CODE_ADDRESS, guests.SMP.code)
        boot_vcpu = vm.create_vcpu()
        created = threading.Event()
        started = threading.Event()
        secondary: dict[str, object] = {}

        def second_thread() -> None:
            try:
                vcpu = vm.create_vcpu()  # its thread is this one
                created.set()
                started.wait(5)
                secondary["context"] = written(vcpu, guests.MMIO_BASE + 8)
                secondary["event"] = system_event(vcpu).event
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                secondary["error"] = exc
                created.set()

        worker = threading.Thread(target=second_thread)
        worker.start()
        assert created.wait(5)
        guests.write_device_tree(vm)
        # Boot at VM level: no per-vCPU call, so each vCPU stays on its own thread.
        vm.set_boot(SPEC)
        vm.start()
        started.set()
        assert written(boot_vcpu, guests.MMIO_BASE) == gm.PSCI_ALREADY_ON & ((1 << 64) - 1)
        assert written(boot_vcpu, guests.MMIO_BASE) == gm.PSCI_SUCCESS
        worker.join(10)
        assert "error" not in secondary, secondary.get("error")
        assert secondary == {"context": guests.CONTEXT_ID, "event": SystemEvent.SHUTDOWN}
        # The boot vCPU idled in WFI; the power-off ended that.
        assert system_event(boot_vcpu).event is SystemEvent.SHUTDOWN


# --- run errors ----------------------------------------------------------------------------


def test_run_from_another_process_is_refused() -> None:
    fresh = gm.GunyahModel()
    with fresh.installed():
        from conftest import make_backend

        with booted(make_backend(), guests.LOOP) as (_, (vcpu,)):
            with fresh.foreign_process(), pytest.raises(HypervisorError, match="GH_VCPU_RUN") as caught:
                vcpu.run()
            assert caught.value.errno == errno.EPERM
    assert [r.rule for r in fresh.rejections] == [gm.R_FOREIGN_MM]


def test_raw_run_before_start_and_sticky_status_via_the_page() -> None:
    raw = RawVm.create(gm.GunyahModel())
    try:
        vcpu = RawVcpu.of(raw, raw.startable(code=guests.LOOP.code))
        assert vcpu.run() == -errno.ENODEV
        raw.model.rejections.clear()
        assert raw.start() == 0
        raw.model.rm_status(raw.model.vms[0], gm.VmStatus.CRASHED)
        for _ in range(2):
            assert vcpu.run() == 0
            assert vcpu.exit_reason == gm.EXIT_STATUS
            assert vcpu.status() == (gm.STATUS_CRASHED, 0)
        # Sticky even with immediate_exit set: the completion step returns first.
        vcpu.page[gm.RUN_IMMEDIATE_EXIT] = 1
        assert vcpu.run() == 0
        assert vcpu.exit_reason == gm.EXIT_STATUS
        assert raw.model.rejections == []
    finally:
        raw.close()


def test_page_is_page_sized() -> None:
    raw = RawVm.create(gm.GunyahModel())
    try:
        vcpu = raw.add_vcpu(0)
        assert raw.ioctl(gm.GH_VCPU_MMAP_SIZE, fd=vcpu) == PAGE
    finally:
        raw.close()


# --- signals: an exit that comes back with EINTR, the run lock, WFI -----------------------


def test_raw_a_signal_as_the_exit_is_made_gives_eintr_with_the_exit_kept() -> None:
    """gunyah_vcpu_run, ``out:``: a pending signal turns the result into
    ERESTARTSYS with the exit already in the page; the state stays MMIO_READ and
    the next RUN consumes the completion the page holds (§6.5)."""
    raw = RawVm.create(gm.GunyahModel())
    try:
        vcpu = RawVcpu.of(raw, raw.startable(code=guests.READ_THEN_WRITE.code))
        assert raw.start() == 0
        raw.model.signal_at(gm.HYPERCALL_RETURNED)
        assert vcpu.run() == -errno.EINTR
        assert vcpu.exit_reason == gm.EXIT_MMIO
        assert vcpu.mmio()[:3] == (guests.MMIO_BASE, 4, False)
        (state,) = raw.model.vms[0].vcpus.values()
        assert state.state == state.MMIO_READ
        vcpu.page[gm.RUN_MMIO_DATA : gm.RUN_MMIO_DATA + 4] = struct.pack("<I", 0x55AA)
        assert vcpu.run() == 0
        assert vcpu.mmio() == (guests.MMIO_BASE + 8, 4, True, struct.pack("<I", 0x55AA))
        raw.model.assert_no_rejections()
    finally:
        raw.close()


def test_raw_with_sa_restart_the_exit_is_completed_unseen() -> None:
    """With SA_RESTART the interrupted RUN restarts at once and consumes the
    completion the driver preset: the guest's read gets whatever the page held.
    Python's handlers have no SA_RESTART, so the plugin sees the EINTR."""
    raw = RawVm.create(gm.GunyahModel())
    raw.model.sa_restart = True
    try:
        vcpu = RawVcpu.of(raw, raw.startable(code=guests.WRITE_THEN_READ.code))
        assert raw.start() == 0
        assert vcpu.run() == 0
        assert vcpu.mmio()[:3] == (guests.MMIO_BASE, 4, True)
        raw.model.signal_at(gm.HYPERCALL_RETURNED)
        assert vcpu.run() == 0  # the read exit was made, then the call restarted
        assert vcpu.mmio() == (guests.MMIO_BASE + 16, 4, True, struct.pack("<I", 0x2A))
    finally:
        raw.close()


def test_raw_mmio_read_data_is_left_stale() -> None:
    """gunyah_handle_mmio fills ``data`` for a write only, and only ``len`` bytes:
    a read exit shows what the page held before."""
    raw = RawVm.create(gm.GunyahModel())
    try:
        vcpu = RawVcpu.of(raw, raw.startable(code=guests.WRITE_THEN_READ.code))
        assert raw.start() == 0
        assert vcpu.run() == 0
        assert vcpu.mmio() == (guests.MMIO_BASE, 4, True, struct.pack("<I", 0x2A))
        vcpu.page[gm.RUN_MMIO_DATA + 4 : gm.RUN_MMIO_DATA + 8] = b"\x11\x22\x33\x44"
        assert vcpu.run() == 0
        assert vcpu.mmio() == (guests.MMIO_BASE + 8, 4, False, struct.pack("<I", 0x2A))
        assert bytes(vcpu.page[gm.RUN_MMIO_DATA + 4 : gm.RUN_MMIO_DATA + 8]) == b"\x11\x22\x33\x44"
        assert vcpu.run() == 0  # completed without new data: the guest reads the stale bytes
        assert vcpu.mmio() == (guests.MMIO_BASE + 16, 4, True, struct.pack("<I", 0x2A))
    finally:
        raw.close()


def test_the_plugin_returns_an_exit_that_came_back_with_eintr(gunyah: Backend, model: gm.GunyahModel) -> None:
    with booted(gunyah, guests.READ_THEN_WRITE) as (_, (vcpu,)):
        model.signal_at(gm.HYPERCALL_RETURNED)
        read = mmio(vcpu)  # not an interrupted run: the read would be lost
        assert (read.address, read.size, read.is_write) == (guests.MMIO_BASE, 4, False)
        assert model.calls_named("GH_VCPU_RUN")[-1].errno == errno.EINTR
        read.data[:4] = struct.pack("<I", 0xBEEF)
        model.signal_at(gm.HYPERCALL_RETURNED)
        assert written(vcpu, guests.MMIO_BASE + 8) == 0xBEEF  # and the write is seen too
        assert model.calls_named("GH_VCPU_RUN")[-1].errno == errno.EINTR
        assert system_event(vcpu).event is SystemEvent.SHUTDOWN


def test_a_kick_racing_an_exit_is_acknowledged(gunyah: Backend, model: gm.GunyahModel) -> None:
    """A kick whose signal lands as the exit is made: the exit is returned, the
    kick counts as done (immediate_exit cleared, the next kick signals again)."""
    with booted(gunyah, guests.READ_THEN_WRITE) as (_, (vcpu,)):

        def kick_from_another_thread() -> None:
            kicker = threading.Thread(target=vcpu.kick)
            kicker.start()
            kicker.join()

        model.at(gm.HYPERCALL_RETURNED, kick_from_another_thread)
        read = mmio(vcpu)
        assert [c.op for c in model.calls].count("signal") == 1
        handle = vcpu.handle
        assert not handle.page.immediate_exit_requested
        assert handle.kicker._signalled is False
        read.data[:4] = struct.pack("<I", 9)
        assert written(vcpu, guests.MMIO_BASE + 8) == 9


def test_raw_a_second_threads_run_waits_for_the_first() -> None:
    """``run_lock``: one RUN per vCPU at a time; a second thread's RUN waits,
    interruptibly (mutex_lock_interruptible -> ERESTARTSYS)."""
    raw = RawVm.create(gm.GunyahModel())
    try:
        vcpu = RawVcpu.of(raw, raw.startable(code=guests.DOORBELL_WAKE.code))
        assert raw.start() == 0
        (state,) = raw.model.vms[0].vcpus.values()
        results: dict[str, int] = {}
        idents: dict[str, int] = {}

        def run(name: str) -> None:
            idents[name] = threading.get_ident()
            results[name] = vcpu.run()

        first = threading.Thread(target=run, args=("first",))
        first.start()
        deadline = time.monotonic() + 5
        while not (state.hv is not None and state.hv.waiting) and time.monotonic() < deadline:
            time.sleep(0.01)  # until it sleeps in WFI, holding the lock
        hypercalls = raw.model.stats.hypercalls
        second = threading.Thread(target=run, args=("second",))
        second.start()
        second.join(0.3)
        assert second.is_alive(), "the second RUN must wait for the first"
        assert state.running_on == idents["first"]
        assert raw.model.stats.hypercalls == hypercalls  # it never reached the hypervisor
        raw.model.post_signal(idents["second"])
        second.join(5)
        assert results["second"] == -errno.EINTR
        assert first.is_alive()
        raw.model.post_signal(idents["first"])
        first.join(5)
        assert results["first"] == -errno.EINTR
        raw.model.assert_no_rejections()
    finally:
        raw.close()


def test_raw_a_signal_alone_ends_a_wfi_sleep_and_the_vcpu_stays_in_wfi() -> None:
    raw = RawVm.create(gm.GunyahModel())
    bell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        assert raw.irqfd(bell, guests.DOORBELL_LABEL) == 0
        vcpu = RawVcpu.of(
            raw,
            raw.startable(
                code=guests.DOORBELL_ENABLED_WAKE.code, tree=raw_fdt(doorbells=[guests.DOORBELL_LABEL], gic=True)
            ),
        )
        assert raw.start() == 0
        signal = threading.Timer(0.2, raw.model.post_signal, (threading.get_ident(),))
        signal.start()
        assert vcpu.run() == -errno.EINTR  # no immediate_exit, no doorbell: the signal alone
        signal.join()
        # Still in WFI: the next RUN sleeps until the doorbell rings.
        ring = threading.Timer(0.2, os.eventfd_write, (bell, 1))
        started = time.monotonic()
        ring.start()
        assert vcpu.run() == 0
        assert time.monotonic() - started >= 0.15
        assert vcpu.mmio()[:3] == (guests.MMIO_BASE, 4, True)
        assert raw.model.vms[0].doorbells[guests.DOORBELL_LABEL].rung == 1
        raw.model.assert_no_rejections()
    finally:
        raw.close()
        os.close(bell)


def test_a_one_byte_write_hits_a_four_byte_ioeventfd_without_datamatch(gunyah: Backend, event: Event) -> None:
    # Without DATAMATCH the driver keeps no length: any write at the address matches.
    with booted(gunyah, guests.IOEVENT_BYTE, setup=_ioevent(event, None)) as (_, (vcpu,)):
        assert written(vcpu, guests.MMIO_BASE) == 0x2A  # the byte write never reached the VMM
        assert event.consume() == 1


def test_a_kick_after_the_vm_went_down_gets_the_status_again(gunyah: Backend) -> None:
    with booted(gunyah, guests.REPORT_REGISTERS) as (_, (vcpu,)):
        for _ in range(3):
            mmio(vcpu)
        assert system_event(vcpu).event is SystemEvent.SHUTDOWN
        vcpu.kick()
        assert system_event(vcpu).event is SystemEvent.SHUTDOWN
