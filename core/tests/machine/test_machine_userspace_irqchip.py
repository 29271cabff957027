"""The userspace interrupt controller: the ``irqchip`` setting, the PC board's
8259s and 8254 on the port bus, and the delivery protocol (inject when the vCPU
is ready, request a window when it is not, one per exit, halt and wake) on the
contract backend, whose vCPU says whether it is ready as the test wants."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from coretests_support import MakeBackend, RecordingBackend, register
from machinetests_support import IRQCHIP_CAPS, MACHINE_CAPS, TINY_IMAGE, io_exit, machine_config

from pyvmm import cli
from pyvmm.capabilities import Capability
from pyvmm.config import Arch
from pyvmm.devices.i8259 import PicPair
from pyvmm.errors import ConfigError, UnsupportedCapability
from pyvmm.exits import IrqWindowOpenExit, VcpuExit
from pyvmm.hookspecs import hookimpl
from pyvmm.machine import Machine, StopReason
from pyvmm.machine.board import MachineEvents, interrupt_controllers
from pyvmm.machine.config import build_config
from pyvmm.machine.pc import PcBoard
from pyvmm.machine.userspace_irqchip import WINDOW_POLL_NS, UserspaceIrqchip
from pyvmm.plugins import PluginRegistry
from pyvmm.testing.contract_backend import TestVcpu, TestVm
from pyvmm.vm import Backend, Vcpu, Vm

#: A backend that injects interrupts itself and has no interrupt controllers.
INJECTING_CAPS = (*MACHINE_CAPS, Capability.INTERRUPT_INJECTION)


# --- the setting ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("caps", "mode", "expected"),
    [
        (IRQCHIP_CAPS, "auto", (True, False)),
        ((*IRQCHIP_CAPS, Capability.INTERRUPT_INJECTION), "auto", (True, False)),
        (INJECTING_CAPS, "auto", (False, True)),
        (MACHINE_CAPS, "auto", (False, False)),
        ((*IRQCHIP_CAPS, Capability.INTERRUPT_INJECTION), "userspace", (False, True)),
        (IRQCHIP_CAPS, "kernel", (True, False)),
        (IRQCHIP_CAPS, "none", (False, False)),
    ],
)
def test_the_irqchip_setting(
    make_backend: MakeBackend, caps: tuple[Capability, ...], mode: str, expected: tuple[bool, bool]
) -> None:
    _, backend = make_backend(caps)
    assert interrupt_controllers(mode, backend, Arch.X86_64) == expected


def test_what_a_backend_lacks_is_refused_by_name(make_backend: MakeBackend) -> None:
    _, plain = make_backend(MACHINE_CAPS)
    with pytest.raises(UnsupportedCapability, match="INTERRUPT_INJECTION"):
        interrupt_controllers("userspace", plain, Arch.X86_64)
    with pytest.raises(UnsupportedCapability, match="IRQCHIP"):
        interrupt_controllers("kernel", plain, Arch.X86_64)
    _, injecting = make_backend(INJECTING_CAPS, name="injecting")
    with pytest.raises(ConfigError, match="the PC's"):
        interrupt_controllers("userspace", injecting, Arch.AARCH64)
    assert interrupt_controllers("auto", injecting, Arch.AARCH64) == (False, False)


def test_the_setting_keeps_its_old_true_and_false() -> None:
    assert machine_config(irqchip=True).irqchip == "auto"
    assert machine_config(irqchip=False).irqchip == "none"
    assert machine_config().irqchip == "auto"
    with pytest.raises(ConfigError, match="irqchip"):
        build_config(None, {"irqchip": "bogus"}, option_names={"irqchip": "--irqchip"})


def test_the_command_line_takes_irqchip() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["run", "--irqchip", "userspace"])
    assert args.irqchip == "userspace"
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--irqchip", "bogus"])


def test_smp_needs_the_hypervisors_interrupt_controllers(make_backend: MakeBackend) -> None:
    _, backend = make_backend(INJECTING_CAPS)
    with pytest.raises(ConfigError, match="drives one vCPU only"):
        Machine(machine_config(cpus=2, irqchip="userspace"), backend=backend, image=TINY_IMAGE)


# --- the board ---------------------------------------------------------------------------


def build(backend: Backend, **settings: Any) -> Machine:
    return Machine(machine_config(**settings), backend=backend, image=TINY_IMAGE)


def test_the_pc_puts_its_8259s_and_8254_on_the_bus(make_backend: MakeBackend) -> None:
    test_backend, backend = make_backend(INJECTING_CAPS)
    with build(backend) as machine:
        assert machine.userspace_irqchip and not machine.irqchip
        names = {port: getattr(machine.pio.find(port), "name", None) for port in (0x20, 0xA1, 0x4D0, 0x43, 0x61)}
        assert names == {0x20: "pic-master", 0xA1: "pic-slave", 0x4D0: "elcr", 0x43: "pit", 0x61: "port-b"}
    assert "pyvmm_create_irqchip" not in test_backend.hook_names()


PROGRAM_PICS = [
    io_exit(0x20, write=True, value=0x11),
    io_exit(0x21, write=True, value=0x20),
    io_exit(0x21, write=True, value=0x04),
    io_exit(0x21, write=True, value=0x01),
    io_exit(0x21, write=True, value=0xEF),  # only IRQ 4 open
]


def test_com1_interrupts_reach_the_vcpu_through_the_8259(make_backend: MakeBackend, vms: list[Vm]) -> None:
    """The guest opens IRQ 4 and enables COM1's transmitter-empty interrupt: before
    its next entry the vCPU gets vector 0x24; the run ends when it halts with
    nothing that could wake it (no timer)."""
    test_backend, backend = make_backend(INJECTING_CAPS)
    test_backend.script_exits(*PROGRAM_PICS, io_exit(0x3F9, write=True, value=0x02))
    with build(backend) as machine:
        result = machine.run()
    assert result.reason is StopReason.HALTED
    assert [call[1] for call in test_backend.calls_of("pyvmm_inject_interrupt")] == [0x24]


class ReadyAtTheWindow(RecordingBackend):
    """A vCPU that cannot take an interrupt until its run returns the window exit."""

    __test__ = False

    @hookimpl
    def pyvmm_create_vcpu(self, vm: TestVm, index: int) -> TestVcpu:
        vcpu = super().pyvmm_create_vcpu(vm, index)
        vcpu.ready = False
        return vcpu

    @hookimpl
    def pyvmm_run_vcpu(self, vcpu: TestVcpu) -> VcpuExit:
        exit_ = super().pyvmm_run_vcpu(vcpu)
        if isinstance(exit_, IrqWindowOpenExit):
            vcpu.ready = True
        return exit_


def test_a_vcpu_that_is_not_ready_gets_a_window_and_then_the_interrupt(registry: PluginRegistry) -> None:
    test_backend = ReadyAtTheWindow("contract-test", INJECTING_CAPS)
    backend = register(registry, test_backend)
    test_backend.script_exits(*PROGRAM_PICS, io_exit(0x3F9, write=True, value=0x02), IrqWindowOpenExit())
    with build(backend) as machine:
        result = machine.run()
    assert result.reason is StopReason.HALTED
    windows = [call[1] for call in test_backend.calls_of("pyvmm_request_interrupt_window")]
    assert windows == [True, False], "requested while not ready, withdrawn once injected"
    assert [call[1] for call in test_backend.calls_of("pyvmm_inject_interrupt")] == [0x24]


# --- the delivery, driven by hand ----------------------------------------------------------


class Events:
    """MachineEvents' wait and wake for a test: wait_for returns at once."""

    def __init__(self) -> None:
        self.woken = 0

    def machine_events(self) -> MachineEvents:
        def wait_for(predicate: Callable[[], bool], seconds: float | None) -> bool:
            return predicate()

        def wake() -> None:
            self.woken += 1

        never: Any = lambda *args: None  # noqa: E731
        return MachineEvents(never, never, never, never, never, wait_for, wake)


