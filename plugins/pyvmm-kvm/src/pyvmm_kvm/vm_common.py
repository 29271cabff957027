"""What a KVM VM does the same on x86 and arm64: memory slots, the dirty log,
ioeventfds, reading guest RAM for error reports, and the raw-capability escape
hatch.  The ioctls and their structs are architecture-neutral in
``<linux/kvm.h>``; :class:`KvmVm` (x86) and :class:`KvmArm64Vm` (arm64) add what
differs (the VM type, the interrupt controller, the clock, coalesced I/O).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from pyvmm.backend import address_of
from pyvmm.config import PAGE_SIZE
from pyvmm.errors import HypervisorError
from pyvmm.memory import RamRegion
from pyvmm.vcpu_state import AddressSpace, IoEventAddress
from pyvmm_kvm import bindings as k
from pyvmm_kvm.bindings import ffi

if TYPE_CHECKING:
    from pyvmm.backend import DeviceHost
    from pyvmm.host import Event
    from pyvmm_kvm.system import KvmSystem


class KvmVmCommon:
    """The architecture-neutral half of a KVM VM; the subclass sets ``kvm``,
    ``host``, ``fd``, ``regions`` and ``_dirty_logs`` (empty) in its constructor, and ``_ffi`` to the FFI
    of its architecture's declarations (the structs here are laid out the same
    in both)."""

    _ffi: Any = ffi
    kvm: KvmSystem
    host: DeviceHost
    fd: int
    regions: dict[int, RamRegion]
    #: Per memory slot: the region, its ``struct kvm_dirty_log`` and bitmap (kept
    #: alive here), the struct's address and a view of the bitmap (made on the
    #: first :meth:`get_dirty_log`).
    _dirty_logs: dict[int, tuple[RamRegion, Any, int, Any]]

    # --- memory -----------------------------------------------------------------
    def _set_region(self, slot: int, flags: int, gpa: int, size: int, host_addr: int) -> None:
        # Positional, in the struct's field order (slot, flags, guest_phys_addr,
        # memory_size, userspace_addr): no dict built for every slot change.
        region = self._ffi.new("struct kvm_userspace_memory_region *", [slot, flags, gpa, size, host_addr])
        self.host.ioctl(self.fd, k.KVM_SET_USER_MEMORY_REGION, region)

    def _check_region(self, region: RamRegion) -> None:
        """Refuse, before any ioctl, a region this VM cannot hold (arm64: beyond its IPA size)."""

    def map_memory(self, region: RamRegion) -> None:
        self._check_region(region)
        flags = 0
        if region.read_only:
            flags |= k.KVM_MEM_READONLY
        if region.log_dirty:
            flags |= k.KVM_MEM_LOG_DIRTY_PAGES
        self._set_region(region.slot, flags, region.guest_phys_addr, region.size, region.host_addr)
        self.regions[region.slot] = region

    def unmap_memory(self, region: RamRegion) -> None:
        # A size of 0 deletes the slot.
        self._set_region(region.slot, 0, region.guest_phys_addr, 0, region.host_addr)
        del self.regions[region.slot]
        self._dirty_logs.pop(region.slot, None)

    def read_guest(self, gpa: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``gpa`` from the region holding it (fewer at the
        region's end, none outside RAM), for error reports."""
        for region in self.regions.values():
            if region.guest_phys_addr <= gpa < region.end:
                offset = gpa - region.guest_phys_addr
                return region.view(offset, min(size, region.size - offset)).tobytes()
        return b""

    def get_dirty_log(self, region: RamRegion) -> bytes:
        # The structs are made once per region and kept: a dirty-page reset
        # asks for the log every iteration, and building them cost more than
        # the ioctl.  A region mapped anew (a new RamRegion) gets its own.
        buffers = self._dirty_logs.get(region.slot)
        if buffers is None or buffers[0] is not region:
            pages = region.size // PAGE_SIZE
            # KVM writes whole longs: the buffer must be rounded up to 64 pages.
            bitmap = self._ffi.new("uint8_t[]", (pages + 63) // 64 * 8)
            log = self._ffi.new("struct kvm_dirty_log *", {"slot": region.slot})
            log.dirty_bitmap = bitmap
            view = self._ffi.buffer(bitmap, (pages + 7) // 8)
            buffers = self._dirty_logs[region.slot] = (region, (log, bitmap), address_of(log), view)
        _, _, address, view = buffers
        self.host.ioctl(self.fd, k.KVM_GET_DIRTY_LOG, address)
        return bytes(view)

    # --- ioeventfds ---------------------------------------------------------------
    def register_ioevent(self, event: Event, address: IoEventAddress, datamatch: int | None, length: int) -> None:
        self._ioeventfd(event.fileno(), address, datamatch, length, remove=False)

    def unregister_ioevent(self, event: Event, address: IoEventAddress, datamatch: int | None, length: int) -> None:
        self._ioeventfd(event.fileno(), address, datamatch, length, remove=True)

    def _check_ioevent(self, address: IoEventAddress) -> None:
        """Refuse, before any ioctl, an address this architecture has no exit for."""

    def _ioeventfd(self, fd: int, address: IoEventAddress, datamatch: int | None, length: int, *, remove: bool) -> None:
        self._check_ioevent(address)
        flags = 0
        if address.space is AddressSpace.PIO:
            flags |= k.KVM_IOEVENTFD_FLAG_PIO
        if datamatch is not None:
            flags |= k.KVM_IOEVENTFD_FLAG_DATAMATCH
        if remove:
            flags |= k.KVM_IOEVENTFD_FLAG_DEASSIGN
        if length == 0 and not self.kvm.check_extension(k.KVM_CAP_IOEVENTFD_ANY_LENGTH):
            raise HypervisorError("KVM_IOEVENTFD", errno.EINVAL, "this KVM needs an explicit ioevent length")
        raw = self._ffi.new(
            "struct kvm_ioeventfd *",
            {"datamatch": datamatch or 0, "addr": address.address, "len": length, "fd": fd, "flags": flags},
        )
        self.host.ioctl(self.fd, k.KVM_IOEVENTFD, raw)

    # --- the escape hatch ---------------------------------------------------------
    def check_raw_capability(self, capability: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM fd: the answer for this VM."""
        return int(self.host.ioctl(self.fd, k.KVM_CHECK_EXTENSION, capability))

    def enable_raw_capability(self, capability: int, flags: int, args: tuple[int, ...]) -> int:
        """``KVM_ENABLE_CAP`` on the VM fd."""
        cap = self._ffi.new("struct kvm_enable_cap *", {"cap": capability, "flags": flags, "args": list(args)})
        return int(self.host.ioctl(self.fd, k.KVM_ENABLE_CAP, cap))
