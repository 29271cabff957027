"""ELF images: parsing (shared by the Multiboot and PVH loaders) and the plain-ELF loader.

Segments are loaded by physical address (``p_paddr``): the guest starts with paging
off or identity-mapped, and kernels such as vmlinux link at high virtual addresses
but give the physical ones in ``p_paddr``.  ``memsz`` beyond ``filesz`` is zeroed
(bss): kvm-unit-tests' start-up code does not clear its own.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from pyvmm.boot import X86Mode
from pyvmm.machine.loaders.common import (
    FOUR_GIB,
    ImageError,
    Item,
    Layout,
    LoadedKernel,
    Request,
    boot_spec,
    finish,
    reject_extras,
)

ELF_MAGIC = b"\x7fELF"
_HEADER_SIZE = {1: 52, 2: 64}
_PHDR_SIZE = {1: 32, 2: 56}
#: Elf32_Phdr / Elf64_Phdr, little-endian (the field order differs: p_flags moved).
_PHDR = {1: struct.Struct("<8I"), 2: struct.Struct("<IIQQQQQQ")}
PT_LOAD = 1
PT_NOTE = 4
#: Notes kept from all PT_NOTE segments together (only the PVH entry note is used).
MAX_NOTES = 1024
#: e_phnum's escape value: the real count is in section header 0 (not supported).
PN_XNUM = 0xFFFF
_MACHINES = ("EM_386", "EM_X86_64")
_TYPES = ("ET_EXEC", "ET_DYN")
_MACHINE_NAMES = {3: "EM_386", 40: "EM_ARM", 62: "EM_X86_64", 183: "EM_AARCH64", 243: "EM_RISCV"}
_TYPE_NAMES = {0: "ET_NONE", 1: "ET_REL", 2: "ET_EXEC", 3: "ET_DYN", 4: "ET_CORE"}
#: e_type, e_machine, e_version, e_entry, e_phoff (after the 16-byte e_ident).
_EHDR = {1: struct.Struct("<HHIII"), 2: struct.Struct("<HHIQQ")}
#: Where e_phentsize and e_phnum are.
_PHENTSIZE_OFFSET = {1: 42, 2: 54}


@dataclass(frozen=True)
class LoadSegment:
    index: int
    paddr: int
    vaddr: int
    offset: int
    filesz: int
    memsz: int

    @property
    def end(self) -> int:
        return self.paddr + self.memsz


@dataclass(frozen=True)
class Note:
    name: str
    type: int
    desc: bytes


@dataclass(frozen=True)
class ElfImage:
    bits: int
    machine: str
    entry: int
    segments: list[LoadSegment]
    notes: list[Note] = field(default_factory=list)

    def end(self) -> int:
        return max(segment.end for segment in self.segments)


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


def parse_elf(path: Path, data: bytes) -> ElfImage:
    """Headers, loadable segments and notes, each checked against the file size."""
    if len(data) < 6:
        raise ImageError(path, f"truncated ELF header ({len(data)} bytes)")
    ei_class = data[4]
    if ei_class not in _HEADER_SIZE:
        raise ImageError(path, f"invalid ELF class {ei_class} (neither ELF32 nor ELF64)")
    if data[5] != 1:
        raise ImageError(path, "big-endian or invalid ELF data encoding; an x86 kernel is little-endian")
    if len(data) < _HEADER_SIZE[ei_class]:
        raise ImageError(path, f"truncated ELF header ({len(data)} bytes, ELF{ei_class * 32} needs more)")
    # The header is read with struct: a malformed one must end in ImageError, and
    # pyelftools raises assorted exception types on hostile input.
    bits = 32 * ei_class
    e_type, e_machine, _, entry, phoff = _EHDR[ei_class].unpack_from(data, 16)
    phentsize, phnum = struct.unpack_from("<HH", data, _PHENTSIZE_OFFSET[ei_class])
    machine = _MACHINE_NAMES.get(e_machine, f"e_machine {e_machine}")
    if machine not in _MACHINES:
        raise ImageError(path, f"ELF for machine {machine}, not x86 (EM_386 or EM_X86_64)")
    type_name = _TYPE_NAMES.get(e_type, f"e_type {e_type}")
    if type_name not in _TYPES:
        raise ImageError(path, f"ELF type {type_name} is not an executable")
    if phnum == 0:
        raise ImageError(path, "ELF file has no program headers")
    if phnum == PN_XNUM:
        raise ImageError(path, "ELF file uses extended program header numbering (e_phnum 0xffff), not supported")
    if phentsize < _PHDR_SIZE[ei_class]:
        raise ImageError(path, f"ELF program header size {phentsize} is too small")
    if phoff + phnum * phentsize > len(data):
        raise ImageError(
            path,
            f"ELF program headers ({phnum} at offset {phoff:#x}) run past the end of the file ({len(data)} bytes)",
        )
    # The program headers are read with struct, not pyelftools: its per-segment
    # parsing costs ~80 us, and a file may hold 65,534 segments.
    segments: list[LoadSegment] = []
    notes: list[Note] = []
    layout = _PHDR[ei_class]
    for index in range(phnum):
        fields = layout.unpack_from(data, phoff + index * phentsize)
        if ei_class == 2:
            kind, _, offset, vaddr, paddr, filesz, memsz, _ = fields
        else:
            kind, offset, vaddr, paddr, filesz, memsz, _, _ = fields
        if kind not in (PT_LOAD, PT_NOTE):
            continue
        if offset + filesz > len(data):
            raise ImageError(
                path,
                f"ELF segment {index} ({filesz:#x} bytes at offset {offset:#x}) runs past the end of the file "
                f"({len(data)} bytes)",
            )
        if kind == PT_NOTE:
            if len(notes) < MAX_NOTES:
                notes.extend(_parse_notes(data[offset : offset + filesz]))
            continue
        if filesz > memsz:
            raise ImageError(path, f"ELF segment {index} has filesz {filesz:#x} > memsz {memsz:#x}")
        if memsz:
            segments.append(LoadSegment(index, paddr, vaddr, offset, filesz, memsz))
    if not segments:
        raise ImageError(path, "ELF file has no loadable (PT_LOAD) segment")
    return ElfImage(bits=bits, machine=machine, entry=entry, segments=segments, notes=notes)


def _parse_notes(blob: bytes) -> list[Note]:
    # Linux's ELFNOTE() pads name and desc to 4 bytes in ELF32 and ELF64 alike.
    notes: list[Note] = []
    pos = 0
    while pos + 12 <= len(blob):
        namesz, descsz, kind = struct.unpack_from("<III", blob, pos)
        pos += 12
        name_end = pos + namesz
        desc_start = pos + (namesz + 3) // 4 * 4
        desc_end = desc_start + descsz
        if desc_end > len(blob):
            break
        notes.append(Note(blob[pos:name_end].rstrip(b"\0").decode("latin-1"), kind, blob[desc_start:desc_end]))
        pos = desc_start + (descsz + 3) // 4 * 4
    return notes


def add_segments(layout: Layout, image: ElfImage, data: bytes) -> None:
    """Lay out every segment at once (:meth:`Layout.add_many`: O(n log n) in the
    number of segments)."""
    view = memoryview(data)
    items: list[Item] = []
    for segment in image.segments:
        what = f"ELF segment {segment.index}"
        if segment.filesz:
            items.append(
                Item(segment.paddr, segment.filesz, what, data=view[segment.offset : segment.offset + segment.filesz])
            )
        if segment.memsz > segment.filesz:
            items.append(Item(segment.paddr + segment.filesz, segment.memsz - segment.filesz, f"{what} bss", zero=True))
    layout.add_many(items)


def physical_entry(path: Path, image: ElfImage, entry: int) -> int:
    """``entry`` as a physical address: as is if it lies in a segment's physical range,
    translated if it lies in one's virtual range (an ELF linked at a higher half)."""
    for segment in image.segments:
        if segment.paddr <= entry < segment.end:
            return entry
    for segment in image.segments:
        if segment.vaddr <= entry < segment.vaddr + segment.memsz:
            return segment.paddr + (entry - segment.vaddr)
    raise ImageError(path, f"entry point {entry:#x} is not inside any loadable segment")


def load_plain_elf(request: Request, image: ElfImage) -> LoadedKernel:
    """A bare ELF: segments loaded, entered in long mode (ELF64) or 32-bit protected mode (ELF32)."""
    path = request.path
    reject_extras(path, "plain ELF", request.cmdline, request.initrd)
    layout = Layout(path, request.ram)
    add_segments(layout, image, request.data)
    entry = physical_entry(path, image, image.entry)
    if entry >= FOUR_GIB:
        raise ImageError(path, f"entry point {entry:#x} is above 4 GiB, outside the boot identity map")
    long_mode = image.bits == 64
    tables = layout.boot_tables(long_mode, hi=FOUR_GIB)
    mode = X86Mode.LONG if long_mode else X86Mode.PROTECTED
    return finish(layout, request.memory, boot_spec(path, entry, mode, tables, {}), "elf")
