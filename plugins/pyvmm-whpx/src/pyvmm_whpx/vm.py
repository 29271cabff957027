"""A WHPX partition: the VM class, whose methods are the backend's VM hooks.

Lifecycle (Microsoft, ``WHvCreatePartition`` / ``WHvSetupPartition``):
``WHvCreatePartition`` makes only the partition *object*; its setup-time
properties (the processor count, the extended exits) are set with
``WHvSetPartitionProperty`` (:mod:`pyvmm_whpx.options` says which
``backend_options`` ask for which); ``WHvSetupPartition`` then creates the partition
in the hypervisor, after which memory is mapped and virtual processors are
created.  :meth:`WhpxVm.create` does all of that, and deletes the partition
again if any step fails, so a failed create leaves nothing behind.
"""

from __future__ import annotations

import struct
from typing import Any

from pyvmm.backend import DllHost
from pyvmm.config import PAGE_SIZE, Arch, VmConfig
from pyvmm.errors import ConfigError
from pyvmm.host import Event, Win32Event
from pyvmm.memory import RamRegion
from pyvmm.vcpu_state import AddressSpace, IoEventAddress
from pyvmm_whpx import bindings as w
from pyvmm_whpx.bindings import address, ffi
from pyvmm_whpx.bindings import address as address_of
from pyvmm_whpx.host import HOST
from pyvmm_whpx.options import parse as parse_options
from pyvmm_whpx.system import Platform, query


