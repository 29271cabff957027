"""Multiboot v1: ELF32 images like kvm-unit-tests' .flat files, and a.out-kludge images."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from loader_images import (
    MiB,
    Seg,
    build_elf,
    cstring,
    multiboot_elf,
    multiboot_header,
    overlaps,
    untouched,
)

from pyvmm.boot import X86Mode
from pyvmm.errors import ConfigError
from pyvmm.machine.loaders import ImageError, LoadedKernel, load_kernel
from pyvmm.memory import GuestMemory

RAM = 32 * MiB


def load(path: Path, memory: GuestMemory, **kwargs: object) -> LoadedKernel:
    kwargs.setdefault("ram_size", RAM)
    kwargs.setdefault("cpus", 1)
    return load_kernel(path, memory, **kwargs)  # type: ignore[arg-type]


def mbi_fields(memory: GuestMemory, mbi: int) -> dict[str, int]:
    names = ["flags", "mem_lower", "mem_upper", "boot_device", "cmdline", "mods_count", "mods_addr"]
    names += ["syms0", "syms1", "syms2", "syms3", "mmap_length", "mmap_addr", "drives_length", "drives_addr"]
    names += ["config_table", "boot_loader_name"]
    values = struct.unpack("<17I", memory.read(mbi, 68))
    return dict(zip(names, values, strict=True))


def mmap_entries(memory: GuestMemory, addr: int, length: int) -> list[tuple[int, int, int, int]]:
    raw = memory.read(addr, length)
    return [struct.unpack_from("<IQQI", raw, pos) for pos in range(0, length, 24)]


def test_kvm_unit_tests_style_image(make_memory, write_image, tmp_path: Path) -> None:
    memory = make_memory((0, RAM))
    image = multiboot_elf(text=b"\x90" * 100, data=b"hello", bss=0x3000)
    path = write_image(image, "dummy.flat")
    env = tmp_path / "env"
    env.write_bytes(b"NR_CPUS=1\nMEMSIZE=32\n")
    memory.fill(0x401000, 0x4000, 0xAA)  # stale contents where the bss goes

    loaded = load(path, memory, cmdline="vmexit_cpuid  -x", initrd=env)

    assert loaded.kind == "multiboot"
    boot = loaded.boot
    assert boot.x86_mode is X86Mode.PROTECTED
    assert boot.entry == 0x400000 + 12
    mbi = boot.registers["rbx"]
    assert boot.registers == {"rax": 0x2BADB002, "rbx": mbi}
    # segments and bss
    assert memory.read(0x400000, 12) == multiboot_header()
    assert memory.read(0x40000C, 100) == b"\x90" * 100
    assert memory.read(0x401000, 5) == b"hello"
    assert memory.read(0x401005, 0x3000) == bytes(0x3000)
    assert memory.read_u8(0x401005 + 0x3000) == 0xAA  # past memsz: not the loader's
    # the information structure
    fields = mbi_fields(memory, mbi)
    assert fields["flags"] == (1 << 0) | (1 << 2) | (1 << 3) | (1 << 6) | (1 << 9)
    assert fields["mem_lower"] == 640
    assert fields["mem_upper"] == (RAM - MiB) // 1024
    assert cstring(memory, fields["cmdline"]) == b"dummy.flat vmexit_cpuid  -x"
    assert cstring(memory, fields["boot_loader_name"]) == b"pyvmm"
    assert fields["mods_count"] == 1
    start, end, string, reserved = struct.unpack("<4I", memory.read(fields["mods_addr"], 16))
    assert start % 4096 == 0
    assert end - start == len(env.read_bytes())
    assert memory.read(start, end - start) == env.read_bytes()
    assert cstring(memory, string) == b"env"
    assert reserved == 0
    assert start >= 0x401000 + 5 + 0x3000  # above the image
    entries = mmap_entries(memory, fields["mmap_addr"], fields["mmap_length"])
    assert entries == [(20, 0, 0xA0000, 1), (20, 0xA0000, 0x60000, 2), (20, MiB, RAM - MiB, 1)]
    # placement: nothing in page 0, nothing on the image, boot tables separate
    structures = [(mbi, mbi + 68), (fields["mmap_addr"], fields["mmap_addr"] + fields["mmap_length"])]
    structures += [(fields["mods_addr"], fields["mods_addr"] + 16), (fields["cmdline"], fields["cmdline"] + 28)]
    tables = (boot.boot_tables, boot.boot_tables + 4096)
    for low in structures:
        assert low[0] >= 0x1000
        assert low[1] <= 0xA0000
        assert not overlaps(low, tables)
        assert not overlaps(low, (0x400000, 0x404005))
    assert tables[0] >= 0x1000
    # what was written
    assert (0x400000, 0x400000 + 112) in loaded.extents
    assert (0x401000, 0x404005) in loaded.extents
    assert (start, end) in loaded.extents
    assert any(a <= mbi < b for a, b in loaded.extents)
    assert not any(overlaps(extent, tables) for extent in loaded.extents)


def test_without_cmdline_or_initrd(make_memory, write_image) -> None:
    memory = make_memory((0, RAM))
    loaded = load(write_image(multiboot_elf(), "my test.flat"), memory)
    fields = mbi_fields(memory, loaded.boot.registers["rbx"])
    assert cstring(memory, fields["cmdline"]) == b"my_test.flat"  # argv[0] stays one word
    assert fields["mods_count"] == 0
    assert fields["flags"] & (1 << 6)


def test_low_image_like_realmode_flat(make_memory, write_image) -> None:
    """realmode.flat sits at 0x8000..0xda30, over QEMU's fixed MBI address."""
    memory = make_memory((0, RAM))
    head = multiboot_header()
    image = build_elf(32, [Seg(0x8000, head + b"\xfa" * 0x2000), Seg(0xB000, b"d", memsz=0x2A30)], entry=0x8018)
    loaded = load(write_image(image, "realmode.flat"), memory, cmdline="x")
    mbi = loaded.boot.registers["rbx"]
    fields = mbi_fields(memory, mbi)
    image_range = (0x8000, 0xDA30)
    for start, size in ((mbi, 68), (fields["mmap_addr"], fields["mmap_length"]), (fields["cmdline"], 16)):
        assert start >= 0x1000
        assert not overlaps((start, start + size), image_range)
    assert not overlaps((loaded.boot.boot_tables, loaded.boot.boot_tables + 4096), image_range)
    assert loaded.boot.entry == 0x8018
    assert memory.read(0, 4096) == bytes(4096)  # page 0 untouched


