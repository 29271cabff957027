"""ioeventfds, irqfds and the remaining vCPU state kinds on real KVM."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pyvmm.arch.x86_64 import MpState
from pyvmm.errors import ConfigError, HypervisorError
from pyvmm.exits import ExitKind, MmioExit
from pyvmm.host import Event
from pyvmm.testing.conformance import programs as p
from pyvmm.testing.conformance.harness import booted
from pyvmm.vcpu_state import IoEventAddress, StateKind
from pyvmm.vm import Backend


def _counter(event: Event) -> int:
    return event.consume()


@pytest.fixture
def eventfd() -> Iterator[Event]:
    with Event() as event:
        yield event


def test_pio_ioevent_signals_instead_of_exiting(kvm: Backend, eventfd: Event) -> None:
    with booted(kvm, p.PIO_OUT) as (vm, vcpu):
        vm.register_ioevent(eventfd, IoEventAddress.pio(p.TEST_PORT), length=1)
        assert vcpu.run().kind is ExitKind.HLT, "the OUT must not exit"
        assert _counter(eventfd) == 1


def test_ioevent_datamatch(kvm: Backend, eventfd: Event) -> None:
    with booted(kvm, p.PIO_OUT) as (vm, vcpu):
        vm.register_ioevent(eventfd, IoEventAddress.pio(p.TEST_PORT), datamatch=0x11, length=1)
        assert vcpu.run().kind is ExitKind.IO, "0x5a does not match 0x11: a normal exit"
        assert _counter(eventfd) == 0
    with booted(kvm, p.PIO_OUT) as (vm, vcpu):
        vm.register_ioevent(eventfd, IoEventAddress.pio(p.TEST_PORT), datamatch=0x5A, length=1)
        assert vcpu.run().kind is ExitKind.HLT
        assert _counter(eventfd) == 1


def test_mmio_ioevent_and_unregister(kvm: Backend, eventfd: Event) -> None:
    address = IoEventAddress.mmio(p.MMIO_BASE + 8)
    with booted(kvm, p.MMIO_ROUND_TRIP) as (vm, vcpu):
        vm.register_ioevent(eventfd, address, length=4)
        read = vcpu.run()
        assert isinstance(read, MmioExit) and not read.is_write
        wide = vcpu.run()
        assert isinstance(wide, MmioExit) and wide.address == p.MMIO_BASE + 16, "the 4-byte write was absorbed"
        assert _counter(eventfd) == 1
        vm.unregister_ioevent(eventfd, address, length=4)
        with pytest.raises(HypervisorError, match="KVM_IOEVENTFD"):
            vm.unregister_ioevent(eventfd, address, length=4)  # already gone: ENOENT


def test_ioevent_bad_length_refused(kvm: Backend, eventfd: Event) -> None:
    with kvm.create_vm({"arch": "x86_64"}) as vm:
        with pytest.raises(ConfigError, match="length"):
            vm.register_ioevent(eventfd, IoEventAddress.pio(0x10), length=3)
        with pytest.raises(ConfigError, match="datamatch"):
            vm.register_ioevent(eventfd, IoEventAddress.pio(0x10), datamatch=1, length=0)


def test_irqfd(kvm: Backend, eventfd: Event) -> None:
    with kvm.create_vm({"arch": "x86_64"}) as vm:
        with pytest.raises(HypervisorError, match="KVM_IRQFD"):
            vm.register_irqfd(eventfd, 4)  # no in-kernel irqchip to deliver it to
        vm.create_irqchip()
        vm.register_irqfd(eventfd, 4)
        eventfd.signal()
        with pytest.raises(ConfigError, match="resample"):
            vm.register_irqfd(eventfd, 5, level=True)


def test_mp_state_and_xcrs(kvm: Backend) -> None:
    with kvm.create_vm({"arch": "x86_64", "vcpus": 2}) as vm:
        vm.create_irqchip()
        boot = vm.create_vcpu(0)
        ap = vm.create_vcpu(1)
        assert boot.get_state(StateKind.MP_STATE) is MpState.RUNNABLE
        assert ap.get_state(StateKind.MP_STATE) is MpState.UNINITIALIZED, "APs wait for INIT/SIPI"
        ap.set_state(StateKind.MP_STATE, MpState.RUNNABLE)
        assert ap.get_state(StateKind.MP_STATE) is MpState.RUNNABLE
        xcrs = boot.get_state(StateKind.XCRS)
        assert xcrs and xcrs[0].index == 0 and xcrs[0].value & 1, "XCR0 bit 0 (x87) is always set"
        boot.set_state(StateKind.XCRS, xcrs)
