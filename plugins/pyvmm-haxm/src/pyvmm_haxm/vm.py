"""A HAXM VM: its device, guest RAM registration and its vCPUs.

Its public methods are the backend's VM hooks: the backend kit's generated
adapter forwards ``pyvmm_map_memory(vm, region)`` to :meth:`HaxmVm.map_memory`,
and so on (``docs/backends/haxm.md`` §5).

RAM goes to HAXM in two steps: a *RAM block* tells the driver which host range
it may pin, a *mapping* puts part of a block at a guest-physical address
(``core/memslot.c memslot_set_mapping``).  With ``HAX_CAP_IMPLICIT_RAMBLOCK`` one
``SET_RAM2`` with ``HAX_RAM_INFO_STANDALONE`` does both, and the block goes away
with the mapping (crosvm's way); otherwise ``ADD_RAMBLOCK`` (or ``ALLOC_RAM``,
below 4 GiB, without ``HAX_CAP_64BIT_RAMBLOCK``) then ``SET_RAM2`` (or
``SET_RAM``, 32-bit sizes, without ``HAX_CAP_64BIT_SETRAM``) -- QEMU's way.  Blocks
cannot be removed then, so a host range is registered once and kept.
"""

from __future__ import annotations

from typing import Any

from pyvmm.backend import install_kick_handler
from pyvmm.config import VmConfig
from pyvmm.errors import ConfigError
from pyvmm.memory import RamRegion
from pyvmm_haxm import bindings as b
from pyvmm_haxm.bindings import ffi
from pyvmm_haxm.host import IN, HaxChannel
from pyvmm_haxm.system import HaxSystem, system
from pyvmm_haxm.vcpu import HaxmVcpu

_FOUR_GIB = 1 << 32


class HaxmVm:
    """The backend's VM handle."""

    @classmethod
    def create(cls, backend: Any, config: VmConfig) -> HaxmVm:
        """``pyvmm_create_vm``: a VM on the current channel's HAXM driver."""
        install_kick_handler()
        return cls(system(), config)

    def __init__(self, hax: HaxSystem, config: VmConfig) -> None:
        if config.backend_options:
            raise ConfigError(f"backend_options: HAXM has no options ({', '.join(sorted(config.backend_options))})")
        if config.vcpus > b.HAX_MAX_VCPUS:
            raise ConfigError(f"vcpus: HAXM allows at most {b.HAX_MAX_VCPUS} vCPUs per VM, {config.vcpus} asked")
        self.hax = hax
        self.channel: HaxChannel = hax.channel
        self.config = config
        self.caps = hax.capabilities
        self.vcpus: list[HaxmVcpu] = []
        self.regions: dict[int, RamRegion] = {}
        #: Host ranges registered with ADD_RAMBLOCK/ALLOC_RAM: ``{start: size}``.
        self.blocks: dict[int, int] = {}
        self.handle = -1
        self.vm_id = hax.create_vm()
        try:
            self.handle = self.channel.open(self.channel.paths.vm_path(self.vm_id))
            # API v2+ turns on fast MMIO for this VM, v4 its guest-to-guest copy
            # (core/vm.c hax_vm_set_qemuversion); QEMU sent it too.
            version = ffi.new(
                "struct hax_qemu_version *", {"cur_version": b.HAX_API_VERSION, "least_version": b.HAX_API_VERSION}
            )
            self.channel.control(self.handle, "NOTIFY_QEMU_VERSION", version, IN)
        except BaseException:
            if self.handle >= 0:
                self.channel.close(self.handle)
            raise

    # --- memory -----------------------------------------------------------------
    @property
    def standalone(self) -> bool:
        return self.caps.has(b.HAX_CAP_IMPLICIT_RAMBLOCK)

    def _check_quota(self, size: int) -> None:
        quota = self.caps.quota
        if quota is None:
            return
        used = sum(region.size for region in self.regions.values())
        if used + size > quota:
            raise ConfigError(
                f"memory: {used + size:#x} bytes of guest RAM exceed the HAXM driver's memory quota of {quota:#x}"
            )

    def _add_block(self, start: int, size: int) -> None:
        if self.blocks.get(start) == size:
            return  # registered before (a region mapped again): blocks are never removed
        if self.caps.has(b.HAX_CAP_64BIT_RAMBLOCK):
            info = ffi.new("struct hax_ramblock_info *", {"start_va": start, "size": size})
            self.channel.control(self.handle, "ADD_RAMBLOCK", info, IN)
        else:
            if size >= _FOUR_GIB:
                raise ConfigError(f"memory: this HAXM registers RAM blocks below 4 GiB only, not {size:#x} bytes")
            info = ffi.new("struct hax_alloc_ram_info *", {"size": size, "va": start})
            self.channel.control(self.handle, "ALLOC_RAM", info, IN)
        self.blocks[start] = size

    def _set_ram(self, gpa: int, size: int, va: int, flags: int) -> None:
        if self.caps.has(b.HAX_CAP_64BIT_SETRAM):
            info = ffi.new("struct hax_set_ram_info2 *", {"pa_start": gpa, "size": size, "va": va, "flags": flags})
            self.channel.control(self.handle, "SET_RAM2", info, IN)
            return
        if size >= _FOUR_GIB:
            raise ConfigError(f"memory: this HAXM maps at most 4 GiB at once, not {size:#x} bytes")
        legacy = ffi.new("struct hax_set_ram_info *", {"pa_start": gpa, "size": size, "flags": flags, "va": va})
        self.channel.control(self.handle, "SET_RAM", legacy, IN)

    def map_memory(self, region: RamRegion) -> None:
        self._check_quota(region.size)
        flags = b.HAX_RAM_INFO_ROM if region.read_only else 0
        if self.standalone and self.caps.has(b.HAX_CAP_64BIT_SETRAM):
            self._set_ram(region.guest_phys_addr, region.size, region.host_addr, flags | b.HAX_RAM_INFO_STANDALONE)
        else:
            self._add_block(region.host_addr, region.size)
            self._set_ram(region.guest_phys_addr, region.size, region.host_addr, flags)
        self.regions[region.slot] = region

    def unmap_memory(self, region: RamRegion) -> None:
        # HAX_RAM_INFO_INVALID alone, with va 0 (core/memory.c handle_set_ram).
        self._set_ram(region.guest_phys_addr, region.size, 0, b.HAX_RAM_INFO_INVALID)
        del self.regions[region.slot]

    # --- vCPUs ------------------------------------------------------------------
    def create_vcpu(self, index: int) -> HaxmVcpu:
        vcpu = HaxmVcpu(self, index)
        self.vcpus.append(vcpu)
        return vcpu

    def remove_vcpu(self, vcpu: HaxmVcpu) -> None:
        if vcpu in self.vcpus:
            self.vcpus.remove(vcpu)

    def close(self) -> None:
        """Close the vCPUs, then the VM device: the driver destroys a VM at the
        last close of its device (``hax_vm_release``; there is no DESTROY_VM on
        Windows, and the Linux driver ignores it)."""
        for vcpu in list(self.vcpus):
            vcpu.close()
        self.vcpus.clear()
        if self.handle >= 0:
            self.channel.close(self.handle)
            self.handle = -1