def test_structures_move_around_an_image_in_their_usual_place(make_memory, write_image) -> None:
    memory = make_memory((0, RAM))
    head = multiboot_header()
    image = build_elf(32, [Seg(0x1000, head + bytes(0x3000))], entry=0x1000 + 12)
    loaded = load(write_image(image), memory)
    mbi = loaded.boot.registers["rbx"]
    tables = loaded.boot.boot_tables
    assert not overlaps((tables, tables + 4096), (0x1000, 0x400C))
    assert not overlaps((mbi, mbi + 0x80), (0x1000, 0x400C))
    assert not overlaps((mbi, mbi + 0x80), (tables, tables + 4096))


def test_adjacent_regions_count_as_contiguous_ram(make_memory, write_image) -> None:
    memory = make_memory((0, MiB), (MiB, 15 * MiB))
    # a segment spanning the boundary between the two regions
    image = build_elf(32, [Seg(0xF0000, multiboot_header() + b"\x11" * 0x20000)], entry=0xF0000 + 12)
    loaded = load(write_image(image), memory, ram_size=16 * MiB)
    end = 0xF000C + 0x20000
    assert memory.read(0xF000C, MiB - 0xF000C) + memory.read(MiB, end - MiB) == b"\x11" * 0x20000
    assert mbi_fields(memory, loaded.boot.registers["rbx"])["mem_upper"] == 15 * 1024


def test_ram_above_4g_and_pci_hole(make_memory, write_image) -> None:
    gib = 1 << 30
    memory = make_memory((0, 3 * gib), (4 * gib, 2 * gib))
    loaded = load(write_image(multiboot_elf()), memory, ram_size=5 * gib)
    fields = mbi_fields(memory, loaded.boot.registers["rbx"])
    assert fields["mem_upper"] == (3 * gib - MiB) // 1024
    entries = mmap_entries(memory, fields["mmap_addr"], fields["mmap_length"])
    # ram_size clips the RAM actually reported to 5 GiB
    assert entries[-1] == (20, 4 * gib, 2 * gib, 1)
    assert entries[-2] == (20, MiB, 3 * gib - MiB, 1)


def test_ram_size_clips_the_map(make_memory, write_image) -> None:
    memory = make_memory((0, 64 * MiB))
    loaded = load(write_image(multiboot_elf()), memory, ram_size=16 * MiB)
    fields = mbi_fields(memory, loaded.boot.registers["rbx"])
    assert fields["mem_upper"] == 15 * 1024


def test_read_only_regions_are_not_ram(make_memory, write_image) -> None:
    memory = make_memory((0, RAM), read_only=((0xFFFF0000, 0x10000),))
    loaded = load(write_image(multiboot_elf()), memory)
    fields = mbi_fields(memory, loaded.boot.registers["rbx"])
    entries = mmap_entries(memory, fields["mmap_addr"], fields["mmap_length"])
    assert all(base < RAM for _, base, _, _ in entries)


