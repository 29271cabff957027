"""Plain ELF images (no Multiboot header, no PVH note) and bad ELF files."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from loader_images import EM_AARCH64, ET_REL, MiB, Seg, build_elf, note, overlaps, untouched

from pyvmm.boot import X86Mode
from pyvmm.machine.loaders import ImageError, LoadedKernel, load_kernel
from pyvmm.memory import GuestMemory

RAM = 32 * MiB


def load(path: Path, memory: GuestMemory, **kwargs: object) -> LoadedKernel:
    kwargs.setdefault("ram_size", RAM)
    kwargs.setdefault("cpus", 1)
    return load_kernel(path, memory, **kwargs)  # type: ignore[arg-type]


def test_elf64_long_mode_by_physical_address(make_memory, write_image) -> None:
    memory = make_memory((0, RAM))
    high = 0xFFFFFFFF80000000
    text = b"\x0f\x01\xd9" * 10
    segments = [
        Seg(0x1000000, text, vaddr=high + 0x1000000),
        Seg(0x1001000, b"dd", memsz=0x2000, vaddr=high + 0x1001000),
    ]
    memory.fill(0x1001000, 0x3000, 0xAA)
    loaded = load(write_image(build_elf(64, segments, entry=high + 0x1000003)), memory)
    assert loaded.kind == "elf"
    assert loaded.boot.x86_mode is X86Mode.LONG
    assert loaded.boot.entry == 0x1000003  # the virtual entry, translated
    assert loaded.boot.registers == {}
    assert memory.read(0x1000000, len(text)) == text
    assert memory.read(0x1001000, 0x2000) == b"dd" + bytes(0x1FFE)
    assert memory.read_u8(0x1003000) == 0xAA
    assert loaded.extents == [(0x1000000, 0x1000000 + len(text)), (0x1001000, 0x1003000)]
    tables = loaded.boot.boot_tables
    assert tables == 0x1000
    assert not any(overlaps((tables, tables + 7 * 4096), extent) for extent in loaded.extents)


def test_elf64_physical_entry(make_memory, write_image) -> None:
    memory = make_memory((0, RAM))
    loaded = load(write_image(build_elf(64, [Seg(0x200000, b"\xf4" * 8, vaddr=0xFFFF800000200000)], 0x200004)), memory)
    assert loaded.boot.entry == 0x200004


def test_elf32_protected_mode(make_memory, write_image) -> None:
    memory = make_memory((0, RAM))
    loaded = load(write_image(build_elf(32, [Seg(0x100000, b"\xf4" * 8)], entry=0x100000)), memory)
    assert loaded.kind == "elf"
    assert loaded.boot.x86_mode is X86Mode.PROTECTED
    assert loaded.boot.entry == 0x100000


def test_boot_tables_avoid_a_low_image(make_memory, write_image) -> None:
    memory = make_memory((0, RAM))
    loaded = load(write_image(build_elf(64, [Seg(0x1000, bytes(0x9000))], entry=0x1000)), memory)
    tables = loaded.boot.boot_tables
    assert not overlaps((tables, tables + 7 * 4096), (0x1000, 0xA000))
    assert tables >= 0x1000


def test_non_pvh_note_is_plain_elf(make_memory, write_image) -> None:
    memory = make_memory((0, RAM))
    image = build_elf(64, [Seg(0x100000, b"\xf4")], 0x100000, notes=note("GNU", 18, struct.pack("<Q", 0x100000)))
    assert load(write_image(image), memory).kind == "elf"


@pytest.mark.parametrize(("kwargs", "what"), [({"cmdline": "x"}, "command line"), ({"initrd": Path("/")}, "initrd")])
def test_plain_elf_takes_no_cmdline_or_initrd(make_memory, write_image, kwargs, what) -> None:
    memory = make_memory((0, RAM))
    with pytest.raises(ImageError, match=f"no boot protocol to pass an? {what}"):
        load(write_image(build_elf(64, [Seg(0x100000, b"\xf4")], 0x100000)), memory, **kwargs)


def _good() -> bytes:
    return build_elf(64, [Seg(0x100000, b"\xf4" * 16)], 0x100000)


def _patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


BAD_ELVES = {
    "truncated ident": (_good()[:5], "truncated ELF header"),
    "truncated header": (_good()[:40], "truncated ELF header"),
    "bad class": (_patch(_good(), 4, "<B", 3), "invalid ELF class 3"),
    "big endian": (_patch(_good(), 5, "<B", 2), "big-endian"),
    "wrong machine": (build_elf(64, [Seg(0x100000, b"x")], 0x100000, machine=EM_AARCH64), "not x86"),
    "relocatable object": (build_elf(64, [Seg(0x100000, b"x")], 0x100000, etype=ET_REL), "not an executable"),
    "no program headers": (_patch(_good(), 56, "<H", 0), "no program headers"),
    "tiny phentsize": (_patch(_good(), 54, "<H", 8), "program header size 8 is too small"),
    "headers past EOF": (_patch(_good(), 56, "<H", 40), "program headers .* run past the end of the file"),
    "truncated program headers": (_good()[:80], "program headers .* run past the end of the file"),
    "segment past EOF": (_good()[:-4], "ELF segment 0 .* runs past the end of the file"),
    "segment offset past EOF": (
        build_elf(64, [Seg(0x100000, b"x" * 16, offset=0x10000)], 0x100000),
        "ELF segment 0 .* runs past the end of the file",
    ),
    "filesz > memsz": (build_elf(64, [Seg(0x100000, b"x" * 16, memsz=8)], 0x100000), "filesz 0x10 > memsz 0x8"),
    "no PT_LOAD": (build_elf(64, [], 0x100000, notes=note("GNU", 1, b"")), "no loadable"),
    "overlapping segments": (
        build_elf(64, [Seg(0x100000, b"a" * 0x100), Seg(0x100080, b"b" * 0x100)], 0x100000),
        r"ELF segment 1 \(0x100080\.\.0x100180\) overlaps ELF segment 0 \(0x100000\.\.0x100100\)",
    ),
    "bss overlapping a segment": (
        build_elf(64, [Seg(0x100000, b"a", memsz=0x1000), Seg(0x100800, b"b")], 0x100000),
        "ELF segment 1 .* overlaps ELF segment 0 bss",
    ),
    "segment beyond RAM": (build_elf(64, [Seg(RAM - 8, b"x" * 16)], RAM - 8), "does not fit in guest RAM"),
    "segment in a hole": (build_elf(64, [Seg(0x80000000, b"x")], 0x80000000), "does not fit in guest RAM"),
    "entry outside": (build_elf(64, [Seg(0x100000, b"x")], 0x300000), "entry point 0x300000 is not inside"),
}


@pytest.mark.parametrize("case", sorted(BAD_ELVES))
def test_bad_elf(make_memory, write_image, case: str) -> None:
    data, problem = BAD_ELVES[case]
    memory = make_memory((0, RAM))
    path = write_image(data)
    with pytest.raises(ImageError, match=problem) as info:
        load(path, memory)
    assert str(info.value).startswith(f"{path}: ")
    assert untouched(memory)


def test_entry_above_4g(make_memory, write_image) -> None:
    memory = make_memory((0, RAM), (1 << 32, 2 * MiB))
    image = build_elf(64, [Seg(1 << 32, b"\xf4")], 1 << 32)
    with pytest.raises(ImageError, match="entry point 0x100000000 is above 4 GiB"):
        load(write_image(image), memory, ram_size=RAM + 2 * MiB)
    assert untouched(memory)


def test_garbage_with_elf_magic(make_memory, write_image) -> None:
    memory = make_memory((0, RAM))
    with pytest.raises(ImageError, match="ELF"):
        load(write_image(b"\x7fELF" + bytes(range(256)) * 4), memory)
    assert untouched(memory)
