"""The machine on the contract backend: exits scripted by the test, dispatched to
the PC devices, and every way a run ends."""

from __future__ import annotations

import io
import logging
import os
import threading
from pathlib import Path

import pytest
from coretests_support import MakeBackend, RecordingBackend, register
from machinetests_support import (
    IRQCHIP_CAPS,
    MACHINE_CAPS,
    TINY_IMAGE,
    io_exit,
    io_exit_bytes,
    machine_config,
    mmio_exit,
    value_of,
)

from pyvmm.boot import X86Mode
from pyvmm.capabilities import Capability
from pyvmm.devices.base import Device
from pyvmm.errors import ConfigError, UnsupportedCapability, VmStateError
from pyvmm.exits import (
    FailEntryExit,
    InternalErrorExit,
    InterruptedExit,
    MsrAccessExit,
    ShutdownExit,
    SystemEvent,
    SystemEventExit,
    VcpuExit,
)
from pyvmm.hookspecs import hookimpl
from pyvmm.machine import DeviceError, GuestImage, Machine, StopReason
from pyvmm.machine.config import CpuidOverride
from pyvmm.plugins import PluginRegistry
from pyvmm.testing import contract_backend
from pyvmm.vm import Backend


@pytest.fixture
def pc(make_backend: MakeBackend) -> tuple[RecordingBackend, Backend]:
    return make_backend(MACHINE_CAPS)


def build(backend: Backend, **settings: object) -> Machine:
    return Machine(machine_config(**settings), backend=backend, image=TINY_IMAGE)


def test_debug_exit_ends_the_run_with_qemus_status(pc: tuple[RecordingBackend, Backend]) -> None:
    test_backend, backend = pc
    test_backend.script_exits(io_exit(0xF4, 4, write=True, value=0x21))
    with build(backend) as machine:
        result = machine.run()
    assert (result.reason, result.status, result.code) == (StopReason.DEBUG_EXIT, 0x43, 0x21)
    assert test_backend.calls_of("pyvmm_run_vcpu") == [("pyvmm_run_vcpu", 0)]  # never re-entered
    assert test_backend.vms[0].destroyed


def test_port_reads_are_completed_in_the_exit_data(pc: tuple[RecordingBackend, Backend]) -> None:
    test_backend, backend = pc
    select = io_exit(0x510, 2, write=True, value=0x05)
    cpus = io_exit(0x511, 1)
    lsr = io_exit(0x3FD, 1)
    wide = io_exit(0x511, 2)
    test_backend.script_exits(select, cpus, lsr, io_exit(0x510, 2, write=True, value=0), wide)
    with build(backend) as machine:
        result = machine.run()
    assert result.reason is StopReason.HALTED and result.status == 0
    assert value_of(cpus) == 1
    assert value_of(lsr) == 0x60
    assert value_of(wide) == int.from_bytes(b"QE", "little")


def test_string_io_handles_every_item(pc: tuple[RecordingBackend, Backend]) -> None:
    test_backend, backend = pc
    select = io_exit(0x510, 2, write=True, value=0)
    signature = io_exit(0x511, 1, count=4)
    test_backend.script_exits(io_exit_bytes(0x3F8, b"rep outsb\n"), select, signature)
    out = io.BytesIO()
    with Machine(machine_config(), backend=backend, image=TINY_IMAGE, serial_output=out) as machine:
        machine.run()
    assert out.getvalue() == b"rep outsb\n"
    assert bytes(signature.data) == b"QEMU"


def test_poweroff_through_string_io_is_status_0(pc: tuple[RecordingBackend, Backend]) -> None:
    test_backend, backend = pc
    test_backend.script_exits(io_exit_bytes(0x8900, b"Shutdown"), io_exit(0xF4, 1, write=True, value=1))
    with build(backend) as machine:
        result = machine.run()
    assert (result.reason, result.status) == (StopReason.POWEROFF, 0)


def test_mmio_round_trip_through_the_demo_device(pc: tuple[RecordingBackend, Backend]) -> None:
    test_backend, backend = pc
    ident = mmio_exit(0xFEB0_0000, 4)
    read_back = mmio_exit(0xFEB0_0008, 8)
    byte = mmio_exit(0xFEB0_0009, 1)
    test_backend.script_exits(
        ident, mmio_exit(0xFEB0_0008, 8, write=True, value=0x1122_3344_5566_7788), read_back, byte
    )
    with build(backend) as machine:
        machine.run()
        assert machine.devices.demo.scratch == 0x1122_3344_5566_7788
    assert bytes(ident.data) == b"PVMM"
    assert value_of(read_back) == 0x1122_3344_5566_7788
    assert value_of(byte) == 0x77