def test_aout_kludge(make_memory, write_image) -> None:
    memory = make_memory((0, RAM))
    load_addr = 0x200000
    # header 8 bytes into the file; the image is the whole file, bss after it
    body = b"\xeb\xfe" + bytes(6)
    kludge = (load_addr + 8, load_addr, 0, load_addr + 0x2000, load_addr)
    image = body + multiboot_header(1 << 16 | 0x3, kludge) + b"\x90" * 40
    memory.fill(load_addr + len(image), 0x2000 - len(image), 0x55)
    loaded = load(write_image(image), memory)
    assert loaded.kind == "multiboot"
    assert loaded.boot.entry == load_addr
    assert memory.read(load_addr, len(image)) == image
    assert memory.read(load_addr + len(image), 0x2000 - len(image)) == bytes(0x2000 - len(image))
    assert loaded.boot.registers["rax"] == 0x2BADB002


def test_aout_kludge_with_load_end(make_memory, write_image) -> None:
    memory = make_memory((0, RAM))
    kludge = (0x100000, 0x100000, 0x100000 + 40, 0, 0x100000 + 32)
    image = multiboot_header(1 << 16, kludge) + b"\x90" * 8 + b"TAIL-NOT-LOADED"
    loaded = load(write_image(image), memory)
    assert memory.read(0x100000, 40) == image[:40]
    assert memory.read(0x100000 + 40, 15) == bytes(15)
    assert loaded.boot.entry == 0x100000 + 32


def test_video_flag_is_accepted_without_video_info(make_memory, write_image) -> None:
    memory = make_memory((0, RAM))
    loaded = load(write_image(multiboot_elf(flags=1 << 2)), memory)
    assert not mbi_fields(memory, loaded.boot.registers["rbx"])["flags"] & (1 << 11)


def test_header_search_rules(make_memory, write_image) -> None:
    memory = make_memory((0, RAM))
    good = multiboot_header()
    bad_checksum = good[:8] + struct.pack("<I", 0)
    # unaligned, bad checksum, or beyond 8 KiB: not a multiboot image, so not loadable
    for data in (b"\0\0" + good + bytes(64), bad_checksum + bytes(64), bytes(8192) + good + bytes(64)):
        with pytest.raises(ImageError, match="not a Multiboot, bzImage or ELF"):
            load(write_image(data), memory)
    assert untouched(memory)


def test_multiboot_beats_elf_and_pvh(make_memory, write_image) -> None:
    from loader_images import note

    memory = make_memory((0, RAM))
    image = build_elf(32, [Seg(0x400000, multiboot_header() + bytes(16))], entry=0x40000C,
                      notes=note("Xen", 18, struct.pack("<I", 0x40000C)))  # fmt: skip
    assert load(write_image(image), memory).kind == "multiboot"


@pytest.mark.skipif(not all(shutil.which(t) for t in ("as", "ld", "objcopy")), reason="GNU as/ld/objcopy missing")
def test_assembled_like_kvm_unit_tests(make_memory, tmp_path: Path) -> None:
    """64-bit code linked at 4 MiB, converted with objcopy -O elf32-i386, as kvm-unit-tests does."""
    source = tmp_path / "k.S"
    source.write_text(
        ".section .init\n.code32\n.long 0x1BADB002, 0, -0x1BADB002\n"
        ".globl start\nstart: mov $0x3f8, %dx\n hlt\n"
        '.data\nmsg: .ascii "hi"\n.bss\n.fill 0x5000, 1, 0\n'
    )
    script = tmp_path / "k.lds"
    script.write_text(
        "SECTIONS { . = 4M + SIZEOF_HEADERS; .init : { *(.init) } .text : { *(.text) }"
        " . = ALIGN(4K); .data : { *(.data) } .bss : { *(.bss) } } ENTRY(start)\n"
    )
    run = lambda *args: subprocess.run(args, check=True, capture_output=True, cwd=tmp_path)  # noqa: E731
    run("as", "--64", "-o", "k.o", "k.S")
    run("ld", "-nostdlib", "-T", "k.lds", "-o", "k.elf", "k.o")
    run("objcopy", "-O", "elf32-i386", "k.elf", "k.flat")
    memory = make_memory((0, RAM))
    loaded = load(tmp_path / "k.flat", memory, cmdline="a")
    assert loaded.kind == "multiboot"
    assert 0x400000 < loaded.boot.entry < 0x401000
    assert memory.read(loaded.boot.entry, 4) == bytes.fromhex("66baf803")
    assert cstring(memory, mbi_fields(memory, loaded.boot.registers["rbx"])["cmdline"]) == b"k.flat a"


# --- bad input --------------------------------------------------------------------


def test_unknown_required_flag(make_memory, write_image) -> None:
    memory = make_memory((0, RAM))
    with pytest.raises(ImageError, match=r"kernel: Multiboot header requires .*0x8"):
        load(write_image(multiboot_elf(flags=1 << 3)), memory)
    assert untouched(memory)


