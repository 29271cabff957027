"""The VM-wide state and XSAVE on real KVM, on the VM API: the thin wrappers'
error paths (no irqchip yet, an image of the wrong size), and a guest driven by
the in-kernel 8259s and 8254 that continues exactly after a restore."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from pyvmm import snapshot
from pyvmm.arch.x86_64 import Xsave
from pyvmm.errors import ConfigError, HypervisorError
from pyvmm.exits import ExitKind, IoExit
from pyvmm.machine.snapshot_port import SNAPSHOT_PORT
from pyvmm.testing.guests.snapshot_counter import expected_code, snapshot_counter_image
from pyvmm.vcpu_state import StateKind
from pyvmm.vm import Backend, Vcpu, Vm
from pyvmm.vm_state import X86_IRQCHIP_KINDS, VmStateKind
from pyvmm_kvm import irqchip_state
from pyvmm_kvm.bindings import ffi

DEBUG_EXIT = 0xF4


@pytest.mark.parametrize("kind", X86_IRQCHIP_KINDS, ids=lambda k: k.value)
def test_vm_state_before_the_irqchip_is_enxio(kvm: Backend, kind: VmStateKind) -> None:
    """kvm_arch_vm_ioctl: KVM_GET/SET_IRQCHIP and KVM_GET/SET_PIT2 without the
    devices are -ENXIO."""
    with kvm.create_vm({"arch": "x86_64"}) as vm:
        size = irqchip_state.PIT_IMAGE_SIZE if kind is VmStateKind.PIT else irqchip_state.CHIP_IMAGE_SIZE
        for call in (lambda: vm.get_vm_state(kind), lambda: vm.set_vm_state(kind, bytes(size))):
            with pytest.raises(HypervisorError) as info:
                call()
            assert info.value.errno == errno.ENXIO


@pytest.mark.parametrize("kind", X86_IRQCHIP_KINDS, ids=lambda k: k.value)
def test_an_image_of_the_wrong_size_is_refused_before_the_ioctl(kvm: Backend, kind: VmStateKind) -> None:
    with kvm.create_vm({"arch": "x86_64"}) as vm:
        vm.create_irqchip()
        image = vm.get_vm_state(kind)
        with pytest.raises(ConfigError, match=f"is {len(image)} bytes, not {len(image) - 1}"):
            vm.set_vm_state(kind, image[:-1])
        vm.set_vm_state(kind, image)


def test_the_pit_image_round_trips_a_programmed_counter(kvm: Backend) -> None:
    with kvm.create_vm({"arch": "x86_64"}) as vm:
        vm.create_irqchip()
        raw = ffi.new("struct kvm_pit_state2 *")
        ffi.buffer(raw)[:] = vm.get_vm_state(VmStateKind.PIT)
        raw.channels[0].count, raw.channels[0].mode = 1193, 2
        vm.set_vm_state(VmStateKind.PIT, bytes(ffi.buffer(raw)))
        read = ffi.new("struct kvm_pit_state2 *")
        ffi.buffer(read)[:] = vm.get_vm_state(VmStateKind.PIT)
        assert (read.channels[0].count, read.channels[0].mode) == (1193, 2)


def test_xsave_round_trips_and_refuses_a_larger_area(kvm: Backend) -> None:
    with kvm.create_vm({"arch": "x86_64"}) as vm:
        vm.add_memory(0, 0x10000)
        vcpu = vm.create_vcpu()
        area = bytearray(vcpu.get_state(StateKind.XSAVE).region)
        area[160:176] = bytes(range(16))  # xmm0 in the legacy region ...
        area[512] |= 0x2  # ... in use: XSTATE_BV's SSE bit (clear, the kernel takes the initial state)
        vcpu.set_state(StateKind.XSAVE, Xsave(bytes(area)))
        assert vcpu.get_state(StateKind.XSAVE).region[160:176] == bytes(range(16))
        assert vcpu.get_state(StateKind.FPU).xmm[0] == bytes(range(16))
        with pytest.raises(ConfigError, match="does not fit"):
            vcpu.set_state(StateKind.XSAVE, Xsave(bytes(area) + bytes(1 << 20)))


def _run_to(vcpu: Vcpu, port: int) -> IoExit:
    """Run until the guest writes ``port`` (the in-kernel devices answer the rest)."""
    while True:
        exit_ = vcpu.run()
        if exit_.kind is ExitKind.IO:
            io: IoExit = exit_  # type: ignore[assignment]
            if io.port == port:
                return io
        assert exit_.kind in (ExitKind.IO, ExitKind.INTERRUPTED, ExitKind.HLT), exit_


def _counter_vm(kvm: Backend) -> tuple[Vm, Vcpu]:
    vm = kvm.create_vm({"arch": "x86_64"})
    vm.add_memory(0, 16 << 20)
    vm.create_irqchip()
    boot = snapshot_counter_image().load(vm.memory, ram_size=16 << 20, cpus=1)
    vcpu = vm.create_vcpu()
    vcpu.set_cpuid(vm.supported_cpuid())
    vm.boot(boot)
    return vm, vcpu


def test_an_irqchip_guest_on_the_vm_api_continues_after_a_restore(kvm: Backend, tmp_path: Path) -> None:
    path = tmp_path / "irqchip.snap"
    vm, vcpu = _counter_vm(kvm)
    with vm:
        _run_to(vcpu, SNAPSHOT_PORT)
        snapshot.save(vm, path)
        never_stopped = int.from_bytes(_run_to(vcpu, DEBUG_EXIT).data, "little")
    image = snapshot.load(path)
    assert [kind for kind, _ in image.vm_states] == list(X86_IRQCHIP_KINDS)
    assert {StateKind.XSAVE, StateKind.LAPIC, StateKind.MP_STATE} <= {kind for kind, _ in image.vcpus[0]}
    with snapshot.restore(kvm, path, lambda v: v.set_cpuid(v.vm.supported_cpuid())) as restored:
        (vcpu2,) = restored.vcpus
        restored_code = int.from_bytes(_run_to(vcpu2, DEBUG_EXIT).data, "little")
    assert never_stopped == restored_code == expected_code()


#: Where the upper half of ymm5 lives in the standard XSAVE layout (AVX
#: component at 576, 16 bytes per register): only XSAVE carries it, not the FPU set.
YMM5_HIGH = slice(576 + 16 * 5, 576 + 16 * 6)


def test_the_upper_half_of_a_ymm_register_crosses_a_snapshot(kvm: Backend, tmp_path: Path) -> None:
    path = tmp_path / "xsave.snap"
    vm, vcpu = _counter_vm(kvm)
    with vm:
        area = bytearray(vcpu.get_state(StateKind.XSAVE).region)
        area[YMM5_HIGH] = b"pyvmm-ymm5-upper"
        area[512] |= 0x4  # XSTATE_BV: the AVX component is in use
        try:
            vcpu.set_state(StateKind.XSAVE, Xsave(bytes(area)))
        except HypervisorError as exc:
            pytest.skip(f"this KVM gives the guest no AVX state: {exc}")
        if vcpu.get_state(StateKind.XSAVE).region[YMM5_HIGH] != b"pyvmm-ymm5-upper":
            pytest.skip("this KVM gives the guest no AVX state")
        _run_to(vcpu, SNAPSHOT_PORT)
        snapshot.save(vm, path)
    with snapshot.restore(kvm, path) as restored:
        (vcpu2,) = restored.vcpus
        assert vcpu2.get_state(StateKind.XSAVE).region[YMM5_HIGH] == b"pyvmm-ymm5-upper"
