"""A GenieZone VM: memory slots, protected-VM configuration, the vGIC, interrupt
lines, irqfds and ioeventfds, and the device tree's location.

The order follows crosvm (``hypervisor/src/geniezone/mod.rs``,
``devices/src/irqchip/geniezone/mod.rs``; ``docs/backends/geniezone.md`` §5):
``GZVM_CREATE_VM``, the memory slots, the protected-VM capability, the vGIC
(``GZVM_CREATE_DEVICE``, before the vCPUs), the vCPUs, their registers and the
device tree's location (``GZVM_SET_DTB_CONFIG``), then the run loops.

Its public methods are the backend's VM hooks (the kit's generated adapter
forwards ``pyvmm_map_memory(vm, region)`` to :meth:`GenieZoneVm.map_memory`, ...).
"""

from __future__ import annotations

import mmap
import struct
from typing import TYPE_CHECKING, Any

from pyvmm.backend import install_kick_handler
from pyvmm.config import Arch, Protection, VmConfig
from pyvmm.errors import ConfigError
from pyvmm.memory import RamRegion
from pyvmm.vcpu_state import AddressSpace, IoEventAddress
from pyvmm_geniezone import bindings as g
from pyvmm_geniezone.bindings import ffi
from pyvmm_geniezone.ioevents import IoEvent, IoEvents
from pyvmm_geniezone.system import GenieZoneSystem, system
from pyvmm_geniezone.vcpu import GenieZoneVcpu
from pyvmm_geniezone.vma import claim_own_vma

if TYPE_CHECKING:
    from pyvmm.host import Event

#: A flattened device tree's header: magic and total size (big-endian).
FDT_MAGIC = 0xD00DFEED
_FDT_HEADER = struct.Struct(">II")

#: One GICv3 redistributor: its RD_base and SGI_base frames (crosvm passes this
#: size for the redistributor device whatever the vCPU count).
GIC_REDISTRIBUTOR_SIZE = 0x2_0000
GIC_DISTRIBUTOR_SIZE = 0x1_0000


#: The host kernel's page size: the driver aligns slots to it (``PAGE_ALIGNED``
#: in ``gzvm_vm.c memory_region_pre_check``), and arm64 kernels run 4, 16 or
#: 64 KiB pages.
HOST_PAGE_SIZE = mmap.PAGESIZE


def _page_round(size: int) -> int:
    return (size + HOST_PAGE_SIZE - 1) // HOST_PAGE_SIZE * HOST_PAGE_SIZE


def _int_option(options: dict[str, Any], key: str, field: str) -> int:
    try:
        return int(options[key])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"backend_options.{field}: needs an integer {key!r}") from exc


