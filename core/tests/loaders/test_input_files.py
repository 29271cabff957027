"""Bounded input for the loaders and the machine file (issue 10, item 7): a FIFO
is never waited on, a device or directory never read, a file never read past
its limit; an ELF with 65,534 segments loads in well under a second."""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from loader_images import MiB, Seg, build_elf

from pyvmm.config import InputFileError, MemoryRegionSpec, check_input_file, read_input_file
from pyvmm.errors import ConfigError
from pyvmm.machine.config import read_machine_file
from pyvmm.machine.loaders import ImageError, load_arm64_kernel, load_kernel
from pyvmm.machine.loaders.arm64 import load_arm64_bytes
from pyvmm.machine.loaders.common import Item, Layout, RamMap
from pyvmm.memory import GuestMemory

RAM = 64 * MiB


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    memory = GuestMemory()
    memory.insert(memory.allocate(MemoryRegionSpec(guest_phys_addr=0, size=RAM)))
    yield memory
    memory.close()


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    # If the code under test opened it for reading and blocks, a writer would
    # release it; the test then fails on time instead of hanging the suite.
    stop = threading.Event()

    def release() -> None:
        if not stop.wait(20):
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
            os.close(fd)

    threading.Thread(target=release, daemon=True).start()
    yield path
    stop.set()


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory", "missing", "too-large"])
def test_read_input_file_refuses_before_reading(tmp_path: Path, fifo: Path, kind: str) -> None:
    big = tmp_path / "big"
    big.write_bytes(bytes(4097))
    path: dict[str, Path | str] = {
        "fifo": fifo,
        "dev-zero": "/dev/zero",
        "directory": tmp_path,
        "missing": tmp_path / "no",
        "too-large": big,
    }
    expected = {
        "fifo": "kernel is a FIFO (named pipe), not a regular file",
        "dev-zero": "kernel is a character device, not a regular file",
        "directory": "kernel is a directory, not a regular file",
        "missing": "kernel file does not exist",
        "too-large": "kernel is 4097 bytes: it does not fit in 4 KiB (4 KiB)",
    }
    started = time.monotonic()
    with pytest.raises(InputFileError) as info:
        read_input_file(path[kind], what="kernel", limit=4096, why="it does not fit in 4 KiB ({limit})")
    assert time.monotonic() - started < 5
    assert info.value.problem == expected[kind]
    assert isinstance(info.value, ConfigError)


def test_read_input_file_reads_exactly_the_file(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_bytes(bytes(range(256)) * 17)
    assert read_input_file(path, what="kernel", limit=256 * 17, why="{limit}") == bytes(range(256)) * 17
    assert check_input_file(path, what="kernel", limit=1 << 20, why="{limit}") == 256 * 17


def test_a_file_whose_size_lies_is_read_only_up_to_the_limit() -> None:
    """/proc files say 0 bytes and have more: the read stops at limit + 1."""
    with pytest.raises(InputFileError, match="is over 16 bytes"):
        read_input_file("/proc/self/maps", what="kernel", limit=16, why="{limit}")


@pytest.mark.parametrize("what", ["kernel", "initrd"])
@pytest.mark.parametrize("target", ["fifo", "/dev/zero"])
def test_loaders_never_block_on_or_read_a_special_file(
    memory: GuestMemory, tmp_path: Path, fifo: Path, what: str, target: str
) -> None:
    special = fifo if target == "fifo" else Path(target)
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(build_elf(64, [Seg(0x20_0000, b"\xf4")], 0x20_0000))
    started = time.monotonic()
    with pytest.raises(ImageError, match=f"{what} is a"):
        if what == "kernel":
            load_kernel(special, memory, ram_size=RAM, cpus=1)
        else:
            load_arm64_kernel(
                kernel, memory, ram_size=RAM, device_tree=lambda chosen: b"", initrd=special, load_address=0x20_0000
            )
    assert time.monotonic() - started < 5
    assert memory.read(0, 0x40_0000) == bytes(0x40_0000)


def test_an_initrd_larger_than_guest_ram_is_not_read(memory: GuestMemory, tmp_path: Path) -> None:
    kernel = tmp_path / "k.flat"
    kernel.write_bytes(b"\xf4")
    initrd = tmp_path / "initrd"
    with initrd.open("wb") as file:
        file.truncate(1 << 40)
    with pytest.raises(ImageError, match=r"initrd is 1024 GiB: it does not fit in guest RAM \(64 MiB\)"):
        load_arm64_kernel(kernel, memory, ram_size=RAM, device_tree=lambda chosen: b"", initrd=initrd, load_address=0)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "too-large", "nested"])
