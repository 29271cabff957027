"""Exit decoding for reasons this machine's KVM cannot be made to produce on
demand.  The vCPU is real; its next KVM_RUN result is written into the run page
by the test at the kernel's documented offsets (which test_bindings_layout checks
against <linux/kvm.h>), so the code under test is the backend's own decoding."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from pyvmm.boot import BootSpec
from pyvmm.errors import UnknownExitError
from pyvmm.exits import ExitKind, InternalErrorExit, SystemEvent, SystemEventExit
from pyvmm.vm import Vcpu, Vm
from pyvmm_kvm import bindings as k


def _next_exit(vcpu: Vcpu, fill: Callable[[memoryview], None]) -> None:
    handle = vcpu.handle
    page = handle._view

    def fake_run(fd: int, request: int, arg: object) -> int:
        fill(page)
        return 0

    handle._ioctl = fake_run
    handle._fx_run = None  # the pure entry (the decoding after it is the same on both paths)


@pytest.mark.parametrize(
    ("kvm_type", "event"),
    [
        (k.KVM_SYSTEM_EVENT_SHUTDOWN, SystemEvent.SHUTDOWN),
        (k.KVM_SYSTEM_EVENT_RESET, SystemEvent.RESET),
        (k.KVM_SYSTEM_EVENT_CRASH, SystemEvent.CRASH),
    ],
)
def test_system_events(vm: Vm, kvm_type: int, event: SystemEvent) -> None:
    vcpu = vm.create_vcpu()

    def fill(page: memoryview) -> None:
        struct.pack_into("<I", page, 8, k.KVM_EXIT_SYSTEM_EVENT)
        struct.pack_into("<IIQ", page, 32, kvm_type, 1, 0x55)

    _next_exit(vcpu, fill)
    exit_ = vcpu.run()
    assert isinstance(exit_, SystemEventExit)
    assert (exit_.event, exit_.data) == (event, (0x55,))


def test_unknown_exit_reason_is_a_typed_error(vm: Vm) -> None:
    vcpu = vm.create_vcpu()
    _next_exit(vcpu, lambda page: struct.pack_into("<I", page, 8, 9999))
    with pytest.raises(UnknownExitError, match="9999") as info:
        vcpu.run()
    assert info.value.reason == 9999


def test_kvm_exit_unknown_carries_the_hardware_reason(vm: Vm) -> None:
    vcpu = vm.create_vcpu()

    def fill(page: memoryview) -> None:
        struct.pack_into("<I", page, 8, k.KVM_EXIT_UNKNOWN)
        struct.pack_into("<Q", page, 32, 0x30)

    _next_exit(vcpu, fill)
    with pytest.raises(UnknownExitError) as info:
        vcpu.run()
    assert info.value.reason == 0x30


def test_emulation_failure_with_bytes_in_the_run_page(vm: Vm) -> None:
    vcpu = vm.create_vcpu()

    def fill(page: memoryview) -> None:
        struct.pack_into("<I", page, 8, k.KVM_EXIT_INTERNAL_ERROR)
        struct.pack_into("<IIQB", page, 32, k.KVM_INTERNAL_ERROR_EMULATION, 3, 1, 3)
        page[49:52] = bytes.fromhex("0f01ca")  # clac

    _next_exit(vcpu, fill)
    exit_ = vcpu.run()
    assert isinstance(exit_, InternalErrorExit)
    assert exit_.instruction == bytes.fromhex("0f01ca")


def test_emulation_failure_without_bytes_reads_them_at_rip(vm: Vm) -> None:
    """Kernels before 5.14 report no instruction bytes: the backend translates
    CS:RIP through KVM and reads the instruction from guest RAM."""
    vm.add_memory(0, 0x10000)
    vm.memory.write(0x1000, bytes.fromhex("0f01cb90"))  # stac; nop
    vcpu = vm.create_vcpu()
    vm.boot(BootSpec(arch="x86_64", entry=0x1000, boot_tables=0x2000))

    def fill(page: memoryview) -> None:
        struct.pack_into("<I", page, 8, k.KVM_EXIT_INTERNAL_ERROR)
        struct.pack_into("<II", page, 32, k.KVM_INTERNAL_ERROR_EMULATION, 0)

    _next_exit(vcpu, fill)
    exit_ = vcpu.run()
    assert isinstance(exit_, InternalErrorExit)
    assert exit_.instruction[:3] == bytes.fromhex("0f01cb")


def test_shutdown_and_fail_entry(vm: Vm) -> None:
    vcpu = vm.create_vcpu()

    def fill(page: memoryview) -> None:
        struct.pack_into("<I", page, 8, k.KVM_EXIT_FAIL_ENTRY)
        struct.pack_into("<QI", page, 32, 0x21, 1)

    _next_exit(vcpu, fill)
    exit_ = vcpu.run()
    assert exit_.kind is ExitKind.FAIL_ENTRY
    assert (exit_.reason, exit_.cpu) == (0x21, 1)  # type: ignore[attr-defined]
