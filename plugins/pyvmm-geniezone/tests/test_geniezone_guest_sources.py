"""The test guests' bytes are their assembly, wherever an aarch64 GNU assembler
is installed (``apt-get install binutils-aarch64-linux-gnu``)."""

from __future__ import annotations

import pytest
from geniezone_guests import GUESTS

from pyvmm.testing.conformance.programs_aarch64 import Aarch64Program, aarch64_assembler, assemble_aarch64


@pytest.mark.skipif(aarch64_assembler() is None, reason="no aarch64 GNU assembler on this host")
@pytest.mark.parametrize("guest", GUESTS, ids=[guest.name for guest in GUESTS])
def test_bytes_are_the_assembled_source(guest: Aarch64Program) -> None:
    assert assemble_aarch64(guest.source) == guest.code
