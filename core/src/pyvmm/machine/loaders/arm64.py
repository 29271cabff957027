"""aarch64 kernels: the Linux arm64 ``Image`` and flat binaries, with an initrd and
the device tree.

The arm64 boot protocol (``Documentation/arch/arm64/booting.rst``) has one
structure the loader must place: the device tree blob, whose address the boot
vCPU gets in X0 and which carries the command line and the initrd's place in
``/chosen``.  The tree is therefore built *during* the load, by the
``device_tree`` callable the board passes, once the initrd's address is known.

Placement in RAM (one range, starting 2 MiB-aligned):

* the kernel: an ``Image`` at RAM base + its ``text_offset``; a flat binary at
  ``load_address``;
* the initrd: page-aligned right after the kernel's ``image_size`` (which covers
  its bss and early page tables);
* the device tree: at the start of the last 2 MiB-aligned 2 MiB window of RAM,
  the window reserved whole.  The blob may not exceed 2 MiB, may not share a
  2 MiB block with memory mapped otherwise, and a hypervisor that owns the boot
  context may need it in the region of the payload (crosvm's ``init_arch``
  checks the same), which one RAM range gives.  The boot spec's ``fdt_size`` is
  the window: room the hypervisor may extend the tree into (a resource manager
  may add an overlay).

As with the x86 loaders, everything is checked before a byte is written; a
problem raises :class:`ImageError` naming the file.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyvmm.boot import BootSpec
from pyvmm.config import PAGE_SIZE, Arch
from pyvmm.errors import ConfigError
from pyvmm.machine.loaders.common import (
    ImageError,
    Layout,
    LoadedKernel,
    RamMap,
    align_down,
    align_up,
    finish,
    read_file,
    read_initrd,
    utf8_cmdline,
)
from pyvmm.memory import GuestMemory
from pyvmm.records import RecordError

ARM64_MAGIC = 0x644D5241  # "ARM\x64" little-endian, at offset 0x38
#: A gzip stream: how distributions often ship the arm64 kernel (Image.gz).
GZIP_MAGIC = b"\x1f\x8b"
#: code0, code1, text_offset, image_size, flags, res2, res3, res4, magic, res5
HEADER = struct.Struct("<IIQQQQQQII")
#: ``text_offset`` of kernels before 3.17, whose header has image_size 0.
LEGACY_TEXT_OFFSET = 0x8_0000
IMAGE_ALIGN = 2 << 20
FLAG_BIG_ENDIAN = 1 << 0
#: The largest device tree the arm64 boot protocol allows.
FDT_MAX_SIZE = 2 << 20
#: The Linux limit on the command line of arm64 (COMMAND_LINE_SIZE).
CMDLINE_MAX = 2047


@dataclass(frozen=True)
class Chosen:
    """What the loader tells the device tree's ``/chosen``: the command line and
    where the initrd went (``start``, ``end``)."""

    bootargs: str = ""
    initrd: tuple[int, int] | None = None


#: Builds the device tree once the loader knows what ``/chosen`` says.
DeviceTreeBuilder = Callable[[Chosen], bytes]


@dataclass(frozen=True)
class Arm64Header:
    text_offset: int
    image_size: int
    flags: int


def parse_image_header(path: Path, data: bytes) -> Arm64Header | None:
    """The arm64 Image header, or None if ``data`` has no ``ARM\\x64`` magic."""
    if len(data) < HEADER.size:
        return None
    fields = HEADER.unpack_from(data)
    if fields[8] != ARM64_MAGIC:
        return None
    text_offset, image_size, flags = fields[2], fields[3], fields[4]
    if image_size == 0:
        # Before 3.17: text_offset was always 0x80000 and image_size unknown.
        return Arm64Header(LEGACY_TEXT_OFFSET, len(data), 0)
    if flags & FLAG_BIG_ENDIAN:
        raise ImageError(path, "a big-endian arm64 Image (header flags bit 0): pyvmm boots little-endian guests")
    if text_offset % PAGE_SIZE or text_offset >= IMAGE_ALIGN:
        raise ImageError(path, f"arm64 Image header: text_offset {text_offset:#x} is not a page offset into 2 MiB")
    if image_size < len(data):
        raise ImageError(
            path, f"arm64 Image header: image_size {image_size:#x} is smaller than the file ({len(data):#x} bytes)"
        )
    return Arm64Header(text_offset, image_size, flags)


def is_arm64_image(data: bytes) -> bool:
    return len(data) >= HEADER.size and HEADER.unpack_from(data)[8] == ARM64_MAGIC


def fdt_window(ram: RamMap) -> tuple[int, int]:
    """``(address, size)`` kept for the device tree: the last 2 MiB-aligned 2 MiB of RAM."""
    start, end = ram.ranges[-1]
    address = align_down(end - FDT_MAX_SIZE, IMAGE_ALIGN)
    if address < start:
        raise ImageError(ram.path, f"guest RAM ({ram.describe()}) has no 2 MiB-aligned 2 MiB for the device tree")
    return address, FDT_MAX_SIZE


def load_arm64_kernel(
    path: Path,
    memory: GuestMemory,
    *,
    ram_size: int,
    device_tree: DeviceTreeBuilder,
    cmdline: str = "",
    initrd: Path | None = None,
    load_address: int | None = None,
) -> LoadedKernel:
    """Load an arm64 ``Image`` (or, with ``load_address``, a flat binary) at
    ``path``, its initrd and the device tree ``device_tree`` builds."""
    path = Path(path)
    data = read_file(path, limit=max(ram_size, 0))
    if not data:
        raise ImageError(path, "kernel file is empty")
    return load_arm64_bytes(
        path,
        data,
        memory,
        ram_size=ram_size,
        device_tree=device_tree,
        cmdline=cmdline,
        initrd=initrd,
        load_address=load_address,
    )


def load_arm64_bytes(
    path: Path | str,
    data: bytes,
    memory: GuestMemory,
    *,
    ram_size: int,
    device_tree: DeviceTreeBuilder,
    cmdline: str = "",
    initrd: Path | None = None,
    load_address: int | None = None,
) -> LoadedKernel:
    """:func:`load_arm64_kernel` for an image already in memory (``path`` names it
    in errors): the bundled demo guest, test programs."""
    path = Path(path)
    if not data:
        # Nothing to write means nothing checks that the entry lies in RAM.
        raise ImageError(path, "the image is empty")
    ram = RamMap(memory, ram_size, 1, path)
    if len(ram.ranges) != 1:
        raise ImageError(path, f"the aarch64 loader needs guest RAM in one range, not {ram.describe()}")
    header = parse_image_header(path, data)
    if header is not None and load_address is not None:
        raise ImageError(path, "load_address applies to flat binaries only; this is an arm64 Image")
    if header is None and load_address is None:
        if data[:2] == GZIP_MAGIC:
            # What a bootloader unpacks for the kernel (Image.gz); the boot protocol starts only the Image.
            raise ImageError(path, "a gzip-compressed kernel (Image.gz): unpack it first (zcat); pyvmm boots the Image")
        what = "an ELF file" if data[:4] == b"\x7fELF" else "not an arm64 Image (no ARM\\x64 magic at 0x38)"
        raise ImageError(path, f"{what}; give load_address to load it as a flat binary")
    raw_cmdline = utf8_cmdline(path, cmdline)
    if b"\0" in raw_cmdline:
        raise ImageError(path, "the command line contains a NUL character")
    if len(raw_cmdline) > CMDLINE_MAX:
        raise ImageError(
            path, f"the command line is {len(raw_cmdline)} bytes; arm64 Linux accepts at most {CMDLINE_MAX}"
        )

    layout = Layout(path, ram)
    ram_start, ram_end = ram.ranges[0]
    window_address, window_size = fdt_window(ram)
    window = layout.reserve(window_address, window_size, "device tree window")
    if header is not None:
        if ram_start % IMAGE_ALIGN:
            raise ImageError(path, f"guest RAM starts at {ram_start:#x}, not 2 MiB-aligned as an arm64 Image needs")
        entry = ram_start + header.text_offset
        kind = "arm64 Image"
        layout.write(entry, data, "arm64 Image")
        if header.image_size > len(data):
            layout.reserve(entry + len(data), header.image_size - len(data), "arm64 Image bss")
        kernel_end = entry + header.image_size
    else:
        assert load_address is not None
        if load_address % 4:
            raise ImageError(path, f"load_address {load_address:#x} is not 4-byte aligned (A64 instructions)")
        entry = load_address
        kind = "flat"
        layout.write(entry, data, "flat binary")
        kernel_end = entry + len(data)

    initrd_range: tuple[int, int] | None = None
    if initrd is not None:
        initrd_data = read_initrd(path, Path(initrd), limit=ram.ram_size)
        # After the kernel, as bootloaders do; anywhere else in RAM if it does not fit there.
        start = layout.find(len(initrd_data), lo=align_up(kernel_end, PAGE_SIZE), hi=ram_end)
        if start is None:
            start = layout.find(len(initrd_data), lo=ram_start, hi=ram_end)
        if start is None:
            raise layout.fail(
                f"no room for the initrd ({len(initrd_data):#x} bytes) in guest RAM "
                f"(RAM: {ram.describe()}; in use: {layout.describe_items()})"
            )
        layout.write(start, initrd_data, f"initrd {initrd}")
        initrd_range = (start, start + len(initrd_data))

    try:
        blob = device_tree(Chosen(bootargs=cmdline, initrd=initrd_range))
    except ConfigError as exc:
        raise ImageError(path, f"cannot build the device tree: {exc}") from None
    if len(blob) > window_size:
        raise ImageError(path, f"the device tree is {len(blob)} bytes; at most {window_size} fit")
    window.data = blob
    try:
        boot = BootSpec(arch=Arch.AARCH64, entry=entry, fdt_address=window_address, fdt_size=window_size)
    except RecordError as exc:
        raise ImageError(path, f"cannot start it: {exc}") from None
    return finish(layout, memory, boot, kind)
