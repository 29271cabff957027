"""The GICv3 image a snapshot carries: what encodes decodes the same, and every
field out of place is a Gicv3StateError naming it (the snapshot loader turns it
into a SnapshotError before anything is created)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pyvmm import snapshot
from pyvmm.config import Arch
from pyvmm.errors import ConfigError
from pyvmm.gicv3_state import FORMAT, Gicv3State, Gicv3StateError
from pyvmm.snapshot import Snapshot, SnapshotError
from pyvmm.vm_state import VmStateKind


def _state(vcpus: int = 2, spis: int = 64) -> Gicv3State:
    return Gicv3State(
        spis,
        {0x0: 0x12, 0x84: 0xFFFF_FFFF, 0x6100: 0x0100},
        [{0x0: 0, 0x10100: 1 << 27} for _ in range(vcpus)],
        [{0xC665: 0x7, 0xC230: 0xF0, 0xC667: (1 << 64) - 1} for _ in range(vcpus)],
        [1 << 27] * vcpus,
        [0] * (spis // 32),
    )


def test_an_image_decodes_to_the_state_encoded() -> None:
    state = _state()
    assert Gicv3State.decode(state.encode()) == state
    assert json.loads(state.encode())["format"] == FORMAT


def test_the_error_is_a_config_error() -> None:
    assert issubclass(Gicv3StateError, ConfigError)


def _changed(**fields: object) -> bytes:
    data = json.loads(_state().encode())
    data.update(fields)
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff", "not the JSON"),
        (b"[]", "expected the fields"),
        (_changed(format="gicv3/0"), "format 'gicv3/0'"),
        (_changed(spis=1024), "1024 SPIs"),
        (_changed(spis=-32), "-32 SPIs"),
        (_changed(spis=40), "not a whole number"),
        (_changed(spis=True), "True SPIs"),
        (_changed(distributor={"0": 1}), "distributor is not a list"),
        (_changed(distributor=[["0", 1]]), "distributor holds \\['0', 1\\]"),
        (_changed(distributor=[[0, 1, 2]]), r"not an \[offset, value\] pair"),
        (_changed(distributor=[[0, 1], [0, 2]]), "register 0x0 twice"),
        (_changed(distributor=[[0x10000, 0]]), "distributor register 65536 is not a register of its frame"),
        (_changed(distributor=[[0x82, 0]]), "distributor register 130 is not a register"),
        (_changed(distributor=[[0x80, 1 << 32]]), "distributor register 0x80 value .* does not fit 32 bits"),
        (_changed(redistributors=[[[0x20000, 0]], []]), "redistributor 0 register 131072"),
        (_changed(redistributors=[[]]), "1 redistributors, 2 CPU interfaces and 2 private line levels"),
        (_changed(cpu_interfaces=[[[0x10000, 0]], []]), "CPU interface 0 register 65536"),
        (_changed(cpu_interfaces=[[[0xC230, 1 << 64]], []]), "CPU interface 0 register 0xc230 value"),
        (_changed(cpu_interfaces="x"), "cpu_interfaces is not a list"),
        (_changed(private_levels=[0, -1]), "private line level value -1"),
        (_changed(spi_levels=[0]), "1 SPI level words for 64 SPIs"),
        (_changed(spi_levels=[0, 1 << 32]), "SPI line level value"),
    ],
)
def test_a_damaged_image_is_refused_naming_the_field(data: bytes, message: str) -> None:
    with pytest.raises(Gicv3StateError, match=message):
        Gicv3State.decode(data)


def test_encoding_a_state_out_of_place_is_refused() -> None:
    with pytest.raises(Gicv3StateError, match="SPI level words"):
        dataclasses.replace(_state(), spi_levels=[]).encode()


def _snapshot(vcpus: int, gic: bytes) -> Snapshot:
    return Snapshot(
        Arch.AARCH64, [], [], [[] for _ in range(vcpus)], [None] * vcpus, [None] * vcpus, [(VmStateKind.GICV3, gic)]
    )


def test_a_snapshot_whose_gic_has_another_vcpu_count_is_refused_when_loaded() -> None:
    assert snapshot.parse(snapshot.encode(_snapshot(2, _state(vcpus=2).encode()))).vm_states
    with pytest.raises(SnapshotError, match=r"the GIC has 2 redistributor\(s\), the snapshot 3 vCPU\(s\)"):
        snapshot.parse(snapshot.encode(_snapshot(3, _state(vcpus=2).encode())))


def test_a_snapshot_whose_gic_image_is_damaged_is_refused_when_loaded() -> None:
    with pytest.raises(SnapshotError, match=r"header\.vm_states\.gicv3: GICv3 image: 1 SPI level words"):
        snapshot.parse(snapshot.encode(_snapshot(2, _changed(spi_levels=[0]))))


def test_x86_irqchip_state_in_an_aarch64_snapshot_is_refused() -> None:
    image = dataclasses.replace(_snapshot(2, _state().encode()), vm_states=[(VmStateKind.PIT, bytes(16))])
    with pytest.raises(SnapshotError, match="VM state 'pit' is repeated or not of aarch64"):
        snapshot.parse(snapshot.encode(image))
