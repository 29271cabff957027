"""pyvmm.reset_point without a hypervisor: the dirty-bitmap run finder, and what
capture refuses (the reset itself runs on KVM in pyvmm-kvm's tests)."""

from __future__ import annotations

import random

import pytest
from coretests_support import MakeBackend

from pyvmm.capabilities import Capability
from pyvmm.errors import ConfigError, UnsupportedCapability, VmStateError
from pyvmm.exits import InterruptedExit
from pyvmm.reset_point import ResetPoint, _runs, settle


def _reference(bitmap: bytes) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for page in (i for i in range(len(bitmap) * 8) if bitmap[i >> 3] >> (i & 7) & 1):
        if runs and runs[-1][1] == page:
            runs[-1] = (runs[-1][0], page + 1)
        else:
            runs.append((page, page + 1))
    return runs


@pytest.mark.parametrize(
    ("bitmap", "runs"),
    [
        (b"", []),
        (b"\x00\x00", []),
        (b"\x01", [(0, 1)]),
        (b"\x05", [(0, 1), (2, 3)]),
        (b"\x80\x01", [(7, 9)]),
        (b"\xff\xff\x00\x03", [(0, 16), (24, 26)]),
        (b"\x80\xff\x01", [(7, 17)]),
    ],
)
def test_runs(bitmap: bytes, runs: list[tuple[int, int]]) -> None:
    assert _runs(bitmap) == runs


def test_runs_agree_with_a_page_by_page_reading() -> None:
    rng = random.Random(19)
    for _ in range(3000):
        bitmap = bytes(rng.choice((0, 0, 0, 0xFF, 0xFF, 1, 0x80, rng.randrange(256))) for _ in range(rng.randrange(24)))
        assert _runs(bitmap) == _reference(bitmap), bitmap.hex()


@pytest.mark.parametrize("edge", [255, 256, 511, 512])
def test_runs_across_the_chunks_the_bitmap_is_read_in(edge: int) -> None:
    rng = random.Random(edge)
    for _ in range(50):
        bitmap = bytearray(rng.choice((0, 0, 0xFF, rng.randrange(256))) for _ in range(700))
        bitmap[edge - 1], bitmap[edge] = 0x80, 0x01  # a run across the boundary
        assert _runs(bytes(bitmap)) == _reference(bytes(bitmap))
    whole = b"\xff" * 700
    assert _runs(whole) == [(0, 5600)]


def test_capture_needs_the_capabilities_and_logged_ram(make_backend: MakeBackend) -> None:
    _, without = make_backend((Capability.VCPU_REGISTERS,))
    with without.create_vm() as vm, pytest.raises(UnsupportedCapability):
        ResetPoint.capture(vm)
    _, backend = make_backend((Capability.DIRTY_LOG, Capability.VCPU_REGISTERS), name="logged")
    with backend.create_vm() as vm:
        with pytest.raises(ConfigError, match="needs guest RAM"):
            ResetPoint.capture(vm)
        vm.add_memory(0, 0x10000)
        with pytest.raises(ConfigError, match=r"log_dirty=True; not: 0x0\+0x10000"):
            ResetPoint.capture(vm)


def test_settle_kicks_each_vcpu_and_wants_it_to_stop_before_the_guest_runs(make_backend: MakeBackend) -> None:
    """What a hypervisor left pending after the last exit (KVM completes an OUT
    on the next KVM_RUN) is finished by a kicked run; a run that goes on into
    the guest instead means the state cannot be taken as it stands."""
    _, unkickable = make_backend((Capability.VCPU_REGISTERS,), name="unkickable")
    with unkickable.create_vm() as vm:
        vm.create_vcpu()
        settle(vm)  # no IMMEDIATE_EXIT: nothing to finish, nothing run
    recording, backend = make_backend((Capability.VCPU_REGISTERS, Capability.IMMEDIATE_EXIT), name="settling")
    with backend.create_vm() as vm:
        vm.create_vcpu()
        recording.script_exits(InterruptedExit())
        settle(vm)
        assert [c for c in recording.calls if c[0] in ("pyvmm_kick_vcpu", "pyvmm_run_vcpu")][-2:] == [
            ("pyvmm_kick_vcpu", 0),
            ("pyvmm_run_vcpu", 0),
        ]
        with pytest.raises(VmStateError, match=r"vCPU 0: a kicked run should stop before the guest runs.*HLT"):
            settle(vm)  # nothing scripted: the test backend's vCPU halts
