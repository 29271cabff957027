"""A GICv3's state as the bytes of a ``VmStateKind.GICV3`` image.

The GIC's state is architectural: the distributor's and each redistributor's
32-bit registers by offset in their frames, each CPU interface's ``ICC_*``
system registers by encoding, and the level of every level-sensitive input
line.  A backend fills a :class:`Gicv3State` from its hypervisor and
:meth:`~Gicv3State.encode`\\ s it; core :meth:`~Gicv3State.decode`\\ s the
image when it loads a snapshot, so that an image that is damaged or does not
fit the snapshot's vCPUs (one redistributor and one CPU interface per vCPU) is
refused before any VM is created.  Which registers an image holds is the
backend's choice (KVM: ``pyvmm_kvm.arm64_vgic_state``); core only checks that
each is in its frame, aligned and of its width.

The bytes are JSON (an image is a few kilobytes, read once per restore)::

    {"format": "gicv3/1", "spis": N, "distributor": [[offset, value], ...],
     "redistributors": [[[offset, value], ...], ...],      # per vCPU, in index order
     "cpu_interfaces": [[[encoding, value], ...], ...],    # per vCPU
     "private_levels": [u32, ...],                         # per vCPU: INTIDs 0-31
     "spi_levels": [u32, ...]}                             # INTIDs 32.., 32 per word
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pyvmm.errors import ConfigError

FORMAT = "gicv3/1"
#: The distributor's frame, and a redistributor's two (RD_base, then SGI_base).
DISTRIBUTOR_FRAME = 0x10000
REDISTRIBUTOR_FRAMES = 0x20000
#: The SPIs a GICv3 can have: INTIDs 32..1019, whole 32-line groups as
#: GICD_TYPER.ITLinesNumber counts them.
MAX_SPIS = 992

Registers = dict[int, int]


class Gicv3StateError(ConfigError):
    """A GICv3 image that is damaged, or of another GIC than the one it is for."""


@dataclass(frozen=True)
class Gicv3State:
    """A GICv3's registers; per-vCPU lists are in vCPU index order."""

    spis: int
    distributor: Registers
    redistributors: list[Registers]
    cpu_interfaces: list[Registers]
    private_levels: list[int]
    spi_levels: list[int]

    @property
    def vcpus(self) -> int:
        return len(self.redistributors)

    def check(self) -> None:
        """:class:`Gicv3StateError` naming the first field out of place."""
        if isinstance(self.spis, bool) or not isinstance(self.spis, int) or not 0 <= self.spis <= MAX_SPIS:
            raise Gicv3StateError(f"GICv3 image: {self.spis!r} SPIs (a GICv3 has 0 to {MAX_SPIS})")
        if self.spis % 32:
            raise Gicv3StateError(f"GICv3 image: {self.spis} SPIs is not a whole number of 32-line groups")
        _check_registers(self.distributor, "distributor", DISTRIBUTOR_FRAME, 32)
        counts = {len(self.redistributors), len(self.cpu_interfaces), len(self.private_levels)}
        if len(counts) != 1:
            raise Gicv3StateError(
                f"GICv3 image: {len(self.redistributors)} redistributors, {len(self.cpu_interfaces)} CPU "
                f"interfaces and {len(self.private_levels)} private line levels: one of each per vCPU"
            )
        for index, registers in enumerate(self.redistributors):
            _check_registers(registers, f"redistributor {index}", REDISTRIBUTOR_FRAMES, 32)
        for index, registers in enumerate(self.cpu_interfaces):
            _check_registers(registers, f"CPU interface {index}", 1 << 16, 64, step=1)
        if len(self.spi_levels) != self.spis // 32:
            raise Gicv3StateError(f"GICv3 image: {len(self.spi_levels)} SPI level words for {self.spis} SPIs")
        for what, words in (("private line level", self.private_levels), ("SPI line level", self.spi_levels)):
            for word in words:
                _check_value(word, what, 32)

    def encode(self) -> bytes:
        self.check()
        return json.dumps(
            {
                "format": FORMAT,
                "spis": self.spis,
                "distributor": sorted(self.distributor.items()),
                "redistributors": [sorted(r.items()) for r in self.redistributors],
                "cpu_interfaces": [sorted(c.items()) for c in self.cpu_interfaces],
                "private_levels": self.private_levels,
                "spi_levels": self.spi_levels,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> Gicv3State:
        """The state an :meth:`encode` wrote.

        :raises Gicv3StateError: not such an image, or a field out of place (named).
        """
        try:
            fields = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise Gicv3StateError("GICv3 image: not the JSON an image is written as") from None
        keys = {"format", "spis", "distributor", "redistributors", "cpu_interfaces", "private_levels", "spi_levels"}
        if not isinstance(fields, dict) or set(fields) != keys:
            raise Gicv3StateError(f"GICv3 image: expected the fields {sorted(keys)}")
        if fields["format"] != FORMAT:
            raise Gicv3StateError(f"GICv3 image: format {fields['format']!r}, this pyvmm reads {FORMAT!r}")
        state = cls(
            fields["spis"],
            _pairs(fields["distributor"], "distributor"),
            [_pairs(r, f"redistributor {i}") for i, r in enumerate(_list(fields["redistributors"], "redistributors"))],
            [_pairs(c, f"CPU interface {i}") for i, c in enumerate(_list(fields["cpu_interfaces"], "cpu_interfaces"))],
            _list(fields["private_levels"], "private_levels"),
            _list(fields["spi_levels"], "spi_levels"),
        )
        state.check()
        return state


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise Gicv3StateError(f"GICv3 image: {what} is not a list")
    return value


def _pairs(value: Any, what: str) -> Registers:
    registers: Registers = {}
    for pair in _list(value, what):
        if not isinstance(pair, list) or len(pair) != 2 or not all(type(item) is int for item in pair):
            raise Gicv3StateError(f"GICv3 image: {what} holds {pair!r}, not an [offset, value] pair")
        if pair[0] in registers:
            raise Gicv3StateError(f"GICv3 image: {what} holds register {pair[0]:#x} twice")
        registers[pair[0]] = pair[1]
    return registers


def _check_value(value: Any, what: str, bits: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise Gicv3StateError(f"GICv3 image: {what} value {value!r} does not fit {bits} bits")


def _check_registers(registers: Registers, what: str, frame: int, bits: int, *, step: int = 4) -> None:
    if not isinstance(registers, dict):
        raise Gicv3StateError(f"GICv3 image: {what} is not a register map")
    for offset, value in registers.items():
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < frame or offset % step:
            raise Gicv3StateError(f"GICv3 image: {what} register {offset!r} is not a register of its frame")
        _check_value(value, f"{what} register {offset:#x}", bits)