class GenieZoneVm:
    """The backend's VM handle.

    ``backend_options`` (all optional):

    * ``firmware``: ``{"address": gpa}`` -- a protected VM's firmware (pvmfw)
      loads there (``ENABLE_CAP(PROTECTED_VM, SET_PVMFW_GPA)``); the region
      holding it is registered with the firmware purpose;
    * ``swiotlb``: guest addresses of regions registered as static swiotlb
      (bounce buffers a protected VM shares with the host);
    * ``gic``: ``{"distributor": gpa, "redistributors": gpa}`` -- where the vGIC
      goes; default: pyvmm's aarch64 board (:mod:`pyvmm.machine.virt`).
    """

    @classmethod
    def create(cls, backend: Any, config: VmConfig) -> GenieZoneVm:
        """``pyvmm_create_vm``: a VM on the current host's probed ``/dev/gzvm``."""
        install_kick_handler()
        return cls(system(), config)

    def __init__(self, gz: GenieZoneSystem, config: VmConfig) -> None:
        options = dict(config.backend_options)
        self.host = gz.host
        self.config = config
        self.protected = config.protection is Protection.PROTECTED
        firmware = options.pop("firmware", None)
        self.swiotlb = {int(a) for a in options.pop("swiotlb", ())}
        gic = options.pop("gic", None)
        if options:
            raise ConfigError(f"backend_options: unknown GenieZone option(s) {', '.join(sorted(options))}")
        if config.arch is not Arch.AARCH64:
            raise ConfigError(f"arch: GenieZone runs aarch64 guests, not {config.arch.value}")
        if config.vcpus > g.GZVM_MAX_VCPUS:
            raise ConfigError(f"vcpus: GenieZone VMs have at most {g.GZVM_MAX_VCPUS} vCPUs, not {config.vcpus}")
        gpa_bits = gz.interface.gpa_bits
        if config.ipa_bits is not None and config.ipa_bits > gpa_bits:
            raise ConfigError(f"ipa_bits: this GenieZone offers {gpa_bits}-bit guest-physical addresses")
        if firmware is not None and not self.protected:
            raise ConfigError("backend_options.firmware: only a protected VM loads firmware")
        self.firmware_address = None if firmware is None else _int_option(firmware, "address", "firmware")
        self.gic_addresses = self._gic_option(gic)
        self.gpa_bits = gpa_bits
        self.regions: dict[int, RamRegion] = {}
        self.vcpus: list[GenieZoneVcpu] = []
        self.irqchip = False
        #: The ioeventfds the driver holds for this VM.
        self.ioevents = IoEvents()
        self._protection_set = False
        #: ``(address, size)`` handed over with GZVM_SET_DTB_CONFIG, once.
        self.dtb: tuple[int, int] | None = None
        self.fd = gz.create_vm()

    @staticmethod
    def _gic_option(gic: Any) -> tuple[int, int]:
        if gic is None:
            # Imported here: the board is only the default, not a dependency of discovery.
            from pyvmm.machine.virt import GIC_DISTRIBUTOR_BASE, GIC_REDISTRIBUTOR_BASE

            return GIC_DISTRIBUTOR_BASE, GIC_REDISTRIBUTOR_BASE
        return _int_option(gic, "distributor", "gic"), _int_option(gic, "redistributors", "gic")

    # --- memory -----------------------------------------------------------------
    def map_memory(self, region: RamRegion) -> None:
        """``GZVM_SET_USER_MEMORY_REGION`` of ``region`` (its own VMA, page-rounded)."""
        if region.slot >= g.GZVM_MAX_MEM_REGION:
            raise ConfigError(
                f"memory: GenieZone has {g.GZVM_MAX_MEM_REGION} memory slots; slot {region.slot} is past them"
            )
        if region.guest_phys_addr % HOST_PAGE_SIZE:
            raise ConfigError(
                f"memory: guest address {region.guest_phys_addr:#x} is not aligned to this host's "
                f"{HOST_PAGE_SIZE // 1024} KiB pages (GenieZone slots are)"
            )
        size = _page_round(region.size)
        claim_own_vma(region.host_addr, size, f"pyvmm-gzvm:{self.fd}:{region.slot}")
        raw = ffi.new(
            "struct gzvm_userspace_memory_region *",
            {
                "slot": region.slot,
                "flags": self._purpose(region),
                "guest_phys_addr": region.guest_phys_addr,
                "memory_size": size,
                "userspace_addr": region.host_addr,
            },
        )
        self.host.ioctl(self.fd, g.GZVM_SET_USER_MEMORY_REGION, raw)
        self.regions[region.slot] = region

    def _purpose(self, region: RamRegion) -> int:
        """The slot's purpose flag, as crosvm gives it (``GeniezoneVm::new``)."""
        if self.firmware_address is not None and region.guest_phys_addr <= self.firmware_address < region.end:
            return g.GZVM_USER_MEM_REGION_PROTECT_FW
        if region.guest_phys_addr in self.swiotlb:
            return g.GZVM_USER_MEM_REGION_STATIC_SWIOTLB
        return g.GZVM_USER_MEM_REGION_GUEST_MEM

    def read_guest(self, gpa: int, size: int) -> bytes | None:
        """``size`` bytes of guest RAM at ``gpa``, or None outside one region."""
        for region in self.regions.values():
            if region.guest_phys_addr <= gpa and gpa + size <= region.end:
                return bytes(ffi.buffer(ffi.cast("char *", region.host_addr + gpa - region.guest_phys_addr), size))
        return None

    # --- protected VMs ----------------------------------------------------------
    def _enable_cap(self, cap: int, *args: int) -> Any:
        raw = ffi.new("struct gzvm_enable_cap *", {"cap": cap, "args": list(args) + [0] * (5 - len(args))})
        self.host.ioctl(self.fd, g.GZVM_ENABLE_CAP, raw)
        return raw

    def _configure_protection(self) -> None:
        """A protected VM, after its memory and before its vCPUs (crosvm's order):
        with firmware, ask its size (``GET_PVMFW_SIZE``, answered in ``args[1]``)
        and place it (``SET_PVMFW_GPA``); without, ``SET_PROTECTED_VM``
        (``arch/arm64/geniezone/vm.c gzvm_vm_ioctl_cap_pvm``)."""
        if not self.protected or self._protection_set:
            return
        if self.firmware_address is None:
            self._enable_cap(g.GZVM_CAP_PROTECTED_VM, g.GZVM_CAP_PVM_SET_PROTECTED_VM)
        else:
            answer = self._enable_cap(g.GZVM_CAP_PROTECTED_VM, g.GZVM_CAP_PVM_GET_PVMFW_SIZE)
            if not answer.args[1]:
                raise ConfigError("backend_options.firmware: the hypervisor has no protected-VM firmware (size 0)")
            self._enable_cap(g.GZVM_CAP_PROTECTED_VM, g.GZVM_CAP_PVM_SET_PVMFW_GPA, self.firmware_address)
        self._protection_set = True

    # --- vCPUs ------------------------------------------------------------------
    def create_vcpu(self, index: int) -> GenieZoneVcpu:
        if not 0 <= index < g.GZVM_MAX_VCPUS:
            raise ConfigError(f"vCPU index {index}: GenieZone vCPU ids are 0..{g.GZVM_MAX_VCPUS - 1}")
        self._configure_protection()
        vcpu = GenieZoneVcpu(self, index)
        self.vcpus.append(vcpu)
        return vcpu

    def remove_vcpu(self, vcpu: GenieZoneVcpu) -> None:
        if vcpu in self.vcpus:
            self.vcpus.remove(vcpu)

    # --- the device tree --------------------------------------------------------
    def hand_over_device_tree(self, address: int) -> None:
        """``GZVM_SET_DTB_CONFIG`` of the device tree at ``address``, once.

        pyvmm gives a backend that sets registers only the boot vCPU's registers,
        so the tree's location is the boot protocol's X0, and its size the one its
        own header states (crosvm hands over the address and size it loaded).
        X0 that is no device tree in guest RAM (a bare-metal guest) hands over
        nothing; a protected VM needs one (its firmware reads it).
        """
        if self.dtb is not None:
            return
        header = self.read_guest(address, _FDT_HEADER.size)
        magic, size = _FDT_HEADER.unpack(header) if header is not None else (0, 0)
        if magic != FDT_MAGIC:
            if self.protected:
                raise ConfigError(f"boot: a protected GenieZone VM needs a device tree at X0 ({address:#x})")
            return
        config = ffi.new("struct gzvm_dtb_config *", {"dtb_addr": address, "dtb_size": size})
        self.host.ioctl(self.fd, g.GZVM_SET_DTB_CONFIG, config)
        self.dtb = (address, size)

    # --- interrupts ----------------------------------------------------------------
    def create_irqchip(self) -> None:
        """The vGICv3 in the hypervisor: ``GZVM_CREATE_DEVICE`` of the distributor,
        then of the redistributors (crosvm ``GeniezoneKernelIrqChip::new``)."""
        distributor, redistributors = self.gic_addresses
        for dev_type, address, size in (
            (g.GZVM_DEV_TYPE_ARM_VGIC_V3_DIST, distributor, GIC_DISTRIBUTOR_SIZE),
            (g.GZVM_DEV_TYPE_ARM_VGIC_V3_REDIST, redistributors, GIC_REDISTRIBUTOR_SIZE),
        ):
            device = ffi.new(
                "struct gzvm_create_device *",
                {"dev_type": dev_type, "id": 0, "dev_addr": address, "dev_reg_size": size},
            )
            self.host.ioctl(self.fd, g.GZVM_CREATE_DEVICE, device)
        self.irqchip = True

    def set_irq_line(self, line: int, level: bool) -> None:
        """``GZVM_IRQ_LINE``: ``line`` is the SPI index (the guest sees INTID 32 + line)."""
        if not 0 <= line <= g.GZVM_IRQ_LINE_NUM_MASK:
            raise ConfigError(f"line {line}: GenieZone interrupt lines are SPI indices 0..{g.GZVM_IRQ_LINE_NUM_MASK}")
        raw = ffi.new("struct gzvm_irq_level *", {"irq": line, "level": int(level)})
        self.host.ioctl(self.fd, g.GZVM_IRQ_LINE, raw)

    def register_irqfd(self, event: Event, line: int, level: bool) -> None:
        """An edge-triggered irqfd on SPI index ``line``.  The driver only ever
        raises an irqfd's line (``gzvm_irqfd.c irqfd_set_spi``) and accepts
        ``RESAMPLE`` without ever lowering the line or signalling the resample
        fd, so a level-triggered irqfd cannot be honoured."""
        if level:
            raise ConfigError(
                "register_irqfd: GenieZone irqfds only raise their line (the driver never lowers it or "
                "signals a resample fd): level-triggered irqfds are not available"
            )
        self._irqfd(event.fileno(), line, 0)

    def unregister_irqfd(self, event: Event, line: int) -> None:
        self._irqfd(event.fileno(), line, g.GZVM_IRQFD_FLAG_DEASSIGN)

    def _irqfd(self, fd: int, line: int, flags: int) -> None:
        raw = ffi.new("struct gzvm_irqfd *", {"fd": fd, "gsi": line, "flags": flags})
        self.host.ioctl(self.fd, g.GZVM_IRQFD, raw)

    def register_ioevent(self, event: Event, address: IoEventAddress, datamatch: int | None, length: int) -> None:
        self._ioeventfd(event.fileno(), address, datamatch, length, 0)

    def unregister_ioevent(self, event: Event, address: IoEventAddress, datamatch: int | None, length: int) -> None:
        self._ioeventfd(event.fileno(), address, datamatch, length, g.GZVM_IOEVENTFD_FLAG_DEASSIGN)

    def _ioeventfd(self, fd: int, address: IoEventAddress, datamatch: int | None, length: int, flags: int) -> None:
        """``GZVM_IOEVENTFD``, as KVM's: MMIO only; with ``datamatch`` a write of
        ``length`` bytes and that value, else any write of ``length`` bytes (0: any
        length) at the address (``gzvm_ioeventfd.c``)."""
        if address.space is not AddressSpace.MMIO:
            raise ConfigError("GenieZone ioevents sit on MMIO addresses only (the driver refuses port I/O)")
        if datamatch is not None:
            if not length:
                raise ConfigError("ioevent: a datamatch needs a length (1, 2, 4 or 8)")
            flags |= g.GZVM_IOEVENTFD_FLAG_DATAMATCH
        raw = ffi.new(
            "struct gzvm_ioeventfd *",
            {"datamatch": datamatch or 0, "addr": address.address, "len": length, "fd": fd, "flags": flags},
        )
        self.host.ioctl(self.fd, g.GZVM_IOEVENTFD, raw)
        registered = IoEvent(fd, address.address, length, datamatch)
        if flags & g.GZVM_IOEVENTFD_FLAG_DEASSIGN:
            self.ioevents.remove(registered)
        else:
            self.ioevents.add(registered)

    # --- teardown -------------------------------------------------------------------
    def close(self) -> None:
        for vcpu in list(self.vcpus):
            vcpu.close()
        self.vcpus.clear()
        if self.fd >= 0:
            self.host.close(self.fd)
            self.fd = -1