def test_unhandled_accesses_read_all_ones_and_log_once(
    pc: tuple[RecordingBackend, Backend], caplog: pytest.LogCaptureFixture
) -> None:
    test_backend, backend = pc
    first, second, mmio = io_exit(0x1234, 4), io_exit(0x1234, 2), mmio_exit(0xFEC1_0000, 8)
    test_backend.script_exits(first, second, io_exit(0x1234, 1, write=True, value=3), mmio)
    with caplog.at_level(logging.WARNING, logger="pyvmm.machine"), build(backend) as machine:
        result = machine.run()
    assert result.reason is StopReason.HALTED
    assert value_of(first) == 0xFFFF_FFFF
    assert value_of(second) == 0xFFFF
    assert value_of(mmio) == 0xFFFF_FFFF_FFFF_FFFF
    unhandled = [r.getMessage() for r in caplog.records if "unhandled" in r.getMessage()]
    assert len(unhandled) == 2
    assert "port read at 0x1234" in unhandled[0]
    assert "MMIO read at 0xfec10000" in unhandled[1]


class Exploding(Device):
    name = "exploding"

    def write(self, offset: int, size: int, value: int) -> None:
        raise RuntimeError(f"cannot take {value:#x}")


def test_a_device_exception_propagates_naming_the_access(pc: tuple[RecordingBackend, Backend]) -> None:
    test_backend, backend = pc
    test_backend.script_exits(io_exit(0x10, 2, write=True, value=0xBEEF), io_exit(0xF4, 1, write=True))
    with build(backend) as machine:
        machine.pio.register(0x10, 1, Exploding())
        with pytest.raises(DeviceError) as info:
            machine.run()
    message = str(info.value)
    assert "vCPU 0: device 'exploding' failed on a 2-byte port write of 0xbeef at 0x10" in message
    assert "guest rip 0xfff0" in message  # the contract backend's vCPU sits at the reset vector
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "cannot take 0xbeef" in message
    assert len(test_backend.calls_of("pyvmm_run_vcpu")) == 1


def test_an_mmio_device_exception_names_the_address(pc: tuple[RecordingBackend, Backend]) -> None:
    test_backend, backend = pc
    test_backend.script_exits(mmio_exit(0xD000_0010, 4, write=True, value=7))
    with build(backend) as machine:
        machine.mmio.register(0xD000_0000, 0x1000, Exploding())
        with pytest.raises(DeviceError, match=r"a 4-byte MMIO write of 0x7 at 0xd0000010"):
            machine.run()


@pytest.mark.parametrize(
    ("exit_", "reason", "status", "detail"),
    [
        (ShutdownExit(), StopReason.TRIPLE_FAULT, 4, "vCPU 0: triple fault at rip 0xfff0"),
        (SystemEventExit(SystemEvent.SHUTDOWN), StopReason.POWEROFF, 0, "powered off"),
        (SystemEventExit(SystemEvent.RESET), StopReason.RESET, 0, "reset"),
        (SystemEventExit(SystemEvent.CRASH, (7,)), StopReason.CRASHED, 4, "crashed (7,)"),
        (
            InternalErrorExit(1, bytes.fromhex("0f01d0"), description="emulation failure"),
            StopReason.EMULATION_ERROR,
            4,
            "emulation failure; instruction bytes: 0f 01 d0",
        ),
        (FailEntryExit(0x21), StopReason.ENTRY_FAILED, 4, "hardware reason 0x21"),
    ],
)
def test_guest_ends(
    pc: tuple[RecordingBackend, Backend], exit_: VcpuExit, reason: StopReason, status: int, detail: str
) -> None:
    test_backend, backend = pc
    test_backend.script_exits(exit_)
    with build(backend) as machine:
        result = machine.run()
    assert (result.reason, result.status) == (reason, status)
    assert detail in result.detail


def test_i8042_reset_stops_with_reason_reset(pc: tuple[RecordingBackend, Backend]) -> None:
    test_backend, backend = pc
    test_backend.script_exits(io_exit(0x64, 1, write=True, value=0xFE), io_exit(0xF4, 1, write=True))
    with build(backend) as machine:
        result = machine.run()
    assert (result.reason, result.status) == (StopReason.RESET, 0)


