"""The conformance suite's x86 guest programs are what their assembly says, and
the offsets the scenarios patch or expect point where the source says."""

from __future__ import annotations

import pytest

from pyvmm.testing.conformance import programs as p
from pyvmm.testing.conformance.programs import GuestProgram, assemble_x86


@pytest.mark.parametrize("program", p.X86_64_PROGRAMS, ids=lambda program: program.name)
def test_bytes_match_source(program: GuestProgram) -> None:
    assembled = program.assembled()
    if assembled is None:
        pytest.skip("no GNU as/objcopy on this machine")
    assert assembled == program.code


def test_the_patched_and_expected_offsets() -> None:
    assert p.REPORT_VECTOR.code[p.REPORT_VECTOR_OFFSET] == 0x20, "mov al, 0x20: the vector byte"
    assert p.LAPIC_HANDLER.code[p.LAPIC_HANDLER_VECTOR_OFFSET] == p.LAPIC_VECTOR
    assert p.WINDOW_AFTER_STI.code[p.WINDOW_OFFSET : p.WINDOW_OFFSET + 2] == bytes.fromhex("e610"), "out 0x10, al"
    before = assemble_x86(p.WINDOW_AFTER_STI.source.split("    out 0x10, al\n    hlt")[0])
    if before is not None:
        assert len(before) == p.WINDOW_OFFSET