def test_not_elf_without_kludge(make_memory, write_image) -> None:
    memory = make_memory((0, RAM))
    with pytest.raises(ImageError, match="flag 16 clear"):
        load(write_image(multiboot_header() + bytes(100)), memory)


@pytest.mark.parametrize(
    ("kludge", "tail", "problem"),
    [
        ((0x100000, 0x100000, 0x100000 + 0x1000, 0, 0x100000), 16, "runs past the end of the file"),
        ((0x100000, 0x100004, 0, 0, 0x100004), 16, "above header_addr"),
        ((0x100100, 0x100000, 0, 0, 0x100000), 16, "before the start of the file"),
        ((0x100000, 0x100000, 0x10, 0, 0x100000), 16, "load_end_addr .* is below load_addr"),
        ((0x100000, 0x100000, 0x100020, 0x100010, 0x100000), 16, "bss_end_addr .* is below"),
        ((0x100000, 0x100000, 0, 0, 0x900000), 16, "entry_addr .* outside"),
        ((0x100000, 0x100000, 0, 0, 0x100000 + 48), 16, "entry_addr .* outside"),
    ],
)
def test_bad_kludge(make_memory, write_image, kludge, tail, problem) -> None:
    memory = make_memory((0, RAM))
    data = multiboot_header(1 << 16, kludge) + bytes(tail)
    with pytest.raises(ImageError, match=problem):
        load(write_image(data), memory)
    assert untouched(memory)


def test_truncated_kludge_header(make_memory, write_image) -> None:
    memory = make_memory((0, RAM))
    with pytest.raises(ImageError, match="truncated Multiboot header"):
        load(write_image(multiboot_header(1 << 16) + bytes(8)), memory)


def test_missing_initrd(make_memory, write_image, tmp_path: Path) -> None:
    memory = make_memory((0, RAM))
    missing = tmp_path / "nope.env"
    with pytest.raises(ImageError, match=r"nope\.env: initrd file does not exist \(initrd for .*kernel\)"):
        load(write_image(multiboot_elf()), memory, initrd=missing)
    assert untouched(memory)


def test_initrd_that_does_not_fit(make_memory, write_image, tmp_path: Path) -> None:
    memory = make_memory((0, 8 * MiB))
    big = tmp_path / "big"
    big.write_bytes(b"x" * (5 * MiB))
    with pytest.raises(ImageError, match=r"no room for the initrd .*big"):
        load(write_image(multiboot_elf()), memory, initrd=big, ram_size=8 * MiB)
    assert untouched(memory)


def test_cmdline_too_long(make_memory, write_image) -> None:
    memory = make_memory((0, RAM))
    with pytest.raises(
        ImageError, match=r"command line is 5007 bytes; the Multiboot boot protocol allows at most 4095"
    ):
        load(write_image(multiboot_elf()), memory, cmdline="x" * 5000)
    with pytest.raises(ImageError, match="NUL"):
        load(write_image(multiboot_elf()), memory, cmdline="a\0b")
    assert untouched(memory)


def test_segment_outside_ram(make_memory, write_image) -> None:
    memory = make_memory((0, 4 * MiB))
    with pytest.raises(ImageError, match=r"ELF segment 0 \(0x400000\.\..*\) does not fit in guest RAM"):
        load(write_image(multiboot_elf()), memory, ram_size=4 * MiB)
    assert untouched(memory)


def test_image_filling_low_memory_leaves_no_room(make_memory, write_image) -> None:
    memory = make_memory((0, RAM))
    image = build_elf(32, [Seg(0x1000, multiboot_header() + b"\x90" * 16, memsz=0x9F000 - 0x1000)], entry=0x100C)
    with pytest.raises(ImageError, match=r"no room for the Multiboot information .* between 0x1000 and 0xa0000"):
        load(write_image(image), memory)
    assert untouched(memory)


def test_needs_low_memory(make_memory, write_image) -> None:
    memory = make_memory((MiB, RAM))
    with pytest.raises(ImageError, match="needs RAM from 0 to 640 KiB"):
        load(write_image(multiboot_elf()), memory, ram_size=RAM)


def test_entry_outside_segments(make_memory, write_image) -> None:
    memory = make_memory((0, RAM))
    image = build_elf(32, [Seg(0x400000, multiboot_header() + bytes(16))], entry=0x800000)
    with pytest.raises(ImageError, match="entry point 0x800000 is not inside any loadable segment"):
        load(write_image(image), memory)


def test_image_error_is_a_config_error(make_memory, tmp_path: Path) -> None:
    memory = make_memory((0, RAM))
    with pytest.raises(ConfigError):
        load(tmp_path / "absent", memory)
