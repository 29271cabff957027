"""Guest memory: host mappings that back guest-physical RAM.

Each region's host memory comes from :func:`pyvmm.host.allocate_ram` (an anonymous
``mmap`` with ``MAP_NORESERVE`` on POSIX, ``VirtualAlloc`` on Windows), so a large
guest costs nothing until its pages are touched.  Every access names a
guest-physical address and is checked against the regions before any host memory
is touched: an access that is not entirely inside one region raises
:class:`~pyvmm.errors.GuestMemoryError`, a bad value (``write_u8(0, 256)``) a
:class:`~pyvmm.errors.ConfigError` naming the argument and its range.  Views are
zero-copy ``memoryview`` s of the mapping; they keep the mapping alive, so a view
can never point at unmapped host memory.

Concurrency: accesses may race :meth:`GuestMemory.insert`, :meth:`GuestMemory.remove`
and :meth:`GuestMemory.close` on other threads.  Layout changes are serialised by a
lock; a lookup reads the sorted region index without it and accepts only a region
that itself covers the address (so a lookup that races a change can miss, and then
retries under the lock, but never returns another region).  An access that races
the removal of its region either completes on that region's memory, which its view
keeps mapped, or raises :class:`~pyvmm.errors.VmStateError` if the region was
already closed.  Adding, removing or finding a region costs O(log N) bisection
steps over a chunked sorted index plus a bounded ``memmove`` (see
:class:`_RegionIndex`); ``benchmarks/bench_guest_memory.py`` prints the costs.
"""

from __future__ import annotations

import bisect
import heapq
import struct
import threading
from collections.abc import Iterator
from typing import Any

from pyvmm.config import PAGE_SIZE, MemoryRegionSpec
from pyvmm.errors import ConfigError, GuestMemoryError, VmStateError
from pyvmm.host import HostRam, allocate_ram

#: Guest-physical addresses and sizes are unsigned 64-bit: an access at or past this
#: is refused as out of range (regions themselves end below 2**52: MemoryRegionSpec).
ADDRESS_LIMIT = 1 << 64

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def _describe(value: object) -> str:
    """``value`` for an error message, cut short: the input may be huge."""
    text = repr(value) if isinstance(value, (int, str, bytes)) else f"a {type(value).__name__}"
    return text if len(text) <= 40 else text[:37] + "..."


