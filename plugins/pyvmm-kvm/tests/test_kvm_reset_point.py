"""Dirty-page reset on real KVM: after a reset the guest runs exactly as from
the capture, and only the pages written in between are copied."""

from __future__ import annotations

import pytest

from pyvmm.boot import BootSpec, X86Mode
from pyvmm.config import Arch
from pyvmm.errors import ConfigError
from pyvmm.exits import ExitKind, IoExit
from pyvmm.reset_point import ResetPoint, restorable_msrs
from pyvmm.vcpu_state import StateKind
from pyvmm.vm import Backend, Vcpu, Vm

CODE = 0x1000
#: mov ax,0x1234; mov [0x2000],ax; mov [0x5000],ax; inc ax; out 0x10,al; hlt
GUEST = bytes.fromhex("b83412a30020a3005040e610f4")


def _guest(kvm: Backend, *, log_dirty: bool = True) -> tuple[Vm, Vcpu]:
    vm = kvm.create_vm({"arch": "x86_64"})
    vm.add_memory(0, 0x10000, log_dirty=log_dirty)
    vm.memory.write(CODE, GUEST)
    vcpu = vm.create_vcpu()
    vm.boot(BootSpec(arch="x86_64", entry=CODE, x86_mode=X86Mode.REAL))
    return vm, vcpu


def _run_once(vm: Vm, vcpu: Vcpu) -> tuple[int, bytes]:
    exit_ = vcpu.run()
    assert exit_.kind is ExitKind.IO
    io: IoExit = exit_  # type: ignore[assignment]
    return io.port, bytes(io.data)


def test_reset_restores_memory_and_registers_and_copies_only_dirty_pages(kvm: Backend) -> None:
    vm, vcpu = _guest(kvm)
    with vm:
        point = ResetPoint.capture(vm)
        pristine = vm.memory.read(0, 0x10000)
        for _ in range(3):
            assert _run_once(vm, vcpu) == (0x10, b"\x35")
            assert vm.memory.read(0x2000, 2) == b"\x34\x12" and vm.memory.read(0x5000, 2) == b"\x34\x12"
            point.write(0x9FFE, b"input")  # the VMM's own writes, across a page boundary
            # Pages 2 and 5 (guest), 9 and 10 (VMM); the dirty log may over-report,
            # never under: upstream kvm_amd in the QEMU bed also logs the code page.
            assert point.reset() in (4, 5)
            assert vm.memory.read(0, 0x10000) == pristine
            assert vcpu.get_regs().rip == CODE and vcpu.get_regs().rax & 0xFFFF == 0
        assert point.reset() == 0, "nothing written since the last reset"


def test_the_dirty_log_does_not_see_vmm_writes(kvm: Backend) -> None:
    # Why ResetPoint.write exists: a plain VMM write is not in the log.
    vm, _ = _guest(kvm)
    with vm:
        point = ResetPoint.capture(vm)
        vm.memory.write(0x9000, b"unseen")
        assert point.reset() == 0
        assert vm.memory.read(0x9000, 6) == b"unseen"


def test_full_restore_gives_the_same_state(kvm: Backend) -> None:
    vm, vcpu = _guest(kvm)
    with vm:
        point = ResetPoint.capture(vm)
        pristine = vm.memory.read(0, 0x10000)
        _run_once(vm, vcpu)
        point.restore_all()
        assert vm.memory.read(0, 0x10000) == pristine
        assert point.reset() == 0, "the full restore also started the dirty log afresh"
        assert _run_once(vm, vcpu) == (0x10, b"\x35")


def test_a_region_without_a_dirty_log_is_refused(kvm: Backend) -> None:
    vm, _ = _guest(kvm, log_dirty=False)
    with vm, pytest.raises(ConfigError, match=r"log_dirty=True; not: 0x0\+0x10000"):
        ResetPoint.capture(vm)


def test_restorable_msrs_can_all_be_written_back_at_once(kvm: Backend) -> None:
    vm, vcpu = _guest(kvm)
    with vm:
        listed = vm.msr_index_list()
        kept = restorable_msrs(vcpu, listed)
        assert kept and {e.index for e in kept} <= set(listed)
        vcpu.set_msrs(kept)  # what every reset does: no refusal
        assert [e.index for e in vcpu.get_msrs([e.index for e in kept])] == [e.index for e in kept]


#: Long mode, at LONG_CODE: mov rax,cr4; or eax,0x40200 (OSFXSR, OSXSAVE); mov cr4,rax;
#: movdqu xmm0,[LONG_DATA]; mov eax,0x12345678; mov dr0,rax;
#: mov ecx,0xc0000102 (KERNEL_GS_BASE); xor edx,edx; wrmsr;
#: xor ecx,ecx; mov eax,3 (x87|SSE); xsetbv; out 0x10,al; hlt
STATE_CHANGER = bytes.fromhex(
    "0f20e0" "0d00020400" "0f22e0" "f30f6f042500101000" "b878563412" "0f23c0"
    "b9020100c0" "31d2" "0f30" "31c9" "b803000000" "0f01d1" "e610f4"
)  # fmt: skip
LONG_CODE, LONG_DATA = 0x10_0000, 0x10_1000


def test_a_reset_restores_fpu_debug_msr_and_xcr_state_the_guest_changed(kvm: Backend) -> None:
    """What the prepared writes must cover: state the guest changes without an
    exit to the VMM (an SSE register, DR0, an MSR, CR4 and XCR0)."""
    vm = kvm.create_vm({"arch": "x86_64"})
    with vm:
        vm.add_memory(0, 0x40_0000, log_dirty=True)
        vm.memory.write(LONG_CODE, STATE_CHANGER)
        vm.memory.write(LONG_DATA, bytes(range(1, 17)))
        vcpu = vm.create_vcpu()
        vm.boot(BootSpec(arch=Arch.X86_64, entry=LONG_CODE, x86_mode=X86Mode.LONG))
        point = ResetPoint.capture(vm)
        before = (vcpu.get_fpu(), vcpu.get_debug_regs(), vcpu.get_msrs([0xC0000102]), vcpu.get_sregs())
        xcrs = vcpu.get_state(StateKind.XCRS)
        xcr0_seen = True
        for _ in range(2):
            assert _run_once(vm, vcpu)[0] == 0x10
            changed = (vcpu.get_fpu(), vcpu.get_debug_regs(), vcpu.get_msrs([0xC0000102]), vcpu.get_sregs())
            assert changed[1].db[0] == 0x12345678 and changed[2][0].data == 0x12345678
            assert changed[3].cr4 & 0x40000
            # Nested under QEMU's TCG (the amd64 test bed) the guest's xsetbv never
            # reaches KVM: QEMU's helper_xsetbv (target/i386/tcg/fpu_helper.c) checks
            # no SVM intercept, so KVM's XCR0 stays as it was.
            xcr0_seen = xcr0_seen and vcpu.get_state(StateKind.XCRS)[0].value == 3
            assert all(a != b for a, b in zip(before, changed, strict=True)), "the guest changed every one of them"
            point.reset()
            after = (vcpu.get_fpu(), vcpu.get_debug_regs(), vcpu.get_msrs([0xC0000102]), vcpu.get_sregs())
            assert after == before
            assert vcpu.get_state(StateKind.XCRS) == xcrs
        if not xcr0_seen:
            pytest.skip(
                "the SSE register, DR0, the MSR and CR4 were restored; XCR0's reset is not shown here: "
                "the guest's xsetbv did not reach the hypervisor (nested under QEMU's TCG)"
            )
