"""Tiny kernel images for the loader tests, built byte by byte."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pyvmm.memory import GuestMemory

MiB = 1 << 20
EM_386 = 3
EM_X86_64 = 62
EM_AARCH64 = 183
ET_EXEC = 2
ET_REL = 1
PT_LOAD = 1
PT_NOTE = 4

MULTIBOOT_MAGIC = 0x1BADB002


@dataclass
class Seg:
    paddr: int
    data: bytes
    memsz: int | None = None
    vaddr: int | None = None
    offset: int | None = None  # force a file offset (for broken images)


def note(name: str, kind: int, desc: bytes) -> bytes:
    raw = name.encode() + b"\0"
    pad = lambda b: b + bytes(-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(raw), len(desc), kind) + pad(raw) + pad(desc)


def build_elf(
    bits: int,
    segments: list[Seg],
    entry: int,
    *,
    machine: int | None = None,
    etype: int = ET_EXEC,
    notes: bytes | None = None,
    ei_class: int | None = None,
    ei_data: int = 1,
) -> bytes:
    """An ELF32/ELF64 executable: header, program headers, then each segment's bytes."""
    machine = machine if machine is not None else (EM_X86_64 if bits == 64 else EM_386)
    ehsize, phentsize = (64, 56) if bits == 64 else (52, 32)
    phnum = len(segments) + (1 if notes is not None else 0)
    offset = ehsize + phnum * phentsize
    blobs: list[tuple[int, bytes]] = []
    phdrs = b""
    for seg in segments:
        offset = (offset + 15) // 16 * 16
        at = seg.offset if seg.offset is not None else offset
        memsz = seg.memsz if seg.memsz is not None else len(seg.data)
        vaddr = seg.vaddr if seg.vaddr is not None else seg.paddr
        if bits == 64:
            phdrs += struct.pack("<IIQQQQQQ", PT_LOAD, 7, at, vaddr, seg.paddr, len(seg.data), memsz, 16)
        else:
            phdrs += struct.pack("<IIIIIIII", PT_LOAD, at, vaddr, seg.paddr, len(seg.data), memsz, 7, 16)
        if seg.offset is None:
            blobs.append((at, seg.data))
            offset = at + len(seg.data)
    if notes is not None:
        offset = (offset + 15) // 16 * 16
        if bits == 64:
            phdrs += struct.pack("<IIQQQQQQ", PT_NOTE, 4, offset, 0, 0, len(notes), len(notes), 4)
        else:
            phdrs += struct.pack("<IIIIIIII", PT_NOTE, offset, 0, 0, len(notes), len(notes), 4, 4)
        blobs.append((offset, notes))
        offset += len(notes)
    ident = b"\x7fELF" + bytes([ei_class or (2 if bits == 64 else 1), ei_data, 1, 0]) + bytes(8)
    if bits == 64:
        header = struct.pack("<16sHHIQQQIHHHHHH", ident, etype, machine, 1, entry, ehsize, 0, 0, ehsize, phentsize,
                             phnum, 64, 0, 0)  # fmt: skip
    else:
        header = struct.pack("<16sHHIIIIIHHHHHH", ident, etype, machine, 1, entry, ehsize, 0, 0, ehsize, phentsize,
                             phnum, 40, 0, 0)  # fmt: skip
    out = bytearray(header + phdrs)
    for at, data in blobs:
        if len(out) < at:
            out += bytes(at - len(out))
        out[at : at + len(data)] = data
    return bytes(out)


def multiboot_header(flags: int = 0, kludge: tuple[int, int, int, int, int] | None = None) -> bytes:
    checksum = (-(MULTIBOOT_MAGIC + flags)) & 0xFFFFFFFF
    raw = struct.pack("<III", MULTIBOOT_MAGIC, flags, checksum)
    if kludge is not None:
        raw += struct.pack("<5I", *kludge)
    return raw


def multiboot_elf(
    *, text_at: int = 0x400000, text: bytes = b"\x90" * 64, data_at: int = 0x401000, data: bytes = b"DATA",
    bss: int = 0x3000, flags: int = 0,
) -> bytes:  # fmt: skip
    """Like a kvm-unit-tests .flat: ELF32, multiboot header at the start of .text,
    a second segment with data and bss, entry just past the header."""
    head = multiboot_header(flags)
    segments = [Seg(text_at, head + text), Seg(data_at, data, memsz=len(data) + bss)]
    return build_elf(32, segments, entry=text_at + len(head))


# --- bzImage ------------------------------------------------------------------------

LOADED_HIGH = 0x01
CAN_USE_HEAP = 0x80


def build_bzimage(
    *,
    version: int = 0x020F,
    setup_sects: int = 4,
    loadflags: int = LOADED_HIGH,
    xloadflags: int = 0x1,
    relocatable: int = 1,
    kernel_alignment: int = 0x200000,
    pref_address: int = 0x1000000,
    init_size: int = 0x400000,
    cmdline_size: int = 2047,
    initrd_addr_max: int = 0x7FFFFFFF,
    kernel: bytes = b"\xf4" * 0x2000,
    boot_flag: int = 0xAA55,
    header_len: int = 0x26C - 0x202,
    syssize: int | None = None,
) -> bytes:
    setup = bytearray((setup_sects + 1) * 512 if setup_sects else 5 * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<I", setup, 0x1F4, syssize if syssize is not None else (len(kernel) + 15) // 16)
    struct.pack_into("<H", setup, 0x1FA, 0xFFFF)  # vid_mode
    struct.pack_into("<H", setup, 0x1FE, boot_flag)
    setup[0x200] = 0xEB
    setup[0x201] = header_len
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x214, 0x100000)
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, kernel_alignment)
    setup[0x234] = relocatable
    setup[0x235] = 21
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + kernel


# --- memory helpers -----------------------------------------------------------------


def u32(memory: GuestMemory, addr: int) -> int:
    return memory.read_u32(addr)


def cstring(memory: GuestMemory, addr: int, limit: int = 8192) -> bytes:
    out = b""
    while len(out) < limit:
        chunk = memory.read(addr + len(out), 64)
        if b"\0" in chunk:
            return out + chunk[: chunk.index(b"\0")]
        out += chunk
    raise AssertionError(f"no NUL within {limit} bytes at {addr:#x}")


def untouched(memory: GuestMemory) -> bool:
    """True if every byte of every region is still zero."""
    return all(region.view().tobytes().count(0) == region.size for region in memory)


def overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]
