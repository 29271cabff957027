"""Snapshots on real KVM: a guest restored from a file continues exactly as the
one that was never stopped, and a damaged file creates nothing."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from pathlib import Path

import pytest

from pyvmm import snapshot
from pyvmm.boot import BootSpec, X86Mode
from pyvmm.config import Arch
from pyvmm.errors import HypervisorError
from pyvmm.exits import ExitKind, IoExit
from pyvmm.snapshot import SnapshotError
from pyvmm.vcpu_state import StateKind
from pyvmm.vm import Backend, Vcpu, Vm

CODE = 0x1000
#: 1: mov ax,[0x2000]; inc ax; mov [0x2000],ax; add bx,ax; mov al,bl; out 0x10,al; jmp 1b
#: -- each exit reports the running sum of the counter: memory and registers both count.
COUNTER = bytes.fromhex("a1002040a3002001c388d8e610ebf1")


def _outputs(vcpu: Vcpu, count: int) -> list[int]:
    values = []
    for _ in range(count):
        exit_ = vcpu.run()
        assert exit_.kind is ExitKind.IO
        io: IoExit = exit_  # type: ignore[assignment]
        values.append(io.data[0])
    return values


def _counter(kvm: Backend) -> tuple[Vm, Vcpu]:
    vm = kvm.create_vm({"arch": "x86_64"})
    vm.add_memory(0, 0x10000)
    vm.add_memory(0x10_0000, 0x4000)  # a second region, mostly zero: stored sparsely
    vm.memory.write(0x10_1000, b"second region")
    vm.memory.write(CODE, COUNTER)
    vcpu = vm.create_vcpu()
    vm.boot(BootSpec(arch=Arch.X86_64, entry=CODE, x86_mode=X86Mode.REAL))
    return vm, vcpu


def test_a_restored_guest_continues_exactly_where_it_stopped(kvm: Backend, tmp_path: Path) -> None:
    path = tmp_path / "counter.snap"
    vm, vcpu = _counter(kvm)
    with vm:
        before = _outputs(vcpu, 37)
        snapshot.save(vm, path)
        never_stopped = _outputs(vcpu, 50)
        memory = vm.memory.read(0, 0x10000) + vm.memory.read(0x10_0000, 0x4000)
    stored = snapshot.load(path).pages
    assert sorted((i, page) for i, pages in enumerate(stored) for page in pages) == [(0, 1), (0, 2), (1, 1)], (
        "only the code, the counter and the written page of the second region are stored"
    )
    with snapshot.restore(kvm, path) as restored:
        (vcpu2,) = restored.vcpus
        assert _outputs(vcpu2, 50) == never_stopped
        assert restored.memory.read(0, 0x10000) + restored.memory.read(0x10_0000, 0x4000) == memory
    assert before[-1] != never_stopped[0]


def _damaged(data: bytes) -> list[tuple[str, bytes, str]]:
    body_start = 8 + 4 + 4 + 8 + 32
    flipped = bytearray(data)
    flipped[-100] ^= 0x40
    return [
        ("empty", b"", "too short"),
        ("magic", b"NOTASNAP" + data[8:], "not a pyvmm snapshot"),
        ("version", data[:8] + (3).to_bytes(4, "little") + data[12:], "version 3"),
        ("truncated", data[:-1], "the file has"),
        ("extended", data + b"\0", "the file has"),
        ("bit flip", bytes(flipped), "checksum does not match"),
        ("header only", data[:body_start], "the file has"),
    ]


def test_a_damaged_file_is_a_typed_error_and_creates_nothing(
    kvm: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "counter.snap"
    vm, vcpu = _counter(kvm)
    with vm:
        _outputs(vcpu, 5)
        snapshot.save(vm, path)
    data = path.read_bytes()
    created: list[object] = []
    real_create = Backend.create_vm
    monkeypatch.setattr(Backend, "create_vm", lambda self, *a, **k: created.append(1) or real_create(self, *a, **k))
    for name, damaged, words in _damaged(data):
        bad = tmp_path / f"{name}.snap"
        bad.write_bytes(damaged)
        with pytest.raises(SnapshotError, match=words):
            snapshot.restore(kvm, bad)
    with pytest.raises(SnapshotError, match="cannot read"):
        snapshot.restore(kvm, tmp_path / "absent.snap")
    assert created == [], "no VM was created for any damaged file"


def test_a_refused_restore_leaves_no_vm_behind(kvm: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "counter.snap"
    vm, vcpu = _counter(kvm)
    with vm:
        _outputs(vcpu, 3)
        snapshot.save(vm, path)
    fds_before = len(os.listdir("/proc/self/fd"))
    closed: list[Vm] = []
    real_close = Vm.close

    def refuse(self: Vcpu, kind: StateKind, value: object) -> None:
        raise HypervisorError("KVM_SET_SREGS", errno.EINVAL)

    def record_close(self: Vm) -> None:
        closed.append(self)
        real_close(self)

    monkeypatch.setattr(Vcpu, "set_state", refuse)
    monkeypatch.setattr(Vm, "close", record_close)
    with pytest.raises(SnapshotError, match="KVM_SET_SREGS") as refused:
        snapshot.restore(kvm, path)
    assert isinstance(refused.value.__cause__, HypervisorError)  # the backend's refusal, kept as the cause
    assert len(closed) == 1
    assert len(os.listdir("/proc/self/fd")) == fds_before, "no descriptor of the half-built VM is left open"


def _as_version_1(data: bytes) -> bytes:
    """A version 2 file of a VM without irqchip rewritten as version 1 wrote
    it: the header without ``vm_states``, ``clock`` and ``devices``, and only
    the register sets version 1 knew (no XSAVE)."""
    body = data[56:]
    (length,) = struct.unpack_from("<I", body)
    header = json.loads(body[4 : 4 + length])
    for key in ("vm_states", "clock", "devices"):
        header.pop(key)
    for vcpu in header["vcpus"]:
        vcpu["states"] = [pair for pair in vcpu["states"] if pair[0] != "xsave"]
    encoded = json.dumps(header).encode()
    new_body = struct.pack("<I", len(encoded)) + encoded + body[4 + length :]
    return struct.pack("<8sIIQ32s", b"PYVMMSNP", 1, 0, len(new_body), hashlib.sha256(new_body).digest()) + new_body


def test_a_version_1_file_restores_and_continues(kvm: Backend, tmp_path: Path) -> None:
    path = tmp_path / "v2.snap"
    vm, vcpu = _counter(kvm)
    with vm:
        _outputs(vcpu, 11)
        snapshot.save(vm, path)
        never_stopped = _outputs(vcpu, 20)
    old = tmp_path / "v1.snap"
    old.write_bytes(_as_version_1(path.read_bytes()))
    image = snapshot.load(old)
    assert (image.vm_states, image.clock, image.devices) == ([], None, None)
    with snapshot.restore(kvm, old) as restored:
        assert _outputs(restored.vcpus[0], 20) == never_stopped
