"""State a snapshot must carry for a restored VM to continue exactly, each put
into a VM on real KVM without running the guest, captured, restored into a
fresh VM and read back there: an armed TSC-deadline timer, interrupts pending
in the local APIC and the 8259, a halted vCPU, and the guest clock (which
continues from the saved time, not the host's)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from pyvmm import snapshot
from pyvmm.arch.x86_64 import Lapic, MpState, MsrEntry
from pyvmm.capabilities import Capability
from pyvmm.machine import GuestImage, Machine, MachineConfig
from pyvmm.machine.outcome import StopReason
from pyvmm.machine.snapshots import HLT_WAIT_KEY, vcpus_in_hlt_wait
from pyvmm.snapshot import MSR_TSC_DEADLINE, Snapshot
from pyvmm.testing.guests.snapshot_counter import snapshot_counter_image
from pyvmm.vcpu_state import StateKind
from pyvmm.vm import Backend, Vcpu, Vm
from pyvmm.vm_state import VmStateKind
from pyvmm_kvm.bindings import ffi

MSR_TSC = 0x10
#: Local APIC registers (Intel SDM vol. 3 table 11-1): spurious vector, the
#: first 32 bits of the IRR, the LVT timer.
APIC_SVR, APIC_IRR0, APIC_LVTT = 0xF0, 0x200, 0x320
LVT_TIMER_TSC_DEADLINE = 2 << 17


def _vm(kvm: Backend) -> tuple[Vm, Vcpu]:
    vm = kvm.create_vm({"arch": "x86_64"})
    vm.add_memory(0, 0x10000)
    vm.create_irqchip()
    vcpu = vm.create_vcpu()
    # CPUID with the TSC-deadline bit: KVM takes the LVT timer's mode bits only then.
    vcpu.set_cpuid(vm.supported_cpuid())
    return vm, vcpu


def _set_lapic(vcpu: Vcpu, **registers: int) -> None:
    regs = bytearray(vcpu.get_state(StateKind.LAPIC).regs)
    offsets = {"svr": APIC_SVR, "irr0": APIC_IRR0, "lvtt": APIC_LVTT}
    for name, value in registers.items():
        regs[offsets[name] : offsets[name] + 4] = value.to_bytes(4, "little")
    vcpu.set_state(StateKind.LAPIC, Lapic(bytes(regs)))


def _lapic_word(vcpu: Vcpu, offset: int) -> int:
    return int.from_bytes(vcpu.get_state(StateKind.LAPIC).regs[offset : offset + 4], "little")


def test_an_armed_tsc_deadline_timer_is_still_armed_after_a_restore(kvm: Backend) -> None:
    """The deadline MSR must be written after the LAPIC put the timer in
    TSC-deadline mode (kvm_set_lapic_tscdeadline_msr drops it before): written
    with the other MSRs first, the restored timer never fires."""
    vm, vcpu = _vm(kvm)
    with vm:
        if MSR_TSC_DEADLINE not in vm.msr_index_list():
            pytest.skip("this KVM has no TSC-deadline timer")
        _set_lapic(vcpu, svr=0x1FF, lvtt=0x40 | LVT_TIMER_TSC_DEADLINE)
        deadline = vcpu.get_msrs([MSR_TSC])[0].data + (1 << 40)  # far away: it does not expire meanwhile
        vcpu.set_msrs([MsrEntry(MSR_TSC_DEADLINE, deadline)])
        if vcpu.get_msrs([MSR_TSC_DEADLINE])[0].data != deadline:
            pytest.skip("this KVM does not take a TSC deadline")
        image = snapshot.capture(vm)
    with snapshot.restore(kvm, image) as restored:
        (vcpu2,) = restored.vcpus
        assert _lapic_word(vcpu2, APIC_LVTT) & (3 << 17) == LVT_TIMER_TSC_DEADLINE
        assert vcpu2.get_msrs([MSR_TSC_DEADLINE])[0].data == deadline


def test_an_interrupt_pending_in_the_local_apic_stays_pending(kvm: Backend) -> None:
    vm, vcpu = _vm(kvm)
    with vm:
        _set_lapic(vcpu, svr=0x1FF, irr0=1 << 0x1D)  # vector 0x1d requested, not yet delivered
        assert _lapic_word(vcpu, APIC_IRR0) == 1 << 0x1D
        image = snapshot.capture(vm)
    with snapshot.restore(kvm, image) as restored:
        assert _lapic_word(restored.vcpus[0], APIC_IRR0) == 1 << 0x1D


def _pic(vm: Vm) -> tuple[int, int]:
    raw = ffi.new("struct kvm_pic_state *")
    ffi.buffer(raw)[:] = vm.get_vm_state(VmStateKind.PIC_PRIMARY)[: ffi.sizeof("struct kvm_pic_state")]
    return int(raw.irr), int(raw.imr)


def test_a_line_raised_at_the_8259_is_still_requested(kvm: Backend) -> None:
    vm, _vcpu = _vm(kvm)
    with vm:
        vm.set_irq_line(3, True)
        irr, _imr = _pic(vm)
        assert irr & 1 << 3
        image = snapshot.capture(vm)
    with snapshot.restore(kvm, image) as restored:
        irr2, _ = _pic(restored)
        assert irr2 == irr


def test_a_halted_vcpu_is_restored_halted(kvm: Backend) -> None:
    if not kvm.supports(Capability.MP_STATE):
        pytest.skip("no MP_STATE")
    vm, vcpu = _vm(kvm)
    with vm:
        vcpu.set_state(StateKind.MP_STATE, MpState.HALTED)
        image = snapshot.capture(vm)
    with snapshot.restore(kvm, image) as restored:
        assert restored.vcpus[0].get_state(StateKind.MP_STATE) is MpState.HALTED


def test_the_guest_clock_goes_on_from_the_saved_time(kvm: Backend) -> None:
    """KVM_SET_CLOCK without KVM_CLOCK_REALTIME: the time between save and
    restore does not pass for the guest (as a paused VM's)."""
    if not kvm.supports(Capability.PVCLOCK):
        pytest.skip("no PVCLOCK")
    vm, _vcpu = _vm(kvm)
    with vm:
        vm.set_clock(5_000_000_000)
        image = snapshot.capture(vm)
    assert image.clock is not None and 5_000_000_000 <= image.clock < 6_000_000_000
    time.sleep(0.2)
    with snapshot.restore(kvm, image) as restored:
        now = restored.get_clock()
    assert image.clock <= now < image.clock + 150_000_000, "the 200 ms between save and restore passed"


#: An IOAPIC pin and vector for a level-triggered line asserted in a snapshot.
IOAPIC_PIN, IOAPIC_VECTOR = 10, 0x61


def _ioapic_with_a_pending_level_line(vm: Vm) -> bytes:
    """The VM's IOAPIC image, pin 10 level-triggered, unmasked, to APIC 0, its
    line high and not yet in service: KVM delivers it when the image is set."""
    raw = ffi.new("struct kvm_ioapic_state *")
    image = vm.get_vm_state(VmStateKind.IOAPIC)
    ffi.buffer(raw)[:] = image[: ffi.sizeof("struct kvm_ioapic_state")]
    entry = raw.redirtbl[IOAPIC_PIN].fields
    entry.vector, entry.trig_mode, entry.mask, entry.dest_id, entry.remote_irr = IOAPIC_VECTOR, 1, 0, 0, 0
    raw.irr |= 1 << IOAPIC_PIN
    return bytes(ffi.buffer(raw)) + image[ffi.sizeof("struct kvm_ioapic_state") :]


def _requested(vcpu: Vcpu, vector: int) -> bool:
    return bool(_lapic_word(vcpu, APIC_IRR0 + 0x10 * (vector // 32)) >> (vector % 32) & 1)


def _in_service_at_ioapic(vm: Vm) -> bool:
    raw = ffi.new("struct kvm_ioapic_state *")
    ffi.buffer(raw)[:] = vm.get_vm_state(VmStateKind.IOAPIC)[: ffi.sizeof("struct kvm_ioapic_state")]
    return bool(raw.redirtbl[IOAPIC_PIN].fields.remote_irr)


@pytest.mark.parametrize("vcpu_first", [True, False], ids=["vcpu-then-ioapic", "ioapic-then-vcpu"])
def test_kvm_delivers_a_pending_ioapic_line_only_to_vcpus_that_exist(kvm: Backend, vcpu_first: bool) -> None:
    """Why a restore sets the irqchip after the vCPUs: set before any vCPU
    exists, KVM marks the line in service (remote IRR) and delivers it nowhere,
    so the guest never sees it and never EOIs it (kvm_set_ioapic ->
    kvm_ioapic_inject_all -> ioapic_service)."""
    with kvm.create_vm({"arch": "x86_64"}) as vm:
        vm.add_memory(0, 0x10000)
        vm.create_irqchip()
        image = _ioapic_with_a_pending_level_line(vm)
        if not vcpu_first:
            vm.set_vm_state(VmStateKind.IOAPIC, image)
        vcpu = vm.create_vcpu()
        _set_lapic(vcpu, svr=0x1FF)
        if vcpu_first:
            vm.set_vm_state(VmStateKind.IOAPIC, image)
        assert _in_service_at_ioapic(vm)
        assert _requested(vcpu, IOAPIC_VECTOR) is vcpu_first


def test_a_restored_ioapic_line_reaches_the_restored_local_apic(kvm: Backend) -> None:
    vm, vcpu = _vm(kvm)
    with vm:
        _set_lapic(vcpu, svr=0x1FF)
        image = snapshot.capture(vm)
        image.vm_states = [
            (kind, _ioapic_with_a_pending_level_line(vm) if kind is VmStateKind.IOAPIC else data)
            for kind, data in image.vm_states
        ]
    with snapshot.restore(kvm, image) as restored:
        assert _requested(restored.vcpus[0], IOAPIC_VECTOR)


def _sleeper_image() -> GuestImage:
    """The snapshot counter's set-up (8259s, 8254 mode 2, IDT, the tick handler
    counting at 0x104000) with the 8254's longest period (~55 ms), then::

        sti
        hlt                        ; the snapshot is taken here
        mov eax, [0x104000]        ; the ticks seen: 1 after a real wake-up
        out 0xf4, eax

    A vCPU resumed past its ``hlt`` without an interrupt reports 0."""
    counter = snapshot_counter_image()
    code = counter.segments[0][1]
    setup = code[: code.index(bytes.fromhex("fb")) + 1]  # up to and including its sti
    setup = setup.replace(bytes.fromhex("b0a9e640b004e640"), bytes.fromhex("b0ffe640b0ffe640"))  # count 0xffff
    tail = bytes.fromhex("f4" "8b042500401000" "e7f4")  # fmt: skip
    return dataclasses.replace(counter, segments=((counter.segments[0][0], setup + tail), *counter.segments[1:]))


#: The sleeper with pyvmm's own 8259s and 8254.
USERSPACE_IRQCHIP = MachineConfig(backend="kvm", irqchip="userspace", timeout=20, serial="none")


def _snapshot_in_hlt(path: Path) -> Snapshot:
    """The sleeper saved 15 ms in, waiting in its hlt for the first tick (the
    test is skipped where the machine is too loaded to get there in time)."""
    with Machine(USERSPACE_IRQCHIP, image=_sleeper_image(), snapshot_to=path, snapshot_after=0.015) as machine:
        saved = machine.run()
    if saved.reason is not StopReason.SNAPSHOT:
        pytest.skip("the guest finished before the snapshot time on this (loaded) machine")
    image = snapshot.load(path)
    if image.pages[0].get(0x104000 // 4096, bytes(4096))[:4] != bytes(4):
        pytest.skip("the first tick came before the snapshot on this (loaded) machine")
    return image


def test_a_vcpu_halted_in_pyvmms_irqchip_is_restored_halted(kvm: Backend, tmp_path: Path) -> None:
    """``irqchip = "userspace"``: KVM reports the ``hlt`` with RIP past it and the
    machine waits for an interrupt; there is no MP state to save.  A snapshot
    taken then must restore a vCPU that waits for the next tick too, not one
    that runs on as if woken, nor one that takes a tick before its hlt (on the
    slow amd64 test bed a tick often fires between the restore's device reload
    and the vCPU's first entry)."""
    with Machine(USERSPACE_IRQCHIP, image=_sleeper_image()) as machine:
        never_stopped = machine.run()
    assert (never_stopped.reason, never_stopped.code) == (StopReason.DEBUG_EXIT, 1)
    path = tmp_path / "halted.snap"
    image = _snapshot_in_hlt(path)
    assert vcpus_in_hlt_wait(image) == {0}, "the snapshot says the vCPU waits in its hlt"
    rip = dict(image.vcpus[0])[StateKind.REGS].rip
    assert _guest_byte(image, rip - 1) == 0xF4, "saved as KVM's hlt exit left it: RIP past the hlt"
    with Machine(USERSPACE_IRQCHIP, image=_sleeper_image(), restore=path) as machine:
        restored = machine.run()
    assert (restored.reason, restored.code) == (StopReason.DEBUG_EXIT, 1)


def test_a_halted_vcpu_saved_before_the_hlt_wait_was_recorded_still_restores(kvm: Backend, tmp_path: Path) -> None:
    """A file of an older pyvmm: no record of the wait, the vCPU's RIP moved back
    onto its hlt instead.  It is read, and the vCPU executes the hlt again."""
    image = _snapshot_in_hlt(tmp_path / "halted.snap")
    states = [
        (kind, dataclasses.replace(value, rip=value.rip - 1) if kind is StateKind.REGS else value)
        for kind, value in image.vcpus[0]
    ]
    devices = [device for device in image.devices or () if device.key != HLT_WAIT_KEY]
    old = tmp_path / "old.snap"
    snapshot.write(dataclasses.replace(image, vcpus=[states], devices=devices), old)
    assert vcpus_in_hlt_wait(snapshot.load(old)) == frozenset()
    with Machine(USERSPACE_IRQCHIP, image=_sleeper_image(), restore=old) as machine:
        restored = machine.run()
    assert (restored.reason, restored.code) == (StopReason.DEBUG_EXIT, 1)


def _guest_byte(image: Snapshot, address: int) -> int:
    page = image.pages[0].get(address // 4096, bytes(4096))
    return page[address % 4096]


def test_the_vm_api_restore_lets_cpuid_come_before_the_state(kvm: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Upstream KVM refuses an XCR0 beyond x87, or an x2APIC base, before the
    vCPU's CPUID is set (``__kvm_set_xcr``, ``kvm_set_apic_base``); this
    machine's KVM does not check, so the order itself is what is tested."""
    vm, vcpu = _vm(kvm)
    with vm:
        image = snapshot.capture(vm)
        xcrs = vcpu.get_state(StateKind.XCRS)
    calls: list[str] = []
    for name in ("set_cpuid", "set_state", "set_msrs", "set_events"):
        real = getattr(Vcpu, name)

        def record(self: Vcpu, *args: object, _name: str = name, _real: object = real) -> object:
            calls.append(_name)
            return _real(self, *args)  # type: ignore[operator]

        monkeypatch.setattr(Vcpu, name, record)
    with snapshot.restore(kvm, image, lambda v: v.set_cpuid(v.vm.supported_cpuid())) as restored:
        assert restored.vcpus[0].get_state(StateKind.XCRS) == xcrs
    assert calls[0] == "set_cpuid" and calls.count("set_cpuid") == 1
    assert {"set_state", "set_msrs"} <= set(calls[1:])


#: Local APIC timer registers: initial count, current count, divide configuration.
APIC_TMICT, APIC_TMCCT, APIC_TDCR = 0x380, 0x390, 0x3E0


def test_a_running_lapic_timer_counts_on_from_where_it_was(kvm: Backend) -> None:
    """KVM_GET_LAPIC reads the current count now and KVM_SET_LAPIC restarts the
    timer from it: the restored count is below the saved one, not the initial
    count again, and not expired."""
    vm, vcpu = _vm(kvm)
    with vm:
        regs = bytearray(vcpu.get_state(StateKind.LAPIC).regs)
        regs[APIC_SVR : APIC_SVR + 4] = (0x1FF).to_bytes(4, "little")
        regs[APIC_LVTT : APIC_LVTT + 4] = (0x40).to_bytes(4, "little")  # one-shot, vector 0x40
        regs[APIC_TDCR : APIC_TDCR + 4] = (0xB).to_bytes(4, "little")  # divide by 1
        vcpu.set_state(StateKind.LAPIC, Lapic(bytes(regs)))
        initial = 0xFFFFFFFF
        regs = bytearray(vcpu.get_state(StateKind.LAPIC).regs)
        regs[APIC_TMICT : APIC_TMICT + 4] = initial.to_bytes(4, "little")
        # KVM_SET_LAPIC starts the timer from the image's current count.
        regs[APIC_TMCCT : APIC_TMCCT + 4] = initial.to_bytes(4, "little")
        vcpu.set_state(StateKind.LAPIC, Lapic(bytes(regs)))
        time.sleep(0.01)
        image = snapshot.capture(vm)
    saved = int.from_bytes(dict(image.vcpus[0])[StateKind.LAPIC].regs[APIC_TMCCT : APIC_TMCCT + 4], "little")
    assert 0 < saved < initial, "the timer was running when saved"
    time.sleep(0.01)
    with snapshot.restore(kvm, image) as restored:
        now = _lapic_word(restored.vcpus[0], APIC_TMCCT)
    assert 0 < now <= saved