def test_interrupted_and_msr_exits_continue(pc: tuple[RecordingBackend, Backend]) -> None:
    test_backend, backend = pc
    msr = MsrAccessExit()
    msr.index = 0x1234
    test_backend.script_exits(InterruptedExit(), msr, io_exit(0xF4, 1, write=True, value=2))
    with build(backend) as machine:
        result = machine.run()
    assert result.status == 5
    assert msr.error  # #GP for an MSR nobody handles


def test_stats_count_exits_per_kind(pc: tuple[RecordingBackend, Backend]) -> None:
    test_backend, backend = pc
    test_backend.script_exits(io_exit(0x3FD), io_exit(0x3FD), mmio_exit(0xFEB0_0000), io_exit(0xF4, write=True))
    with build(backend, stats=True) as machine:
        result = machine.run()
    assert result.stats is not None
    assert result.stats.by_kind() == {"io": 3, "mmio": 1}
    assert result.stats.exits == 4
    vcpu = result.stats.vcpus[0]
    assert 0 < vcpu.guest_ns <= vcpu.wall_ns
    assert "vCPU 0: 4 exits" in result.stats.format()


def test_no_stats_unless_asked(pc: tuple[RecordingBackend, Backend]) -> None:
    with build(pc[1]) as machine:
        assert machine.run().stats is None


class StuckVcpuBackend(RecordingBackend):
    """vCPU 1 stays "in the guest" until kicked; vCPU 0 exits through the debug
    port once vCPU 1 is inside run."""

    __test__ = False

    def __init__(self) -> None:
        super().__init__("stuck", IRQCHIP_CAPS)
        self.inside = threading.Event()
        self.kicked = threading.Event()
        self.runs: list[int] = []

    @hookimpl
    def pyvmm_run_vcpu(self, vcpu: contract_backend.TestVcpu) -> VcpuExit:
        self.runs.append(vcpu.index)
        if vcpu.index == 1:
            self.inside.set()
            assert self.kicked.wait(10), "vCPU 1 was never kicked"
            return InterruptedExit()
        assert self.inside.wait(10)
        return io_exit(0xF4, 1, write=True, value=3)

    @hookimpl
    def pyvmm_kick_vcpu(self, vcpu: contract_backend.TestVcpu) -> None:
        super().pyvmm_kick_vcpu(vcpu)
        if vcpu.index == 1:
            self.kicked.set()


def test_a_stop_kicks_a_vcpu_that_is_still_in_the_guest(registry: PluginRegistry) -> None:
    test_backend = StuckVcpuBackend()
    backend = register(registry, test_backend)
    with build(backend, cpus=2) as machine:
        result = machine.run()
    assert (result.reason, result.status) == (StopReason.DEBUG_EXIT, 7)
    assert test_backend.kicked.is_set()
    assert sorted(test_backend.runs) == [0, 1]  # neither vCPU ran again


def test_irqchip_comes_before_the_vcpus_and_cpuid_carries_apic_ids(make_backend: MakeBackend) -> None:
    test_backend, backend = make_backend(IRQCHIP_CAPS)
    test_backend.script_exits(io_exit(0xF4, 1, write=True), io_exit(0xF4, 1, write=True))
    overrides = [CpuidOverride(function=1, register="ecx", value=0x80)]
    with build(backend, cpus=2, cpuid_overrides=overrides) as machine:
        machine.run()
    names = [call[0] for call in test_backend.calls]
    assert names.index("pyvmm_create_irqchip") < names.index("pyvmm_create_vcpu")
    tables = [call[1] for call in test_backend.calls_of("pyvmm_set_cpuid")]
    assert len(tables) == 2
    leaf1 = sorted((t for t in tables), key=lambda t: [e.ebx for e in t if e.function == 1] or [0])
    assert any(e.function == 1 and e.ecx == 0x80 for e in leaf1[0])
    inits = test_backend.calls_of("pyvmm_init_vcpu")
    assert sorted(call[2].boot_cpu for call in inits) == [False, True]


def test_the_uart_interrupt_goes_to_irq_4_with_an_irqchip(make_backend: MakeBackend) -> None:
    test_backend, backend = make_backend(IRQCHIP_CAPS)
    test_backend.script_exits(io_exit(0x3F9, 1, write=True, value=0x02), io_exit(0xF4, 1, write=True))
    with build(backend) as machine:
        machine.run()
    assert test_backend.calls_of("pyvmm_set_irq_line") == [("pyvmm_set_irq_line", 4, True)]