@pytest.fixture
def vms() -> Iterator[list[Vm]]:
    """The VMs a test made by hand, closed after it."""
    made: list[Vm] = []
    yield made
    for vm in made:
        vm.close()


def delivery(
    make_backend: MakeBackend, vms: list[Vm], icw4: int = 0x01
) -> tuple[RecordingBackend, UserspaceIrqchip, PicPair, Vcpu, Events]:
    test_backend, backend = make_backend(INJECTING_CAPS)
    vm = backend.create_vm()
    vms.append(vm)
    vcpu = vm.create_vcpu()
    pic = PicPair()
    for chip, base, icw3 in ((pic.master, 0x20, 4), (pic.slave, 0x28, 2)):
        for offset, value in ((0, 0x11), (1, base), (1, icw3), (1, icw4), (1, 0x00)):
            pic.port_write(chip, offset, value)
    events = Events()
    chip = UserspaceIrqchip(backend, events.machine_events(), pic, timer_thread=False, clock=lambda: 0)
    pic.on_change = chip.output_changed
    chip.attach(vcpu)
    return test_backend, chip, pic, vcpu, events


def injected(test_backend: RecordingBackend) -> list[int]:
    return [call[1] for call in test_backend.calls_of("pyvmm_inject_interrupt")]


def test_one_injection_per_entry_and_a_window_for_the_next(make_backend: MakeBackend, vms: list[Vm]) -> None:
    """With automatic EOI a second request is deliverable at once: it waits for the
    next entry, behind a window request."""
    test_backend, chip, pic, vcpu, _ = delivery(make_backend, vms, icw4=0x03)
    run = chip.run_function(vcpu, vcpu.run)
    pic.set_irq(3, True)
    pic.set_irq(5, True)
    run()
    assert injected(test_backend) == [0x23]
    assert vcpu.handle.window_requested, "IRQ 5 waits for the next window"
    run()  # (the window exit, or any exit)
    assert injected(test_backend) == [0x23, 0x25]
    assert not vcpu.handle.window_requested


