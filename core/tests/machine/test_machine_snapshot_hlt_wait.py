"""Machine snapshots of a vCPU waiting in ``hlt`` for pyvmm's own 8259s
(``irqchip = "userspace"``), on the contract backend: the snapshot records the
wait, the restore starts the vCPU in it (RIP past the ``hlt``, as saved), and
the first interrupt -- raised between the device reload and the vCPU's first
entry, or while it waits -- is injected before the vCPU enters the guest, once.
The record is checked before any VM exists; files without it stay readable."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from coretests_support import RecordingBackend, register
from machinetests_support import MACHINE_CAPS, TINY_IMAGE, io_exit, machine_config

from pyvmm import snapshot
from pyvmm.arch.x86_64 import DebugRegs, Fpu, Regs, VcpuEvents
from pyvmm.arch.x86_64_extra_state import InterruptEvent
from pyvmm.capabilities import Capability
from pyvmm.devices.state import DeviceImage
from pyvmm.exits import InterruptedExit, VcpuExit
from pyvmm.hookspecs import hookimpl
from pyvmm.machine import Machine, StopReason
from pyvmm.machine.pc import PcBoard
from pyvmm.machine.snapshots import HLT_WAIT_KEY, HLT_WAIT_VERSION
from pyvmm.plugins import PluginRegistry
from pyvmm.snapshot import Snapshot, SnapshotError
from pyvmm.testing.contract_backend import TestVcpu, TestVm
from pyvmm.vcpu_state import StateKind
from pyvmm.vm import Backend
from pyvmm.vm_state import VmStateKind

CAPS = (*MACHINE_CAPS, Capability.INTERRUPT_INJECTION, Capability.VCPU_EVENTS)
#: Where the guest's hlt was (TINY_IMAGE's one byte) and where its exit leaves RIP.
HLT_AT = 0x100000
#: Interrupts on, as after the guest's ``sti``.
RFLAGS_IF = 0x202
#: The guest before its hlt: both 8259s at vectors 0x20/0x28, only IRQ 4 open,
#: COM1's received-data interrupt on -- something that can wake it, and nothing
#: that ticks (the console never sends input here).
GUEST_BEFORE_HLT = (
    io_exit(0x20, write=True, value=0x11),
    io_exit(0x21, write=True, value=0x20),
    io_exit(0x21, write=True, value=0x04),
    io_exit(0x21, write=True, value=0x01),
    io_exit(0x21, write=True, value=0xEF),
    io_exit(0x3F9, write=True, value=0x01),
)
#: What the restored guest does once woken: ends the run (isa-debug-exit).
GUEST_AFTER_WAKING = (io_exit(0xF4, write=True, value=0x01),)


class HltBackend(RecordingBackend):
    """The contract backend as KVM behaves where these tests need it: a kicked
    run returns before the guest runs, whether the vCPU takes an interrupt is
    known only from a run's exit, the register sets a snapshot reads are kept,
    and its ``hlt`` exit leaves RIP past the instruction with interrupts on."""

    __test__ = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Per vCPU (by id): the register sets the contract backend does not keep.
        self.other_state: dict[int, dict[StateKind, Any]] = {}

    @hookimpl
    def pyvmm_create_vcpu(self, vm: TestVm, index: int) -> TestVcpu:
        vcpu = super().pyvmm_create_vcpu(vm, index)
        vcpu.regs = Regs(rip=HLT_AT + 1, rflags=RFLAGS_IF)
        vcpu.ready = False  # as KVM's kvm_run: nothing reported before the first run
        self.other_state[id(vcpu)] = {StateKind.FPU: Fpu(), StateKind.DEBUG_REGS: DebugRegs()}
        return vcpu

    @hookimpl
    def pyvmm_run_vcpu(self, vcpu: TestVcpu) -> VcpuExit:
        vcpu.ready = True  # each exit (this guest has interrupts on) reports it ready
        if vcpu.kicked:
            vcpu.kicked = False
            self._record("pyvmm_run_vcpu:kicked", vcpu.index)
            return InterruptedExit()
        return super().pyvmm_run_vcpu(vcpu)

    @hookimpl
    def pyvmm_get_vcpu_state(self, vcpu: TestVcpu, kind: StateKind) -> Any:
        if kind in (StateKind.REGS, StateKind.SREGS):
            return super().pyvmm_get_vcpu_state(vcpu, kind)
        return self.other_state[id(vcpu)][kind]

    @hookimpl
    def pyvmm_set_vcpu_state(self, vcpu: TestVcpu, kind: StateKind, value: Any) -> None:
        if kind in (StateKind.REGS, StateKind.SREGS):
            super().pyvmm_set_vcpu_state(vcpu, kind, value)
        else:
            self.other_state[id(vcpu)][kind] = value


CONFIG = machine_config(irqchip="userspace", timeout=10)


@pytest.fixture
def hlt_backend(registry: PluginRegistry) -> tuple[HltBackend, Backend]:
    test_backend = HltBackend("contract-test", CAPS)
    return test_backend, register(registry, test_backend)


@pytest.fixture
def saved(hlt_backend: tuple[HltBackend, Backend], tmp_path: Path) -> Path:
    """A snapshot taken while the vCPU waited in its hlt (nothing could come
    before the stop: no timer runs)."""
    test_backend, backend = hlt_backend
    test_backend.script_exits(*GUEST_BEFORE_HLT)  # then hlt, and hlt again
    path = tmp_path / "hlt.snap"
    with Machine(CONFIG, backend=backend, image=TINY_IMAGE, snapshot_to=path, snapshot_after=0.05) as machine:
        result = machine.run()
    assert result.reason is StopReason.SNAPSHOT
    return path


def _record(image: Snapshot) -> DeviceImage:
    (record,) = [device for device in image.devices or () if device.key == HLT_WAIT_KEY]
    return record


def test_the_snapshot_records_the_vcpu_waiting_and_its_rip_past_the_hlt(saved: Path) -> None:
    image = snapshot.load(saved)
    assert _record(image) == DeviceImage(HLT_WAIT_KEY, HLT_WAIT_VERSION, {"vcpus": b"\x01"})
    regs = dict(image.vcpus[0])[StateKind.REGS]
    assert regs.rip == HLT_AT + 1, "saved as the hlt exit left it, not moved back onto the hlt"


def _entries_after_the_restore(test_backend: HltBackend, mark: int) -> list[str]:
    """The restored vCPU's run, injection and settling calls, in order."""
    wanted = ("pyvmm_run_vcpu", "pyvmm_run_vcpu:kicked", "pyvmm_inject_interrupt")
    return [name for name in test_backend.hooks_since(mark) if name in wanted]