def _check_int(what: str, value: Any, lo: int, hi: int, error: type[Exception] = ConfigError) -> int:
    """``value`` as an int in ``lo..hi``, else ``error`` naming ``what`` and the range
    (booleans are refused: ``True`` is almost never meant as 1 here)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{what} must be an integer from {lo:#x} to {hi:#x}, not {_describe(value)}")
    if not lo <= value <= hi:
        raise error(f"{what} {value:#x} is out of range: must be from {lo:#x} to {hi:#x}")
    return int(value)


class RamRegion:
    """One guest-physical range and the host memory behind it.

    ``slot`` is the backend-visible slot number core assigned; ``host_addr`` the
    address of the memory in this process (what KVM calls ``userspace_addr``);
    ``ram`` the :class:`~pyvmm.host.HostRam`.  Once closed, every access through the
    region raises :class:`VmStateError`; views taken before stay valid.
    """

    __slots__ = (
        "__weakref__",
        "_inserted",
        "_view",
        "end",
        "guest_phys_addr",
        "host_accessible",
        "host_addr",
        "ram",
        "size",
        "slot",
        "spec",
    )

    def __init__(self, spec: MemoryRegionSpec, slot: int) -> None:
        self.spec = spec
        self.slot = slot
        # Plain attributes, not properties over the spec: the lookup reads them on
        # every access.
        self.guest_phys_addr: int = spec.guest_phys_addr
        self.size: int = spec.size
        self.end: int = spec.guest_phys_addr + spec.size
        #: False once the hypervisor has taken the pages from the host (memory lent
        #: to a protected VM): every access through pyvmm is then refused instead of
        #: faulting.  Set by the backend when that happens: in ``pyvmm_map_memory``,
        #: or later (Gunyah takes lent pages from ``pyvmm_start_vm`` on).
        self.host_accessible = True
        #: Visible to its GuestMemory's lookups (set by GuestMemory.insert/remove).
        self._inserted = False
        self.ram: HostRam = allocate_ram(spec.size)
        self.host_addr: int = self.ram.address
        self._view: memoryview | None = self.ram.buffer

    @property
    def mapping(self) -> Any:
        """The object owning the host memory (an ``mmap`` on POSIX); None once closed.
        It lives as long as any view of the region."""
        return self.ram.mapping

    @property
    def read_only(self) -> bool:
        return self.spec.read_only

    @property
    def log_dirty(self) -> bool:
        return self.spec.log_dirty

    @property
    def closed(self) -> bool:
        return self._view is None

    def view(self, offset: int = 0, size: int | None = None) -> memoryview:
        """A zero-copy view of ``size`` bytes (default: to the end) at ``offset``
        into the region.

        :raises GuestMemoryError: the range is not inside the region.
        :raises VmStateError: the region has been unmapped.
        """
        view = self._view  # read once: close() may run on another thread
        if view is None:
            raise VmStateError(f"memory region at {self.guest_phys_addr:#x} has been unmapped")
        end = self.size if size is None else offset + size
        # A negative offset would slice from the end: the wrong bytes, not an error.
        if not 0 <= offset <= end <= self.size:
            raise GuestMemoryError(
                f"range {offset:#x}+{end - offset:#x} is not inside the region "
                f"{self.guest_phys_addr:#x}..{self.end:#x} (size {self.size:#x})"
            )
        return view[offset:end]

    def close(self) -> None:
        """Unmap.  If a caller still holds a view, the memory lives until that view
        is released (it is never unmapped under a live view).  Idempotent."""
        self._view = None
        self.ram.close()

    def __repr__(self) -> str:
        flags = "".join(f for f, on in (("r", True), ("w", not self.read_only), ("d", self.log_dirty)) if on)
        return f"RamRegion(slot={self.slot}, {self.guest_phys_addr:#x}..{self.end:#x}, {flags})"


#: A chunk of the region index splits in two when it reaches twice this many regions.
_CHUNK = 256


class _RegionIndex:
    """Regions sorted by start address, in chunks of fewer than ``2 * _CHUNK``.

    One flat sorted list would cost a ``memmove`` of up to N pointers per insertion
    or removal (at 64k regions that dominated adding a region); chunks bound it by
    ``2 * _CHUNK`` plus the short list of chunk heads.  Mutated only under the
    owner's lock.  :meth:`covering` may run without it: every list operation is
    atomic, a reader that sees the lists half-way through a change finds no region
    or one that does not cover its address, and only a region covering the address
    is returned (the ranges are disjoint, so that is the right one).
    """

    __slots__ = ("firsts", "regions", "starts")

    def __init__(self) -> None:
        self.firsts: list[int] = []  # the first start address of each chunk
        self.starts: list[list[int]] = []  # each chunk's start addresses, for bisect
        self.regions: list[list[RamRegion]] = []  # each chunk's regions

    def covering(self, gpa: int) -> RamRegion | None:
        """The region whose range contains ``gpa``, or None (see the class docstring)."""
        chunk = bisect.bisect_right(self.firsts, gpa) - 1
        if chunk < 0:
            return None
        try:
            starts = self.starts[chunk]
            regions = self.regions[chunk]
            index = bisect.bisect_right(starts, gpa) - 1
            if index < 0:  # never wrap to the end of the chunk
                return None
            region = regions[index]
        except IndexError:  # the lists changed under a lock-free reader
            return None
        if region.guest_phys_addr <= gpa < region.end:
            return region
        return None

    def position(self, region: RamRegion) -> tuple[int, int] | None:
        """(chunk, index) of ``region`` itself, or None."""
        start = region.guest_phys_addr
        chunk = bisect.bisect_right(self.firsts, start) - 1
        if chunk < 0:
            return None
        index = bisect.bisect_left(self.starts[chunk], start)
        regions = self.regions[chunk]
        if index < len(regions) and regions[index] is region:
            return chunk, index
        return None

    def neighbours(self, start: int) -> tuple[RamRegion | None, RamRegion | None]:
        """The last region starting at or before ``start`` and the first one after."""
        chunk = bisect.bisect_right(self.firsts, start) - 1
        if chunk < 0:
            return None, (self.regions[0][0] if self.regions else None)
        regions = self.regions[chunk]
        index = bisect.bisect_right(self.starts[chunk], start)  # >= 1: the chunk starts at or before
        before = regions[index - 1]
        if index < len(regions):
            return before, regions[index]
        return before, (self.regions[chunk + 1][0] if chunk + 1 < len(self.regions) else None)

    def add(self, region: RamRegion) -> None:
        start = region.guest_phys_addr
        if not self.regions:
            self.starts.append([start])
            self.regions.append([region])
            self.firsts.append(start)
            return
        chunk = max(bisect.bisect_right(self.firsts, start) - 1, 0)
        starts, regions = self.starts[chunk], self.regions[chunk]
        index = bisect.bisect_left(starts, start)
        regions.insert(index, region)
        starts.insert(index, start)
        if index == 0:
            self.firsts[chunk] = start
        if len(regions) >= 2 * _CHUNK:
            # New lists for both halves: a reader holding the old chunk still sees
            # a consistent (if stale) one.
            half = len(regions) // 2
            self.regions[chunk : chunk + 1] = [regions[:half], regions[half:]]
            self.starts[chunk : chunk + 1] = [starts[:half], starts[half:]]
            self.firsts.insert(chunk + 1, starts[half])

    def discard(self, chunk: int, index: int) -> None:
        regions, starts = self.regions[chunk], self.starts[chunk]
        del regions[index]
        del starts[index]
        if not regions:
            del self.regions[chunk]
            del self.starts[chunk]
            del self.firsts[chunk]
        elif index == 0:
            self.firsts[chunk] = starts[0]

    def __iter__(self) -> Iterator[RamRegion]:
        for regions in self.regions:
            yield from regions


class GuestMemory:
    """The set of RAM regions of one VM, looked up by guest-physical address.

    A region's life: :meth:`allocate` (reserves its range and a slot, creates the
    host memory; not yet visible to lookups), then :meth:`insert` once the backend
    has mapped it, or :meth:`release_slot` if that failed; :meth:`remove` ends it.
    """

    def __init__(self) -> None:
        # Serialises every layout change; lookups take it only after a miss.
        self._lock = threading.Lock()
        # Every region allocated and not yet released or removed, inserted or not:
        # the overlap check runs against all of them, so two threads adding
        # overlapping regions at once cannot both succeed.  Lookups accept only
        # inserted ones (RamRegion._inserted).
        self._index = _RegionIndex()
        self._inserted = 0
        # Slots given back, as a min-heap: the lowest is reused first.
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._closed = False

    # --- layout -------------------------------------------------------------
    def allocate(self, spec: MemoryRegionSpec) -> RamRegion:
        """Create the host memory for ``spec`` and assign it the lowest free slot.

        :raises GuestMemoryError: it overlaps a region (inserted or being added), or
            the host refused the memory (then no slot is consumed).
        :raises VmStateError: this guest memory is closed.
        """
        start, end = spec.guest_phys_addr, spec.end
        with self._lock:
            if self._closed:
                raise VmStateError("the guest memory is closed")
            # The ranges are disjoint and sorted: only the two neighbours of start
            # can overlap the new one.
            before, after = self._index.neighbours(start)
            clash = before if before is not None and before.end > start else None
            if clash is None and after is not None and after.guest_phys_addr < end:
                clash = after
            if clash is not None:
                raise GuestMemoryError(
                    f"region {start:#x}..{end:#x} overlaps {clash.guest_phys_addr:#x}..{clash.end:#x}"
                )
            reuse = bool(self._free_slots)
            slot = self._free_slots[0] if reuse else self._next_slot
            try:
                region = RamRegion(spec, slot)
            except OSError as exc:
                raise GuestMemoryError(f"cannot reserve {spec.size:#x} bytes of host memory: {exc}") from exc
            if reuse:
                heapq.heappop(self._free_slots)
            else:
                self._next_slot += 1
            self._index.add(region)
            return region

    def _forget(self, position: tuple[int, int], region: RamRegion) -> None:
        self._index.discard(*position)
        heapq.heappush(self._free_slots, region.slot)

    def release_slot(self, region: RamRegion) -> None:
        """Give back a region from :meth:`allocate` that was never inserted: its range
        and slot become free and its memory is unmapped.  Idempotent.

        :raises VmStateError: ``region`` is inserted (use :meth:`remove`).
        """
        with self._lock:
            position = self._index.position(region)
            if position is not None:
                if region._inserted:
                    raise VmStateError(f"{region!r} is inserted: remove it instead of releasing its slot")
                self._forget(position, region)
        region.close()

    def insert(self, region: RamRegion) -> None:
        """Make an allocated region visible to lookups.

        :raises VmStateError: the guest memory was closed meanwhile (the region is
            then closed too), or ``region`` was not allocated here or is inserted.
        """
        with self._lock:
            if self._closed:
                region.close()
                raise VmStateError("the guest memory was closed while the region was being added")
            if self._index.position(region) is None:
                raise VmStateError(f"{region!r} was not allocated by this guest memory (or was released)")
            if region._inserted:
                raise VmStateError(f"{region!r} is already inserted")
            region._inserted = True
            self._inserted += 1

    def remove(self, region: RamRegion) -> None:
        """Forget ``region`` and unmap it; its range and slot become free for reuse.

        :raises GuestMemoryError: ``region`` is not in this guest memory.
        """
        with self._lock:
            position = self._index.position(region)
            if position is None or not region._inserted:
                raise GuestMemoryError(f"{region!r} is not mapped in this guest memory")
            region._inserted = False
            self._inserted -= 1
            self._forget(position, region)
        region.close()

    def close(self) -> None:
        """Unmap every inserted region; later accesses raise :class:`VmStateError`.
        A region still being added is closed by :meth:`insert` or :meth:`release_slot`.
        Idempotent."""
        with self._lock:
            self._closed = True
            # A new index rather than emptying this one: a lock-free lookup holding
            # the old one finds the old regions, which refuse access once closed.
            regions = [region for region in self._index if region._inserted]
            self._index = _RegionIndex()
            self._inserted = 0
            for region in regions:
                region._inserted = False
        for region in regions:
            region.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __iter__(self) -> Iterator[RamRegion]:
        """The inserted regions in address order (a snapshot)."""
        with self._lock:
            return iter([region for region in self._index if region._inserted])

    def __len__(self) -> int:
        return self._inserted

    def __contains__(self, region: object) -> bool:
        """Whether ``region`` is inserted here (O(log N))."""
        if not isinstance(region, RamRegion):
            return False
        with self._lock:
            return region._inserted and self._index.position(region) is not None

    # --- lookup -------------------------------------------------------------
    def region_at(self, gpa: int) -> RamRegion | None:
        """The inserted region containing ``gpa``, or None.

        :raises GuestMemoryError: ``gpa`` is not an integer.
        """
        if type(gpa) is not int:
            if isinstance(gpa, bool) or not isinstance(gpa, int):
                raise GuestMemoryError(f"region_at: gpa must be an integer, not {_describe(gpa)}")
            gpa = int(gpa)
        return self._region_at(gpa)

    def _region_at(self, gpa: int) -> RamRegion | None:
        region = self._index.covering(gpa)  # without the lock: see _RegionIndex
        if region is not None and region._inserted:
            return region
        # A miss may come from a change half-way through: ask again, consistently.
        with self._lock:
            region = self._index.covering(gpa)
            return region if region is not None and region._inserted else None

    def contains(self, gpa: int, size: int = 1) -> bool:
        """Whether ``[gpa, gpa + size)`` lies inside one region."""
        if isinstance(gpa, bool) or not isinstance(gpa, int) or isinstance(size, bool) or not isinstance(size, int):
            return False
        region = self._region_at(gpa)
        return region is not None and size >= 0 and gpa + size <= region.end

    def _locate(self, gpa: int, size: int) -> tuple[RamRegion, int]:
        if type(gpa) is not int or type(size) is not int or gpa < 0 or size < 0 or gpa >= ADDRESS_LIMIT:
            gpa = _check_int("invalid guest access: gpa", gpa, 0, ADDRESS_LIMIT - 1, GuestMemoryError)
            size = _check_int("invalid guest access: size", size, 0, ADDRESS_LIMIT, GuestMemoryError)
        region = self._region_at(gpa)
        if region is None:
            if self._closed:
                raise VmStateError(f"cannot access guest address {gpa:#x}: the guest memory is closed")
            raise GuestMemoryError(f"guest address {gpa:#x} is not in guest RAM")
        if gpa + size > region.end:
            raise GuestMemoryError(
                f"guest access {gpa:#x}+{size:#x} runs past the end of RAM region "
                f"{region.guest_phys_addr:#x}..{region.end:#x}"
            )
        if not region.host_accessible:
            raise GuestMemoryError(
                f"guest RAM at {gpa:#x} is lent to the guest (region {region.guest_phys_addr:#x}.."
                f"{region.end:#x}): the host has no access to it"
            )
        return region, gpa - region.guest_phys_addr

    # --- access -------------------------------------------------------------
    def view(self, gpa: int, size: int) -> memoryview:
        """Zero-copy, writable view of ``size`` bytes at ``gpa`` (must lie in one region)."""
        region, offset = self._locate(gpa, size)
        return region.view(offset, size)

    def read(self, gpa: int, size: int) -> bytes:
        region, offset = self._locate(gpa, size)
        return region.view(offset, size).tobytes()

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` (any bytes-like object) at ``gpa``."""
        if type(data) is not bytes:
            try:
                raw = memoryview(data)
            except TypeError:
                raise ConfigError(f"data must be a bytes-like object, not {_describe(data)}") from None
            # Any format or shape: what is written is its bytes.
            data = raw.cast("B") if raw.c_contiguous else raw.tobytes()
            size = data.nbytes if isinstance(data, memoryview) else len(data)
        else:
            size = len(data)
        region, offset = self._locate(gpa, size)
        region.view(offset, size)[:] = data

    def fill(self, gpa: int, size: int, byte: int = 0) -> None:
        """Set ``size`` bytes at ``gpa`` to ``byte``."""
        if type(byte) is not int or not 0 <= byte <= 0xFF:
            _check_int("fill: byte", byte, 0, 0xFF)
        region, offset = self._locate(gpa, size)
        view = region.view(offset, size)
        if byte == 0 and size >= PAGE_SIZE:
            view[:] = bytes(size)
        else:
            view[:] = bytes([byte]) * size

    def read_u8(self, gpa: int) -> int:
        region, offset = self._locate(gpa, 1)
        return region.view(offset, 1)[0]

    def read_u16(self, gpa: int) -> int:
        region, offset = self._locate(gpa, 2)
        return int(_U16.unpack(region.view(offset, 2))[0])

    def read_u32(self, gpa: int) -> int:
        region, offset = self._locate(gpa, 4)
        return int(_U32.unpack(region.view(offset, 4))[0])

    def read_u64(self, gpa: int) -> int:
        region, offset = self._locate(gpa, 8)
        return int(_U64.unpack(region.view(offset, 8))[0])

    def write_u8(self, gpa: int, value: int) -> None:
        if type(value) is not int or not 0 <= value <= 0xFF:
            _check_int("write_u8: value", value, 0, 0xFF)
        self.write(gpa, bytes((value,)))

    def write_u16(self, gpa: int, value: int) -> None:
        if type(value) is not int or not 0 <= value <= 0xFFFF:
            _check_int("write_u16: value", value, 0, 0xFFFF)
        self.write(gpa, _U16.pack(value))

    def write_u32(self, gpa: int, value: int) -> None:
        if type(value) is not int or not 0 <= value <= 0xFFFF_FFFF:
            _check_int("write_u32: value", value, 0, 0xFFFF_FFFF)
        self.write(gpa, _U32.pack(value))

    def write_u64(self, gpa: int, value: int) -> None:
        if type(value) is not int or not 0 <= value <= 0xFFFF_FFFF_FFFF_FFFF:
            _check_int("write_u64: value", value, 0, 0xFFFF_FFFF_FFFF_FFFF)
        self.write(gpa, _U64.pack(value))
