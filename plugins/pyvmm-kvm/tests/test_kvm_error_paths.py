"""Every KVM wrapper's error path, as kvm-ioctls tests it: each call made on a
descriptor that is not open fails with a HypervisorError naming the ioctl and
carrying EBADF, and nothing escapes untyped.

The objects are real (created on /dev/kvm through a seam that records every
request); then their descriptors are swapped for a closed one.  A completeness
check compares the requests that failed this way with every request the
plugin's source uses, so a new wrapper without an error-path test fails here."""

from __future__ import annotations

import errno
import os
import pathlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pyvmm.arch.x86_64 import (
    CpuidEntry,
    DebugRegs,
    Fpu,
    Lapic,
    MpState,
    MsrEntry,
    Regs,
    Sregs,
    VcpuEvents,
    Xcr,
    Xsave,
)
from pyvmm.backend import LibcDeviceSeam
from pyvmm.boot import X86VcpuInit
from pyvmm.config import MemoryRegionSpec, VmConfig
from pyvmm.errors import HypervisorError
from pyvmm.host import Event
from pyvmm.interrupts import MsiRoute
from pyvmm.memory import GuestMemory
from pyvmm.vcpu_state import IoEventAddress, StateKind
from pyvmm.vm import Backend
from pyvmm.vm_state import VmStateKind
from pyvmm_kvm import bindings as k
from pyvmm_kvm import irqchip_state
from pyvmm_kvm.host import HOST
from pyvmm_kvm.system import KvmSystem
from pyvmm_kvm.vcpu import KvmVcpu
from pyvmm_kvm.vm import KvmVm

SRC = pathlib.Path(k.__file__).parent


class RecordingSeam(LibcDeviceSeam):
    """The real system calls, with every ioctl request and its result logged."""

    def __init__(self) -> None:
        super().__init__()
        self.results: list[tuple[int, int]] = []

    def ioctl(self, fd: int, request: int, arg: int) -> int:
        result = super().ioctl(fd, request, arg)
        self.results.append((request, result))
        return result


@pytest.fixture(scope="module")
def seam(kvm: Backend) -> RecordingSeam:
    return RecordingSeam()


@pytest.fixture
def objects(seam: RecordingSeam) -> Iterator[tuple[KvmSystem, KvmVm, KvmVcpu, int]]:
    """A system, VM and vCPU made for real, and a descriptor number that is closed."""
    with HOST.use(seam) as host:
        system = KvmSystem(host)
        vm = KvmVm(system, VmConfig())
        vcpu = vm.create_vcpu(0)
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    real = (system.fd, vm.fd, vcpu.fd)
    yield system, vm, vcpu, w
    system.fd, vm.fd, vcpu.fd = real
    vm.close()
    system.close()


def _region() -> Any:
    memory = GuestMemory()
    return memory.allocate(MemoryRegionSpec(guest_phys_addr=0, size=0x10000, log_dirty=True))