@pytest.mark.parametrize("when", ["between-the-reload-and-the-first-entry", "while-it-waits"])
def test_the_restored_vcpu_waits_and_the_first_interrupt_wakes_it_once(
    hlt_backend: tuple[HltBackend, Backend], saved: Path, when: str
) -> None:
    """The race the amd64 bed found: with RIP moved back onto the hlt, an
    interrupt raised after the device reload but before the vCPU's first entry
    was taken *before* the hlt, which then waited for another.  Now the vCPU
    starts in the wait either way, and its first entry carries the interrupt."""
    test_backend, backend = hlt_backend
    test_backend.script_exits(*GUEST_AFTER_WAKING)
    with Machine(CONFIG, backend=backend, image=TINY_IMAGE, restore=saved) as machine:
        board = machine._board
        assert isinstance(board, PcBoard) and board.pic is not None and board.userspace is not None
        pic, chip, runner = board.pic, board.userspace, machine._runner
        reload = runner.vcpus_ready
        assert reload is not None
        raiser: threading.Thread | None = None

        def raise_when_waiting() -> None:
            deadline = time.monotonic() + 5.0
            while not chip._waiting and time.monotonic() < deadline:
                time.sleep(0.001)
            pic.set_irq(4, True)

        def after_the_reload() -> None:
            nonlocal raiser
            reload()
            if when == "between-the-reload-and-the-first-entry":
                pic.set_irq(4, True)  # before any vCPU may go on
            else:
                raiser = threading.Thread(target=raise_when_waiting)
                raiser.start()

        runner.vcpus_ready = after_the_reload
        mark = len(test_backend.calls)
        result = machine.run()
        if raiser is not None:
            raiser.join()
        vcpu = machine.vm.vcpus[0]
        assert vcpu.handle.regs.rip == HLT_AT + 1, "restored past the hlt, as saved"
    assert (result.reason, result.code) == (StopReason.DEBUG_EXIT, 0x01)
    assert vcpu.handle.injected == [0x24], "COM1's interrupt, once"
    assert _entries_after_the_restore(test_backend, mark)[:3] == [
        "pyvmm_run_vcpu:kicked",  # the backend's report of the restored vCPU, no guest code run
        "pyvmm_inject_interrupt",
        "pyvmm_run_vcpu",  # the first entry into the guest carries the interrupt
    ]


