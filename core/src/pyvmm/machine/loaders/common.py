"""What every loader shares: the result type, the error, the RAM map and the layout.

A loader never writes as it goes.  It describes everything it will put into guest
memory in a :class:`Layout` -- image bytes, zero-filled bss, boot structures, and
reservations for ranges that are written later by someone else (the boot tables) or
used by the guest at once (a bzImage's decompression area).  Each addition is checked
against guest RAM and against everything added before, so a bad image fails with an
:class:`ImageError` while guest memory is still untouched; :meth:`Layout.commit`
then does all the writes.
"""

from __future__ import annotations

import bisect
import itertools
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from pyvmm.boot import BootSpec, X86Mode
from pyvmm.config import PAGE_SIZE, Arch, InputFileError, read_input_file
from pyvmm.errors import ConfigError
from pyvmm.lean_dataclass import lean_dataclass
from pyvmm.memory import GuestMemory
from pyvmm.records import RecordError

if TYPE_CHECKING:
    from pathlib import Path

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
FOUR_GIB = 1 << 32

#: The PC's legacy hole (VGA memory, option ROMs, BIOS): never RAM in the memory map.
LEGACY_HOLE_START = 0xA0000
LEGACY_HOLE_END = 0x100000
#: Boot structures go between page 0 (kept free: kvm-unit-tests copies its AP
#: trampoline there) and the legacy hole.
LOW_STRUCTS_START = 0x1000
LOW_STRUCTS_END = LEGACY_HOLE_START

E820_RAM = 1
E820_RESERVED = 2

#: Boot tables: one page (GDT) in protected mode, seven (GDT + page tables) in long mode,
#: as pyvmm.arch.x86_64_boot writes them.
BOOT_TABLES_PROTECTED = PAGE_SIZE
BOOT_TABLES_LONG = 7 * PAGE_SIZE


