"""The shared guests in :mod:`pyvmm.testing.guests` are what their assembly says."""

from __future__ import annotations

import struct

import pytest

from pyvmm.arch.x86_64_boot import CODE32_SELECTOR
from pyvmm.testing.conformance.programs import GuestProgram
from pyvmm.testing.guests import multiboot_pic


@pytest.mark.parametrize("program", multiboot_pic.PROGRAMS, ids=lambda program: program.name)
def test_multiboot_programs_match_their_source(program: GuestProgram) -> None:
    assembled = program.assembled()
    if assembled is None:
        pytest.skip("no GNU as/objcopy on this machine")
    assert assembled == program.code


def test_the_multiboot_kernel_file() -> None:
    image = multiboot_pic.multiboot_pic_kernel()
    magic, flags, checksum = struct.unpack_from("<3I", image)
    assert magic == 0x1BADB002 and (magic + flags + checksum) & 0xFFFFFFFF == 0
    assert image[0x30 : 0x30 + len(multiboot_pic.MULTIBOOT_PIC_KERNEL.code)] == multiboot_pic.MULTIBOOT_PIC_KERNEL.code
    limit, idt = struct.unpack_from("<HI", image, 0xA00)
    gate = image[idt - 0x100000 + 8 * 0x20 : idt - 0x100000 + 8 * 0x21]
    low, selector, _, kind, high = struct.unpack("<HHBBH", gate)
    assert (low | high << 16, selector, kind, limit) == (0x100800, CODE32_SELECTOR, 0x8E, 8 * 0x30 - 1)
