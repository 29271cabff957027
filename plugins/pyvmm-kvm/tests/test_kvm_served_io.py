"""Served registers on real KVM (pyvmm.served_io), on both exit paths.

Every test runs twice: on the compiled path (``pyvmm_kvm._fast_exits``, skipped
where it was not built) and on the pure-Python one (``PYVMM_KVM_PURE_EXITS=1``).
Both must answer every access the same way and return the same exits."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator

import pytest

from pyvmm.boot import BootSpec, X86Mode
from pyvmm.devices.acpi_pm import PM_BASE, AcpiPm, SleepEvents
from pyvmm.devices.base import Device
from pyvmm.errors import ConfigError
from pyvmm.exits import ExitKind, IoExit
from pyvmm.machine import GuestImage, Machine, MachineConfig, StopReason
from pyvmm.served_io import ConstantRegister, LatchedBytes, PmTimerRegister, pm_timer_count
from pyvmm.vcpu_state import IoEventAddress
from pyvmm.vm import Backend, Vcpu, Vm
from pyvmm_kvm.fast_exits import ENV_PURE_EXITS, compiled_module, compiled_module_for

CODE = 0x1000
DS_SELECTOR = 0x1000  # real mode: DS base 0x10000, just past the 64 KiB of RAM
MMIO = DS_SELECTOR << 4
REPORT_PORT = 0x10  # not served: each value the guest wants checked goes out here
STRING_BUFFER = 0x2000

#: Real mode.  Each served access is followed, where it reads, by an `out` of
#: what it read to REPORT_PORT (an exit the test sees).
GUEST = bytes.fromhex(
    "b05a"  # mov al,0x5a
    "e640"  # out 0x40,al            latch write                    (served 1)
    "e441"  # in al,0x41             latch never written: initial   (served 2)
    "e610"  # out 0x10,al            -> 0xff
    "e440"  # in al,0x40             latch read back                (served 3)
    "e610"  # out 0x10,al            -> 0x5a
    "e550"  # in ax,0x50             constant, 2 bytes              (served 4)
    "e710"  # out 0x10,ax            -> 0xabcd
    "66a10000"  # mov eax,[0]        MMIO constant, 4 bytes         (served 5)
    "66e710"  # out 0x10,eax         -> 0x55667788
    "b077"  # mov al,0x77
    "a20800"  # mov [8],al           MMIO latch write               (served 6)
    "a00900"  # mov al,[9]           MMIO latch initial             (served 7)
    "e610"  # out 0x10,al            -> 0x00
    "a00800"  # mov al,[8]           MMIO latch read back           (served 8)
    "e610"  # out 0x10,al            -> 0x77
    "ba5000"  # mov dx,0x50
    "b90400"  # mov cx,4
    "bf0020"  # mov di,0x2000
    "f36c"  # rep insb               string read of the constant    (served 9)
    "ba0806"  # mov dx,0x608
    "66ed"  # in eax,dx              PM timer                       (served 10)
    "66e710"  # out 0x10,eax         -> the count
    "ec"  # in al,dx                 a 1-byte PM timer read: the VMM's
    "f4"  # hlt
)
SERVED_IN_GUEST = 10


@pytest.fixture(params=["compiled", "pure"])
def exit_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "compiled":
        if compiled_module() is None:
            pytest.skip("pyvmm_kvm._fast_exits was not built (no C compiler at install)")
        monkeypatch.delenv(ENV_PURE_EXITS, raising=False)
    else:
        monkeypatch.setenv(ENV_PURE_EXITS, "1")
    return str(request.param)


def _vm(kvm: Backend, code: bytes) -> tuple[Vm, Vcpu]:
    vm = kvm.create_vm({"arch": "x86_64"})
    vm.add_memory(0, 0x10000)
    vm.memory.write(CODE, code)
    vcpu = vm.create_vcpu()
    vm.boot(BootSpec(arch="x86_64", entry=CODE, x86_mode=X86Mode.REAL))
    sregs = vcpu.get_sregs()
    sregs.ds.base, sregs.ds.selector = MMIO, DS_SELECTOR
    vcpu.set_sregs(sregs)
    return vm, vcpu


@pytest.fixture
def guest(kvm: Backend, exit_path: str) -> Iterator[tuple[Vm, Vcpu]]:
    vm, vcpu = _vm(kvm, GUEST)
    with vm:
        assert (vm.handle.compiled is not None) is (exit_path == "compiled"), "the path asked for is the path taken"
        yield vm, vcpu


def _report(vcpu: Vcpu) -> tuple[int, int]:
    exit_ = vcpu.run()
    assert isinstance(exit_, IoExit), exit_
    assert exit_.port == REPORT_PORT and exit_.is_write
    return exit_.size, int.from_bytes(exit_.data, "little")


def test_served_registers_answer_without_exits(guest: tuple[Vm, Vcpu]) -> None:
    vm, vcpu = guest
    vm.serve_io(IoEventAddress.pio(0x40), 2, LatchedBytes())
    vm.serve_io(IoEventAddress.pio(0x50), 1, ConstantRegister(0x1234_ABCD))
    vm.serve_io(IoEventAddress.mmio(MMIO), 8, ConstantRegister(0x1122_3344_5566_7788))
    vm.serve_io(IoEventAddress.mmio(MMIO + 8), 2, LatchedBytes(0))
    start = time.monotonic_ns()
    vm.serve_io(IoEventAddress.pio(PM_BASE + 8), 4, PmTimerRegister(start))

    assert _report(vcpu) == (1, 0xFF)
    assert _report(vcpu) == (1, 0x5A)
    assert _report(vcpu) == (2, 0xABCD)
    assert _report(vcpu) == (4, 0x5566_7788)
    assert _report(vcpu) == (1, 0x00)
    assert _report(vcpu) == (1, 0x77)
    before = pm_timer_count(start, time.monotonic_ns())
    size, count = _report(vcpu)
    assert size == 4 and before <= count <= pm_timer_count(start, time.monotonic_ns())
    assert vm.memory.read(STRING_BUFFER, 4) == b"\xcd" * 4, "each element of a string read is answered"

    exit_ = vcpu.run()
    assert isinstance(exit_, IoExit), "a width the PM timer does not answer reaches the VMM"
    assert (exit_.port, exit_.size, exit_.is_write) == (PM_BASE + 8, 1, False)
    exit_.data[0] = 0
    assert vcpu.run().kind is ExitKind.HLT
    assert vcpu.handle.served_exits == SERVED_IN_GUEST


def test_without_served_ranges_every_access_exits(guest: tuple[Vm, Vcpu]) -> None:
    _, vcpu = guest
    exit_ = vcpu.run()
    assert isinstance(exit_, IoExit)
    assert (exit_.port, exit_.is_write, bytes(exit_.data)) == (0x40, True, b"\x5a")
    assert vcpu.handle.served_exits == 0


def test_a_range_added_between_runs_is_served_from_the_next(guest: tuple[Vm, Vcpu]) -> None:
    vm, vcpu = guest
    assert vcpu.run().port == 0x40  # type: ignore[attr-defined]  # not served yet: it exits
    vm.serve_io(IoEventAddress.pio(0x41), 1, ConstantRegister(0x42))
    assert _report(vcpu) == (1, 0x42)
    assert vcpu.handle.served_exits == 1


def test_overlaps_are_refused_and_change_nothing(guest: tuple[Vm, Vcpu]) -> None:
    vm, vcpu = guest
    vm.serve_io(IoEventAddress.pio(0x40), 2, LatchedBytes())
    with pytest.raises(ConfigError, match="overlaps the served range at 0x40"):
        vm.serve_io(IoEventAddress.pio(0x41), 4, ConstantRegister(0))
    vm.serve_io(IoEventAddress.mmio(0x40), 2, ConstantRegister(0))  # the same number in the other space is no overlap
    vm.register_coalesced_io(IoEventAddress.mmio(MMIO), 16)
    with pytest.raises(ConfigError, match="overlaps the coalesced zone"):
        vm.serve_io(IoEventAddress.mmio(MMIO + 8), 2, LatchedBytes())
    with pytest.raises(ConfigError, match="overlaps the served range"):
        vm.register_coalesced_io(IoEventAddress.pio(0x41), 1)
    assert [(r.space.value, r.base) for r in vm.handle.served.ranges] == [("pio", 0x40), ("mmio", 0x40)]
    exit_ = vcpu.run()
    assert isinstance(exit_, IoExit) and exit_.port == REPORT_PORT, "the latch still answers, nothing else changed"


#: 1: in eax,dx; jmp 1b -- a guest that only ever reads a served register.
SPIN = bytes.fromhex("ba080666edebfc")


def test_a_kick_ends_a_run_that_only_serves(kvm: Backend, exit_path: str) -> None:
    vm, vcpu = _vm(kvm, SPIN)
    with vm:
        vm.serve_io(IoEventAddress.pio(PM_BASE + 8), 4, PmTimerRegister(time.monotonic_ns()))
        kicker = threading.Timer(0.2, vcpu.kick)
        kicker.start()
        try:
            exit_ = vcpu.run()
        finally:
            kicker.join()
        assert exit_.kind is ExitKind.INTERRUPTED
        assert vcpu.handle.served_exits > 0
        served = vcpu.handle.served_exits
        again = threading.Timer(0.05, vcpu.kick)
        again.start()
        try:
            assert vcpu.run().kind is ExitKind.INTERRUPTED, "the next run serves again until the next kick"
        finally:
            again.join()
        assert vcpu.handle.served_exits > served


# --- the machine: the ACPI PM timer is served ----------------------------------------

STOP_MMIO = 0xD000_0000
#: Long mode, rbx = STOP_MMIO: mov dx,0x608; in eax,dx; mov ecx,eax;
#: in eax,dx (x 20); mov [rbx],ecx; mov [rbx+4],eax; jmp $
MACHINE_GUEST = bytes.fromhex("66ba0806ed89c1" + "ed" * 20 + "890b894304ebfe")


class Recorder(Device):
    """Keeps two 4-byte writes; the second ends the run."""

    name = "recorder"

    def __init__(self) -> None:
        self.values: list[int] = []
        self.machine: Machine | None = None

    def write(self, offset: int, size: int, value: int) -> None:
        self.values.append(value)
        if len(self.values) == 2:
            assert self.machine is not None
            self.machine.request_stop(StopReason.POWEROFF, 0, "recorded")


def test_the_machine_serves_the_pm_timer(kvm: Backend, exit_path: str) -> None:
    recorder = Recorder()
    image = GuestImage("pm timer", ((0x10_0000, MACHINE_GUEST),), 0x10_0000, X86Mode.LONG, registers={"rbx": STOP_MMIO})
    config = MachineConfig(backend="kvm", serial="none", memory=16 << 20, stats=True, timeout=30)
    with Machine(config, image=image) as machine:
        recorder.machine = machine
        pm = AcpiPm(SleepEvents(suspend=lambda: None, poweroff=lambda: None))
        machine.pio.register(PM_BASE, 12, pm)
        machine.mmio.register(STOP_MMIO, 0x1000, recorder)
        result = machine.run()
        served = sum(vcpu.served_exits for vcpu in machine.vm.handle.vcpus)
    assert result.reason is StopReason.POWEROFF
    first, last = recorder.values
    assert (last - first) & 0xFF_FFFF < 1 << 23, "the count runs forward (modulo its 24 bits)"
    assert result.stats is not None
    assert result.stats.by_kind().get("io", 0) == 0, "no PM timer read reached the VMM"
    assert served == 21


# --- choosing the path ---------------------------------------------------------------


def test_a_missing_compiled_module_means_the_pure_path(kvm: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_PURE_EXITS, raising=False)
    monkeypatch.setitem(sys.modules, "pyvmm_kvm._fast_exits", None)  # what an install without a compiler has
    assert compiled_module() is None
    vm, vcpu = _vm(kvm, GUEST)
    with vm:
        assert vm.handle.compiled is None
        vm.serve_io(IoEventAddress.pio(0x40), 2, LatchedBytes())
        assert _report(vcpu) == (1, 0xFF)
        assert vcpu.handle.served_exits == 2


@pytest.mark.parametrize(("value", "pure"), [("1", True), ("yes", True), ("0", False), ("", False)])
def test_the_environment_chooses_the_pure_path(monkeypatch: pytest.MonkeyPatch, value: str, pure: bool) -> None:
    if compiled_module() is None:
        pytest.skip("pyvmm_kvm._fast_exits was not built (no C compiler at install)")
    monkeypatch.setenv(ENV_PURE_EXITS, value)
    assert (compiled_module() is None) is pure


def test_a_driver_model_always_gets_the_pure_path() -> None:
    from pyvmm.backend import DeviceHost

    class Model:
        """Any seam but libc's: the compiled loop would make the real system call."""

    assert compiled_module_for(DeviceHost(Model(), {})) is None  # type: ignore[arg-type]