class ImageError(ConfigError):
    """A kernel, initrd or boot request that cannot be loaded.  The message names the
    file and the problem; nothing has been written to guest memory when it is raised."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


@lean_dataclass
class LoadedKernel:
    """How to start the loaded kernel.  ``extents`` are the guest ranges the loader
    wrote, sorted and merged; ``boot.boot_tables`` points at pages kept free for the
    GDT and page tables, which the machine writes when it builds the vCPU state."""

    boot: BootSpec
    kind: str
    extents: list[tuple[int, int]]


def align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def align_down(value: int, align: int) -> int:
    return value // align * align


def read_file(path: Path, what: str = "kernel", *, limit: int) -> bytes:
    """The bytes of ``path``, which must be a regular file of at most ``limit``
    bytes (the guest RAM: a larger one cannot be loaded anyway).  A FIFO, a device
    or a directory is refused without being read (a FIFO is never waited on)."""
    try:
        return read_input_file(path, what=what, limit=limit, why="it does not fit in guest RAM ({limit})")
    except InputFileError as exc:
        raise ImageError(path, exc.problem) from None


class RamMap:
    """Guest RAM as the loaders see it: the writable regions of ``memory``, adjacent
    ones merged, the first ``ram_size`` bytes of them.  Read-only regions (ROMs,
    flash) are not RAM."""

    def __init__(self, memory: GuestMemory, ram_size: int, cpus: int, path: Path) -> None:
        self.path = path
        if ram_size <= 0 or ram_size % PAGE_SIZE:
            raise ImageError(path, f"ram_size {ram_size:#x} is not a positive multiple of {PAGE_SIZE:#x}")
        if cpus < 1:
            raise ImageError(path, f"cpus {cpus} must be at least 1")
        merged: list[tuple[int, int]] = []
        for region in sorted(memory, key=lambda r: r.guest_phys_addr):
            if region.read_only:
                continue
            if merged and merged[-1][1] == region.guest_phys_addr:
                merged[-1] = (merged[-1][0], region.end)
            else:
                merged.append((region.guest_phys_addr, region.end))
        mapped = sum(end - start for start, end in merged)
        if mapped < ram_size:
            raise ImageError(
                path, f"ram_size {ram_size:#x} is larger than the guest RAM actually mapped ({mapped:#x} bytes)"
            )
        self.ranges: list[tuple[int, int]] = []
        left = ram_size
        for start, end in merged:
            if left == 0:
                break
            take = min(end - start, left)
            self.ranges.append((start, start + take))
            left -= take
        self.ram_size = ram_size

    def describe(self) -> str:
        return ", ".join(f"{start:#x}..{end:#x}" for start, end in self.ranges)

    def range_containing(self, start: int, end: int) -> tuple[int, int] | None:
        for lo, hi in self.ranges:
            if lo <= start and end <= hi:
                return (lo, hi)
        return None

    def contains(self, start: int, end: int) -> bool:
        return self.range_containing(start, end) is not None

    def end_of_ram(self) -> int:
        return self.ranges[-1][1]

    def e820(self) -> list[tuple[int, int, int]]:
        """(base, length, type) entries: RAM, and 640 KiB..1 MiB reserved as on a PC
        (whether or not the machine backs it with RAM)."""
        entries = [(LEGACY_HOLE_START, LEGACY_HOLE_END - LEGACY_HOLE_START, E820_RESERVED)]
        for start, end in self.ranges:
            for lo, hi in ((start, min(end, LEGACY_HOLE_START)), (max(start, LEGACY_HOLE_END), end)):
                if lo < hi:
                    entries.append((lo, hi - lo, E820_RAM))
        entries.sort()
        return entries

    def usable(self) -> list[tuple[int, int]]:
        """RAM the loaders may place their own structures in: RAM outside the legacy hole."""
        return [(base, base + length) for base, length, kind in self.e820() if kind == E820_RAM]

    def require_low_memory(self, kind: str) -> None:
        """The PC boot protocols put their structures below 640 KiB and the kernel above 1 MiB."""
        if not self.contains(0, LEGACY_HOLE_START) or not any(hi > LEGACY_HOLE_END for _, hi in self.usable()):
            raise ImageError(
                self.path,
                f"a {kind} kernel needs RAM from 0 to 640 KiB and above 1 MiB; guest RAM is {self.describe()}",
            )


@lean_dataclass
class Request:
    """One load_kernel call, after the kernel file has been read."""

    path: Path
    data: bytes
    memory: GuestMemory
    ram: RamMap
    cmdline: str
    initrd: Path | None
    load_address: int | None


@lean_dataclass
class Item:
    """One range of the layout.  ``data`` is written at ``start`` (``None``: nothing is
    written, the range is only kept free), ``zero`` fills the range with zeros."""

    start: int
    size: int
    what: str
    data: bytes | memoryview | None = None
    zero: bool = False

    @property
    def end(self) -> int:
        return self.start + self.size

    def describe(self) -> str:
        return f"{self.what} ({self.start:#x}..{self.end:#x})"


class Layout:
    """Everything a loader will put into guest memory, checked as it is added.

    The non-empty items are also kept sorted by address.  They never overlap (an
    overlapping addition is refused), so their ends are sorted too and the clash
    check is a binary search: laying out an ELF with N segments is O(N log N)
    (:meth:`add_many`), not O(N^2) -- 65,534 segments once took minutes.
    """

    def __init__(self, path: Path, ram: RamMap) -> None:
        self.path = path
        self.ram = ram
        #: In the order added (commit writes them in this order).
        self.items: list[Item] = []
        self._sorted: list[Item] = []
        self._ends: list[int] = []
        self._top = 0

    def fail(self, problem: str) -> ImageError:
        return ImageError(self.path, problem)

    def _clash(self, start: int, end: int) -> Item | None:
        """The lowest item overlapping ``[start, end)`` (for an empty range: one
        that strictly contains ``start``), in O(log n)."""
        index = bisect.bisect_right(self._ends, start)  # the first item ending after start
        if index < len(self._sorted) and self._sorted[index].start < end:
            return self._sorted[index]
        return None

    def _check(self, item: Item) -> None:
        if item.size < 0:
            raise self.fail(f"{item.what} has a negative size")
        if item.size and not self.ram.contains(item.start, item.end):
            raise self.fail(f"{item.describe()} does not fit in guest RAM ({self.ram.describe()})")

    def add(self, item: Item) -> Item:
        self._check(item)
        clash = self._clash(item.start, item.end)
        if clash is not None:
            raise self.fail(f"{item.describe()} overlaps {clash.describe()}")
        if item.size:
            index = bisect.bisect_right(self._ends, item.start)
            self._sorted.insert(index, item)
            self._ends.insert(index, item.end)
        self.items.append(item)
        self._top = max(self._top, item.end)
        return item

    def add_many(self, items: list[Item]) -> None:
        """:meth:`add` each of ``items``, in O((n + m) log(n + m)) for n items laid
        out and m new ones; nothing is added when one is refused."""
        for item in items:
            self._check(item)
        order = {id(item): index for index, item in enumerate(items)}
        new = sorted((item for item in items if item.size), key=lambda item: item.start)
        for low, high in itertools.pairwise(new):
            if high.start < low.end:
                # Name them in the order the loader gave them, as add() would.
                first, second = sorted((low, high), key=lambda item: order[id(item)])
                raise self.fail(f"{second.describe()} overlaps {first.describe()}")
        for item in items:
            clash = self._clash(item.start, item.end)
            if clash is not None:
                raise self.fail(f"{item.describe()} overlaps {clash.describe()}")
        new_ends = [item.end for item in new]
        for item in items:
            # An empty item strictly inside one of the new ones.
            index = bisect.bisect_right(new_ends, item.start)
            if not item.size and index < len(new) and new[index].start < item.end:
                raise self.fail(f"{item.describe()} overlaps {new[index].describe()}")
        if new:
            # Two sorted runs: timsort merges them in linear time.
            merged = self._sorted + new
            merged.sort(key=lambda item: item.start)
            self._sorted = merged
            self._ends = [item.end for item in merged]
        self.items.extend(items)
        self._top = max(self._top, *(item.end for item in items)) if items else self._top

    def write(self, start: int, data: bytes | memoryview, what: str) -> Item:
        return self.add(Item(start, len(data), what, data=data))

    def zero(self, start: int, size: int, what: str) -> Item:
        return self.add(Item(start, size, what, zero=True))

    def reserve(self, start: int, size: int, what: str) -> Item:
        return self.add(Item(start, size, what))

    def find(
        self, size: int, *, align: int = PAGE_SIZE, lo: int = 0, hi: int = FOUR_GIB, top_down: bool = False
    ) -> int | None:
        """The lowest (or highest) ``align``-ed address in usable RAM within [lo, hi)
        where ``size`` bytes clash with nothing already in the layout."""
        ranges = [(max(a, lo), min(b, hi)) for a, b in self.ram.usable()]
        ranges = [(a, b) for a, b in ranges if a < b]
        if top_down:
            for a, b in reversed(ranges):
                addr = align_down(b - size, align)
                while addr >= a:
                    clash = self._clash(addr, addr + max(size, 1))
                    if clash is None:
                        return addr
                    addr = align_down(clash.start - size, align)
        else:
            for a, b in ranges:
                addr = align_up(a, align)
                while addr + size <= b:
                    clash = self._clash(addr, addr + max(size, 1))
                    if clash is None:
                        return addr
                    addr = align_up(clash.end, align)
        return None

    def allocate(
        self,
        size: int,
        what: str,
        *,
        align: int = PAGE_SIZE,
        lo: int = 0,
        hi: int = FOUR_GIB,
        top_down: bool = False,
    ) -> Item:
        """Reserve ``size`` bytes somewhere free; fill in ``data`` on the returned item."""
        addr = self.find(size, align=align, lo=lo, hi=hi, top_down=top_down)
        if addr is None:
            raise self.fail(
                f"no room for the {what} ({size:#x} bytes) in guest RAM between {lo:#x} and {hi:#x} "
                f"(RAM: {self.ram.describe()}; in use: {self.describe_items()})"
            )
        return self.add(Item(addr, size, what))

    def boot_tables(self, long_mode: bool, hi: int = LOW_STRUCTS_END) -> int:
        """Keep pages free for the GDT (and long-mode page tables) the machine writes."""
        size = BOOT_TABLES_LONG if long_mode else BOOT_TABLES_PROTECTED
        what = "boot GDT and page tables" if long_mode else "boot GDT"
        return self.allocate(size, what, lo=LOW_STRUCTS_START, hi=hi).start

    def describe_items(self, limit: int = 8) -> str:
        """The items by address, the first ``limit`` of them (an ELF may have 65,534)."""
        items = sorted(self.items, key=lambda i: i.start)
        text = ", ".join(item.describe() for item in items[:limit]) or "nothing"
        if len(items) > limit:
            text += f" and {len(items) - limit} more"
        return text

    def image_end(self) -> int:
        """The first address above everything laid out so far."""
        return self._top

    def commit(self, memory: GuestMemory) -> list[tuple[int, int]]:
        """Do the writes; returns the written ranges, merged."""
        written: list[tuple[int, int]] = []
        for item in self.items:
            if item.size == 0:
                continue
            if item.data is not None:
                _store(memory, item.start, memoryview(item.data))
            elif item.zero:
                _fill(memory, item.start, item.size)
            else:
                continue
            written.append((item.start, item.end))
        return merge_ranges(written)


def boot_spec(path: Path, entry: int, mode: X86Mode, boot_tables: int, registers: dict[str, int]) -> BootSpec:
    try:
        return BootSpec(
            arch=Arch.X86_64, entry=entry, x86_mode=mode, boot_tables=boot_tables, registers=dict(registers)
        )
    except RecordError as exc:
        raise ImageError(path, f"cannot start it: {exc}") from None


def finish(layout: Layout, memory: GuestMemory, boot: BootSpec, kind: str) -> LoadedKernel:
    """Write the (fully validated) layout; ``boot`` is built before, so it cannot fail after."""
    return LoadedKernel(boot=boot, kind=kind, extents=layout.commit(memory))


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


# The layout checks ranges against merged RAM, so one item may span two adjacent
# regions; GuestMemory accesses stay within one region, hence the splitting.
def _store(memory: GuestMemory, addr: int, data: memoryview) -> None:
    while data.nbytes:
        region = memory.region_at(addr)
        assert region is not None, "checked against the RAM map before any write"
        count = min(data.nbytes, region.end - addr)
        memory.write(addr, data[:count])
        addr += count
        data = data[count:]


def _fill(memory: GuestMemory, addr: int, size: int) -> None:
    while size:
        region = memory.region_at(addr)
        assert region is not None, "checked against the RAM map before any write"
        count = min(size, region.end - addr)
        memory.fill(addr, count)
        addr += count
        size -= count


def file_name_bytes(path: Path) -> bytes:
    """The last component of ``path`` as the bytes the file system holds (a name
    that is not UTF-8 round-trips instead of raising)."""
    return os.fsencode(path.name)


def utf8_cmdline(path: Path, cmdline: str) -> bytes:
    """``cmdline`` as UTF-8.  A command-line argument that is not UTF-8 reaches
    Python as lone surrogates, which cannot be encoded: say so instead of
    letting ``UnicodeEncodeError`` out."""
    if not isinstance(cmdline, str):
        raise ImageError(path, f"the command line must be a string, not {type(cmdline).__name__}")
    try:
        return cmdline.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ImageError(
            path, f"the command line is not valid UTF-8 (character {exc.start} cannot be encoded)"
        ) from None


def encode_cmdline(path: Path, cmdline: str, limit: int, protocol: str) -> bytes:
    """The NUL-terminated command line; ``limit`` counts the bytes before the NUL."""
    raw = utf8_cmdline(path, cmdline)
    if b"\0" in raw:
        raise ImageError(path, "the command line contains a NUL character")
    if len(raw) > limit:
        raise ImageError(
            path, f"the command line is {len(raw)} bytes; the {protocol} boot protocol allows at most {limit}"
        )
    return raw + b"\0"


def read_initrd(kernel: Path, initrd: Path, *, limit: int) -> bytes:
    """The initrd's bytes (at most ``limit``: the guest RAM); errors name the
    initrd (and the kernel it was for)."""
    try:
        return read_file(initrd, "initrd", limit=limit)
    except ImageError as exc:
        raise ImageError(initrd, f"{exc.problem} (initrd for {kernel})") from None


def reject_extras(path: Path, kind: str, cmdline: str, initrd: Path | None) -> None:
    """Formats without a boot protocol have nowhere to pass a command line or initrd."""
    if cmdline:
        raise ImageError(path, f"a {kind} image has no boot protocol to pass a command line to")
    if initrd is not None:
        raise ImageError(path, f"a {kind} image has no boot protocol to pass an initrd to")
