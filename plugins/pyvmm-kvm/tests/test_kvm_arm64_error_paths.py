"""Every ioctl of the arm64 KVM backend fails typed: a HypervisorError naming the
ioctl with its errno, and nothing left half-made.

As in ``test_kvm_error_paths.py`` (the x86 half), the objects are real and their
descriptors are then swapped for a closed one; ioctls issued while an object is
being built fail through a seam that fails just that request, and the test checks
that no descriptor was left open.  A completeness check compares the requests
tested here with every request the arm64 modules use.  Needs KVM on an aarch64
host (the arm64 test bed)."""

from __future__ import annotations

import errno
import gc
import os
import pathlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pyvmm.arch.aarch64 import x_reg_id
from pyvmm.backend import LibcDeviceSeam
from pyvmm.config import MemoryRegionSpec, VmConfig
from pyvmm.errors import HypervisorError
from pyvmm.host import Event
from pyvmm.memory import GuestMemory
from pyvmm.vcpu_state import IoEventAddress
from pyvmm_kvm import bindings as k
from pyvmm_kvm.arm64_plugin import probe
from pyvmm_kvm.arm64_vcpu import KvmArm64Vcpu
from pyvmm_kvm.arm64_vm import KvmArm64Vm
from pyvmm_kvm.host import HOST
from pyvmm_kvm.host_arch import host_is_arm64
from pyvmm_kvm.system import KvmSystem

pytestmark = pytest.mark.skipif(not host_is_arm64(), reason="needs KVM on an aarch64 host: runs in the arm64 test bed")

SRC = pathlib.Path(k.__file__).parent


class FailOn(LibcDeviceSeam):
    """The real system calls, except that ``request`` fails with EBADF."""

    def __init__(self, request: int) -> None:
        super().__init__()
        self.request = request

    def ioctl(self, fd: int, request: int, arg: int) -> int:
        if request == self.request:
            return -errno.EBADF
        return super().ioctl(fd, request, arg)


@pytest.fixture(scope="module", autouse=True)
def usable() -> None:
    availability = probe()
    if not availability.available:
        pytest.skip(f"KVM is not usable here: {availability.reason}")


@pytest.fixture
def objects() -> Iterator[tuple[KvmArm64Vm, KvmArm64Vcpu, int]]:
    """A VM with a vGIC and a vCPU made for real, started (so irqfds attach at
    once), and a descriptor number that is closed."""
    with HOST.use(LibcDeviceSeam()) as host:
        system = KvmSystem(host)
        vm = KvmArm64Vm(system, VmConfig.from_mapping({"arch": "aarch64", "vcpus": 2}))
        vm.create_irqchip()
        vcpu = vm.create_vcpu(0)
        vm.start()
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    assert vm.vgic is not None
    real = (vm.fd, vcpu.fd, vm.vgic.fd)
    yield vm, vcpu, w
    vm.fd, vcpu.fd, vm.vgic.fd = real
    vm.vgic.initialized = True
    vm.close()
    system.close()


def _region() -> Any:
    return GuestMemory().allocate(MemoryRegionSpec(guest_phys_addr=0x4000_0000, size=0x10000, log_dirty=True))


def _expect(name: str, call: Callable[[], object]) -> None:
    with pytest.raises(HypervisorError) as info:
        call()
    assert info.value.operation == name
    assert info.value.errno == errno.EBADF


VCPU_CALLS: dict[str, Callable[[KvmArm64Vcpu], object]] = {
    "KVM_RUN": lambda v: v.run(),
    "KVM_GET_ONE_REG": lambda v: v.get_one_reg(x_reg_id(0)),
    "KVM_SET_ONE_REG": lambda v: v.set_one_reg(x_reg_id(0), 1),
    "KVM_GET_REG_LIST": lambda v: v.reg_list(),
    "KVM_GET_MP_STATE": lambda v: v.get_mp_state(),
    "KVM_SET_MP_STATE": lambda v: v.set_mp_state(k.KVM_MP_STATE_RUNNABLE),
    "KVM_ENABLE_CAP": lambda v: v.enable_raw_capability(k.KVM_CAP_ARM_NISV_TO_USER, 0, ()),
}

