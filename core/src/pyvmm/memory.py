"""Guest memory: host mappings that back guest-physical RAM.

Each region is an anonymous ``mmap`` with ``MAP_NORESERVE``, so a large guest
costs nothing until its pages are touched.  Every access names a guest-physical
address and is checked against the regions before any host memory is touched:
an access that is not entirely inside one region raises
:class:`~pyvmm.errors.GuestMemoryError`.  Views are zero-copy ``memoryview`` s of
the mapping; they keep the mapping alive, so a view can never point at unmapped
host memory.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import mmap
import struct
from collections.abc import Iterator

from pyvmm.config import PAGE_SIZE, MemoryRegionSpec
from pyvmm.errors import GuestMemoryError, VmStateError

# Python 3.10's mmap module lacks the constant; the value is the same on every
# Linux architecture pyvmm supports.
MAP_NORESERVE: int = getattr(mmap, "MAP_NORESERVE", 0x4000)


class RamRegion:
    """One guest-physical range and the host mapping behind it.

    ``slot`` is the backend-visible slot number core assigned; ``host_addr`` the
    address of the mapping in this process (what KVM calls ``userspace_addr``).
    """

    __slots__ = ("__weakref__", "_view", "host_accessible", "host_addr", "mapping", "slot", "spec")

    def __init__(self, spec: MemoryRegionSpec, slot: int) -> None:
        self.spec = spec
        self.slot = slot
        #: False once the backend has lent the pages to the guest (a protected VM):
        #: the host then loses access, so every access through pyvmm is refused
        #: instead of faulting.  Set by ``pyvmm_map_memory``.
        self.host_accessible = True
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
        self.mapping: mmap.mmap | None = mmap.mmap(-1, spec.size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        anchor = ctypes.c_char.from_buffer(self.mapping)
        self.host_addr = ctypes.addressof(anchor)
        del anchor  # release the buffer export so close() can unmap
        self._view: memoryview | None = memoryview(self.mapping)

    @property
    def guest_phys_addr(self) -> int:
        return self.spec.guest_phys_addr

    @property
    def size(self) -> int:
        return self.spec.size

    @property
    def end(self) -> int:
        return self.spec.guest_phys_addr + self.spec.size

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
        """A zero-copy view at ``offset`` into the region (bounds already checked by the caller)."""
        if self._view is None:
            raise VmStateError(f"memory region at {self.guest_phys_addr:#x} has been unmapped")
        end = self.size if size is None else offset + size
        return self._view[offset:end]

    def close(self) -> None:
        """Unmap.  If a caller still holds a view, the mapping lives until that view
        is released (it is never unmapped under a live view)."""
        if self._view is not None:
            self._view.release()
            self._view = None
        mapping, self.mapping = self.mapping, None
        if mapping is not None:
            # A caller's view may still export it; it is then unmapped when that view goes.
            with contextlib.suppress(BufferError):
                mapping.close()

    def __repr__(self) -> str:
        flags = "".join(f for f, on in (("r", True), ("w", not self.read_only), ("d", self.log_dirty)) if on)
        return f"RamRegion(slot={self.slot}, {self.guest_phys_addr:#x}..{self.end:#x}, {flags})"


class GuestMemory:
    """The set of RAM regions of one VM, looked up by guest-physical address."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._regions: list[RamRegion] = []
        self._free_slots: list[int] = []
        self._next_slot = 0

    # --- layout -------------------------------------------------------------
    def allocate(self, spec: MemoryRegionSpec) -> RamRegion:
        """Create the host mapping for ``spec`` and assign it the lowest free slot.
        Raises if it overlaps an existing region.  The region is not yet visible to
        lookups: :meth:`insert` does that once the backend has mapped it."""
        clash = self._overlapping(spec.guest_phys_addr, spec.end)
        if clash is not None:
            raise GuestMemoryError(
                f"region {spec.guest_phys_addr:#x}..{spec.end:#x} overlaps {clash.guest_phys_addr:#x}..{clash.end:#x}"
            )
        slot = min(self._free_slots) if self._free_slots else self._next_slot
        try:
            region = RamRegion(spec, slot)
        except OSError as exc:
            raise GuestMemoryError(f"cannot reserve {spec.size:#x} bytes of host memory: {exc}") from exc
        if slot in self._free_slots:
            self._free_slots.remove(slot)
        else:
            self._next_slot += 1
        return region

    def release_slot(self, region: RamRegion) -> None:
        """Give back a slot from :meth:`allocate` whose region was never inserted."""
        self._free_slots.append(region.slot)
        region.close()

    def insert(self, region: RamRegion) -> None:
        index = bisect.bisect(self._starts, region.guest_phys_addr)
        self._starts.insert(index, region.guest_phys_addr)
        self._regions.insert(index, region)

    def remove(self, region: RamRegion) -> None:
        """Forget ``region`` and unmap it; its slot becomes free for reuse."""
        index = self._regions.index(region)
        del self._starts[index]
        del self._regions[index]
        self._free_slots.append(region.slot)
        region.close()

    def close(self) -> None:
        for region in self._regions:
            region.close()
        self._regions.clear()
        self._starts.clear()

    def _overlapping(self, start: int, end: int) -> RamRegion | None:
        for region in self._regions:
            if start < region.end and region.guest_phys_addr < end:
                return region
        return None

    def __iter__(self) -> Iterator[RamRegion]:
        return iter(list(self._regions))

    def __len__(self) -> int:
        return len(self._regions)

    # --- lookup -------------------------------------------------------------
    def region_at(self, gpa: int) -> RamRegion | None:
        index = bisect.bisect(self._starts, gpa) - 1
        if index >= 0:
            region = self._regions[index]
            if gpa < region.end:
                return region
        return None

    def contains(self, gpa: int, size: int = 1) -> bool:
        region = self.region_at(gpa)
        return region is not None and size >= 0 and gpa + size <= region.end

    def _locate(self, gpa: int, size: int) -> tuple[RamRegion, int]:
        if gpa < 0 or size < 0:
            raise GuestMemoryError(f"invalid guest access at {gpa:#x} size {size}")
        region = self.region_at(gpa)
        if region is None:
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
        size = len(data) if not isinstance(data, memoryview) else data.nbytes
        region, offset = self._locate(gpa, size)
        region.view(offset, size)[:] = data

    def fill(self, gpa: int, size: int, byte: int = 0) -> None:
        region, offset = self._locate(gpa, size)
        view = region.view(offset, size)
        if byte == 0 and size >= PAGE_SIZE:
            view[:] = bytes(size)
        else:
            view[:] = bytes([byte]) * size

    def read_u8(self, gpa: int) -> int:
        return self.read(gpa, 1)[0]

    def read_u16(self, gpa: int) -> int:
        return int(struct.unpack("<H", self.read(gpa, 2))[0])

    def read_u32(self, gpa: int) -> int:
        return int(struct.unpack("<I", self.read(gpa, 4))[0])

    def read_u64(self, gpa: int) -> int:
        return int(struct.unpack("<Q", self.read(gpa, 8))[0])

    def write_u8(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<B", value))

    def write_u16(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<H", value))

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<I", value))

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<Q", value))
