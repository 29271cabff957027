"""Fuzz every kernel loader with mutated images (hypothesis; see fuzz_support for
the CI budget and ``PYVMM_FUZZ=long``).

Each property feeds a loader an image built by ``loader_images`` and then mutated
(bytes flipped, header fields overwritten with boundary values, the file cut or
extended), with a random command line and initrd, and checks the loader's
contract:

* the only exception is :class:`ImageError`, and when it is raised guest RAM is
  still all zeros (everything is validated before the first write);
* when the load succeeds, every byte it changed lies inside the ranges it reports
  (``LoadedKernel.extents``), those ranges lie in guest RAM, and the boot spec's
  entry lies in guest RAM too.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import fuzz_support  # noqa: F401 - selects the hypothesis profile
import pytest
from hypothesis import given
from hypothesis import strategies as st
from loader_images import MiB, Seg, build_bzimage, build_elf, multiboot_elf, multiboot_header, note

from pyvmm.config import MemoryRegionSpec
from pyvmm.machine.loaders import ImageError, LoadedKernel, load_kernel
from pyvmm.machine.loaders.arm64 import ARM64_MAGIC, HEADER, Chosen, load_arm64_bytes
from pyvmm.memory import GuestMemory

#: Small, so that checking every byte after each load stays cheap.
X86_RAM = 8 * MiB
ARM_BASE = 0x4000_0000
ARM_RAM = 8 * MiB

#: Values that sit on the edges loaders check: zero, one, sign bits, all ones,
#: and the edges of this test's RAM.
BOUNDARY = [
    0, 1, 2, 0xFF, 0x100, 0xFFFF, 0x1_0000, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 0x1_0000_0000,
    0x7FFF_FFFF_FFFF_FFFF, 0x8000_0000_0000_0000, 0xFFFF_FFFF_FFFF_FFFF, 0x10_0000, X86_RAM, X86_RAM - 1,
    ARM_BASE, ARM_BASE + ARM_RAM, 0xFFFF_FFFF_8000_0000,
]  # fmt: skip
#: Command lines: empty, ordinary, long, with a NUL, not encodable (a non-UTF-8 argv byte).
CMDLINES = ["", "console=ttyS0 quiet", "x" * 5000, "a\0b", "bad\udcffbyte"]


def _pvh_image() -> bytes:
    high = 0xFFFF_FFFF_8000_0000
    segments = [Seg(0x20_0000, b"\x90" * 0x100, vaddr=high + 0x20_0000), Seg(0x30_0000, b"d", memsz=0x1000)]
    notes = note("GNU", 3, b"id") + note("Xen", 18, struct.pack("<Q", 0x20_0040))
    return build_elf(64, segments, entry=0x20_0000, notes=notes)


def _kludge_image() -> bytes:
    head = multiboot_header(1 << 16, (0x10_0000, 0x10_0000, 0, 0x10_4000, 0x10_0020))
    return head + b"\x90" * 0x200


def _arm64_image() -> bytes:
    code = b"\x1f\x20\x03\xd5" * 64
    return HEADER.pack(0x14000010, 0, 0x8_0000, 0x2_0000, 0b1010, 0, 0, 0, ARM64_MAGIC, 0) + code


#: Seed images per loader, and how far into the file its headers go (mutations
#: favour those bytes: that is where the loaders' decisions are).
SEEDS: dict[str, tuple[list[bytes], int]] = {
    "flat": ([b"\x90" * 64 + b"\xf4", bytes(range(256)) * 16], 64),
    "elf": ([build_elf(64, [Seg(0x20_0000, b"\x90" * 64), Seg(0x30_0000, b"D", memsz=0x2000)], 0x20_0000),
             build_elf(32, [Seg(0x20_0000, b"\xf4" * 16)], 0x20_0000)], 0xC0),
    "multiboot": ([multiboot_elf(), _kludge_image()], 0x100),
    "bzimage": ([build_bzimage(pref_address=0x10_0000), build_bzimage(xloadflags=0, version=0x0206)], 0x300),
    "pvh": ([_pvh_image()], 0x180),
    "arm64": ([_arm64_image()], 0x40),
}  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn, kind: str) -> bytes:
    """A seed image of ``kind`` with up to 8 mutations."""
    seeds, hot = SEEDS[kind]
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 8))):
        if not data:
            break
        where = draw(st.integers(0, min(hot, len(data)) - 1) | st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["byte", "u16", "u32", "u64", "cut", "grow"]))
        if action == "byte":
            data[where] = draw(st.integers(0, 255))
        elif action == "cut":
            del data[where:]
        elif action == "grow":
            data += draw(st.binary(max_size=512))
        else:
            size = {"u16": 2, "u32": 4, "u64": 8}[action]
            value = draw(st.sampled_from(BOUNDARY) | st.integers(0, (1 << (8 * size)) - 1)) & ((1 << (8 * size)) - 1)
            data[where : where + size] = value.to_bytes(size, "little")[: len(data) - where]
    return bytes(data)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str, bytes | None], Path]]:
    """``files(name, data)`` -> a path holding ``data`` (``None``: a FIFO)."""
    root = tmp_path_factory.mktemp("fuzz-loaders")

    def make(name: str, data: bytes | None) -> Path:
        path = root / name
        if path.exists() or path.is_symlink():
            path.unlink()
        if data is None:
            os.mkfifo(path)
        else:
            path.write_bytes(data)
        return path

    yield make


def _memory(base: int, size: int) -> GuestMemory:
    memory = GuestMemory()
    memory.insert(memory.allocate(MemoryRegionSpec(guest_phys_addr=base, size=size)))
    return memory


def _changed_outside(memory: GuestMemory, extents: list[tuple[int, int]]) -> list[int]:
    """Addresses of the non-zero bytes outside ``extents`` (the first few)."""
    found: list[int] = []
    for region in memory:
        buf = bytearray(region.view())
        for start, end in extents:
            lo, hi = max(start, region.guest_phys_addr), min(end, region.end)
            if lo < hi:
                buf[lo - region.guest_phys_addr : hi - region.guest_phys_addr] = bytes(hi - lo)
        if buf.count(0) != len(buf):
            found += [region.guest_phys_addr + i for i, byte in enumerate(buf) if byte][:8]
    return found


def _check_contract(memory: GuestMemory, load: Callable[[], LoadedKernel], base: int, size: int) -> None:
    try:
        loaded = load()
    except ImageError:
        assert _changed_outside(memory, []) == [], "a refused image wrote guest RAM"
        return
    for start, end in loaded.extents:
        assert base <= start < end <= base + size, f"reported extent {start:#x}..{end:#x} is outside guest RAM"
    assert _changed_outside(memory, loaded.extents) == [], "bytes changed outside the reported extents"
    assert base <= loaded.boot.entry < base + size, f"entry {loaded.boot.entry:#x} is outside guest RAM"


@st.composite
def extras(draw: st.DrawFn) -> tuple[str, bytes | bool | None]:
    """A command line and an initrd: bytes, a FIFO (None), or no initrd (False)."""
    cmdline = draw(st.sampled_from(CMDLINES) | st.text(max_size=64))
    initrd = draw(st.just(False) | st.none() | st.binary(max_size=4096))
    return cmdline, initrd


def _x86_property(kind: str, files: Callable[[str, bytes | None], Path], data: bytes, more: tuple[str, object]) -> None:
    cmdline, initrd = more
    initrd_path = files("initrd", initrd) if initrd is not False else None  # type: ignore[arg-type]
    memory = _memory(0, X86_RAM)
    try:
        _check_contract(
            memory,
            lambda: load_kernel(
                files("kernel", data), memory, cmdline=cmdline, initrd=initrd_path, ram_size=X86_RAM, cpus=1
            ),
            0,
            X86_RAM,
        )
    finally:
        memory.close()


@given(data=mutated("elf"), more=extras())
def test_fuzz_elf(files: Callable[[str, bytes | None], Path], data: bytes, more: tuple[str, object]) -> None:
    _x86_property("elf", files, data, more)


@given(data=mutated("multiboot"), more=extras())
def test_fuzz_multiboot(files: Callable[[str, bytes | None], Path], data: bytes, more: tuple[str, object]) -> None:
    _x86_property("multiboot", files, data, more)


@given(data=mutated("bzimage"), more=extras())
def test_fuzz_bzimage(files: Callable[[str, bytes | None], Path], data: bytes, more: tuple[str, object]) -> None:
    _x86_property("bzimage", files, data, more)


@given(data=mutated("pvh"), more=extras())
def test_fuzz_pvh(files: Callable[[str, bytes | None], Path], data: bytes, more: tuple[str, object]) -> None:
    _x86_property("pvh", files, data, more)


@given(
    data=mutated("flat") | st.binary(max_size=2048),
    address=st.sampled_from(BOUNDARY) | st.integers(-(1 << 70), 1 << 70),
    more=extras(),
)
def test_fuzz_flat(
    files: Callable[[str, bytes | None], Path], data: bytes, address: int, more: tuple[str, object]
) -> None:
    cmdline, initrd = more
    initrd_path = files("initrd", initrd) if initrd is not False else None  # type: ignore[arg-type]
    memory = _memory(0, X86_RAM)
    try:
        kernel = files("kernel", data)
        _check_contract(
            memory,
            lambda: load_kernel(
                kernel, memory, cmdline=cmdline, initrd=initrd_path, ram_size=X86_RAM, cpus=1, load_address=address
            ),
            0,
            X86_RAM,
        )
    finally:
        memory.close()


@given(
    data=mutated("arm64") | mutated("flat"),
    address=st.none() | st.sampled_from(BOUNDARY) | st.integers(ARM_BASE, ARM_BASE + ARM_RAM),
    more=extras(),
    tree=st.binary(min_size=0, max_size=64) | st.just(bytes(3 << 20)),
)
def test_fuzz_arm64(
    files: Callable[[str, bytes | None], Path], data: bytes, address: int | None, more: tuple[str, object], tree: bytes
) -> None:
    cmdline, initrd = more
    initrd_path = files("initrd", initrd) if initrd is not False else None  # type: ignore[arg-type]

    def device_tree(chosen: Chosen) -> bytes:
        return tree

    memory = _memory(ARM_BASE, ARM_RAM)
    try:
        _check_contract(
            memory,
            lambda: load_arm64_bytes(
                "fuzzed",
                data,
                memory,
                ram_size=ARM_RAM,
                device_tree=device_tree,
                cmdline=cmdline,
                initrd=initrd_path,
                load_address=address,
            ),
            ARM_BASE,
            ARM_RAM,
        )
    finally:
        memory.close()


def test_the_mutator_makes_images_the_loaders_accept_and_refuse(files: Callable[[str, bytes | None], Path]) -> None:
    """The seeds load as they are (so mutations start from valid images), and the
    contract check catches a loader that writes before refusing."""
    for kind in ("elf", "multiboot", "bzimage", "pvh"):
        for seed in SEEDS[kind][0]:
            memory = _memory(0, X86_RAM)
            try:
                loaded = load_kernel(files("kernel", seed), memory, ram_size=X86_RAM, cpus=1)
                assert loaded.extents
            finally:
                memory.close()
    memory = _memory(0, X86_RAM)
    try:

        def writes_then_refuses() -> LoadedKernel:
            memory.write(0x5000, b"x")
            raise ImageError("k", "refused after writing")

        with pytest.raises(AssertionError, match="wrote guest RAM"):
            _check_contract(memory, writes_then_refuses, 0, X86_RAM)
    finally:
        memory.close()
