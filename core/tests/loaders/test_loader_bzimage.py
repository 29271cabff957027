"""Linux bzImage by the x86 boot protocol, with a fake setup header."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from loader_images import CAN_USE_HEAP, LOADED_HIGH, MiB, build_bzimage, cstring, overlaps, untouched

from pyvmm.boot import X86Mode
from pyvmm.machine.loaders import ImageError, LoadedKernel, load_kernel
from pyvmm.memory import GuestMemory

RAM = 64 * MiB
KERNEL = bytes(range(256)) * 32  # 8 KiB protected-mode kernel


def load(path: Path, memory: GuestMemory, **kwargs: object) -> LoadedKernel:
    kwargs.setdefault("ram_size", RAM)
    kwargs.setdefault("cpus", 1)
    return load_kernel(path, memory, **kwargs)  # type: ignore[arg-type]


def e820(memory: GuestMemory, zero_page: int) -> list[tuple[int, int, int]]:
    count = memory.read_u8(zero_page + 0x1E8)
    raw = memory.read(zero_page + 0x2D0, count * 20)
    return [struct.unpack_from("<QQI", raw, i * 20) for i in range(count)]


def test_64bit_boot_protocol(make_memory, write_image, tmp_path: Path) -> None:
    memory = make_memory((0, RAM))
    image = build_bzimage(kernel=KERNEL, init_size=0x800000)
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"\x07" * 12345)
    loaded = load(write_image(image, "bzImage"), memory, cmdline="console=ttyS0 root=/dev/vda", initrd=initrd)

    assert loaded.kind == "bzimage"
    boot = loaded.boot
    # relocatable, and RAM holds pref_address + init_size: loaded there
    assert boot.x86_mode is X86Mode.LONG
    assert boot.entry == 0x1000000 + 0x200
    zp = boot.registers["rsi"]
    assert boot.registers == {"rsi": zp}
    assert memory.read(0x1000000, len(KERNEL)) == KERNEL
    # zero page: the setup header copied, then the loader's fields
    header_end = 0x202 + image[0x201]
    page = memory.read(zp, 4096)
    patched = {0x210, 0x211, 0x214, 0x215, 0x216, 0x217} | set(range(0x218, 0x220)) | {0x224, 0x225}
    patched |= set(range(0x228, 0x22C))
    for offset in range(0x1F1, header_end):
        if offset not in patched:
            assert page[offset] == image[offset], hex(offset)
    assert page[:0x1E8] == bytes(0x1E8)
    assert page[0x210] == 0xFF  # type_of_loader: undefined
    assert page[0x211] == LOADED_HIGH | CAN_USE_HEAP
    assert struct.unpack_from("<H", page, 0x224)[0] == 0xFE00
    assert struct.unpack_from("<I", page, 0x214)[0] == 0x1000000
    cmd_line_ptr = struct.unpack_from("<I", page, 0x228)[0]
    assert cstring(memory, cmd_line_ptr) == b"console=ttyS0 root=/dev/vda"
    ramdisk_image, ramdisk_size = struct.unpack_from("<II", page, 0x218)
    assert ramdisk_size == 12345
    assert ramdisk_image % 4096 == 0
    assert ramdisk_image + ramdisk_size <= RAM
    assert ramdisk_image == (RAM - 12345) // 4096 * 4096  # as high as possible
    assert memory.read(ramdisk_image, ramdisk_size) == b"\x07" * 12345
    assert struct.unpack_from("<III", page, 0xC0) == (0, 0, 0)  # ext_ramdisk_*, ext_cmd_line_ptr
    assert e820(memory, zp) == [(0, 0xA0000, 1), (0xA0000, 0x60000, 2), (MiB, RAM - MiB, 1)]
    # layout
    tables = (boot.boot_tables, boot.boot_tables + 7 * 4096)
    low = [(zp, zp + 4096), (cmd_line_ptr, cmd_line_ptr + 28)]
    for piece in low:
        assert piece[0] >= 0x1000
        assert piece[1] <= 0xA0000
        assert not overlaps(piece, tables)
    assert not overlaps(low[0], low[1])
    assert not overlaps((ramdisk_image, ramdisk_image + ramdisk_size), (0x1000000, 0x1800000))
    assert (0x1000000, 0x1000000 + len(KERNEL)) in loaded.extents
    assert (zp, zp + 4096) in loaded.extents or any(a <= zp and zp + 4096 <= b for a, b in loaded.extents)


def test_32bit_boot_protocol(make_memory, write_image) -> None:
    memory = make_memory((0, RAM))
    loaded = load(write_image(build_bzimage(version=0x020A, xloadflags=0, kernel=KERNEL)), memory)
    assert loaded.boot.x86_mode is X86Mode.PROTECTED
    assert loaded.boot.entry == 0x1000000
    assert "rsi" in loaded.boot.registers


def test_xloadflags_ignored_before_2_12(make_memory, write_image) -> None:
    memory = make_memory((0, RAM))
    loaded = load(write_image(build_bzimage(version=0x020B, xloadflags=1)), memory)
    assert loaded.boot.x86_mode is X86Mode.PROTECTED


def test_not_relocatable_loads_at_1mib(make_memory, write_image) -> None:
    memory = make_memory((0, RAM))
    loaded = load(write_image(build_bzimage(relocatable=0, kernel=KERNEL)), memory)
    assert loaded.boot.entry == MiB + 0x200
    assert memory.read(MiB, len(KERNEL)) == KERNEL


def test_nonsense_pref_address_falls_back_to_1mib(make_memory, write_image, tmp_path: Path) -> None:
    memory = make_memory((0, RAM))
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"i" * 100)
    # below initrd_addr_max, only 1 MiB + kernel .. 2 MiB is free: the kernel runs from 2 MiB
    image = build_bzimage(pref_address=0x1000, init_size=0x800000, initrd_addr_max=0xA00000 - 1, kernel=KERNEL)
    loaded = load(write_image(image), memory, initrd=initrd)
    assert loaded.boot.entry == MiB + 0x200
    assert memory.read(MiB, len(KERNEL)) == KERNEL
    zp = loaded.boot.registers["rsi"]
    start = memory.read_u32(zp + 0x218)
    assert start == 2 * MiB - 4096  # the highest page below the runtime area


def test_ram_too_small_for_init_size(make_memory, write_image) -> None:
    memory = make_memory((0, 24 * MiB))
    image = build_bzimage(pref_address=0x1000000, init_size=0x1000000)
    # wherever it is loaded, the kernel runs from pref_address: 16 MiB + 16 MiB > 24 MiB
    with pytest.raises(ImageError, match=r"runtime area \(init_size\) \(0x1000000\.\.0x2000000\) does not fit"):
        load(write_image(image), memory, ram_size=24 * MiB)
    assert untouched(memory)


def test_initrd_below_initrd_addr_max(make_memory, write_image, tmp_path: Path) -> None:
    memory = make_memory((0, RAM))
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"i" * 5000)
    limit = 0x2000000 - 1  # last byte the initrd may occupy
    loaded = load(write_image(build_bzimage(initrd_addr_max=limit)), memory, initrd=initrd)
    zp = loaded.boot.registers["rsi"]
    start, size = memory.read_u32(zp + 0x218), memory.read_u32(zp + 0x21C)
    assert start + size - 1 <= limit
    assert start == (limit + 1 - 5000) // 4096 * 4096


def test_initrd_avoids_the_kernel_runtime_area(make_memory, write_image, tmp_path: Path) -> None:
    memory = make_memory((0, RAM))
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"i" * MiB)
    # the only RAM below initrd_addr_max is taken by the kernel and its runtime area
    image = build_bzimage(initrd_addr_max=0x1800000 - 1, init_size=0x800000)
    loaded = load(write_image(image), memory, initrd=initrd)
    zp = loaded.boot.registers["rsi"]
    start = memory.read_u32(zp + 0x218)
    assert not overlaps((start, start + MiB), (0x1000000, 0x1800000))


def test_old_protocol_2_02(make_memory, write_image) -> None:
    memory = make_memory((0, RAM))
    image = build_bzimage(version=0x0202, header_len=0x22C - 0x202, xloadflags=0)
    loaded = load(write_image(image), memory, cmdline="x" * 255)
    assert loaded.boot.x86_mode is X86Mode.PROTECTED
    assert loaded.boot.entry == MiB  # 2.02 has no relocatable flag
    with pytest.raises(
        ImageError, match=r"command line is 256 bytes; the Linux 2\.02 boot protocol allows at most 255"
    ):
        load(write_image(image), memory, cmdline="x" * 256)


def test_setup_sects_zero_means_four(make_memory, write_image) -> None:
    memory = make_memory((0, RAM))
    image = build_bzimage(setup_sects=0, kernel=KERNEL)
    loaded = load(write_image(image), memory)
    assert memory.read(0x1000000, len(KERNEL)) == KERNEL
    assert loaded.boot.entry == 0x1000200


# --- bad input --------------------------------------------------------------------


def test_cmdline_longer_than_cmdline_size(make_memory, write_image) -> None:
    memory = make_memory((0, RAM))
    image = build_bzimage(cmdline_size=16)
    load(write_image(image), memory, cmdline="x" * 16)
    fresh = make_memory((0, RAM))
    with pytest.raises(ImageError, match=r"command line is 17 bytes; the Linux 2\.15 boot protocol allows at most 16"):
        load(write_image(image), fresh, cmdline="x" * 17)
    assert untouched(fresh)


BAD = {
    "too old": (build_bzimage(version=0x0201), "boot protocol 2.01 is too old; pyvmm needs 2.02 or later"),
    "bad boot_flag": (build_bzimage(boot_flag=0x1234), "boot_flag is 0x1234, not 0xaa55"),
    "zImage": (build_bzimage(loadflags=0), "zImage"),
    "short header": (build_bzimage(header_len=0x30), "setup header ends at 0x232, short of its protocol's fields"),
    "cut in the header": (build_bzimage()[:0x240], "truncated bzImage: the setup header is cut off"),
    "cut before version": (build_bzimage()[:0x207], "truncated bzImage: the setup header is cut off"),
    "no kernel": (build_bzimage()[: 5 * 512], "no protected-mode kernel after the 4 setup sectors"),
    "kernel cut short": (build_bzimage()[:-16], "truncated bzImage: the header gives a 0x2000-byte kernel"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_bzimage(make_memory, write_image, case: str) -> None:
    data, problem = BAD[case]
    memory = make_memory((0, RAM))
    path = write_image(data)
    with pytest.raises(ImageError, match=problem) as info:
        load(path, memory)
    assert str(info.value).startswith(f"{path}: ")
    assert untouched(memory)


def test_missing_initrd(make_memory, write_image, tmp_path: Path) -> None:
    memory = make_memory((0, RAM))
    with pytest.raises(ImageError, match="initrd file does not exist"):
        load(write_image(build_bzimage()), memory, initrd=tmp_path / "missing")
    assert untouched(memory)


def test_initrd_does_not_fit(make_memory, write_image, tmp_path: Path) -> None:
    memory = make_memory((0, RAM))
    initrd = tmp_path / "huge"
    initrd.write_bytes(bytes(40 * MiB))
    with pytest.raises(ImageError, match=r"no room for the initrd .*huge \(0x2800000 bytes\)"):
        load(write_image(build_bzimage(init_size=0x1000000)), memory, initrd=initrd)
    assert untouched(memory)


def test_kernel_does_not_fit(make_memory, write_image) -> None:
    memory = make_memory((0, 2 * MiB))
    with pytest.raises(ImageError, match="does not fit in guest RAM"):
        load(write_image(build_bzimage(relocatable=0, init_size=0, kernel=bytes(2 * MiB))), memory, ram_size=2 * MiB)
    assert untouched(memory)


def test_needs_low_memory(make_memory, write_image) -> None:
    memory = make_memory((MiB, RAM))
    with pytest.raises(ImageError, match="a Linux kernel needs RAM from 0 to 640 KiB"):
        load(write_image(build_bzimage()), memory, ram_size=RAM)
