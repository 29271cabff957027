"""Interrupts from userspace and the rest of the VM/vCPU API, on real /dev/kvm.

Unless a test says otherwise the VM has no in-kernel irqchip (no
``KVM_CREATE_IRQCHIP``): interrupts reach the guest only through ``KVM_INTERRUPT``,
``KVM_NMI`` and the vCPU events, as on a hypervisor without interrupt controllers
(``docs/backends/kvm.md`` §6.4).  The conformance suite's scenarios
(``pytest --pyvmm-backend kvm``) cover the same ground backend-neutrally; these
tests add what is KVM's own, the real-mode vector table, and the machine's
userspace 8259s and 8254 (``--irqchip userspace``).

This machine's KVM is a software one (``kvm_pvm``), which differs from hardware
KVM in ways these tests show rather than pass by accident: it reports no
``KVM_CAP_INTR_SHADOW`` and does not hold an injection back for the STI shadow,
never exits with ``KVM_EXIT_IRQ_WINDOW_OPEN`` (nor for an NMI window), signals a
resample eventfd when the level interrupt is delivered rather than at the guest's
EOI, and accepts a TSC offset without applying it (``docs/backends/kvm.md`` §6.5).
The tests of those behaviours are ``xfail(strict=True)`` here, with the reason,
and pass on hardware KVM.  The userspace 8259s and 8254 work there all the same:
they do not wait for a window exit (``pyvmm.machine.userspace_irqchip``).
"""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest

from kvm_guests import (
    READ_UNKNOWN_MSR,
    REAL_MODE_INTERRUPTS,
    REAL_MODE_REPORT_VECTOR,
    SHADOW_DONE,
    STI_DONE,
    STI_THEN_NOPS,
    UNKNOWN_MSR,
)
from pyvmm import cli
from pyvmm.arch.x86_64 import InterruptShadow, MsrEntry
from pyvmm.boot import BootSpec, X86Mode
from pyvmm.capabilities import Capability
from pyvmm.errors import ConfigError, HypervisorError, InterruptNotReady, MsrAccessError, UnsupportedCapability
from pyvmm.exits import ExitKind, IoExit, MsrAccessExit
from pyvmm.host import Event
from pyvmm.interrupts import IrqChip, IrqchipRoute
from pyvmm.machine import GuestImage, Machine, MachineConfig, StopReason
from pyvmm.testing.conformance import programs as p
from pyvmm.testing.conformance.harness import booted, expect_port_write, install_idt, run_to
from pyvmm.testing.guests import pit_ticks
from pyvmm.testing.guests.multiboot_pic import EXPECTED_STATUS, multiboot_pic_kernel
from pyvmm.vm import Backend
from pyvmm_kvm import bindings as k

#: This machine's KVM is kvm_pvm, the software one (see the module docstring).
SOFTWARE_KVM = Path("/sys/module/kvm_pvm").is_dir()
#: Set by the test beds (tools/testbed): the CPU under this KVM is QEMU's TCG emulation.
UNDER_QEMU_TCG = os.environ.get("PYVMM_TESTBED_EMULATOR") == "qemu-tcg"

REAL_MODE_CODE = 0x8000
REAL_MODE_HANDLERS = 0x9000
#: Where PIT_TICKS expects its IDTR, IDT and tick handler.


