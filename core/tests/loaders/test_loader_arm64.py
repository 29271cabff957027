"""The aarch64 loader: arm64 Images, flat binaries, the initrd, the device tree."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from loader_images import MiB, build_elf, overlaps, untouched

from pyvmm.config import Arch
from pyvmm.errors import ConfigError
from pyvmm.machine.loaders import ImageError, LoadedKernel, load_arm64_kernel
from pyvmm.machine.loaders.arm64 import (
    ARM64_MAGIC,
    FDT_MAX_SIZE,
    HEADER,
    LEGACY_TEXT_OFFSET,
    Chosen,
    is_arm64_image,
    load_arm64_bytes,
)
from pyvmm.memory import GuestMemory

BASE = 0x8000_0000
RAM = 16 * MiB
#: Where the device tree goes in that RAM: the last 2 MiB.
FDT_AT = BASE + RAM - 2 * MiB


def image(text_offset: int = 0, image_size: int = 0x4000, flags: int = 0b1010) -> bytes:
    """An arm64 Image: the 64-byte header, then NOPs; ``image_size`` 0 as before 3.17."""
    code = b"\x1f\x20\x03\xd5" * 64
    size = max(image_size, HEADER.size + len(code)) if image_size else 0
    head = HEADER.pack(0x14000010, 0, text_offset, size, flags, 0, 0, 0, ARM64_MAGIC, 0)
    return head + code


class Recorder:
    """A device-tree builder that remembers what it was asked for."""

    def __init__(self, blob: bytes = b"\xd0\x0d\xfe\xed-tree") -> None:
        self.blob = blob
        self.chosen: list[Chosen] = []

    def __call__(self, chosen: Chosen) -> bytes:
        self.chosen.append(chosen)
        return self.blob


def load(path: Path, memory: GuestMemory, tree: Recorder | None = None, **kwargs: object) -> LoadedKernel:
    kwargs.setdefault("ram_size", RAM)
    return load_arm64_kernel(path, memory, device_tree=tree or Recorder(), **kwargs)  # type: ignore[arg-type]


def test_image_goes_to_ram_base_plus_text_offset(make_memory, write_image) -> None:
    memory = make_memory((BASE, RAM))
    data = image(text_offset=0x8_0000, image_size=0x10_0000)
    tree = Recorder()
    loaded = load(write_image(data), memory, tree, cmdline="console=ttyAMA0")
    assert loaded.kind == "arm64 Image"
    boot = loaded.boot
    assert boot.arch is Arch.AARCH64
    assert boot.entry == BASE + 0x8_0000
    assert (boot.fdt_address, boot.fdt_size) == (FDT_AT, FDT_MAX_SIZE)
    assert memory.read(BASE + 0x8_0000, len(data)) == data
    assert memory.read(FDT_AT, len(tree.blob)) == tree.blob
    assert tree.chosen == [Chosen(bootargs="console=ttyAMA0", initrd=None)]


def test_image_with_text_offset_zero_and_its_bss_kept_free(make_memory, write_image) -> None:
    memory = make_memory((BASE, RAM))
    initrd = write_image(b"I" * 5000, "initrd")
    tree = Recorder()
    loaded = load(write_image(image(image_size=0x20_0000)), memory, tree, initrd=initrd)
    assert loaded.boot.entry == BASE
    # The initrd follows the whole image_size (bss included), page-aligned.
    assert tree.chosen[0].initrd == (BASE + 0x20_0000, BASE + 0x20_0000 + 5000)
    assert memory.read(BASE + 0x20_0000, 5000) == b"I" * 5000


def test_pre_3_17_image_without_image_size(make_memory, write_image) -> None:
    memory = make_memory((BASE, RAM))
    loaded = load(write_image(image(text_offset=0x1234, image_size=0)), memory)
    # image_size 0: text_offset is 0x80000 whatever the header says.
    assert loaded.boot.entry == BASE + LEGACY_TEXT_OFFSET


def test_flat_binary_at_load_address_with_cmdline_and_initrd(make_memory, write_image) -> None:
    memory = make_memory((BASE, RAM))
    code = b"\x1f\x20\x03\xd5" * 10
    tree = Recorder()
    loaded = load(
        write_image(code), memory, tree, load_address=BASE + 0x1000, cmdline="x", initrd=write_image(b"r", "rd")
    )
    assert loaded.kind == "flat"
    assert loaded.boot.entry == BASE + 0x1000
    assert memory.read(BASE + 0x1000, len(code)) == code
    start, end = tree.chosen[0].initrd or (0, 0)
    assert end - start == 1 and start % 4096 == 0 and start >= BASE + 0x1000 + len(code)
    assert tree.chosen[0].bootargs == "x"


def test_initrd_goes_below_a_kernel_loaded_high(make_memory, write_image) -> None:
    memory = make_memory((BASE, RAM))
    tree = Recorder()
    top = FDT_AT - 0x1000
    load(write_image(b"\x00" * 0x1000), memory, tree, load_address=top, initrd=write_image(b"r" * 0x3000, "rd"))
    start, end = tree.chosen[0].initrd or (0, 0)
    assert not overlaps((start, end), (top, top + 0x1000)) and BASE <= start < end <= top


def test_in_memory_bytes_load_like_a_file(make_memory) -> None:
    memory = make_memory((BASE, RAM))
    loaded = load_arm64_bytes("demo", b"\x00" * 8, memory, ram_size=RAM, device_tree=Recorder(), load_address=BASE)
    assert loaded.boot.entry == BASE and loaded.boot.fdt_address == FDT_AT


def test_detection() -> None:
    assert is_arm64_image(image())
    assert not is_arm64_image(image()[:0x3C])
    assert not is_arm64_image(b"\x7fELF" + bytes(100))


@pytest.mark.parametrize(
    ("data", "kwargs", "problem"),
    [
        (b"", {}, "kernel file is empty"),
        (b"\x00" * 100, {}, r"not an arm64 Image \(no ARM\\x64 magic at 0x38\); give load_address"),
        (build_elf(64, [], BASE, machine=183), {}, "an ELF file; give load_address to load it as a flat binary"),
        (b"\x1f\x8b\x08" + bytes(100), {}, r"a gzip-compressed kernel \(Image.gz\): unpack it first"),
        (image(), {"load_address": BASE}, "load_address applies to flat binaries only; this is an arm64 Image"),
        (image(flags=1), {}, "big-endian arm64 Image"),
        (image(text_offset=0x123), {}, "text_offset 0x123 is not a page offset"),
        (image(text_offset=4 << 20), {}, "text_offset 0x400000 is not a page offset into 2 MiB"),
        (image(image_size=RAM), {}, r"arm64 Image bss \(.*\) does not fit in guest RAM|overlaps device tree window"),
        (b"\x00" * 0x1000, {"load_address": FDT_AT}, r"flat binary \(.*\) overlaps device tree window"),
        (b"\x00" * 8, {"load_address": BASE + 2}, "load_address 0x80000002 is not 4-byte aligned"),
        (b"\x00" * 8, {"load_address": 0x1000}, r"flat binary \(0x1000\.\.0x1008\) does not fit in guest RAM"),
        (image(), {"cmdline": "a\0b"}, "the command line contains a NUL character"),
        (image(), {"cmdline": "x" * 2048}, "the command line is 2048 bytes; arm64 Linux accepts at most 2047"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(make_memory, write_image, data, kwargs, problem) -> None:
    memory = make_memory((BASE, RAM))
    path = write_image(data)
    tree = Recorder()
    with pytest.raises(ImageError, match=problem) as caught:
        load(path, memory, tree, **kwargs)
    assert str(caught.value).startswith(f"{path}: ")
    assert untouched(memory)


def test_image_size_smaller_than_the_file(make_memory, write_image) -> None:
    data = HEADER.pack(0, 0, 0, 0x10, 0, 0, 0, 0, ARM64_MAGIC, 0) + b"\x00" * 0x100
    memory = make_memory((BASE, RAM))
    with pytest.raises(ImageError, match="image_size 0x10 is smaller than the file"):
        load(write_image(data), memory)
    assert untouched(memory)


def test_image_needs_2mib_aligned_ram(make_memory, write_image) -> None:
    memory = make_memory((BASE + 0x1000, RAM))
    with pytest.raises(ImageError, match=r"guest RAM starts at 0x80001000, not 2 MiB-aligned"):
        load(write_image(image()), memory)
    assert untouched(memory)


def test_ram_in_one_range_only(make_memory, write_image) -> None:
    memory = make_memory((BASE, 4 * MiB), (BASE + 8 * MiB, 4 * MiB))
    with pytest.raises(ImageError, match="needs guest RAM in one range"):
        load(write_image(image()), memory, ram_size=8 * MiB)


def test_ram_too_small_for_the_device_tree_window(make_memory, write_image) -> None:
    memory = make_memory((BASE + 0x1000, 2 * MiB))
    with pytest.raises(ImageError, match="no 2 MiB-aligned 2 MiB for the device tree"):
        load(write_image(b"\x00"), memory, ram_size=2 * MiB, load_address=BASE + 0x1000)


def test_missing_initrd_names_it(make_memory, write_image, tmp_path) -> None:
    memory = make_memory((BASE, RAM))
    with pytest.raises(ImageError, match=r"rd: initrd file does not exist \(initrd for .*kernel\)"):
        load(write_image(image()), memory, initrd=tmp_path / "rd")
    assert untouched(memory)


def test_initrd_that_does_not_fit(make_memory, write_image) -> None:
    memory = make_memory((BASE, 8 * MiB))
    with pytest.raises(ImageError, match=r"no room for the initrd \(0x700000 bytes\)"):
        load(write_image(image()), memory, ram_size=8 * MiB, initrd=write_image(b"r" * (7 * MiB), "rd"))
    assert untouched(memory)


def test_device_tree_errors_and_oversize_trees(make_memory, write_image) -> None:
    memory = make_memory((BASE, RAM))

    def broken(chosen: Chosen) -> bytes:
        raise ConfigError("device tree: /chosen/bootargs: nope")

    with pytest.raises(ImageError, match="cannot build the device tree: device tree: /chosen/bootargs: nope"):
        load_arm64_kernel(write_image(image()), memory, ram_size=RAM, device_tree=broken)
    with pytest.raises(ImageError, match=f"the device tree is {FDT_MAX_SIZE + 1} bytes"):
        load(write_image(image()), memory, Recorder(b"\0" * (FDT_MAX_SIZE + 1)))
    assert untouched(memory)


def test_error_pickles_with_path_and_problem(make_memory, write_image) -> None:
    import pickle

    memory = make_memory((BASE, RAM))
    with pytest.raises(ImageError) as caught:
        load(write_image(b"\x00" * 100), memory)
    copy = pickle.loads(pickle.dumps(caught.value))
    assert (copy.path, copy.problem) == (caught.value.path, caught.value.problem)


def test_header_layout_matches_booting_rst() -> None:
    # magic at 0x38, text_offset at 8, image_size at 16, flags at 24: 64 bytes in all.
    packed = HEADER.pack(1, 2, 3, 4, 5, 6, 7, 8, ARM64_MAGIC, 9)
    assert len(packed) == 64
    assert packed[0x38:0x3C] == b"ARM\x64"
    assert struct.unpack_from("<QQQ", packed, 8) == (3, 4, 5)
