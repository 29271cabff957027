"""The snapshot file format (pyvmm.snapshot) without a hypervisor: every damaged
or malformed file is a SnapshotError naming the problem, never anything else."""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import struct
from typing import Any

import pytest

from pyvmm.arch import aarch64, x86_64
from pyvmm.devices.state import DeviceImage
from pyvmm.snapshot import MAGIC, STATE_TYPES, VERSION, SnapshotError, _decode, _encode, encode, parse
from pyvmm.vcpu_state import StateKind
from pyvmm.vm_state import VmStateKind

REGION = {"guest_phys_addr": 0, "size": 0x4000, "read_only": False, "log_dirty": False}


def _file(
    header: Any,
    runs: list[tuple[int, int, int, bytes]] = (),
    *,
    raw_header: bytes | None = None,
    version: int = VERSION,
) -> bytes:
    encoded = raw_header if raw_header is not None else json.dumps(header).encode()
    body = struct.pack("<I", len(encoded)) + encoded
    for region, first, count, data in runs:
        body += struct.pack("<IQI", region, first, count) + data
    return struct.pack("<8sIIQ32s", MAGIC, version, 0, len(body), hashlib.sha256(body).digest()) + body


def _vcpu(**states: Any) -> dict[str, Any]:
    return {"states": [[k, v] for k, v in states.items()], "events": None, "msrs": None}


def _good_v1() -> dict[str, Any]:
    return {"arch": "x86_64", "regions": [REGION], "vcpus": [_vcpu(regs=_encode(x86_64.Regs(rax=5)))]}


PIT_IMAGE = {"$bytes": "00" * 112}
DEVICE = {"key": "pio@0x3f8:uart", "version": 1, "state": {"ier": 2, "thre_pending": True, "rx": {"$bytes": "41"}}}


def _good() -> dict[str, Any]:
    return {**_good_v1(), "vm_states": [["pit", PIT_IMAGE]], "clock": 12345, "devices": [DEVICE]}


def test_a_well_formed_file_parses() -> None:
    page = bytes(range(256)) * 16
    image = parse(_file(_good(), [(0, 2, 1, page)]))
    assert image.pages == [{2: page}]
    assert image.vcpus == [[(StateKind.REGS, x86_64.Regs(rax=5))]]
    assert image.vm_states == [(VmStateKind.PIT, bytes(112))]
    assert image.clock == 12345
    assert image.devices == [DeviceImage("pio@0x3f8:uart", 1, {"ier": 2, "thre_pending": True, "rx": b"A"})]


def test_a_version_1_file_is_still_read() -> None:
    """Version 1 held RAM, registers, events and MSRs only: it reads as a
    snapshot without VM-wide state, clock or devices."""
    image = parse(_file(_good_v1(), version=1))
    assert image.vcpus == [[(StateKind.REGS, x86_64.Regs(rax=5))]]
    assert (image.vm_states, image.clock, image.devices) == ([], None, None)
    with pytest.raises(SnapshotError, match="expected the fields"):
        parse(_file(_good(), version=1))  # a version 1 file has no version 2 fields


def test_an_encoded_snapshot_parses_back_equal() -> None:
    page = bytes(range(256)) * 16
    image = parse(_file(_good(), [(0, 1, 2, page * 2)]))
    assert parse(encode(image)) == image


@pytest.mark.parametrize(
    ("record", "kind"),
    [
        (x86_64.Regs(rip=0x1234, rflags=0x202), STATE_TYPES[StateKind.REGS]),
        (x86_64.Sregs(), STATE_TYPES[StateKind.SREGS]),
        (x86_64.Fpu(), STATE_TYPES[StateKind.FPU]),
        (x86_64.DebugRegs(), STATE_TYPES[StateKind.DEBUG_REGS]),
        ([x86_64.Xcr(0, 7)], STATE_TYPES[StateKind.XCRS]),
        (x86_64.Lapic(regs=bytes(range(256)) * 4), STATE_TYPES[StateKind.LAPIC]),
        (x86_64.MpState.RUNNABLE, STATE_TYPES[StateKind.MP_STATE]),
        (aarch64.CoreRegs(pc=0x4000_0000), STATE_TYPES[StateKind.CORE_REGS]),
        (x86_64.VcpuEvents(), x86_64.VcpuEvents),
        (x86_64.Xsave(region=bytes(range(256)) * 20), STATE_TYPES[StateKind.XSAVE]),
    ],
    ids=lambda r: type(r).__name__,
)
def test_every_record_type_round_trips(record: Any, kind: Any) -> None:
    assert _decode(json.loads(json.dumps(_encode(record))), kind, "record") == record


