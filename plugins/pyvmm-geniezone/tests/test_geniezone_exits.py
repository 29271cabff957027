"""How the plugin reads every exit the driver can hand to userspace, including
those the model's hypervisor never makes by itself: a test hypervisor fills the
driver's copy of ``gzvm_vcpu_run`` with one exit, laid out as the header says."""

from __future__ import annotations

import errno
import struct
import threading
from collections.abc import Callable, Iterator

import pytest
from booting import booted
from conftest import geniezone_backend

from pyvmm.errors import HypervisorError, UnknownExitError
from pyvmm.exits import (
    FailEntryExit,
    InternalErrorExit,
    InterruptedExit,
    ShutdownExit,
    ShutdownReason,
    SystemEvent,
    SystemEventExit,
    VcpuExit,
)
from pyvmm.testing.conformance import programs_aarch64 as p
from pyvmm_geniezone import model as gm

EXIT_FAIL_ENTRY = 0x92920006
EXIT_INTERNAL_ERROR = 0x92920007
EXIT_EXCEPTION = 0x92920004
EXIT_SHUTDOWN = 0x92920009
EXIT_IPI = 0x9292000D


def fill(reason: int, union: bytes) -> Callable[[bytearray], int]:
    def write(run: bytearray) -> int:
        struct.pack_into("<I", run, 0, reason)
        run[8 : 8 + len(union)] = union
        return reason

    return write


class _OneExit(gm.Hypervisor):
    def __init__(self, model: gm.GenieZoneModel, make: Callable[[bytearray], int]) -> None:
        super().__init__(model)
        self.make = make

    def vcpu_run(self, vcpu: gm.ModelVcpu, run: bytearray) -> int:
        return self.make(run)


@pytest.fixture
def scripted() -> Iterator[Callable[[Callable[[bytearray], int]], VcpuExit]]:
    model = gm.GenieZoneModel()

    def first_exit(make: Callable[[bytearray], int]) -> VcpuExit:
        model.hypervisor = _OneExit(model, make)
        with booted(geniezone_backend(), p.PSCI_OFF) as (_, (vcpu,)):
            return vcpu.run()

    with model.installed():
        yield first_exit
    model.assert_no_rejections()


def test_fail_entry(scripted: Callable[[Callable[[bytearray], int]], VcpuExit]) -> None:
    exit_ = scripted(fill(EXIT_FAIL_ENTRY, struct.pack("<QI", 0x1234, 3)))
    assert isinstance(exit_, FailEntryExit) and (exit_.reason, exit_.cpu) == (0x1234, 3)


def test_internal_error(scripted: Callable[[Callable[[bytearray], int]], VcpuExit]) -> None:
    exit_ = scripted(fill(EXIT_INTERNAL_ERROR, struct.pack("<II3Q", 2, 3, 7, 8, 9)))
    assert isinstance(exit_, InternalErrorExit) and (exit_.suberror, exit_.data) == (2, (7, 8, 9))


def test_exception(scripted: Callable[[Callable[[bytearray], int]], VcpuExit]) -> None:
    exit_ = scripted(fill(EXIT_EXCEPTION, struct.pack("<IIQ", 1, 0x92, 0x4000_0000)))
    assert isinstance(exit_, InternalErrorExit)
    assert (exit_.suberror, exit_.data) == (1, (0x92, 0x4000_0000))


def test_shutdown(scripted: Callable[[Callable[[bytearray], int]], VcpuExit]) -> None:
    exit_ = scripted(fill(EXIT_SHUTDOWN, b""))
    assert isinstance(exit_, ShutdownExit) and exit_.reason is ShutdownReason.OTHER


@pytest.mark.parametrize(("kind", "event"), [(1, SystemEvent.SHUTDOWN), (2, SystemEvent.RESET), (3, SystemEvent.CRASH)])
def test_system_events(
    scripted: Callable[[Callable[[bytearray], int]], VcpuExit], kind: int, event: SystemEvent
) -> None:
    exit_ = scripted(fill(gm.EXIT_SYSTEM_EVENT, struct.pack("<II2Q", kind, 2, 5, 6)))
    assert isinstance(exit_, SystemEventExit) and (exit_.event, exit_.data) == (event, (5, 6))


