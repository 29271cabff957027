"""Resource safety: nothing leaks, nothing is left half-made."""

from __future__ import annotations

import errno
import gc
import os

import pytest

from pyvmm.backend import LibcDeviceSeam
from pyvmm.errors import ConfigError, HypervisorError
from pyvmm.interrupts import MsiRoute
from pyvmm.vm import Backend
from pyvmm_kvm import bindings as k
from pyvmm_kvm.host import HOST
from pyvmm_kvm.system import system


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _mappings() -> int:
    with open("/proc/self/maps") as maps:
        return sum(1 for _ in maps)


def test_500_vms_leave_fds_and_mappings_unchanged(kvm: Backend) -> None:
    def one_vm() -> None:
        with kvm.create_vm({"arch": "x86_64"}) as vm:
            vm.add_memory(0, 0x10000)
            vm.create_vcpu()

    one_vm()  # first use opens /dev/kvm and loads libraries: not a leak
    # Earlier tests' garbage (a closed-over eventfd, a file) may be collected at
    # any time: collect it before each count so only this loop's fds are compared.
    gc.collect()
    fds, mappings = _fds(), _mappings()
    for _ in range(500):
        one_vm()
    gc.collect()
    assert _fds() == fds
    assert _mappings() == mappings


class _RefusingTss(LibcDeviceSeam):
    """The real calls, except that KVM_SET_TSS_ADDR fails as the kernel would."""

    def ioctl(self, fd: int, request: int, arg: int) -> int:
        if request == k.KVM_SET_TSS_ADDR:
            return -errno.EINVAL
        return super().ioctl(fd, request, arg)


def test_vm_failing_half_way_leaves_nothing_open(kvm: Backend) -> None:
    """KVM_CREATE_VM succeeds, KVM_SET_TSS_ADDR then fails: the VM descriptor
    must be closed before the error."""
    with HOST.use(_RefusingTss()) as host:
        kvm_system = system(host)
        try:
            fds = _fds()
            with pytest.raises(HypervisorError, match="KVM_SET_TSS_ADDR") as info:
                kvm.create_vm({"arch": "x86_64"})
            assert info.value.errno == errno.EINVAL
            assert _fds() == fds
        finally:
            kvm_system.close()


def test_unknown_backend_option_refused_before_anything_opens(kvm: Backend) -> None:
    fds = _fds()
    with pytest.raises(ConfigError, match="colour"):
        kvm.create_vm({"arch": "x86_64", "backend_options": {"colour": "blue"}})
    assert _fds() == fds


def test_failed_memory_map_frees_host_memory_and_slot(kvm: Backend) -> None:
    """A slot KVM refuses (it overlaps nothing in core's view but wraps KVM's
    address space) leaves no region behind, and the slot is reused."""
    with kvm.create_vm({"arch": "x86_64"}) as vm:
        mappings = _mappings()
        handle = vm.handle
        real_map = handle.map_memory

        def refuse(region: object) -> None:
            handle.fd, saved = -1, handle.fd  # the ioctl then fails with EBADF
            try:
                real_map(region)
            finally:
                handle.fd = saved

        handle.map_memory = refuse
        with pytest.raises(HypervisorError, match=r"KVM_SET_USER_MEMORY_REGION.*EBADF"):
            vm.add_memory(0, 0x10000)
        handle.map_memory = real_map
        assert len(vm.memory) == 0
        assert _mappings() == mappings
        assert vm.add_memory(0, 0x10000).slot == 0


def test_ioctl_errors_name_the_ioctl(kvm: Backend) -> None:
    with kvm.create_vm({"arch": "x86_64"}) as vm:
        vm.create_vcpu()
        # Without KVM_CREATE_IRQCHIP there is nothing to route to (docs/backends/kvm.md §6.6).
        with pytest.raises(HypervisorError, match="KVM_SET_GSI_ROUTING") as info:
            vm.set_gsi_routing([MsiRoute(24, 0xFEE00000, 0x41)])
        assert isinstance(info.value, OSError) and info.value.errno == errno.EINVAL
    # (A refused MSR is no ioctl error: KVM_GET_MSRS returns a short count, and
    # pyvmm raises MsrAccessError naming the MSR: test_kvm_interrupts.py.)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tss_address": 1 << 64}, "tss_address"),
        ({"tss_address": 0xFFFFE000}, "below 4 GiB"),  # its 3 pages would cross 4 GiB
        ({"tss_address": 0x1234}, "page-aligned"),
        ({"tss_address": True}, "integer address"),
        ({"identity_map_address": "0x1000"}, "integer address"),
    ],
)
def test_bad_tss_and_identity_addresses_are_config_errors(
    kvm: Backend, options: dict[str, object], message: str
) -> None:
    """Issue 10: tss_address=1<<64 wrapped silently."""
    # The first VM of the process opens /dev/kvm and keeps it: not a leak.
    kvm.create_vm({"arch": "x86_64"}).close()
    before = _fds()
    with pytest.raises(ConfigError, match=message):
        kvm.create_vm({"arch": "x86_64", "backend_options": options})
    assert _fds() == before


class _RecordingVmSetup(LibcDeviceSeam):
    """The real calls, remembering each VM setup ioctl and its argument."""

    def __init__(self) -> None:
        super().__init__()
        self.setup: list[tuple[int, int]] = []

    def ioctl(self, fd: int, request: int, arg: int) -> int:
        if request in (k.KVM_SET_TSS_ADDR, k.KVM_SET_IDENTITY_MAP_ADDR):
            self.setup.append((request, arg))
        return super().ioctl(fd, request, arg)


def test_identity_map_is_set_only_away_from_kvms_default(kvm: Backend) -> None:
    """KVM takes 0xFFFBC000 for the identity map page when userspace never sets
    one (docs/backends/kvm.md §4.1), so a VM at that address skips the ioctl;
    the TSS address is always set, and any other identity address is too."""
    with HOST.use(_RecordingVmSetup()) as host:
        seam = host.seam
        assert isinstance(seam, _RecordingVmSetup)
        kvm_system = system(host)
        try:
            with kvm.create_vm({"arch": "x86_64"}):
                pass
            assert [request for request, _ in seam.setup] == [k.KVM_SET_TSS_ADDR]
            assert seam.setup[0][1] == 0xFFFBD000
            seam.setup.clear()
            with kvm.create_vm({"arch": "x86_64", "backend_options": {"identity_map_address": 0xFEFFC000}}) as vm:
                vm.create_vcpu()  # the kernel took the address: a vCPU can follow
            requests = [request for request, _ in seam.setup]
            if kvm_system.check_extension(k.KVM_CAP_SET_IDENTITY_MAP_ADDR):
                assert requests == [k.KVM_SET_TSS_ADDR, k.KVM_SET_IDENTITY_MAP_ADDR]
            else:
                assert requests == [k.KVM_SET_TSS_ADDR]
        finally:
            kvm_system.close()
