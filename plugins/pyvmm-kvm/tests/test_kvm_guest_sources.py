"""The guest bytes in kvm_guests.py are what their assembly says."""

from __future__ import annotations

import pytest

from kvm_guests import ALL
from pyvmm.testing.conformance.programs import GuestProgram


@pytest.mark.parametrize("program", ALL, ids=lambda p: p.name)
def test_bytes_match_source(program: GuestProgram) -> None:
    assembled = program.assembled()
    if assembled is None:
        pytest.skip("no GNU as/objcopy on this machine")
    assert assembled == program.code