def test_an_unknown_system_event_is_an_error(scripted: Callable[[Callable[[bytearray], int]], VcpuExit]) -> None:
    with pytest.raises(HypervisorError, match="unknown system event type 5") as raised:
        scripted(fill(gm.EXIT_SYSTEM_EVENT, struct.pack("<II", 5, 0)))
    assert raised.value.errno == errno.EPROTO


def test_an_unknown_exit_is_an_error(scripted: Callable[[Callable[[bytearray], int]], VcpuExit]) -> None:
    with pytest.raises(UnknownExitError) as raised:
        scripted(fill(EXIT_IPI, b""))
    assert raised.value.reason == EXIT_IPI


def test_an_mmio_exit_of_a_bad_size_is_an_error(scripted: Callable[[Callable[[bytearray], int]], VcpuExit]) -> None:
    with pytest.raises(HypervisorError, match="an MMIO exit of 16 bytes"):
        scripted(fill(gm.EXIT_MMIO, struct.pack("<Q8sQIB", 0x0A00_0000, bytes(8), 16, 0, 1)))


def signalled(reason: int, model: gm.GenieZoneModel) -> Callable[[bytearray], int]:
    """An exit the driver keeps (it loops), made as a signal arrives: the loop
    ends and the copy out carries ``reason`` to the VMM with ERESTARTSYS."""

    def write(run: bytearray) -> int:
        struct.pack_into("<I", run, 0, reason)
        model.post_signal(threading.get_ident())
        return reason

    return write


@pytest.mark.parametrize("reason", [gm.EXIT_IRQ, gm.EXIT_GZ, gm.EXIT_IDLE])
def test_an_exit_the_driver_keeps_is_an_interruption(reason: int) -> None:
    model = gm.GenieZoneModel()
    model.hypervisor = _OneExit(model, signalled(reason, model))
    with model.installed(), booted(geniezone_backend(), p.PSCI_OFF) as (_, (vcpu,)):
        exit_ = vcpu.run()
        runs = [c for c in model.calls if c.name == "GZVM_RUN"]
        assert runs[-1].errno == errno.EINTR
        assert isinstance(exit_, InterruptedExit), exit_
    model.assert_no_rejections()


class _Script(gm.Hypervisor):
    """A hypervisor that makes the given exits in turn."""

    def __init__(self, model: gm.GenieZoneModel, *makes: Callable[[bytearray], int]) -> None:
        super().__init__(model)
        self.makes = list(makes)

    def vcpu_run(self, vcpu: gm.ModelVcpu, run: bytearray) -> int:
        return self.makes.pop(0)(run)


RELINQUISH = struct.pack("<2Q", gm.HVC_MEM_RELINQUISH, 0x4000_1000)


def test_mem_relinquish_stays_in_the_driver() -> None:
    """``gzvm_handle_relinquish`` always succeeds: the driver loops on, and the
    VMM sees the next exit only."""
    model = gm.GenieZoneModel()
    model.hypervisor = _Script(
        model, fill(gm.EXIT_HYPERCALL, RELINQUISH), fill(gm.EXIT_SYSTEM_EVENT, struct.pack("<II", 1, 0))
    )
    with model.installed(), booted(geniezone_backend(), p.PSCI_OFF) as (_, (vcpu,)):
        exit_ = vcpu.run()
        assert isinstance(exit_, SystemEventExit) and exit_.event is SystemEvent.SHUTDOWN, exit_
    model.assert_no_rejections()


def test_a_relinquish_ended_by_a_signal_is_an_interruption() -> None:
    """The copy out carries the relinquish hypercall the driver already handled:
    it is no hypercall for the VMM."""
    model = gm.GenieZoneModel()

    def relinquish_then_signal(run: bytearray) -> int:
        model.post_signal(threading.get_ident())
        return fill(gm.EXIT_HYPERCALL, RELINQUISH)(run)

    model.hypervisor = _Script(model, relinquish_then_signal)
    with model.installed(), booted(geniezone_backend(), p.PSCI_OFF) as (_, (vcpu,)):
        exit_ = vcpu.run()
        assert isinstance(exit_, InterruptedExit), exit_
    model.assert_no_rejections()