def test_machine_file_is_bounded(tmp_path: Path, fifo: Path, kind: str) -> None:
    path = {"fifo": fifo, "dev-zero": Path("/dev/zero")}.get(kind, tmp_path / "m.toml")
    if kind == "too-large":
        path.write_bytes(b"#" * ((1 << 20) + 1))
    elif kind == "nested":
        path.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    started = time.monotonic()
    with pytest.raises(ConfigError, match=rf"{path}: (cannot read the machine file|not a valid TOML)"):
        read_machine_file(path)
    assert time.monotonic() - started < 5


def _many_segments(count: int) -> bytes:
    """An ELF64 with ``count`` one-page PT_LOAD segments, built in linear time."""
    header_size, phdr_size = 64, 56
    data_at = (header_size + count * phdr_size + 0xFFF) & ~0xFFF
    ident = b"\x7fELF\x02\x01\x01" + bytes(9)
    header = struct.pack(
        "<16sHHIQQQIHHHHHH", ident, 2, 62, 1, 0x10_0000, header_size, 0, 0, header_size, phdr_size, count, 64, 0, 0
    )
    phdrs = b"".join(
        struct.pack("<IIQQQQQQ", 1, 7, data_at, 0x10_0000 + i * 16, 0x10_0000 + i * 16, 16, 16, 16)
        for i in range(count)
    )
    return header + phdrs + bytes(data_at - header_size - len(phdrs)) + b"\xf4" * 16


def test_an_elf_with_65534_segments_loads_in_n_log_n(memory: GuestMemory, tmp_path: Path) -> None:
    """Was quadratic (each segment checked against every earlier one): 65,534
    segments took over 120 s.  Now well under a second here; the bound leaves a
    slow CI machine a wide margin and still fails the quadratic version."""
    kernel = tmp_path / "many.elf"
    kernel.write_bytes(_many_segments(65534))
    started = time.monotonic()
    loaded = load_kernel(kernel, memory, ram_size=RAM, cpus=1)
    elapsed = time.monotonic() - started
    assert elapsed < 20, f"{elapsed:.1f} s"
    assert loaded.extents[0] == (0x10_0000, 0x10_0000 + 65534 * 16)


def test_overlapping_segments_in_one_batch_are_still_refused(memory: GuestMemory) -> None:
    ram = RamMap(memory, RAM, 1, Path("k"))
    layout = Layout(Path("k"), ram)
    layout.reserve(0x1000, 0x1000, "boot tables")
    items = [Item(0x30_0000, 0x100, "ELF segment 0", data=bytes(0x100)), Item(0x20_0000, 0x100_001, "ELF segment 1")]
    with pytest.raises(ImageError, match=r"ELF segment 1 \(0x200000..0x300001\) overlaps ELF segment 0"):
        layout.add_many(items)
    with pytest.raises(ImageError, match=r"ELF segment 0 \(0x1800..0x1900\) overlaps boot tables"):
        layout.add_many([Item(0x1800, 0x100, "ELF segment 0")])
    assert len(layout.items) == 1  # nothing of a refused batch was added
    layout.add_many([Item(0x2000, 0x100, "a"), Item(0x2100, 0, "empty"), Item(0x2100, 0x100, "b")])
    assert layout.image_end() == 0x2200
    with pytest.raises(ImageError, match="empty"):
        layout.add_many([Item(0x2050, 0, "empty")])


def test_an_empty_aarch64_image_is_refused(memory: GuestMemory) -> None:
    """Found by the fuzz suite: an empty flat image wrote nothing, so nothing
    checked its entry point, and a load_address outside RAM was accepted."""
    with pytest.raises(ImageError, match="the image is empty"):
        load_arm64_bytes("empty", b"", memory, ram_size=RAM, device_tree=lambda chosen: b"", load_address=RAM + 0x1000)