def test_a_restored_vcpu_that_nothing_can_wake_is_halted_for_good(
    hlt_backend: tuple[HltBackend, Backend], saved: Path
) -> None:
    """As after its live hlt exit: with COM1's interrupt masked again in the
    saved 8259 (nothing left to wake it), the run ends halted, never entering
    the guest."""
    test_backend, backend = hlt_backend
    image = snapshot.load(saved)
    devices = [
        dataclasses.replace(d, state={**d.state, "master_imr": 0xFF}) if d.key == "pio@0x20:pic" else d
        for d in image.devices or ()
    ]
    with Machine(CONFIG, backend=backend, image=TINY_IMAGE, restore=dataclasses.replace(image, devices=devices)) as m:
        mark = len(test_backend.calls)
        result = m.run()
    assert result.reason is StopReason.HALTED
    assert _entries_after_the_restore(test_backend, mark) == ["pyvmm_run_vcpu:kicked"]


def test_a_file_without_the_record_is_restored_running(hlt_backend: tuple[HltBackend, Backend], saved: Path) -> None:
    """A snapshot written before the record existed: its vCPU was saved with RIP
    moved back onto the hlt, so it runs (and would execute the hlt again)."""
    test_backend, backend = hlt_backend
    image = snapshot.load(saved)
    old = dataclasses.replace(image, devices=[d for d in image.devices or () if d.key != HLT_WAIT_KEY])
    test_backend.script_exits(*GUEST_AFTER_WAKING)
    with Machine(CONFIG, backend=backend, image=TINY_IMAGE, restore=old) as machine:
        mark = len(test_backend.calls)
        result = machine.run()
    assert (result.reason, result.code) == (StopReason.DEBUG_EXIT, 0x01)
    assert _entries_after_the_restore(test_backend, mark)[:1] == ["pyvmm_run_vcpu"], "no wait first"


def _with_record(image: Snapshot, **changes: Any) -> Snapshot:
    devices = [dataclasses.replace(d, **changes) if d.key == HLT_WAIT_KEY else d for d in image.devices or ()]
    return dataclasses.replace(image, devices=devices)


