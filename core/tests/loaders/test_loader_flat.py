"""Flat binaries, format detection, and the checks every load does first (file, RAM size)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from loader_images import MiB, Seg, build_bzimage, build_elf, multiboot_elf, overlaps, untouched

from pyvmm.boot import X86Mode
from pyvmm.machine.loaders import ImageError, LoadedKernel, load_kernel
from pyvmm.memory import GuestMemory

RAM = 16 * MiB


def load(path: Path, memory: GuestMemory, **kwargs: object) -> LoadedKernel:
    kwargs.setdefault("ram_size", RAM)
    kwargs.setdefault("cpus", 1)
    return load_kernel(path, memory, **kwargs)  # type: ignore[arg-type]


def test_flat_binary(make_memory, write_image) -> None:
    memory = make_memory((0, RAM))
    code = bytes(range(256)) * 3
    loaded = load(write_image(code), memory, load_address=0x10000)
    assert loaded.kind == "flat"
    assert loaded.boot.entry == 0x10000
    assert loaded.boot.x86_mode is X86Mode.LONG
    assert loaded.boot.registers == {}
    assert memory.read(0x10000, len(code)) == code
    assert loaded.extents == [(0x10000, 0x10000 + len(code))]
    assert loaded.boot.boot_tables == 0x1000


def test_flat_binary_over_the_usual_boot_tables(make_memory, write_image) -> None:
    memory = make_memory((0, RAM))
    loaded = load(write_image(b"\xf4" * 0x3000), memory, load_address=0x2000)
    tables = loaded.boot.boot_tables
    assert not overlaps((tables, tables + 7 * 4096), (0x2000, 0x5000))


def test_flat_binary_at_any_ram_address(make_memory, write_image) -> None:
    memory = make_memory((0x100000, RAM))
    loaded = load(write_image(b"\xf4"), memory, load_address=0x200000)
    assert loaded.boot.entry == 0x200000
    assert loaded.boot.boot_tables >= 0x100000


@pytest.mark.parametrize(
    ("data", "address", "problem"),
    [
        (b"\xf4" * 0x2000, RAM - 0x1000, r"flat binary \(.*\) does not fit in guest RAM"),
        (b"\xf4", 1 << 32, "load_address 0x100000000 is not below 4 GiB"),
        (b"\xf4", -1, "not below 4 GiB"),
    ],
)
def test_bad_flat(make_memory, write_image, data, address, problem) -> None:
    memory = make_memory((0, RAM))
    with pytest.raises(ImageError, match=problem):
        load(write_image(data), memory, load_address=address)
    assert untouched(memory)


@pytest.mark.parametrize(("kwargs", "what"), [({"cmdline": "x"}, "command line"), ({"initrd": Path("/")}, "initrd")])
def test_flat_takes_no_cmdline_or_initrd(make_memory, write_image, kwargs, what) -> None:
    memory = make_memory((0, RAM))
    with pytest.raises(ImageError, match=f"flat binary image has no boot protocol to pass an? {what}"):
        load(write_image(b"\xf4"), memory, load_address=0x10000, **kwargs)


def test_garbage_without_load_address(make_memory, write_image) -> None:
    memory = make_memory((0, RAM))
    with pytest.raises(ImageError, match="give load_address to load it as a flat binary"):
        load(write_image(bytes(range(256)) * 64), memory)
    assert untouched(memory)


@pytest.mark.parametrize(
    ("image", "kind"),
    [
        (multiboot_elf(), "Multiboot"),
        (build_bzimage(), "bzImage"),
        (build_elf(64, [Seg(0x100000, b"x")], 0x100000), "ELF"),
    ],
)
def test_load_address_is_for_flat_binaries_only(make_memory, write_image, image, kind) -> None:
    memory = make_memory((0, RAM))
    with pytest.raises(ImageError, match=f"load_address applies to flat binaries only; this is an? {kind} kernel"):
        load(write_image(image), memory, load_address=0x100000)


# --- the file itself ----------------------------------------------------------------


def test_missing_file(make_memory, tmp_path: Path) -> None:
    memory = make_memory((0, RAM))
    with pytest.raises(ImageError, match=r"/vmlinuz: kernel file does not exist"):
        load(tmp_path / "vmlinuz", memory)


def test_directory(make_memory, tmp_path: Path) -> None:
    memory = make_memory((0, RAM))
    with pytest.raises(ImageError, match="is a directory"):
        load(tmp_path, memory)


def test_empty_file(make_memory, write_image) -> None:
    memory = make_memory((0, RAM))
    with pytest.raises(ImageError, match="kernel: kernel file is empty"):
        load(write_image(b""), memory, load_address=0x10000)


def test_truncated_file(make_memory, write_image) -> None:
    memory = make_memory((0, RAM))
    with pytest.raises(ImageError, match="not a Multiboot, bzImage or ELF kernel"):
        load(write_image(b"\x7fEL"), memory)


def test_initrd_is_a_directory(make_memory, write_image, tmp_path: Path) -> None:
    memory = make_memory((0, RAM))
    with pytest.raises(ImageError, match="initrd is a directory"):
        load(write_image(multiboot_elf()), memory, initrd=tmp_path)


# --- sizes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ram_size", "cpus", "problem"),
    [
        (0, 1, "ram_size 0x0 is not a positive multiple"),
        (-4096, 1, "not a positive multiple"),
        (RAM + 100, 1, "not a positive multiple"),
        (2 * RAM, 1, "larger than the guest RAM actually mapped"),
        (RAM, 0, "cpus 0 must be at least 1"),
    ],
)
def test_nonsense_sizes(make_memory, write_image, ram_size, cpus, problem) -> None:
    memory = make_memory((0, RAM))
    with pytest.raises(ImageError, match=problem):
        load(write_image(b"\xf4"), memory, load_address=0x10000, ram_size=ram_size, cpus=cpus)
    assert untouched(memory)


def test_ram_size_smaller_than_mapped_limits_placement(make_memory, write_image) -> None:
    memory = make_memory((0, RAM))
    with pytest.raises(ImageError, match="does not fit in guest RAM"):
        load(write_image(b"\xf4"), memory, load_address=8 * MiB, ram_size=4 * MiB)


def test_ram_too_small_for_the_kernel(make_memory, write_image) -> None:
    memory = make_memory((0, 2 * MiB))
    with pytest.raises(ImageError, match=r"ELF segment 0 \(0x400000.*does not fit in guest RAM \(0x0\.\.0x200000\)"):
        load(write_image(multiboot_elf()), memory, ram_size=2 * MiB)
    with pytest.raises(ImageError, match=r"needs RAM from 0 to 640 KiB and above 1 MiB; guest RAM is 0x0\.\.0x100000"):
        load(write_image(multiboot_elf()), memory, ram_size=1 * MiB)
    assert untouched(memory)


def test_image_error_pickles() -> None:
    error = pickle.loads(pickle.dumps(ImageError("/k", "bad")))
    assert str(error) == "/k: bad"
    assert (error.path, error.problem) == ("/k", "bad")