class WhpxVm:
    """One partition and the guest memory mapped into it."""

    @classmethod
    def create(cls, backend: Any, config: VmConfig) -> WhpxVm:
        """``pyvmm_create_vm``."""
        if config.arch is not Arch.X86_64:
            raise ConfigError(f"arch: WHPX runs x86_64 guests here, not {config.arch.value}")
        host = HOST.current()
        found = query(host)
        if not found.hypervisor_present:
            raise ConfigError("the Windows Hypervisor Platform reports no hypervisor (HypervisorPresent is FALSE)")
        options = parse_options(config.backend_options, found.extended_exits)
        slot = ffi.new("void **")
        host.call_hresult("WHvCreatePartition", address(slot))
        handle = int(ffi.cast("uintptr_t", slot[0]))
        try:
            set_property(host, handle, w.PROPERTY_PROCESSOR_COUNT, struct.pack("<I", config.vcpus))
            # Both before setup: CpuidResultList may only be set then, and the
            # exits are wanted from the first instruction.
            if options.extended_exits:
                set_property(host, handle, w.PROPERTY_EXTENDED_VM_EXITS, struct.pack("<Q", options.extended_exits))
            if options.cpuid_results:
                set_property(host, handle, w.PROPERTY_CPUID_RESULT_LIST, options.cpuid_result_list())
            host.call_hresult("WHvSetupPartition", handle)
        except BaseException:
            host.call_hresult("WHvDeletePartition", handle)
            raise
        return cls(host, handle, config, found)

    def __init__(self, host: DllHost, handle: int, config: VmConfig, found: Platform) -> None:
        self.host = host
        self.handle = handle
        self.config = config
        self.platform = found
        self.regions: list[RamRegion] = []
        self.vcpus: list[Any] = []
        self.closed = False

    # --- memory ---------------------------------------------------------------------
    def map_memory(self, region: RamRegion) -> None:
        flags = w.MAP_READ | w.MAP_EXECUTE | (0 if region.read_only else w.MAP_WRITE)
        if region.log_dirty:
            if not self.platform.dirty_tracking:
                raise ConfigError("log_dirty: this Windows offers no dirty-page tracking (Features.DirtyPageTracking)")
            flags |= w.MAP_TRACK_DIRTY_PAGES
        self.host.call_hresult(
            "WHvMapGpaRange",
            self.handle,
            region.host_addr,
            region.guest_phys_addr,
            region.size,
            flags,
            detail=f"guest {region.guest_phys_addr:#x}+{region.size:#x}",
        )
        self.regions.append(region)

    def unmap_memory(self, region: RamRegion) -> None:
        self.host.call_hresult("WHvUnmapGpaRange", self.handle, region.guest_phys_addr, region.size)
        self.regions.remove(region)

    def get_dirty_log(self, region: RamRegion) -> bytes:
        """``WHvQueryGpaRangeDirtyBitmap``: one bit per page, read and reset."""
        pages = region.size // PAGE_SIZE
        size = (pages + 63) // 64 * 8  # one bit per page, rounded up to 8 bytes (the docs)
        bitmap = ffi.new("uint64_t[]", size // 8)
        self.host.call_hresult(
            "WHvQueryGpaRangeDirtyBitmap", self.handle, region.guest_phys_addr, region.size, address(bitmap), size
        )
        return bytes(ffi.buffer(bitmap, size))[: (pages + 7) // 8]

    def region_at(self, gpa: int) -> RamRegion | None:
        """The RAM region that holds guest-physical ``gpa``, if any."""
        for region in self.regions:
            if region.guest_phys_addr <= gpa < region.end:
                return region
        return None

    # --- ioevents: doorbells ------------------------------------------------------------
    def register_ioevent(self, event: Event, address: IoEventAddress, datamatch: int | None, length: int) -> None:
        """``WHvRegisterPartitionDoorbellEvent``: a matching guest write signals
        ``event`` and the vCPU does not exit (guest-physical addresses only)."""
        match = _match(address, datamatch, length)  # referenced for the call: the DLL gets its address
        self.host.call_hresult("WHvRegisterPartitionDoorbellEvent", self.handle, address_of(match), _handle(event))

    def unregister_ioevent(self, event: Event, address: IoEventAddress, datamatch: int | None, length: int) -> None:
        """``WHvUnregisterPartitionDoorbellEvent`` with the same match data."""
        match = _match(address, datamatch, length)
        self.host.call_hresult("WHvUnregisterPartitionDoorbellEvent", self.handle, address_of(match))

    # --- vCPUs ------------------------------------------------------------------------
    def create_vcpu(self, index: int) -> Any:
        from pyvmm_whpx.vcpu import WhpxVcpu

        vcpu = WhpxVcpu.create(self, index)
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        if self.closed:
            return
        # A vCPU that does not leave the hypervisor raises here, and the partition
        # (and the guest RAM it maps) is then kept rather than pulled from under it.
        for vcpu in list(self.vcpus):
            vcpu.close()
        self.closed = True
        self.regions.clear()
        self.host.call_hresult("WHvDeletePartition", self.handle)


def _match(address: IoEventAddress, datamatch: int | None, length: int) -> Any:
    """WHV_DOORBELL_MATCH_DATA for an ioevent (core has refused port addresses
    without PIO_IOEVENTS and a datamatch without a length)."""
    if address.space is not AddressSpace.MMIO:
        raise ConfigError("ioevent: WHPX doorbells match guest-physical memory writes, not port I/O")
    match = ffi.new("WHV_DOORBELL_MATCH_DATA *")
    match.GuestAddress = address.address
    match.Value = datamatch or 0
    match.Length = length
    match.MatchFlags = (w.DOORBELL_MATCH_ON_VALUE if datamatch is not None else 0) | (
        w.DOORBELL_MATCH_ON_LENGTH if length else 0
    )
    return match


def _handle(event: Event) -> int:
    """The event as a HANDLE: a Win32 event object's handle.  (A driver model on
    a POSIX host receives the eventfd number in its place.)"""
    if isinstance(event, Win32Event):
        return event.handle
    return event.fileno()


def set_property(host: DllHost, handle: int, code: int, value: bytes) -> None:
    """``WHvSetPartitionProperty``: a scalar in a ``WHV_PARTITION_PROPERTY``-sized
    buffer (what the header's union is), a list in exactly its own size."""
    size = max(len(value), w.PARTITION_PROPERTY_SIZE) if len(value) <= 8 else len(value)
    buffer = ffi.new("uint8_t[]", size)
    ffi.memmove(buffer, value, len(value))
    host.call_hresult("WHvSetPartitionProperty", handle, code, address(buffer), size, detail=f"property {code:#x}")
