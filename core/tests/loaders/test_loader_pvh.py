"""PVH: ELF kernels with XEN_ELFNOTE_PHYS32_ENTRY and the hvm_start_info they get."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from loader_images import MiB, Seg, build_elf, cstring, note, overlaps, untouched

from pyvmm.boot import X86Mode
from pyvmm.machine.loaders import ImageError, LoadedKernel, load_kernel
from pyvmm.memory import GuestMemory

RAM = 64 * MiB
HIGH = 0xFFFFFFFF80000000


def load(path: Path, memory: GuestMemory, **kwargs: object) -> LoadedKernel:
    kwargs.setdefault("ram_size", RAM)
    kwargs.setdefault("cpus", 1)
    return load_kernel(path, memory, **kwargs)  # type: ignore[arg-type]


def vmlinux(entry: int = 0x1000040, desc: bytes | None = None, bits: int = 64) -> bytes:
    """Like vmlinux: linked high, p_paddr physical, e_entry not the PVH entry."""
    segments = [
        Seg(0x1000000, b"\x90" * 0x100, vaddr=HIGH + 0x1000000 if bits == 64 else 0xC1000000),
        Seg(0x1200000, b"data", memsz=0x10000, vaddr=HIGH + 0x1200000 if bits == 64 else 0xC1200000),
    ]
    value = desc if desc is not None else struct.pack("<Q" if bits == 64 else "<I", entry)
    notes = note("GNU", 3, b"build-id") + note("Xen", 18, value)
    return build_elf(bits, segments, entry=0x1000000, notes=notes)


def start_info(memory: GuestMemory, addr: int) -> tuple[int, ...]:
    return struct.unpack("<IIIIQQQQII", memory.read(addr, 56))


def test_pvh_with_initrd(make_memory, write_image, tmp_path: Path) -> None:
    memory = make_memory((0, RAM))
    memory.fill(0x1200000, 0x10000, 0xAA)
    initrd = tmp_path / "rootfs.cpio"
    initrd.write_bytes(b"070701" * 1000)
    loaded = load(write_image(vmlinux(), "vmlinux"), memory, cmdline="console=hvc0", initrd=initrd)

    assert loaded.kind == "pvh"
    boot = loaded.boot
    assert boot.x86_mode is X86Mode.PROTECTED
    assert boot.entry == 0x1000040
    info = boot.registers["rbx"]
    assert boot.registers == {"rbx": info}
    magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, entries, reserved = start_info(memory, info)
    assert (magic, version, flags, nr_modules, rsdp, reserved) == (0x336EC578, 1, 0, 1, 0, 0)
    assert cstring(memory, cmdline) == b"console=hvc0"
    paddr, size, mod_cmdline, mod_reserved = struct.unpack("<QQQQ", memory.read(modlist, 32))
    assert size == 6000
    assert mod_reserved == 0
    assert paddr % 4096 == 0
    assert paddr == (RAM - 6000) // 4096 * 4096
    assert memory.read(paddr, size) == b"070701" * 1000
    assert cstring(memory, mod_cmdline) == b"rootfs.cpio"
    raw = memory.read(memmap, entries * 24)
    table = [struct.unpack_from("<QQII", raw, i * 24) for i in range(entries)]
    assert table == [(0, 0xA0000, 1, 0), (0xA0000, 0x60000, 2, 0), (MiB, RAM - MiB, 1, 0)]
    # segments by physical address, bss zeroed
    assert memory.read(0x1000000, 0x100) == b"\x90" * 0x100
    assert memory.read(0x1200000, 0x10000) == b"data" + bytes(0x10000 - 4)
    # placement
    tables = (boot.boot_tables, boot.boot_tables + 4096)
    for start, end in ((info, info + 56), (memmap, memmap + entries * 24), (cmdline, cmdline + 13)):
        assert start >= 0x1000
        assert end <= 0xA0000
        assert not overlaps((start, end), tables)
    assert (paddr, paddr + size) in loaded.extents


def test_pvh_without_initrd(make_memory, write_image) -> None:
    memory = make_memory((0, RAM))
    loaded = load(write_image(vmlinux()), memory)
    magic, _, _, nr_modules, modlist, cmdline, *_ = start_info(memory, loaded.boot.registers["rbx"])
    assert magic == 0x336EC578
    assert (nr_modules, modlist) == (0, 0)
    assert cstring(memory, cmdline) == b""


def test_pvh_elf32_with_4_byte_note(make_memory, write_image) -> None:
    memory = make_memory((0, RAM))
    loaded = load(write_image(vmlinux(bits=32)), memory)
    assert loaded.kind == "pvh"
    assert loaded.boot.entry == 0x1000040


@pytest.mark.parametrize(
    ("image", "problem"),
    [
        (vmlinux(desc=b"\x00" * 6), "PVH entry note has a 6-byte value"),
        (vmlinux(entry=0x3000000), "PVH entry point 0x3000000 is not inside any loadable segment"),
        (vmlinux(entry=1 << 32), "above 4 GiB"),
    ],
)
def test_bad_pvh(make_memory, write_image, image, problem) -> None:
    memory = make_memory((0, RAM))
    with pytest.raises(ImageError, match=problem):
        load(write_image(image), memory)
    assert untouched(memory)


def test_pvh_cmdline_too_long(make_memory, write_image) -> None:
    memory = make_memory((0, RAM))
    with pytest.raises(ImageError, match="the PVH boot protocol allows at most 4095"):
        load(write_image(vmlinux()), memory, cmdline="y" * 4096)
    assert untouched(memory)


def test_pvh_initrd_does_not_fit(make_memory, write_image, tmp_path: Path) -> None:
    memory = make_memory((0, RAM))
    initrd = tmp_path / "big"
    initrd.write_bytes(bytes(48 * MiB))
    with pytest.raises(ImageError, match="no room for the initrd"):
        load(write_image(vmlinux()), memory, initrd=initrd)
    assert untouched(memory)


def test_pvh_missing_initrd(make_memory, write_image, tmp_path: Path) -> None:
    memory = make_memory((0, RAM))
    with pytest.raises(ImageError, match="initrd file does not exist"):
        load(write_image(vmlinux()), memory, initrd=tmp_path / "gone")
