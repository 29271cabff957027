"""The aarch64 conformance programs: their bytes are their source, assembled.

Runs wherever an aarch64 GNU assembler exists (``aarch64-linux-gnu-as`` from
binutils-aarch64-linux-gnu, or ``as`` on an aarch64 host) and says so where not.
"""

from __future__ import annotations

import struct

import pytest

from pyvmm.testing.conformance import programs_aarch64 as p


@pytest.mark.parametrize("program", p.AARCH64_PROGRAMS, ids=lambda prog: prog.name)
def test_bytes_match_source(program: p.Aarch64Program) -> None:
    if p.aarch64_assembler() is None:
        pytest.skip("no aarch64 assembler (apt-get install binutils-aarch64-linux-gnu)")
    assert program.assembled() == program.code


def test_programs_are_whole_instructions_and_named_once() -> None:
    names = [prog.name for prog in p.AARCH64_PROGRAMS]
    assert len(names) == len(set(names))
    for prog in p.AARCH64_PROGRAMS:
        assert prog.code and len(prog.code) % 4 == 0, prog.name


def test_layout_fits_in_ram() -> None:
    for address in (p.CODE_ADDRESS, p.FDT_ADDRESS, p.DATA_ADDRESS):
        assert p.RAM_BASE <= address < p.RAM_BASE + p.RAM_SIZE
    assert p.FDT_ADDRESS + p.FDT_SIZE <= p.DATA_ADDRESS
    assert not p.RAM_BASE <= p.MMIO_BASE < p.READ_ONLY_ADDRESS + 0x1000


def test_minimal_fdt_is_a_valid_header() -> None:
    blob = p.minimal_fdt()
    magic, total, off_struct, off_strings, off_rsvmap, version, last_comp = struct.unpack(">7I", blob[:28])
    assert (magic, total, version, last_comp) == (0xD00DFEED, len(blob), 17, 16)
    assert off_rsvmap % 8 == 0 and blob[off_rsvmap : off_rsvmap + 16] == bytes(16)
    assert struct.unpack(">I", blob[off_struct : off_struct + 4])[0] == 1  # FDT_BEGIN_NODE
    assert struct.unpack(">I", blob[off_strings - 4 : off_strings])[0] == 9  # FDT_END
    assert len(blob) <= p.FDT_SIZE
