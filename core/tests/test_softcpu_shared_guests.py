"""The shared guests in :mod:`pyvmm.testing.guests` are what their assembly says."""

from __future__ import annotations

import struct

import pytest

from pyvmm.arch.x86_64_boot import CODE32_SELECTOR
from pyvmm.testing.conformance.programs import GuestProgram
from pyvmm.testing.conformance.programs_aarch64 import aarch64_assembler, assemble_aarch64
from pyvmm.testing.guests import gicv3, multiboot_pic, pit_ticks, snapshot_counter


@pytest.mark.parametrize(
    "program", multiboot_pic.PROGRAMS + pit_ticks.PROGRAMS + snapshot_counter.PROGRAMS, ids=lambda program: program.name
)
def test_x86_programs_match_their_source(program: GuestProgram) -> None:
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


def test_the_gic_guest_matches_its_source() -> None:
    if aarch64_assembler() is None:
        pytest.skip("no aarch64 GNU assembler (apt-get install binutils-aarch64-linux-gnu)")
    assert assemble_aarch64(gicv3.TIMER_AND_DOORBELL.source) == gicv3.TIMER_AND_DOORBELL.code


def test_the_gic_guests_handler_is_at_the_irq_vector() -> None:
    code = gicv3.TIMER_AND_DOORBELL.code
    assert code[:4] != bytes(4) and code[4 : gicv3.HANDLER_OFFSET] == bytes(gicv3.HANDLER_OFFSET - 4)
    assert code[gicv3.HANDLER_OFFSET : gicv3.HANDLER_OFFSET + 4] == bytes.fromhex("05cc38d5"), "mrs x5, ICC_IAR1_EL1"
