"""Multiboot v1: ELF images (kvm-unit-tests' ``.flat`` files) and a.out-kludge images.

Layout (addresses for an image above 1 MiB; each piece takes the lowest free place
that avoids page 0, the image and what was placed before it):

* boot GDT: one page at 0x1000 (the vCPU starts in 32-bit protected mode);
* info block at 0x2000: the Multiboot information structure, then the memory map,
  the module list and the strings (command line, module name, loader name);
* the initrd, as module 0: page-aligned, just above both 1 MiB and the image.

QEMU puts its MBI at 0x9500; realmode.flat is linked over that (0x8000..0xda30),
so fixed addresses do not work for every image.

The command line starts with the kernel's file name: kvm-unit-tests (like most
multiboot kernels) treats the first word as argv[0], and QEMU passes
"<kernel> <-append text>".
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from pyvmm.boot import X86Mode
from pyvmm.config import PAGE_SIZE
from pyvmm.machine.loaders.common import (
    FOUR_GIB,
    LOW_STRUCTS_END,
    LOW_STRUCTS_START,
    ImageError,
    KiB,
    Layout,
    LoadedKernel,
    MiB,
    Request,
    align_up,
    boot_spec,
    encode_cmdline,
    file_name_bytes,
    finish,
    read_initrd,
)
from pyvmm.machine.loaders.elf import add_segments, is_elf, parse_elf, physical_entry

MULTIBOOT_MAGIC = 0x1BADB002
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002
HEADER_SEARCH_LIMIT = 8192

HEADER_PAGE_ALIGN = 1 << 0
HEADER_MEMORY_INFO = 1 << 1
HEADER_VIDEO_MODE = 1 << 2
HEADER_AOUT_KLUDGE = 1 << 16
#: Bits 0-15 are requirements: a loader must refuse an image that asks for one it
#: does not know.  Video mode (bit 2) is known but not provided, as in QEMU: a
#: headless VMM has no framebuffer to describe.
_REQUIRED_KNOWN = HEADER_PAGE_ALIGN | HEADER_MEMORY_INFO | HEADER_VIDEO_MODE

INFO_MEMORY = 1 << 0
INFO_CMDLINE = 1 << 2
INFO_MODS = 1 << 3
INFO_MMAP = 1 << 6
INFO_LOADER_NAME = 1 << 9

#: The MBI with the framebuffer fields of spec 0.6.96 is 116 bytes.
MBI_SIZE = 0x80
MMAP_ENTRY_SIZE = 24
MODULE_ENTRY_SIZE = 16
#: Multiboot sets no limit; pyvmm keeps the boot structures small.
CMDLINE_MAX = 4095
LOADER_NAME = b"pyvmm\0"

# MBI field offsets
_FLAGS, _MEM_LOWER, _MEM_UPPER, _CMDLINE, _MODS_COUNT, _MODS_ADDR = 0, 4, 8, 16, 20, 24
_MMAP_LENGTH, _MMAP_ADDR, _LOADER_NAME = 44, 48, 64


@dataclass(frozen=True)
class MultibootHeader:
    offset: int
    flags: int


def find_header(data: bytes) -> MultibootHeader | None:
    """The first 4-byte-aligned header in the first 8 KiB whose checksum is right."""
    magic = struct.pack("<I", MULTIBOOT_MAGIC)
    pos = data.find(magic, 0, HEADER_SEARCH_LIMIT)
    while pos != -1:
        if pos % 4 == 0 and pos + 12 <= len(data):
            _, flags, checksum = struct.unpack_from("<III", data, pos)
            if (MULTIBOOT_MAGIC + flags + checksum) & 0xFFFFFFFF == 0:
                return MultibootHeader(pos, flags)
        pos = data.find(magic, pos + 1, HEADER_SEARCH_LIMIT)
    return None


def program_name(request: Request) -> str:
    # argv is split on blanks, so a blank in the file name would shift every argument.
    # A file name that is not UTF-8 (lone surrogates here) would make the command
    # line unencodable: its undecodable bytes become U+FFFD.
    name = file_name_bytes(request.path).decode("utf-8", "replace")
    return re.sub(r"\s", "_", name) or "kernel"


def load_multiboot(request: Request, header: MultibootHeader) -> LoadedKernel:
    path, data, ram = request.path, request.data, request.ram
    unknown = header.flags & 0xFFFF & ~_REQUIRED_KNOWN
    if unknown:
        raise ImageError(path, f"Multiboot header requires features pyvmm does not provide (flags {unknown:#x})")
    ram.require_low_memory("Multiboot")
    layout = Layout(path, ram)
    if header.flags & HEADER_AOUT_KLUDGE:
        entry = _load_kludge(layout, data, header)
    else:
        if not is_elf(data):
            raise ImageError(
                path, "Multiboot header has no load addresses (flag 16 clear) and the file is not an ELF image"
            )
        image = parse_elf(path, data)
        add_segments(layout, image, data)
        entry = physical_entry(path, image, image.entry)
    if entry >= FOUR_GIB:
        raise ImageError(path, f"entry point {entry:#x} is above 4 GiB; Multiboot starts in 32-bit mode")

    argv0 = program_name(request)
    cmdline = encode_cmdline(path, f"{argv0} {request.cmdline}" if request.cmdline else argv0, CMDLINE_MAX, "Multiboot")
    initrd = read_initrd(path, request.initrd, limit=ram.ram_size) if request.initrd is not None else None
    module_name = (file_name_bytes(request.initrd) + b"\0") if request.initrd is not None else b""
    memory_map = ram.e820()

    mmap_offset = MBI_SIZE
    mods_offset = align_up(mmap_offset + len(memory_map) * MMAP_ENTRY_SIZE, 16)
    cmdline_offset = mods_offset + (MODULE_ENTRY_SIZE if initrd is not None else 0)
    module_name_offset = cmdline_offset + len(cmdline)
    loader_name_offset = module_name_offset + len(module_name)
    block_size = loader_name_offset + len(LOADER_NAME)

    tables = layout.boot_tables(long_mode=False)
    block = layout.allocate(block_size, "Multiboot information", lo=LOW_STRUCTS_START, hi=LOW_STRUCTS_END)
    mbi = block.start
    module = None
    if initrd is not None:
        module = layout.allocate(
            len(initrd),
            f"initrd {request.initrd}",
            lo=align_up(max(MiB, layout.image_end()), PAGE_SIZE),
            hi=FOUR_GIB,
        )
        module.data = initrd

    info = bytearray(block_size)
    flags = INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_MMAP | INFO_LOADER_NAME
    struct.pack_into("<I", info, _FLAGS, flags)
    struct.pack_into("<I", info, _MEM_LOWER, 640)
    upper = ram.range_containing(MiB, MiB + 1)
    mem_upper = (min(upper[1], FOUR_GIB) - MiB) // KiB if upper else 0
    struct.pack_into("<I", info, _MEM_UPPER, mem_upper)
    struct.pack_into("<I", info, _CMDLINE, mbi + cmdline_offset)
    struct.pack_into("<II", info, _MMAP_LENGTH, len(memory_map) * MMAP_ENTRY_SIZE, mbi + mmap_offset)
    struct.pack_into("<I", info, _LOADER_NAME, mbi + loader_name_offset)
    for index, (base, length, kind) in enumerate(memory_map):
        # ``size`` counts the bytes after itself.
        struct.pack_into("<IQQI", info, mmap_offset + index * MMAP_ENTRY_SIZE, 20, base, length, kind)
    if module is not None:
        struct.pack_into("<II", info, _MODS_COUNT, 1, mbi + mods_offset)
        entry_fields = (module.start, module.end, mbi + module_name_offset, 0)
        struct.pack_into("<IIII", info, mods_offset, *entry_fields)
        info[module_name_offset:loader_name_offset] = module_name
    info[cmdline_offset:module_name_offset] = cmdline
    info[loader_name_offset:block_size] = LOADER_NAME
    block.data = bytes(info)

    registers = {"rax": MULTIBOOT_BOOTLOADER_MAGIC, "rbx": mbi}
    spec = boot_spec(path, entry, X86Mode.PROTECTED, tables, registers)
    return finish(layout, request.memory, spec, "multiboot")


def _load_kludge(layout: Layout, data: bytes, header: MultibootHeader) -> int:
    """Load by the header's address fields (flag 16); returns the entry point."""
    path = layout.path
    if header.offset + 32 > len(data):
        raise ImageError(path, "truncated Multiboot header: flag 16 needs the address fields")
    fields: tuple[int, int, int, int, int] = struct.unpack_from("<5I", data, header.offset + 12)
    header_addr, load_addr, load_end, bss_end, entry = fields
    if load_addr > header_addr:
        raise ImageError(path, f"Multiboot load_addr {load_addr:#x} is above header_addr {header_addr:#x}")
    file_start = header.offset - (header_addr - load_addr)
    if file_start < 0:
        raise ImageError(path, "Multiboot header_addr/load_addr put the image start before the start of the file")
    if load_end == 0:
        load_size = len(data) - file_start
    elif load_end < load_addr:
        raise ImageError(path, f"Multiboot load_end_addr {load_end:#x} is below load_addr {load_addr:#x}")
    else:
        load_size = load_end - load_addr
    if file_start + load_size > len(data):
        raise ImageError(
            path,
            f"Multiboot load range ({load_size:#x} bytes from offset {file_start:#x}) runs past the end of the file "
            f"({len(data)} bytes)",
        )
    image_end = load_addr + load_size
    if bss_end and bss_end < image_end:
        raise ImageError(path, f"Multiboot bss_end_addr {bss_end:#x} is below the end of the image {image_end:#x}")
    layout.write(load_addr, memoryview(data)[file_start : file_start + load_size], "Multiboot image")
    if bss_end > image_end:
        layout.zero(image_end, bss_end - image_end, "Multiboot image bss")
    if not load_addr <= entry < max(image_end, bss_end):
        raise ImageError(path, f"Multiboot entry_addr {entry:#x} is outside the loaded image")
    return entry