def _software_kvm_differs(why: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(SOFTWARE_KVM, strict=True, reason=f"this machine's software KVM (kvm_pvm) {why}")


# --- injection: real mode, long mode, refused, only the last --------------------


def test_real_mode_interrupts_through_the_vector_table(kvm: Backend) -> None:
    """Three vectors in a row, each taken through the real-mode vector table."""
    with kvm.create_vm({"arch": "x86_64"}) as vm:
        vm.add_memory(0, 0x100000)
        vm.memory.write(REAL_MODE_CODE, REAL_MODE_INTERRUPTS.code)
        for slot, vector in enumerate((0x08, 0x20, 0x70)):
            stub = bytearray(REAL_MODE_REPORT_VECTOR.code)
            stub[2] = vector
            handler = REAL_MODE_HANDLERS + 16 * slot
            vm.memory.write(handler, bytes(stub))
            vm.memory.write(4 * vector, struct.pack("<HH", handler, 0))  # offset, segment 0
        vcpu = vm.create_vcpu()
        vm.boot(BootSpec(arch="x86_64", entry=REAL_MODE_CODE, stack=0x7000, x86_mode=X86Mode.REAL))
        for count, vector in zip((3, 2, 1), (0x08, 0x20, 0x70), strict=True):
            expect_port_write(vcpu, p.TEST_PORT, count)
            assert vcpu.ready_for_interrupt()
            vcpu.interrupt(vector)
            expect_port_write(vcpu, p.REPORT_PORT, vector)
        run_to(vcpu, ExitKind.HLT)


def test_long_mode_interrupts_in_a_row_and_one_refused(kvm: Backend) -> None:
    with booted(kvm, p.INTERRUPTS_ON) as (vm, vcpu):
        install_idt(vm)
        with pytest.raises(InterruptNotReady):
            vcpu.interrupt(0x20)  # before the first run: KVM has not said the vCPU is ready
        for count in (4, 3, 2, 1):
            expect_port_write(vcpu, p.TEST_PORT, count)
            vcpu.interrupt(0x40 + count)
            expect_port_write(vcpu, p.REPORT_PORT, 0x40 + count)
        run_to(vcpu, ExitKind.HLT)
    with booted(kvm, p.INTERRUPTS_OFF_THEN_ON) as (vm, vcpu):
        install_idt(vm)
        expect_port_write(vcpu, p.TEST_PORT, 1)
        with pytest.raises(InterruptNotReady, match="vector 0x21"):
            vcpu.interrupt(0x21)
        assert not vcpu.get_events().interrupt.injected, "nothing reached KVM"
        expect_port_write(vcpu, p.TEST_PORT, 2)
        expect_port_write(vcpu, p.TEST_PORT, 3)
        vcpu.interrupt(0x22)
        expect_port_write(vcpu, p.REPORT_PORT, 0x22)


def test_a_second_injection_in_one_exit_replaces_the_first(kvm: Backend) -> None:
    """KVM keeps one vector queued: the last one asked for (x86
    ``kvm_vcpu_ioctl_interrupt()``); hence one injection per exit."""
    with booted(kvm, p.INTERRUPTS_ON) as (vm, vcpu):
        install_idt(vm)
        expect_port_write(vcpu, p.TEST_PORT, 4)
        vcpu.interrupt(0x30)
        vcpu.interrupt(0x31)
        assert vcpu.get_events().interrupt.vector == 0x31
        expect_port_write(vcpu, p.REPORT_PORT, 0x31)
        expect_port_write(vcpu, p.TEST_PORT, 3)


def test_kvm_interrupt_is_refused_by_kvm_with_its_irqchip(kvm: Backend) -> None:
    """With the full in-kernel irqchip KVM_INTERRUPT is not for userspace: ENXIO."""
    with booted(kvm, p.INTERRUPTS_ON, irqchip=True) as (vm, vcpu):
        install_idt(vm)
        expect_port_write(vcpu, p.TEST_PORT, 4)
        with pytest.raises(HypervisorError, match="KVM_INTERRUPT") as info:
            vcpu.interrupt(0x20)
        assert info.value.errno == errno.ENXIO


# --- the STI shadow and the interrupt window ----------------------------------------


@pytest.mark.xfail(
    UNDER_QEMU_TCG,
    strict=True,
    reason="in the amd64 test bed (kvm_amd under QEMU's TCG) a single step over sti stops only after the "
    "instruction in its shadow: no step ends inside the shadow",
)
def test_the_sti_shadow_is_reported(kvm: Backend) -> None:
    """Single-stepped past ``sti``, the vCPU is in its shadow: not ready, and the
    events say STI; one instruction later it is ready."""
    with booted(kvm, STI_THEN_NOPS) as (vm, vcpu):
        install_idt(vm)
        expect_port_write(vcpu, p.TEST_PORT, 1)
        vcpu.set_guest_debug(single_step=True)
        run_to(vcpu, ExitKind.DEBUG)
        if vcpu.get_regs().rip == p.CODE_ADDRESS + STI_DONE - 1:
            # Upstream KVM completes a port write when the vCPU next runs, and a
            # single step reports that completion on its own (x86.c:
            # complete_fast_pio_out -> kvm_skip_emulated_instruction): the sti is
            # the next step.  kvm_pvm completes the write before it exits.
            run_to(vcpu, ExitKind.DEBUG)
        assert vcpu.get_regs().rip == p.CODE_ADDRESS + STI_DONE
        assert not vcpu.ready_for_interrupt()
        assert vcpu.get_events().interrupt.shadow == InterruptShadow.STI
        run_to(vcpu, ExitKind.DEBUG)
        assert vcpu.get_regs().rip == p.CODE_ADDRESS + SHADOW_DONE
        assert vcpu.ready_for_interrupt()
        assert vcpu.get_events().interrupt.shadow == InterruptShadow.NONE


@_software_kvm_differs("never exits with KVM_EXIT_IRQ_WINDOW_OPEN: the guest runs on to its hlt")
def test_the_interrupt_window_opens_after_the_sti_shadow(kvm: Backend) -> None:
    with booted(kvm, STI_THEN_NOPS) as (vm, vcpu):
        install_idt(vm)
        expect_port_write(vcpu, p.TEST_PORT, 1)
        assert not vcpu.ready_for_interrupt()
        vcpu.request_interrupt_window()
        run_to(vcpu, ExitKind.IRQ_WINDOW_OPEN)
        assert vcpu.get_regs().rip == p.CODE_ADDRESS + SHADOW_DONE
        vcpu.interrupt(0x24)
        vcpu.request_interrupt_window(False)
        expect_port_write(vcpu, p.REPORT_PORT, 0x24)
        run_to(vcpu, ExitKind.HLT)


def test_the_probe_reports_the_missing_interrupt_shadow(kvm: Backend) -> None:
    """INTERRUPT_SHADOW is declared and narrowed by KVM_CAP_INTR_SHADOW, which this
    machine's software KVM does not report: the conformance suite's window
    scenario is then skipped, naming the capability, instead of failing or passing."""
    assert Capability.INTERRUPT_SHADOW in kvm.manifest.capability_set
    assert kvm.supports(Capability.INTERRUPT_SHADOW) is not SOFTWARE_KVM
    if SOFTWARE_KVM:
        assert Capability.INTERRUPT_SHADOW in kvm.availability().missing_capabilities


# --- NMIs and the vCPU events --------------------------------------------------------


def test_an_nmi_during_the_nmi_handler_waits_for_its_iretq(kvm: Backend) -> None:
    """A second NMI while the first is handled stays pending (NMIs blocked), and is
    taken once the handler's iretq unblocks them."""
    with booted(kvm, p.NMI_WITH_INTERRUPTS_OFF) as (vm, vcpu):
        install_idt(vm)
        expect_port_write(vcpu, p.TEST_PORT, 1)
        vcpu.inject_nmi()
        expect_port_write(vcpu, p.REPORT_PORT, 2)
        vcpu.inject_nmi()
        events = vcpu.get_events()
        assert events.nmi.masked and events.nmi.pending, "blocked, and waiting"
        ports = []
        for _ in range(4):
            exit_ = vcpu.run()
            if exit_.kind is ExitKind.HLT:
                break
            assert isinstance(exit_, IoExit)
            ports.append((exit_.port, exit_.data[0]))
        assert sorted(ports) == [(p.TEST_PORT, 2), (p.REPORT_PORT, 2)], ports


@_software_kvm_differs("has no NMI-window exit: the waiting NMI is taken at the next exit, not at the iretq")
def test_the_waiting_nmi_is_taken_right_after_the_iretq(kvm: Backend) -> None:
    with booted(kvm, p.NMI_WITH_INTERRUPTS_OFF) as (vm, vcpu):
        install_idt(vm)
        expect_port_write(vcpu, p.TEST_PORT, 1)
        vcpu.inject_nmi()
        expect_port_write(vcpu, p.REPORT_PORT, 2)
        vcpu.inject_nmi()
        expect_port_write(vcpu, p.REPORT_PORT, 2)
        expect_port_write(vcpu, p.TEST_PORT, 2)


def test_vcpu_events_as_kvm_reports_them(kvm: Backend) -> None:
    """Without KVM_CAP_EXCEPTION_PAYLOAD enabled, KVM does not tell a pending
    exception from an injected one (None); enabled through the escape hatch, it does."""
    with booted(kvm, p.NMI_WITH_INTERRUPTS_OFF) as (vm, vcpu):
        events = vcpu.get_events()
        assert events.exception.pending is None and events.exception.payload is None
        assert events.nmi.pending is False and events.interrupt.shadow is InterruptShadow.NONE
        vcpu.set_events(events)
        assert vcpu.get_events() == events
        assert vm.check_raw_capability(k.KVM_CAP_EXCEPTION_PAYLOAD) > 0
        vm.enable_raw_capability(k.KVM_CAP_EXCEPTION_PAYLOAD, 0, (1,))
        assert vcpu.get_events().exception.pending is False


# --- MSRs, TSC -------------------------------------------------------------------------


def _ignore_msrs() -> bool:
    path = Path("/sys/module/kvm/parameters/ignore_msrs")
    return path.exists() and path.read_text().strip() == "Y"


def test_msrs_processed_short_name_the_first_refused(kvm: Backend) -> None:
    """KVM_GET_MSRS/KVM_SET_MSRS return how many MSRs they processed: a short count
    is MsrAccessError naming the MSR, with what came before it, and no errno."""
    if _ignore_msrs():
        pytest.skip("kvm.ignore_msrs=Y: KVM accepts unknown MSRs")
    bogus = 0xDEAD0000
    with kvm.create_vm({"arch": "x86_64"}) as vm:
        vcpu = vm.create_vcpu()
        with pytest.raises(MsrAccessError) as info:
            vcpu.get_msrs([0x174, bogus, 0x175])
        error = info.value
        assert (error.operation, error.index, error.position, error.write) == ("KVM_GET_MSRS", bogus, 1, False)
        assert [e.index for e in error.entries] == [0x174]
        assert not isinstance(error, OSError), "no errno: KVM reported a count"
        with pytest.raises(MsrAccessError, match=f"MSR {bogus:#x} cannot be written") as info:
            vcpu.set_msrs([MsrEntry(0x174, 0x10), MsrEntry(bogus, 1)])
        assert info.value.completed == ((0x174, 0x10),)
        assert vcpu.get_msrs([0x174]) == [MsrEntry(0x174, 0x10)], "the MSR before the refused one was written"


def test_msr_index_list_and_feature_msrs(kvm: Backend) -> None:
    with kvm.create_vm({"arch": "x86_64"}) as vm:
        saved = vm.msr_index_list()
        assert 0x10 in saved and 0x174 in saved, "TSC and SYSENTER_CS are saved and restored"
        features = vm.feature_msrs()
        assert features and all(isinstance(e, MsrEntry) for e in features)


def test_tsc_frequency(kvm: Backend) -> None:
    with kvm.create_vm({"arch": "x86_64"}) as vm:
        vcpu = vm.create_vcpu()
        khz = vcpu.get_tsc_khz()
        assert khz > 100_000
        if kvm.supports(Capability.TSC_SCALING):
            vcpu.set_tsc_khz(khz)
        else:  # this machine: KVM_CAP_TSC_CONTROL is 0
            with pytest.raises(UnsupportedCapability, match="TSC_SCALING"):
                vcpu.set_tsc_khz(khz)


@_software_kvm_differs("accepts KVM_VCPU_TSC_OFFSET and reads back 0: the offset is not applied")
def test_tsc_offset_round_trip(kvm: Backend) -> None:
    with kvm.create_vm({"arch": "x86_64"}) as vm:
        vcpu = vm.create_vcpu()
        before = vcpu.get_msrs([0x10])[0].data
        vcpu.set_tsc_offset(1 << 50)
        assert vcpu.get_tsc_offset() == 1 << 50
        assert vcpu.get_msrs([0x10])[0].data > before + (1 << 49)


# --- the escape hatch --------------------------------------------------------------------


def test_raw_capabilities_query_and_enable(kvm: Backend) -> None:
    """KVM_CHECK_EXTENSION on the VM fd; KVM_ENABLE_CAP of user-space MSR exits
    turns a guest rdmsr of an unknown MSR into an MsrAccessExit the VMM answers."""
    with booted(kvm, READ_UNKNOWN_MSR) as (vm, vcpu):
        assert vm.check_raw_capability(k.KVM_CAP_IRQCHIP) > 0
        assert vm.check_raw_capability(0xFFFF) == 0
        assert vm.enable_raw_capability(k.KVM_CAP_X86_USER_SPACE_MSR, 0, (k.KVM_MSR_EXIT_REASON_UNKNOWN,)) == 0
        exit_ = run_to(vcpu, ExitKind.MSR_ACCESS)
        assert isinstance(exit_, MsrAccessExit) and (exit_.index, exit_.is_write) == (UNKNOWN_MSR, False)
        exit_.value = 0x5A
        expect_port_write(vcpu, p.TEST_PORT, 0x5A)
        with pytest.raises(HypervisorError, match="KVM_ENABLE_CAP") as info:
            vcpu.enable_raw_capability(0xFFFF)
        assert info.value.errno == errno.EINVAL


# --- the in-kernel irqchip: MSIs, routing, resample ----------------------------------------


def test_msi_and_gsi_routing_need_the_in_kernel_irqchip(kvm: Backend) -> None:
    with kvm.create_vm({"arch": "x86_64"}) as vm:
        vm.create_vcpu()
        for call, name in (
            (lambda: vm.signal_msi(0xFEE00000, 0x41), "KVM_SIGNAL_MSI"),
            (lambda: vm.set_gsi_routing([IrqchipRoute(4, IrqChip.IOAPIC, 4)]), "KVM_SET_GSI_ROUTING"),
        ):
            with pytest.raises(HypervisorError, match=name) as info:
                call()
            assert info.value.errno == errno.EINVAL


def test_an_msi_nobody_takes_is_kvms_minus_one(kvm: Backend) -> None:
    """KVM_SIGNAL_MSI returns -1 when no vCPU accepts the message: seen as EPERM."""
    with kvm.create_vm({"arch": "x86_64"}) as vm:
        vm.create_irqchip()
        with pytest.raises(HypervisorError, match="no vCPU accepted") as info:
            vm.signal_msi(0xFEE00000, 0x41)
        assert info.value.errno == errno.EPERM


@_software_kvm_differs("signals the resample eventfd when the level interrupt is delivered, before the EOI")
def test_the_resample_event_waits_for_the_guests_eoi(kvm: Backend) -> None:
    with booted(kvm, p.IOAPIC_LEVEL_WAIT, irqchip=True) as (vm, vcpu), Event() as irq, Event() as resample:
        code = bytearray(p.LAPIC_HANDLER.code)
        code[p.LAPIC_HANDLER_VECTOR_OFFSET] = p.LAPIC_VECTOR
        install_idt(vm, {p.LAPIC_VECTOR: bytes(code)})
        vm.register_irqfd(irq, p.IOAPIC_PIN, level=True, resample=resample)
        expect_port_write(vcpu, p.TEST_PORT, 1)
        irq.signal()
        expect_port_write(vcpu, p.REPORT_PORT, p.LAPIC_VECTOR)
        assert not resample.wait(0), "resampled before the guest's EOI"
        expect_port_write(vcpu, p.REPORT_PORT + 1, p.LAPIC_VECTOR)
        assert resample.wait(5)


# --- the machine's userspace 8259s and 8254 (--irqchip userspace) --------------------------


def _run(kvm: Backend, image: GuestImage, **settings: object) -> tuple[object, Machine]:
    config = MachineConfig.from_mapping({"serial": "none", "timeout": 20, "irqchip": "userspace", **settings})
    with Machine(config, backend=kvm, image=image) as machine:
        return machine.run(), machine


def test_userspace_pit_ticks_through_the_userspace_pic(kvm: Backend) -> None:
    """A long-mode guest programs the 8259s and the PIT (1 kHz) and sleeps in hlt
    until ten ticks: each tick is injected by pyvmm, on KVM without its irqchip."""
    result, machine = _run(kvm, pit_ticks.pit_ticks_image())
    assert (result.reason, result.code) == (StopReason.DEBUG_EXIT, pit_ticks.EXIT_CODE), result.detail
    assert not machine.irqchip and machine.userspace_irqchip
    assert not machine.vm.handle.irqchip, "no KVM_CREATE_IRQCHIP"
    chip = machine._board.userspace
    assert chip is not None and chip.injected >= pit_ticks.TICKS


def test_a_multiboot_kernel_with_the_pic_runs_under_irqchip_userspace(kvm: Backend, tmp_path: Path) -> None:
    """``pyvmm run --irqchip userspace``: the legacy firmware's stub programs the
    8259s and the PIT, the kernel reprograms them, counts 20 timer ticks and a
    COM1 interrupt, and exits 0x10 (status 0x21)."""
    kernel = tmp_path / "pic.bin"
    kernel.write_bytes(multiboot_pic_kernel())
    status = cli.main(
        ["run", "--backend", "kvm", "--kernel", str(kernel), "--irqchip", "userspace", "--serial", "none",
         "--timeout", "20"]
    )  # fmt: skip
    assert status == EXPECTED_STATUS


def test_smp_without_an_in_kernel_irqchip_is_refused(kvm: Backend) -> None:
    for mode in ("userspace", "none"):
        config = MachineConfig.from_mapping({"serial": "none", "cpus": 2, "irqchip": mode})
        with pytest.raises(ConfigError, match="2 vCPUs need the hypervisor's interrupt controllers") as info:
            Machine(config, backend=kvm)
        assert "drives one vCPU only" in str(info.value)


def test_irqchip_kernel_is_kvms_own(kvm: Backend) -> None:
    config = MachineConfig.from_mapping({"serial": "none", "irqchip": "kernel"})
    with Machine(config, backend=kvm) as machine:
        assert machine.irqchip and not machine.userspace_irqchip
        assert machine.vm.handle.irqchip


def test_kvm_interrupt_shadow_bits_are_pyvmm_interrupt_shadow_values() -> None:
    """``events_from_kvm`` and ``events_to_kvm`` pass the shadow bits through as they are."""
    assert int(InterruptShadow.MOV_SS) == k.KVM_X86_SHADOW_INT_MOV_SS
    assert int(InterruptShadow.STI) == k.KVM_X86_SHADOW_INT_STI