VCPU_CALLS: dict[str, Callable[[KvmVcpu], object]] = {
    "KVM_RUN": lambda v: v.run(),
    "KVM_GET_REGS": lambda v: v.get_state(StateKind.REGS),
    "KVM_SET_REGS": lambda v: v.set_state(StateKind.REGS, Regs()),
    "KVM_GET_SREGS": lambda v: v.get_state(StateKind.SREGS),
    "KVM_GET_FPU": lambda v: v.get_state(StateKind.FPU),
    "KVM_GET_DEBUGREGS": lambda v: v.get_state(StateKind.DEBUG_REGS),
    "KVM_GET_LAPIC": lambda v: v.get_state(StateKind.LAPIC),
    "KVM_SET_LAPIC": lambda v: v.set_state(StateKind.LAPIC, Lapic()),
    "KVM_GET_MP_STATE": lambda v: v.get_state(StateKind.MP_STATE),
    "KVM_SET_MP_STATE": lambda v: v.set_state(StateKind.MP_STATE, MpState.RUNNABLE),
    "KVM_GET_XCRS": lambda v: v.get_state(StateKind.XCRS),
    "KVM_SET_XCRS": lambda v: v.set_state(StateKind.XCRS, [Xcr(0, 1)]),
    "KVM_GET_MSRS": lambda v: v.get_msrs([0x10]),
    "KVM_SET_MSRS": lambda v: v.set_msrs([MsrEntry(0x10, 0)]),
    "KVM_SET_CPUID2": lambda v: v.set_cpuid([CpuidEntry(0)]),
    "KVM_SET_GUEST_DEBUG": lambda v: v.set_guest_debug(True, []),
    "KVM_GET_VCPU_EVENTS": lambda v: v.get_events(),
    "KVM_SET_VCPU_EVENTS": lambda v: v.set_events(VcpuEvents()),
    "KVM_INTERRUPT": lambda v: v.interrupt(0x20),
    "KVM_NMI": lambda v: v.inject_nmi(),
    "KVM_GET_TSC_KHZ": lambda v: v.get_tsc_khz(),
    "KVM_SET_TSC_KHZ": lambda v: v.set_tsc_khz(1_000_000),
    "KVM_GET_DEVICE_ATTR": lambda v: v.get_tsc_offset(),
    "KVM_SET_DEVICE_ATTR": lambda v: v.set_tsc_offset(0),
    "KVM_ENABLE_CAP": lambda v: v.enable_raw_capability(0, 0, (0, 0, 0, 0)),
    "KVM_GET_XSAVE": lambda v: v.get_state(StateKind.XSAVE),
    "KVM_SET_XSAVE": lambda v: v.set_state(StateKind.XSAVE, Xsave()),
    "KVM_GET_XSAVE2": lambda v: _with_large_xsave(v).get_state(StateKind.XSAVE),
}
# Setters of state KVM only takes whole: they read it first, and the read fails.
VCPU_READ_FIRST: dict[str, Callable[[KvmVcpu], object]] = {
    "KVM_SET_SREGS": lambda v: v.set_state(StateKind.SREGS, Sregs()),
    "KVM_SET_FPU": lambda v: v.set_state(StateKind.FPU, Fpu()),
    "KVM_SET_DEBUGREGS": lambda v: v.set_state(StateKind.DEBUG_REGS, DebugRegs()),
}
VM_CALLS: dict[str, Callable[[KvmVm], object]] = {
    "KVM_SET_USER_MEMORY_REGION": lambda vm: vm.map_memory(_region()),
    "KVM_GET_DIRTY_LOG": lambda vm: vm.get_dirty_log(_region()),
    "KVM_CREATE_VCPU": lambda vm: vm.create_vcpu(1),
    "KVM_CREATE_IRQCHIP": lambda vm: vm.create_irqchip(),
    "KVM_IRQ_LINE": lambda vm: vm.set_irq_line(4, True),
    "KVM_IRQFD": lambda vm: vm.register_irqfd(Event(), 4, False),
    "KVM_IOEVENTFD": lambda vm: vm.register_ioevent(Event(), IoEventAddress.pio(0x10), None, 1),
    "KVM_GET_CLOCK": lambda vm: vm.get_clock(),
    "KVM_SET_CLOCK": lambda vm: vm.set_clock(0),
    "KVM_SET_GSI_ROUTING": lambda vm: vm.set_gsi_routing([MsiRoute(24, 0xFEE00000, 0x41)]),
    "KVM_SIGNAL_MSI": lambda vm: vm.signal_msi(0xFEE00000, 0x41),
    "KVM_REGISTER_COALESCED_MMIO": lambda vm: vm.register_coalesced_io(IoEventAddress.mmio(0xD0000000), 0x1000),
    "KVM_UNREGISTER_COALESCED_MMIO": lambda vm: vm.unregister_coalesced_io(IoEventAddress.mmio(0xD0000000), 0x1000),
    "KVM_GET_IRQCHIP": lambda vm: vm.get_vm_state(VmStateKind.IOAPIC),
    "KVM_SET_IRQCHIP": lambda vm: vm.set_vm_state(VmStateKind.PIC_PRIMARY, bytes(irqchip_state.CHIP_IMAGE_SIZE)),
    "KVM_GET_PIT2": lambda vm: vm.get_vm_state(VmStateKind.PIT),
    "KVM_SET_PIT2": lambda vm: vm.set_vm_state(VmStateKind.PIT, bytes(irqchip_state.PIT_IMAGE_SIZE)),
}


def _with_large_xsave(vcpu: KvmVcpu) -> KvmVcpu:
    """A vCPU whose KVM reports an XSAVE area past 4 KiB (AMX hosts), so that
    reading it takes KVM_GET_XSAVE2."""
    vcpu.xsave_size = lambda: 8192  # type: ignore[method-assign]
    return vcpu


#: Events made before any descriptor is swapped for a closed one (an Event made
#: afterwards could get that very number); closed after the module's tests.
EVENTS = (Event(), Event())


@pytest.fixture(scope="module", autouse=True)
def _close_events() -> Iterator[None]:
    yield
    for event in EVENTS:
        event.close()


# Calls that reach an ioctl already in the tables through another path, and so
# need their own error-path test: the same request, another wrapper.
VM_ALSO: dict[str, tuple[str, Callable[[KvmVm], object]]] = {
    "unregister_irqfd": ("KVM_IRQFD", lambda vm: vm.unregister_irqfd(EVENTS[0], 4)),
    "register_resample_irqfd": ("KVM_IRQFD", lambda vm: vm.register_resample_irqfd(EVENTS[0], 4, EVENTS[1])),
    "check_raw_capability": ("KVM_CHECK_EXTENSION", lambda vm: vm.check_raw_capability(k.KVM_CAP_IRQCHIP)),
    "enable_raw_capability": (
        "KVM_ENABLE_CAP",
        lambda vm: vm.enable_raw_capability(k.KVM_CAP_X86_USER_SPACE_MSR, 0, (0, 0, 0, 0)),
    ),
}