def _with(path: str, value: Any) -> dict[str, Any]:
    header = _good()
    target: Any = header
    keys = path.split("/")
    for key in keys[:-1]:
        target = target[int(key)] if isinstance(target, list) else target[key]
    last = keys[-1]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return header


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (_file(None, raw_header=b"{not json"), "not JSON"),
        (_file([1, 2]), "expected the fields"),
        (_file({**_good(), "extra": 1}), "expected the fields"),
        (_file(_with("arch", "riscv")), "unknown architecture"),
        (_file(_with("regions/0", {**REGION, "size": 0x1001})), "whole number of pages"),
        (_file(_with("regions/0", {**REGION, "size": True})), r"regions\[0\]\.size"),
        (_file(_with("regions", [REGION, REGION])), "overlap"),
        (_file(_with("regions/0", {**REGION, "size": 1 << 41})), "integer from 0"),
        (_file(_good(), [(1, 0, 1, bytes(4096))]), "names region 1"),
        (_file(_good(), [(0, 3, 2, bytes(8192))]), "leaves region 0"),
        (_file(_good(), [(0, 0, 0, b"")]), "leaves region 0"),
        (_file(_good(), [(0, 1, 1, bytes(4096)), (0, 1, 1, bytes(4096))]), "given twice"),
        (_file(_good(), [(0, 1, 2, bytes(4096))]), "cut short"),
        (_file(_good())[:-1], "the file has"),
        (_file(_with("vcpus/0", _vcpu(nonsense={}))), "unknown register set"),
        (_file(_with("vcpus/0", _vcpu(core_regs=_encode(aarch64.CoreRegs())))), "not of x86_64"),
        (_file(_with("vcpus/0", _vcpu(regs={**_encode(x86_64.Regs()), "rax": "5"}))), "rax: expected a 64-bit"),
        (_file(_with("vcpus/0", _vcpu(regs={**_encode(x86_64.Regs()), "r99": 0}))), "expected the fields"),
        (_file(_with("vcpus/0", _vcpu(lapic={"regs": {"$bytes": "zz"}}))), "not hexadecimal"),
        (_file(_with("vcpus/0", _vcpu(mp_state=99))), "not a MpState"),
        (_file(_with("vcpus/0", _vcpu(regs=_encode(x86_64.Regs()), **{"regs ": 1}))), "unknown register set"),
        (_file({**_good(), "arch": "aarch64", "vcpus": [{"states": [], "events": {}, "msrs": None}]}), "only x86_64"),
        (_file({**_good(), "arch": "aarch64", "vcpus": [{"states": [], "events": None, "msrs": []}]}), "have MSRs"),
        (_file(_with("vcpus/0/msrs", [{"index": 1 << 33, "data": 0}])), r"msrs\[0\]: MsrEntry.index"),
        (_file(_with("vcpus/0/msrs", [{"index": 0x10, "data": -1}])), r"msrs\[0\]: MsrEntry.data"),
        (_file(_with("vcpus/0/msrs", [{"index": 0x10}])), "expected the fields"),
        (_file(_good(), version=3), "reads versions 1 and 2"),
        (_file(_with("vm_states", [["hpet", PIT_IMAGE]])), "unknown VM state"),
        (_file(_with("vm_states", [["pit", PIT_IMAGE], ["pit", PIT_IMAGE]])), "repeated"),
        (_file(_with("vm_states", [["pit"]])), r"expected \[kind, state\]"),
        (_file(_with("vm_states", [["pit", "00"]])), "expected bytes"),
        (_file({**_good(), "arch": "aarch64", "vcpus": []}), "not of aarch64"),
        (_file(_with("clock", -1)), "header.clock"),
        (_file(_with("clock", "now")), "header.clock"),
        (_file(_with("devices", {})), "expected a list"),
        (_file(_with("devices", [DEVICE, DEVICE])), "unique"),
        (_file(_with("devices", [{**DEVICE, "key": 7}])), "key"),
        (_file(_with("devices", [{**DEVICE, "version": -1}])), "version"),
        (_file(_with("devices", [{**DEVICE, "state": []}])), "expected an object"),
        (_file(_with("devices", [{**DEVICE, "state": {"ier": 1.5}}])), "expected an integer"),
        (_file(_with("devices", [{**DEVICE, "state": {"ier": 1 << 70}}])), "does not fit 64 bits"),
        (_file(_with("devices", [{**DEVICE, "state": {"rx": {"$bytes": "x"}}}])), "not hexadecimal"),
        (_file(_with("devices", [{"key": "a", "version": 1}])), "expected the fields"),
        (_file(_with("vcpus/0", _vcpu(xsave={"region": {"$bytes": "00" * 100}}))), "Xsave.region"),
    ],
)
def test_malformed_bodies_with_a_good_checksum(data: bytes, words: str) -> None:
    with pytest.raises(SnapshotError, match=words):
        parse(data)


def test_random_damage_is_always_a_snapshot_error() -> None:
    """Damage behind a recomputed checksum (a broken saver, not a bit flip):
    whatever comes out, it is a SnapshotError or a valid snapshot, never
    another exception."""
    header = _good()
    header["vcpus"][0]["states"].append(["sregs", _encode(x86_64.Sregs())])
    good = _file(header, [(0, 1, 1, bytes(range(256)) * 16)])
    body = good[56:]
    rng = random.Random(19)
    for _ in range(400):
        damaged = bytearray(body)
        for _ in range(rng.randrange(1, 4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        cut = bytes(damaged[: rng.randrange(len(damaged) + 1)]) if rng.random() < 0.2 else bytes(damaged)
        data = struct.pack("<8sIIQ32s", MAGIC, VERSION, 0, len(cut), hashlib.sha256(cut).digest()) + cut
        with contextlib.suppress(SnapshotError):
            parse(data)


def test_a_file_that_cannot_be_written_is_a_snapshot_error(tmp_path: Any) -> None:
    """Writing onto a directory or into one that does not exist: a SnapshotError
    naming the path (the CLI's status 2, not a traceback), and nothing left behind."""
    from pyvmm.snapshot import write

    image = parse(_file(_good()))
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    for target in (occupied, tmp_path / "missing" / "file.snap"):
        with pytest.raises(SnapshotError, match="cannot write the snapshot"):
            write(image, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"]
    assert not any(occupied.iterdir())
