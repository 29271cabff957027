"""Linux bzImage, by the x86 boot protocol (Documentation/arch/x86/boot.rst), without
running the real-mode setup code: pyvmm fills in the zero page itself and enters the
protected-mode kernel directly -- at its 64-bit entry (load address + 0x200, long
mode) when the header advertises XLF_KERNEL_64, else at its 32-bit entry.  Either
way RSI holds the zero page's address.

Layout (each piece takes the lowest free place above page 0):

* boot GDT (and, for the 64-bit entry, page tables): 0x1000..0x8000 (or 0x1000..0x2000);
* zero page (``struct boot_params``): the next page, 0x8000 (0x2000);
* command line: the page after it;
* kernel: at ``pref_address`` when relocatable and RAM holds it there, else at 1 MiB;
  the range the decompressed kernel runs in (``init_size`` bytes from its runtime
  start) is kept free;
* initrd: as high as possible below ``initrd_addr_max``, 4 GiB and the end of RAM,
  page-aligned.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

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
    finish,
    read_initrd,
)

HDRS_OFFSET = 0x202
HDRS_MAGIC = b"HdrS"
BOOT_FLAG_MAGIC = 0xAA55
MIN_VERSION = 0x0202

LOADED_HIGH = 0x01
CAN_USE_HEAP = 0x80
XLF_KERNEL_64 = 1 << 0
TYPE_OF_LOADER_UNDEFINED = 0xFF
#: Where a real-mode setup's heap would end; only meaningful with CAN_USE_HEAP set.
HEAP_END_PTR = 0xFE00
#: Before protocol 2.06 the command line may be at most 255 bytes.
OLD_CMDLINE_MAX = 255
#: Before protocol 2.03 the initrd must end below this (boot.rst).
OLD_INITRD_ADDR_MAX = 0x37FFFFFF
ENTRY64_OFFSET = 0x200

ZERO_PAGE_SIZE = 4096
E820_MAX_ZEROPAGE = 128

# struct boot_params offsets (arch/x86/include/uapi/asm/bootparam.h)
EXT_RAMDISK_IMAGE = 0x0C0
EXT_RAMDISK_SIZE = 0x0C4
EXT_CMD_LINE_PTR = 0x0C8
E820_ENTRIES = 0x1E8
SETUP_HEADER = 0x1F1
SETUP_SECTS = 0x1F1
SYSSIZE = 0x1F4
BOOT_FLAG = 0x1FE
JUMP = 0x200
VERSION = 0x206
TYPE_OF_LOADER = 0x210
LOADFLAGS = 0x211
CODE32_START = 0x214
RAMDISK_IMAGE = 0x218
RAMDISK_SIZE = 0x21C
HEAP_END = 0x224
CMD_LINE_PTR = 0x228
INITRD_ADDR_MAX = 0x22C
KERNEL_ALIGNMENT = 0x230
RELOCATABLE_KERNEL = 0x234
XLOADFLAGS = 0x236
CMDLINE_SIZE = 0x238
PREF_ADDRESS = 0x258
INIT_SIZE = 0x260
#: boot_params pads the setup header up to here; the e820 table follows later.
SETUP_HEADER_LIMIT = 0x290
E820_TABLE = 0x2D0

# (protocol version, first byte past the last field pyvmm reads at that version)
_HEADER_NEEDS = ((0x20A, 0x264), (0x206, 0x23C), (0x205, 0x235), (0x203, 0x230), (0x202, 0x22C))


def is_bzimage(data: bytes) -> bool:
    return data[HDRS_OFFSET : HDRS_OFFSET + 4] == HDRS_MAGIC


@dataclass(frozen=True)
class SetupHeader:
    version: int
    header_end: int
    kernel_offset: int
    loadflags: int
    xloadflags: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable: bool
    cmdline_size: int
    pref_address: int
    init_size: int

    def describe_version(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"


def _u8(data: bytes, offset: int) -> int:
    return data[offset]


def _u16(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("<H", data, offset)[0])


def _u32(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("<I", data, offset)[0])


def _u64(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("<Q", data, offset)[0])


def parse_setup_header(request: Request) -> SetupHeader:
    path, data = request.path, request.data
    if len(data) < VERSION + 2:
        raise ImageError(path, "truncated bzImage: the setup header is cut off")
    version = _u16(data, VERSION)
    if version < MIN_VERSION:
        raise ImageError(
            path, f"Linux boot protocol {version >> 8}.{version & 0xFF:02d} is too old; pyvmm needs 2.02 or later"
        )
    header_end = HDRS_OFFSET + _u8(data, JUMP + 1)
    needed = next(end for at_least, end in _HEADER_NEEDS if version >= at_least)
    if header_end < needed:
        raise ImageError(path, f"bzImage setup header ends at {header_end:#x}, short of its protocol's fields")
    if len(data) < header_end:
        raise ImageError(path, "truncated bzImage: the setup header is cut off")
    if _u16(data, BOOT_FLAG) != BOOT_FLAG_MAGIC:
        raise ImageError(path, f"bzImage boot_flag is {_u16(data, BOOT_FLAG):#06x}, not 0xaa55")
    setup_sects = _u8(data, SETUP_SECTS) or 4  # 0 means 4, for very old kernels
    kernel_offset = (setup_sects + 1) * 512
    if kernel_offset >= len(data):
        raise ImageError(path, f"truncated bzImage: no protected-mode kernel after the {setup_sects} setup sectors")
    syssize = _u32(data, SYSSIZE) * 16
    if kernel_offset + syssize > len(data):
        raise ImageError(
            path,
            f"truncated bzImage: the header gives a {syssize:#x}-byte kernel, the file has "
            f"{len(data) - kernel_offset:#x} bytes after the setup code",
        )
    loadflags = _u8(data, LOADFLAGS)
    if not loadflags & LOADED_HIGH:
        raise ImageError(path, "a zImage (loaded below 1 MiB) is not supported; build a bzImage")
    return SetupHeader(
        version=version,
        header_end=min(header_end, SETUP_HEADER_LIMIT),
        kernel_offset=kernel_offset,
        loadflags=loadflags,
        xloadflags=_u16(data, XLOADFLAGS) if version >= 0x20C else 0,
        initrd_addr_max=_u32(data, INITRD_ADDR_MAX) if version >= 0x203 else OLD_INITRD_ADDR_MAX,
        kernel_alignment=_u32(data, KERNEL_ALIGNMENT) if version >= 0x205 else 0,
        relocatable=version >= 0x205 and _u8(data, RELOCATABLE_KERNEL) != 0,
        cmdline_size=_u32(data, CMDLINE_SIZE) if version >= 0x206 else OLD_CMDLINE_MAX,
        pref_address=_u64(data, PREF_ADDRESS) if version >= 0x20A else 0,
        init_size=_u32(data, INIT_SIZE) if version >= 0x20A else 0,
    )


def _subtract(start: int, end: int, hole_start: int, hole_end: int) -> list[tuple[int, int]]:
    pieces = [(start, min(end, hole_start)), (max(start, hole_end), end)]
    return [(a, b) for a, b in pieces if a < b]


def load_bzimage(request: Request) -> LoadedKernel:
    path, data, ram = request.path, request.data, request.ram
    header = parse_setup_header(request)
    ram.require_low_memory("Linux")
    cmdline = encode_cmdline(path, request.cmdline, header.cmdline_size, f"Linux {header.describe_version()}")
    initrd = read_initrd(path, request.initrd, limit=ram.ram_size) if request.initrd is not None else None

    kernel = memoryview(data)[header.kernel_offset :]
    footprint = max(kernel.nbytes, header.init_size)
    pref = header.pref_address
    if header.relocatable and pref >= MiB and pref + footprint <= FOUR_GIB and ram.contains(pref, pref + footprint):
        load = pref
    else:
        load = MiB
    # The decompressor runs the kernel from max(load aligned up, pref_address)
    # (arch/x86/boot/compressed/head_64.S) and needs init_size bytes there.
    runtime = max(align_up(load, header.kernel_alignment or 1), pref) if header.relocatable else pref or load
    layout = Layout(path, ram)
    layout.write(load, kernel, "Linux kernel")
    for start, end in _subtract(runtime, runtime + header.init_size, load, load + kernel.nbytes):
        layout.reserve(start, end - start, "Linux kernel runtime area (init_size)")

    long_mode = bool(header.xloadflags & XLF_KERNEL_64)
    tables = layout.boot_tables(long_mode)
    zero_page = layout.allocate(ZERO_PAGE_SIZE, "zero page", lo=LOW_STRUCTS_START, hi=LOW_STRUCTS_END)
    cmdline_item = layout.allocate(len(cmdline), "command line", lo=LOW_STRUCTS_START, hi=LOW_STRUCTS_END)
    cmdline_item.data = cmdline
    ramdisk = (0, 0)
    if initrd is not None:
        limit = min(header.initrd_addr_max + 1, FOUR_GIB)
        item = layout.allocate(len(initrd), f"initrd {request.initrd}", lo=MiB, hi=limit, top_down=True)
        item.data = initrd
        ramdisk = (item.start, len(initrd))

    params = bytearray(ZERO_PAGE_SIZE)
    params[SETUP_HEADER : header.header_end] = data[SETUP_HEADER : header.header_end]
    params[TYPE_OF_LOADER] = TYPE_OF_LOADER_UNDEFINED
    params[LOADFLAGS] = header.loadflags | CAN_USE_HEAP
    struct.pack_into("<H", params, HEAP_END, HEAP_END_PTR)
    struct.pack_into("<I", params, CODE32_START, load)
    struct.pack_into("<I", params, CMD_LINE_PTR, cmdline_item.start & 0xFFFFFFFF)
    struct.pack_into("<I", params, EXT_CMD_LINE_PTR, cmdline_item.start >> 32)
    struct.pack_into("<II", params, RAMDISK_IMAGE, ramdisk[0] & 0xFFFFFFFF, ramdisk[1] & 0xFFFFFFFF)
    struct.pack_into("<II", params, EXT_RAMDISK_IMAGE, ramdisk[0] >> 32, ramdisk[1] >> 32)
    e820 = ram.e820()[:E820_MAX_ZEROPAGE]
    params[E820_ENTRIES] = len(e820)
    for index, (base, length, kind) in enumerate(e820):
        struct.pack_into("<QQI", params, E820_TABLE + index * 20, base, length, kind)
    zero_page.data = bytes(params)

    registers = {"rsi": zero_page.start}
    if long_mode:
        spec = boot_spec(path, load + ENTRY64_OFFSET, X86Mode.LONG, tables, registers)
    else:
        spec = boot_spec(path, load, X86Mode.PROTECTED, tables, registers)
    return finish(layout, request.memory, spec, "bzimage")
