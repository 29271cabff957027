"""PVH: an uncompressed ELF kernel (vmlinux) carrying XEN_ELFNOTE_PHYS32_ENTRY.

The kernel is entered at the note's address in 32-bit protected mode, paging off,
with EBX pointing at a ``struct hvm_start_info`` (xen/include/public/arch-x86/
hvm/start_info.h, version 1: command line, module list, memory map).

Layout: boot GDT at 0x1000; start info block at 0x2000 (start info, module list,
memory map, command line, module name); segments at their ``p_paddr``; the initrd
as high as possible below 4 GiB and the end of RAM, page-aligned.
"""

from __future__ import annotations

import struct
from pathlib import Path

from pyvmm.boot import X86Mode
from pyvmm.machine.loaders.common import (
    FOUR_GIB,
    LOW_STRUCTS_END,
    LOW_STRUCTS_START,
    ImageError,
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
from pyvmm.machine.loaders.elf import ElfImage, add_segments

XEN_ELFNOTE_PHYS32_ENTRY = 18
HVM_START_MAGIC = 0x336EC578
HVM_START_VERSION = 1
START_INFO_SIZE = 56
MODLIST_ENTRY_SIZE = 32
MEMMAP_ENTRY_SIZE = 24
#: PVH sets no limit; pyvmm keeps the boot structures small.
CMDLINE_MAX = 4095


def pvh_entry(path: Path, image: ElfImage) -> int | None:
    """The PHYS32 entry from the ELF notes, or None when there is no PVH note."""
    for note in image.notes:
        if note.name == "Xen" and note.type == XEN_ELFNOTE_PHYS32_ENTRY:
            # Linux emits _ASM_PTR: 8 bytes in a 64-bit build, 4 in a 32-bit one.
            if len(note.desc) not in (4, 8):
                raise ImageError(path, f"PVH entry note has a {len(note.desc)}-byte value, expected 4 or 8")
            return int.from_bytes(note.desc, "little")
    return None


def load_pvh(request: Request, image: ElfImage, entry: int) -> LoadedKernel:
    path, ram = request.path, request.ram
    if entry >= FOUR_GIB:
        raise ImageError(path, f"PVH entry point {entry:#x} is above 4 GiB; PVH starts in 32-bit mode")
    if not any(segment.paddr <= entry < segment.end for segment in image.segments):
        raise ImageError(path, f"PVH entry point {entry:#x} is not inside any loadable segment")
    ram.require_low_memory("PVH")
    cmdline = encode_cmdline(path, request.cmdline, CMDLINE_MAX, "PVH")
    initrd = read_initrd(path, request.initrd, limit=ram.ram_size) if request.initrd is not None else None
    module_name = (file_name_bytes(request.initrd) + b"\0") if request.initrd is not None else b""
    memory_map = ram.e820()

    layout = Layout(path, ram)
    add_segments(layout, image, request.data)
    tables = layout.boot_tables(long_mode=False)

    modlist_offset = align_up(START_INFO_SIZE, 16)
    memmap_offset = modlist_offset + (MODLIST_ENTRY_SIZE if initrd is not None else 0)
    cmdline_offset = memmap_offset + len(memory_map) * MEMMAP_ENTRY_SIZE
    module_name_offset = cmdline_offset + len(cmdline)
    block_size = module_name_offset + len(module_name)
    block = layout.allocate(block_size, "PVH start info", lo=LOW_STRUCTS_START, hi=LOW_STRUCTS_END)
    base = block.start

    info = bytearray(block_size)
    nr_modules = 0
    if initrd is not None:
        module = layout.allocate(len(initrd), f"initrd {request.initrd}", lo=MiB, hi=FOUR_GIB, top_down=True)
        module.data = initrd
        nr_modules = 1
        struct.pack_into("<QQQQ", info, modlist_offset, module.start, len(initrd), base + module_name_offset, 0)
        info[module_name_offset:block_size] = module_name
    struct.pack_into(
        "<IIIIQQQQII",
        info,
        0,
        HVM_START_MAGIC,
        HVM_START_VERSION,
        0,
        nr_modules,
        base + modlist_offset if nr_modules else 0,
        base + cmdline_offset,
        0,  # rsdp_paddr: none; Linux then scans the BIOS areas for the RSDP
        base + memmap_offset,
        len(memory_map),
        0,
    )
    for index, (start, length, kind) in enumerate(memory_map):
        struct.pack_into("<QQII", info, memmap_offset + index * MEMMAP_ENTRY_SIZE, start, length, kind, 0)
    info[cmdline_offset:module_name_offset] = cmdline
    block.data = bytes(info)

    spec = boot_spec(path, entry, X86Mode.PROTECTED, tables, {"rbx": base})
    return finish(layout, request.memory, spec, "pvh")