def _with_vcpu(image: Snapshot, regs: Regs | None = None, events: VcpuEvents | None = None) -> Snapshot:
    states = [(kind, regs if kind is StateKind.REGS and regs is not None else value) for kind, value in image.vcpus[0]]
    return dataclasses.replace(image, vcpus=[states], events=[events if events is not None else image.events[0]])


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda i: _with_record(i, version=2), "version 2, this pyvmm reads version 1"),
        (lambda i: _with_record(i, state={"vcpus": b"\x02"}), "one byte, 0 or 1"),
        (lambda i: _with_record(i, state={"vcpus": b"\x01\x00"}), "each of the 1 vCPU"),
        (lambda i: _with_record(i, state={"vcpus": 1}), "as bytes"),
        (lambda i: _with_record(i, state={"vcpus": b"\x01", "rip": 1}), "one field"),
        (lambda i: dataclasses.replace(i, vm_states=[(VmStateKind.PIT, b"")]), "MP state"),
        (lambda i: _with_vcpu(i, regs=Regs(rip=HLT_AT + 1, rflags=0x2)), "interrupts disabled"),
        (
            lambda i: _with_vcpu(i, events=VcpuEvents(interrupt=InterruptEvent(injected=True, vector=0x24))),
            "while one is being injected",
        ),
    ],
    ids=["version", "flag", "count", "type", "fields", "in-kernel-irqchip", "if-clear", "injecting"],
)
def test_a_damaged_record_is_refused_before_a_vm_exists(
    hlt_backend: tuple[HltBackend, Backend], saved: Path, tmp_path: Path, damage: Any, words: str
) -> None:
    test_backend, backend = hlt_backend
    damaged = damage(snapshot.load(saved))
    vms_before = len(test_backend.vms)
    with pytest.raises(SnapshotError, match=words):
        Machine(CONFIG, backend=backend, image=TINY_IMAGE, restore=damaged)
    assert len(test_backend.vms) == vms_before, "refused before any VM was created"
    path = tmp_path / "damaged.snap"
    snapshot.write(damaged, path)
    with pytest.raises(SnapshotError, match=words):
        Machine(CONFIG, backend=backend, image=TINY_IMAGE, restore=path)
    assert len(test_backend.vms) == vms_before


def test_a_backend_that_cannot_report_without_running_is_refused(registry: PluginRegistry, saved: Path) -> None:
    without_kick = tuple(c for c in CAPS if c is not Capability.IMMEDIATE_EXIT)
    backend = register(registry, HltBackend("no-kick", without_kick))
    with pytest.raises(SnapshotError, match="IMMEDIATE_EXIT"):
        Machine(CONFIG, backend=backend, image=TINY_IMAGE, restore=saved)


def test_the_devices_are_saved_as_the_vcpus_stop_not_when_the_file_is_written(
    hlt_backend: tuple[HltBackend, Backend], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 8254 counts on while the run winds down: saved then, its next tick
    came due early in the restored machine (on the slow amd64 bed, just before
    the one after it, and the guest counted two)."""
    test_backend, backend = hlt_backend
    counter_0_rate_generator = (io_exit(0x43, write=True, value=0x34), *(io_exit(0x40, write=True, value=0xFF),) * 2)
    test_backend.script_exits(*GUEST_BEFORE_HLT, *counter_0_rate_generator)
    later = [0]
    path = tmp_path / "pit.snap"
    with Machine(CONFIG, backend=backend, image=TINY_IMAGE, snapshot_to=path, snapshot_after=0.05) as machine:
        board = machine._board
        assert isinstance(board, PcBoard) and board.pit is not None
        board.pit.clock = lambda: time.monotonic_ns() + later[0]
        snapshots = machine._snapshots
        assert snapshots is not None
        real_save = snapshots.save

        def save_a_second_after_the_stop() -> Snapshot:
            later[0] = 1_000_000_000
            return real_save()

        monkeypatch.setattr(snapshots, "save", save_a_second_after_the_stop)
        assert machine.run().reason is StopReason.SNAPSHOT
    (pit,) = [d for d in snapshot.load(path).devices or () if d.key == "pio@0x40:pit"]
    elapsed = pit.state["counter0_elapsed_ns"]
    assert isinstance(elapsed, int) and elapsed < 500_000_000, "counted to the stop, not to the save"


def test_no_timer_fires_while_the_timers_are_held(hlt_backend: tuple[HltBackend, Backend]) -> None:
    """What the restore's device reload holds: a tick due meanwhile fires only
    after it, from the timer's state then (here: still due, so it fires)."""
    _, backend = hlt_backend
    with Machine(CONFIG, backend=backend, image=TINY_IMAGE) as machine:
        board = machine._board
        assert isinstance(board, PcBoard) and board.userspace is not None
        chip = board.userspace
        fired: list[str] = []
        chip.add_timer(lambda: 0, lambda: fired.append(threading.current_thread().name))
        ticking = threading.Thread(target=chip.tick, name="ticking")
        with chip.timers_held():
            ticking.start()
            ticking.join(0.2)
            assert ticking.is_alive() and fired == [], "held: the due timer waits"
        ticking.join(5.0)
    assert fired == ["ticking"]