def test_pic_ports_are_sinks_only_without_an_irqchip(make_backend: MakeBackend) -> None:
    _, plain = make_backend(MACHINE_CAPS, name="plain")
    _, chip = make_backend(IRQCHIP_CAPS, name="chip")
    with build(plain) as without, build(chip) as with_chip:
        assert without.pio.find(0x21) is not None
        assert with_chip.pio.find(0x21) is None
        assert with_chip.pio.find(0x80) is not None


def test_several_vcpus_need_an_irqchip(pc: tuple[RecordingBackend, Backend]) -> None:
    with pytest.raises(ConfigError, match="cpus: 2 vCPUs need the hypervisor's interrupt controllers"):
        build(pc[1], cpus=2)


def test_a_backend_without_port_io_is_refused(make_backend: MakeBackend) -> None:
    _, backend = make_backend([Capability.IMMEDIATE_EXIT])
    with pytest.raises(UnsupportedCapability, match="PORT_IO"):
        build(backend)


def test_cpuid_overrides_need_the_cpuid_capability(make_backend: MakeBackend) -> None:
    test_backend, backend = make_backend([Capability.PORT_IO])
    with pytest.raises(ConfigError, match="cpuid_overrides: backend 'contract-test' cannot set"):
        build(backend, cpuid_overrides=[CpuidOverride(function=1, register="eax", value=0)])
    assert test_backend.vms[0].destroyed  # nothing left open


def test_an_image_that_does_not_fit_is_refused_before_any_vcpu(pc: tuple[RecordingBackend, Backend]) -> None:
    test_backend, backend = pc
    big = GuestImage("big", ((0x1F0_0000, bytes(0x20_0000)),), 0x1F0_0000)
    with pytest.raises(ConfigError, match="big: 2097152 bytes at 0x1f00000 do not fit"):
        Machine(machine_config(memory="32M"), backend=backend, image=big)
    assert test_backend.calls_of("pyvmm_create_vcpu") == []
    assert test_backend.vms[0].destroyed


def test_an_image_over_the_boot_tables_is_refused(pc: tuple[RecordingBackend, Backend]) -> None:
    bad = GuestImage("low", ((0x2000, b"\xf4"),), 0x2000, X86Mode.LONG)
    with pytest.raises(ConfigError, match="overlap the boot tables"):
        Machine(machine_config(), backend=pc[1], image=bad)


def test_ram_is_mapped_around_the_hole(pc: tuple[RecordingBackend, Backend]) -> None:
    test_backend, backend = pc
    with build(backend, memory="4G"):
        mapped = [(r.guest_phys_addr, r.size) for r in test_backend.mapped]
    assert mapped == [(0, 0xD000_0000), (1 << 32, 0x3000_0000)]


def test_a_machine_runs_once(pc: tuple[RecordingBackend, Backend]) -> None:
    with build(pc[1]) as machine:
        machine.run()
        with pytest.raises(VmStateError, match="runs once"):
            machine.run()
    machine.close()  # idempotent


def test_a_failing_vcpu_setup_propagates(pc: tuple[RecordingBackend, Backend]) -> None:
    test_backend, backend = pc
    test_backend.fail("pyvmm_create_vcpu", OSError("no vCPU for you"))
    with build(backend) as machine, pytest.raises(OSError, match="no vCPU for you"):
        machine.run()


class Exiting(Device):
    name = "exiting"

    def write(self, offset: int, size: int, value: int) -> None:
        raise SystemExit(0)


def test_systemexit_from_a_device_is_an_error_not_a_guest_result(pc: tuple[RecordingBackend, Backend]) -> None:
    """Issue 10: SystemExit inside the run made `pyvmm run` exit 0 as if the guest had finished."""
    from pyvmm.machine.runner import RunAborted

    test_backend, backend = pc
    test_backend.script_exits(io_exit(0x10, 1, write=True, value=1))
    with build(backend) as machine:
        machine.pio.register(0x10, 1, Exiting())
        with pytest.raises(RunAborted, match="SystemExit") as info:
            machine.run()
    assert isinstance(info.value.__cause__, SystemExit)


def test_a_machine_never_waits_for_a_reader_of_its_console_fifo(
    pc: tuple[RecordingBackend, Backend], tmp_path: Path
) -> None:
    """Issue 10: the API's Machine opened its serial file with a blocking open(),
    which waits for ever on a FIFO nobody reads."""
    fifo = tmp_path / "console"
    os.mkfifo(fifo)
    _, backend = pc
    with pytest.raises(ConfigError, match="FIFO with no reader"):
        build(backend, serial=str(fifo))