def _create_vm(system: KvmSystem) -> KvmVm:
    system.max_vcpus = lambda: 4  # type: ignore[method-assign]  # (itself an ioctl, tested above)
    return KvmVm(system, VmConfig())


SYSTEM_CALLS: dict[str, Callable[[KvmSystem], object]] = {
    "KVM_CHECK_EXTENSION": lambda s: s.check_extension(k.KVM_CAP_IRQCHIP),
    "KVM_GET_SUPPORTED_CPUID": lambda s: s.supported_cpuid(),
    "KVM_GET_MSR_INDEX_LIST": lambda s: s.msr_index_list(),
    "KVM_GET_MSR_FEATURE_INDEX_LIST": lambda s: s.feature_msrs(),
    "KVM_CREATE_VM": _create_vm,
}


def _expect_ebadf(name: str, call: Callable[[], object]) -> None:
    with pytest.raises(HypervisorError) as info:
        call()
    assert info.value.operation == name
    assert info.value.errno == errno.EBADF


@pytest.mark.parametrize("name", sorted(VCPU_CALLS))
def test_vcpu_wrapper_fails_typed(objects: tuple[KvmSystem, KvmVm, KvmVcpu, int], name: str) -> None:
    _, _, vcpu, bad = objects
    vcpu.fd = bad
    _expect_ebadf(name, lambda: VCPU_CALLS[name](vcpu))


@pytest.mark.parametrize("name", sorted(VCPU_READ_FIRST))
def test_vcpu_setter_fails_on_its_read(objects: tuple[KvmSystem, KvmVm, KvmVcpu, int], name: str) -> None:
    _, _, vcpu, bad = objects
    vcpu.fd = bad
    _expect_ebadf(name.replace("_SET_", "_GET_"), lambda: VCPU_READ_FIRST[name](vcpu))


@pytest.mark.parametrize("name", sorted(VM_CALLS))
def test_vm_wrapper_fails_typed(objects: tuple[KvmSystem, KvmVm, KvmVcpu, int], name: str) -> None:
    _, vm, _, bad = objects
    vm.fd = bad
    _expect_ebadf(name, lambda: VM_CALLS[name](vm))


@pytest.mark.parametrize("wrapper", sorted(VM_ALSO))
def test_other_vm_wrappers_fail_typed(objects: tuple[KvmSystem, KvmVm, KvmVcpu, int], wrapper: str) -> None:
    _, vm, _, bad = objects
    vm.fd = bad
    name, call = VM_ALSO[wrapper]
    _expect_ebadf(name, lambda: call(vm))


@pytest.mark.parametrize("name", sorted(SYSTEM_CALLS))
def test_system_wrapper_fails_typed(objects: tuple[KvmSystem, KvmVm, KvmVcpu, int], name: str) -> None:
    system, _, _, bad = objects
    system.fd = bad
    system._cpuid = None  # not from the cache
    _expect_ebadf(name, lambda: SYSTEM_CALLS[name](system))


def test_vcpu_init_fails_typed(objects: tuple[KvmSystem, KvmVm, KvmVcpu, int]) -> None:
    _, _, vcpu, bad = objects
    vcpu.fd = bad
    _expect_ebadf("KVM_GET_SREGS", lambda: vcpu.init(X86VcpuInit(regs=Regs(), sregs=Sregs())))


def test_open_of_a_missing_device_fails_typed(kvm: Backend, tmp_path: pathlib.Path) -> None:
    with HOST.use(RecordingSeam()) as host, pytest.raises(HypervisorError) as info:
        KvmSystem(host, str(tmp_path / "kvm"))
    assert info.value.errno == errno.ENOENT and "open(" in info.value.operation


def test_every_ioctl_the_plugin_issues_has_an_error_path_test() -> None:
    used = set()
    for path in SRC.glob("*.py"):
        # The arm64 modules' ioctls are checked on arm64 KVM (test_kvm_arm64_error_paths.py).
        if path.name == "bindings.py" or path.name.startswith("arm64_"):
            continue
        used |= set(re.findall(r"\bk\.(KVM_[A-Z0-9_]+)", path.read_text())) & set(k.IOCTL_NAMES.values())
    # Issued only where their failure is expected and handled: the VM's setup
    # ioctls (a failure closes the VM: test_kvm_resources), KVM_TRANSLATE (best
    # effort for error reports), KVM_GET_API_VERSION/VCPU_MMAP_SIZE (open).
    untestable_here = {
        "KVM_SET_TSS_ADDR",
        "KVM_SET_IDENTITY_MAP_ADDR",
        "KVM_CREATE_PIT2",
        "KVM_TRANSLATE",
        "KVM_GET_API_VERSION",
        "KVM_GET_VCPU_MMAP_SIZE",
    }
    tested = set(VCPU_CALLS) | set(VCPU_READ_FIRST) | set(VM_CALLS) | set(SYSTEM_CALLS)
    assert used - untestable_here <= tested, f"no error-path test for {sorted(used - untestable_here - tested)}"