def test_a_lower_priority_request_waits_for_the_eoi(make_backend: MakeBackend, vms: list[Vm]) -> None:
    test_backend, chip, pic, vcpu, _ = delivery(make_backend, vms)
    run = chip.run_function(vcpu, vcpu.run)
    pic.set_irq(3, True)
    pic.set_irq(5, True)
    run()
    run()
    assert injected(test_backend) == [0x23] and not vcpu.handle.window_requested
    pic.port_write(pic.master, 0, 0x20)  # the guest's EOI
    run()
    assert injected(test_backend) == [0x23, 0x25]


def test_nothing_is_injected_into_a_vcpu_that_is_not_ready(make_backend: MakeBackend, vms: list[Vm]) -> None:
    test_backend, chip, pic, vcpu, _ = delivery(make_backend, vms)
    run = chip.run_function(vcpu, vcpu.run)
    vcpu.handle.ready = False
    pic.set_irq(1, True)
    run()
    assert injected(test_backend) == [] and vcpu.handle.window_requested
    assert pic.has_interrupt(), "still waiting in the 8259, not acknowledged"
    vcpu.handle.ready = True
    run()
    assert injected(test_backend) == [0x21] and not vcpu.handle.window_requested


def test_another_thread_kicks_the_vcpu_and_a_halted_one_is_woken(make_backend: MakeBackend, vms: list[Vm]) -> None:
    _, chip, pic, vcpu, _ = delivery(make_backend, vms)
    thread = threading.Thread(target=pic.set_irq, args=(4, True))
    thread.start()
    thread.join()
    assert vcpu.handle.kicked, "raised from another thread: the vCPU is kicked out of the guest"
    assert chip.wait_for_interrupt(vcpu), "halted with an interrupt waiting: woken"
    vcpu.handle.ready = False
    assert not chip.wait_for_interrupt(vcpu), "interrupts off: halted for good"


def test_a_halt_with_nothing_that_could_wake_it_is_final(make_backend: MakeBackend, vms: list[Vm]) -> None:
    _, chip, _, vcpu, _ = delivery(make_backend, vms)
    chip._can_wake = lambda: False
    assert not chip.wait_for_interrupt(vcpu)


def test_an_overdue_window_is_polled_with_a_kick(make_backend: MakeBackend, vms: list[Vm]) -> None:
    _, backend = make_backend(INJECTING_CAPS)
    vm = backend.create_vm()
    vms.append(vm)
    vcpu = vm.create_vcpu()
    pic = PicPair()
    for offset, value in ((0, 0x13), (1, 0x20), (1, 0x01), (1, 0x00)):  # single 8259
        pic.port_write(pic.master, offset, value)
    now = [0]
    chip = UserspaceIrqchip(backend, Events().machine_events(), pic, timer_thread=False, clock=lambda: now[0])
    pic.on_change = chip.output_changed
    chip.attach(vcpu)
    vcpu.handle.ready = False
    pic.set_irq(6, True)
    chip.run_function(vcpu, vcpu.run)()
    assert chip.next_deadline() == WINDOW_POLL_NS
    vcpu.handle.kicked = False
    now[0] = WINDOW_POLL_NS
    chip.tick()
    assert vcpu.handle.kicked, "no window exit came: the timer kicks the vCPU to look again"


def test_a_timer_that_fails_ends_the_run_with_its_error(make_backend: MakeBackend, vms: list[Vm]) -> None:
    _, chip, _, vcpu, _ = delivery(make_backend, vms)
    chip.timer_failed(RuntimeError("the timer broke"))
    with pytest.raises(RuntimeError, match="the timer broke"):
        chip.run_function(vcpu, vcpu.run)()


def test_a_halted_vcpu_waits_only_for_what_can_come(make_backend: MakeBackend) -> None:
    """What may still interrupt a halted vCPU: the PIT on an open IRQ 0, or COM1's
    received-data interrupt (input from the console's thread) on an open IRQ 4."""
    _, backend = make_backend(INJECTING_CAPS)
    with build(backend) as machine:
        board = machine._board
        assert isinstance(board, PcBoard)

        def out(port: int, value: int) -> None:
            _, write, offset, _ = machine.pio.table[port]  # as the vCPU loop dispatches a port write
            write(offset, 1, value)

        for port, value in ((0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01), (0x21, 0xEF)):
            out(port, value)
        assert not board._interrupt_may_come(), "no timer, no receive interrupt"
        out(0x3F9, 0x01)  # COM1: interrupt on received data
        assert board._interrupt_may_come()
        out(0x21, 0xFF)  # IRQ 4 masked again
        assert not board._interrupt_may_come()
        out(0x21, 0xFE)  # IRQ 0 open
        assert not board._interrupt_may_come(), "the PIT is not counting yet"
        out(0x43, 0x34)  # counter 0: rate generator
        out(0x40, 0xA9)
        out(0x40, 0x04)
        assert board._interrupt_may_come()
