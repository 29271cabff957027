"""The 8259/8254 set-up the tick-driven test guests share."""

from __future__ import annotations

import pytest

from pyvmm.testing.conformance.programs import assemble_x86
from pyvmm.testing.guests.pic_pit_setup import pic_pit_setup


@pytest.mark.parametrize("mask", [0x00, 0xEE, 0xFE])
def test_the_bytes_are_the_assembly_of_the_text(mask: int) -> None:
    source, code = pic_pit_setup(mask)
    assembled = assemble_x86(source)
    if assembled is None:
        pytest.skip("GNU as/objcopy are not installed (Debian package binutils)")
    assert assembled == code
    assert bytes((0xB0, mask, 0xE6, 0x21)) in code, "the master's mask is written to port 0x21"


@pytest.mark.parametrize("mask", [-1, 0x100])
def test_a_mask_wider_than_a_byte_is_refused(mask: int) -> None:
    with pytest.raises(ValueError, match="one byte"):
        pic_pit_setup(mask)