VM_CALLS: dict[str, Callable[[KvmArm64Vm], object]] = {
    "KVM_SET_USER_MEMORY_REGION": lambda vm: vm.map_memory(_region()),
    "KVM_GET_DIRTY_LOG": lambda vm: vm.get_dirty_log(_region()),
    "KVM_IRQ_LINE": lambda vm: vm.set_irq_line(1, True),
    "KVM_IOEVENTFD": lambda vm: vm.register_ioevent(Event(), IoEventAddress.mmio(0x0A00_0000), None, 4),
    "KVM_CHECK_EXTENSION": lambda vm: vm.check_raw_capability(k.KVM_CAP_IRQCHIP),
}


@pytest.mark.parametrize("name", sorted(VCPU_CALLS))
def test_vcpu_wrapper_fails_typed(objects: tuple[KvmArm64Vm, KvmArm64Vcpu, int], name: str) -> None:
    _, vcpu, bad = objects
    vcpu.fd = bad
    _expect(name, lambda: VCPU_CALLS[name](vcpu))


@pytest.mark.parametrize("name", sorted(VM_CALLS))
def test_vm_wrapper_fails_typed(objects: tuple[KvmArm64Vm, KvmArm64Vcpu, int], name: str) -> None:
    vm, _, bad = objects
    vm.fd = bad
    _expect(name, lambda: VM_CALLS[name](vm))


def test_irqfd_fails_typed(objects: tuple[KvmArm64Vm, KvmArm64Vcpu, int]) -> None:
    vm, _, bad = objects
    vm.fd = bad
    with Event() as event:
        _expect("KVM_IRQFD", lambda: vm.register_irqfd(event, 2, level=False))


def test_vgic_attributes_fail_typed(objects: tuple[KvmArm64Vm, KvmArm64Vcpu, int]) -> None:
    vm, _, bad = objects
    vgic = vm.vgic
    assert vgic is not None
    vgic.fd = bad
    _expect("KVM_GET_DEVICE_ATTR", lambda: vgic.distributor_register(0))
    vgic.initialized = False
    _expect("KVM_SET_DEVICE_ATTR", vgic.initialize)


def _open_fds() -> set[str]:
    # Garbage an earlier test left (a cycle through a traceback, say) may close
    # an fd whenever the collector runs: collect first, so only this test's own
    # opens and closes show.
    gc.collect()
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(
    "name", ["KVM_CREATE_VM", "KVM_ARM_PREFERRED_TARGET", "KVM_CREATE_VCPU", "KVM_ARM_VCPU_INIT", "KVM_CREATE_DEVICE"]
)
def test_building_fails_typed_and_leaves_nothing_open(name: str) -> None:
    with HOST.use(FailOn(getattr(k, name))) as host:
        system = KvmSystem(host)
        before = _open_fds()
        try:
            with pytest.raises(HypervisorError) as info:
                vm = KvmArm64Vm(system, VmConfig.from_mapping({"arch": "aarch64"}))
                try:
                    vm.create_irqchip() if name == "KVM_CREATE_DEVICE" else vm.create_vcpu(0)
                finally:
                    vm.close()
            assert info.value.operation == name
            assert _open_fds() == before
        finally:
            system.close()


def test_every_ioctl_of_the_arm64_modules_has_an_error_path_test() -> None:
    used: set[str] = set()
    for path in SRC.glob("arm64_*.py"):
        used |= set(re.findall(r"\bk\.(KVM_[A-Z0-9_]+)", path.read_text())) & set(k.IOCTL_NAMES.values())
    tested = set(VCPU_CALLS) | set(VM_CALLS) | {"KVM_IRQFD", "KVM_GET_DEVICE_ATTR", "KVM_SET_DEVICE_ATTR"}
    tested |= {"KVM_CREATE_VM", "KVM_ARM_PREFERRED_TARGET", "KVM_CREATE_VCPU", "KVM_ARM_VCPU_INIT", "KVM_CREATE_DEVICE"}
    assert used <= tested, f"no error-path test for {sorted(used - tested)}"
