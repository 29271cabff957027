"""A Gunyah VM: memory bindings, the boot context, start, doorbells, ioeventfds,
and the VM's own device-tree nodes.

The order is fixed by the driver (``docs/backends/gunyah.md`` §5.1): all memory
before start (an unstarted VM is the only one a Linux guest lets grow), vCPU
functions, irqfds and ioeventfds, then the device tree address and the boot
context, then ``GH_VM_START``.  The hypervisor, not the VMM, owns the vCPU
registers: the entry point reaches it through ``GH_VM_SET_BOOT_CONTEXT``.

Its public methods are the backend's VM hooks: the backend kit's generated
adapter forwards ``pyvmm_map_memory(vm, region)`` to :meth:`GunyahVm.map_memory`,
and so on (the method names are the hook specifications' metadata).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pyvmm.backend import address_of, install_kick_handler
from pyvmm.boot import BootSpec
from pyvmm.config import PAGE_SIZE, Arch, Protection, VmConfig
from pyvmm.errors import ConfigError, VmStateError
from pyvmm.memory import RamRegion
from pyvmm.vcpu_state import AddressSpace, IoEventAddress
from pyvmm_gunyah import bindings as g
from pyvmm_gunyah.bindings import ffi
from pyvmm_gunyah.system import GunyahSystem, system
from pyvmm_gunyah.vcpu import GunyahVcpu

if TYPE_CHECKING:
    from pyvmm.host import Event
    from pyvmm.machine.devicetree import DeviceTree

#: Gunyah's guest-physical address width (crosvm ``gunyah/mod.rs``: 40 bits, fixed).
IPA_BITS = 40

#: The boot-context SP index of the stack a guest entered at EL1h uses.  REG_SET_SP
#: takes indices 0..2, one per exception level (SP_EL0..SP_EL2).
SP_EL1_INDEX = 1


def _page_round(size: int) -> int:
    return (size + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


class GunyahVm:
    """The backend's VM handle.

    ``backend_options`` (all optional):

    * ``swiotlb``: guest addresses of regions that stay *shared* in a protected VM
      (the static swiotlb bounce buffers); every other region of a protected VM is
      lent, as crosvm does;
    * ``firmware``: ``{"address": gpa, "size": bytes}`` of a protected VM's
      firmware window (``GH_VM_ANDROID_SET_FW_CONFIG``).
    """

    @classmethod
    def create(cls, backend: Any, config: VmConfig) -> GunyahVm:
        """``pyvmm_create_vm``: a VM on the current host's probed ``/dev/gunyah``."""
        install_kick_handler()
        return cls(system(), config)

    def __init__(self, gunyah: GunyahSystem, config: VmConfig) -> None:
        options = dict(config.backend_options)
        self.host = gunyah.host
        self.config = config
        self.protected = config.protection is Protection.PROTECTED
        self.swiotlb = {int(a) for a in options.pop("swiotlb", ())}
        firmware = options.pop("firmware", None)
        if options:
            raise ConfigError(f"backend_options: unknown Gunyah option(s) {', '.join(sorted(options))}")
        if config.arch is not Arch.AARCH64:
            raise ConfigError(f"arch: Gunyah runs aarch64 guests, not {config.arch.value}")
        if config.ipa_bits not in (None, IPA_BITS):
            raise ConfigError(f"ipa_bits: Gunyah's guest-physical space is {IPA_BITS} bits, not {config.ipa_bits}")
        if firmware is not None and not self.protected:
            raise ConfigError("backend_options.firmware: only a protected VM loads firmware")
        self.regions: dict[int, RamRegion] = {}
        #: Regions lent to the guest.  The host keeps access until START, which
        #: donates the device tree's pages; from then on the guest takes any page
        #: on first touch, so the host gives up the whole region (§8.2).
        self.lent: dict[int, RamRegion] = {}
        self._lent_taken = False
        self.vcpus: list[GunyahVcpu] = []
        #: The irqfds bound to doorbells: label -> (event, level-triggered).
        self.irqfds: dict[int, tuple[Event, bool]] = {}
        #: A protected VM's firmware window (address, size), if it has one.
        self.firmware: tuple[int, int] | None = None
        self.started = False
        self.fd = gunyah.create_vm()
        try:
            if firmware is not None:
                self._set_firmware(firmware)
        except BaseException:
            self.host.close(self.fd)
            raise

    def _set_firmware(self, firmware: Any) -> None:
        try:
            address, size = int(firmware["address"]), int(firmware["size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError("backend_options.firmware: needs integer 'address' and 'size'") from exc
        config = ffi.new("struct gh_vm_firmware_config *", {"guest_phys_addr": address, "size": size})
        self.host.ioctl(self.fd, g.GH_VM_ANDROID_SET_FW_CONFIG, config)
        self.firmware = (address, size)

    # --- memory -----------------------------------------------------------------
    def map_memory(self, region: RamRegion) -> None:
        if self.started:
            raise VmStateError("Gunyah takes guest memory only before the VM starts")
        flags = g.GH_MEM_ALLOW_READ | g.GH_MEM_ALLOW_EXEC
        if not region.read_only:
            flags |= g.GH_MEM_ALLOW_WRITE
        lend = self.protected and region.guest_phys_addr not in self.swiotlb
        raw = ffi.new(
            "struct gh_userspace_memory_region *",
            {
                "label": region.slot,
                "flags": flags,
                "guest_phys_addr": region.guest_phys_addr,
                "memory_size": _page_round(region.size),
                "userspace_addr": region.host_addr,
            },
        )
        request = g.GH_VM_ANDROID_LEND_USER_MEM if lend else g.GH_VM_SET_USER_MEM_REGION
        # Lending only records a binding: the driver takes no page before START
        # (docs/backends/gunyah.md §8.2; vm_mgr_mem.c gunyah_vm_binding_alloc), so
        # the host may still load the kernel and device tree, as crosvm does.
        self.host.ioctl(self.fd, request, raw)
        self.regions[region.slot] = region
        if lend:
            self.lent[region.slot] = region

    def host_accessible(self, gpa: int, size: int = 1) -> bool:
        """Whether the host may still touch ``size`` bytes at ``gpa``: False inside
        a lent region once the VM starts (the access would fault)."""
        if not self._lent_taken:
            return True
        return not any(gpa < r.end and r.guest_phys_addr < gpa + size for r in self.lent.values())

    def region_holding(self, gpa: int, size: int) -> RamRegion | None:
        for region in self.regions.values():
            if region.guest_phys_addr <= gpa and gpa + size <= region.end:
                return region
        return None

    # --- vCPUs ------------------------------------------------------------------
    def create_vcpu(self, index: int) -> GunyahVcpu:
        vcpu = GunyahVcpu(self, index)
        self.vcpus.append(vcpu)
        return vcpu

    def remove_vcpu(self, vcpu: GunyahVcpu) -> None:
        if vcpu in self.vcpus:
            self.vcpus.remove(vcpu)

    def remove_function(self, fn_type: int, arg: Any) -> None:
        """``GH_VM_REMOVE_FUNCTION`` of the function ``arg`` (cffi struct) describes."""
        desc = ffi.new("struct gh_fn_desc *", {"type": fn_type, "arg_size": ffi.sizeof(arg[0]), "arg": address_of(arg)})
        self.host.ioctl(self.fd, g.GH_VM_REMOVE_FUNCTION, desc)

    def add_function(self, fn_type: int, arg: Any) -> int:
        """``GH_VM_ADD_FUNCTION``: the new fd (vCPU) or 0."""
        desc = ffi.new("struct gh_fn_desc *", {"type": fn_type, "arg_size": ffi.sizeof(arg[0]), "arg": address_of(arg)})
        return self.host.ioctl(self.fd, g.GH_VM_ADD_FUNCTION, desc)

    # --- boot -------------------------------------------------------------------
    def set_boot_context(self, boot: BootSpec) -> None:
        """Device tree location, then the entry (and any registers) as boot context."""
        if self.started:
            raise VmStateError("the boot context can only be set before the VM starts")
        if boot.fdt_address is None or boot.fdt_size is None:
            raise ConfigError(
                "Gunyah's resource manager reads the VM's configuration from its device tree: "
                "the boot spec needs fdt_address and fdt_size"
            )
        # The RM shares the DTB as whole pages from the one holding its start
        # (gunyah_generic_pre_vm_configure): a window under a page would be empty.
        offset = boot.fdt_address % PAGE_SIZE
        window = _page_round(offset + boot.fdt_size)
        if self.region_holding(boot.fdt_address - offset, window) is None:
            raise ConfigError(
                f"the device tree {boot.fdt_address:#x}+{boot.fdt_size:#x} (rounded to whole pages) "
                "must lie inside one memory region"
            )
        dtb = ffi.new("struct gh_vm_dtb_config *", {"guest_phys_addr": boot.fdt_address, "size": window})
        self.host.ioctl(self.fd, g.GH_VM_SET_DTB_CONFIG, dtb)
        for reg, value in boot_context_registers(boot):
            context = ffi.new("struct gh_vm_boot_context *", {"reg": reg, "value": value})
            self.host.ioctl(self.fd, g.GH_VM_SET_BOOT_CONTEXT, context)

    def start(self) -> None:
        """``GH_VM_START``.  From here the driver may take any lent page: the
        config-image parcel (the device tree's pages) at START, every other page on
        the guest's first touch (vm_mgr_mem.c gunyah_gup_share_parcel,
        gunyah_gup_demand_page).  Which pages the guest touched is not visible, so
        the host gives up every lent region now -- before the call, since a START
        that fails half-way may already have lent the parcel."""
        self._lent_taken = True
        for region in self.lent.values():
            region.host_accessible = False
        self.host.ioctl(self.fd, g.GH_VM_START)
        self.started = True

    # --- interrupts and events -------------------------------------------------------
    def register_irqfd(self, event: Event, line: int, level: bool) -> None:
        """Bind ``event`` to the doorbell with label ``line`` (the device-tree node
        ``bell-<line>`` that :meth:`add_device_tree_nodes` writes;
        ``docs/backends/gunyah.md`` §7.1)."""
        flags = g.GH_IRQFD_LEVEL if level else 0
        arg = ffi.new("struct gh_fn_irqfd_arg *", {"fd": event.fileno(), "label": line, "flags": flags})
        self.add_function(g.GH_FN_IRQFD, arg)
        self.irqfds[line] = (event, level)

    def register_ioevent(self, event: Event, address: IoEventAddress, datamatch: int | None, length: int) -> None:
        self._ioeventfd(event.fileno(), address, datamatch, length, remove=False)

    def unregister_ioevent(self, event: Event, address: IoEventAddress, datamatch: int | None, length: int) -> None:
        self._ioeventfd(event.fileno(), address, datamatch, length, remove=True)

    def _ioeventfd(self, fd: int, address: IoEventAddress, datamatch: int | None, length: int, *, remove: bool) -> None:
        """Add or remove an MMIO ioeventfd.  Without ``datamatch`` the driver matches
        any access length at the address (``gunyah_ioeventfd.c`` keeps the length
        only for datamatch; ``docs/backends/gunyah.md`` §7.2)."""
        if address.space is not AddressSpace.MMIO:
            raise ConfigError("Gunyah ioevents sit on MMIO addresses only (the hypervisor has no port I/O)")
        arg = ffi.new(
            "struct gh_fn_ioeventfd_arg *",
            {
                "datamatch": datamatch or 0,
                "addr": address.address,
                "len": length,
                "fd": fd,
                "flags": g.GH_IOEVENTFD_DATAMATCH if datamatch is not None else 0,
            },
        )
        if remove:
            self.remove_function(g.GH_FN_IOEVENTFD, arg)
        else:
            self.add_function(g.GH_FN_IOEVENTFD, arg)

    # --- the device tree ------------------------------------------------------------
    def doorbells(self) -> list[tuple[int, bool]]:
        """``(label, level-triggered)`` of every irqfd, in registration order."""
        return [(label, level) for label, (_, level) in self.irqfds.items()]

    def guest_ram(self) -> Sequence[RamRegion]:
        """The regions the resource manager counts as the VM's memory: every mapped
        region except one that lies wholly inside a protected VM's firmware window
        (crosvm ``gunyah/aarch64.rs`` ``create_fdt`` counts guest memory and
        swiotlb regions, and names the firmware region by ``firmware-address``).

        :raises VmStateError: there is none yet.
        """
        ram = list(self.regions.values())
        if self.firmware is not None:
            start, size = self.firmware
            ram = [r for r in ram if not (start <= r.guest_phys_addr and r.end <= start + size)]
        if not ram:
            raise VmStateError("Gunyah's device-tree nodes describe the VM's memory: map it first")
        return ram

    @property
    def ram_base(self) -> int:
        """Where the VM's RAM starts: the lowest guest address of :meth:`guest_ram`."""
        return min(r.guest_phys_addr for r in self.guest_ram())

    @property
    def ram_size(self) -> int:
        """How much RAM the VM has: :meth:`guest_ram` together."""
        return sum(r.size for r in self.guest_ram())

    def add_device_tree_nodes(self, tree: DeviceTree) -> None:
        """``/gunyah-vm-config`` and one doorbell per irqfd, which the resource
        manager reads to build the VM (``docs/backends/gunyah.md`` §7.3).

        :raises VmStateError: no memory is mapped yet.
        :raises ConfigError: more memory than the resource manager accepts.
        """
        # Imported here: the machine layer's tree writer is not needed to discover
        # or probe the backend.
        from pyvmm_gunyah.devicetree import add_vm_config_nodes

        firmware = None if self.firmware is None else self.firmware[0]
        add_vm_config_nodes(tree, self.ram_base, self.ram_size, self.doorbells(), firmware_address=firmware)

    def close(self) -> None:
        for vcpu in list(self.vcpus):
            vcpu.close()
        self.vcpus.clear()
        if self.fd >= 0:
            self.host.close(self.fd)
            self.fd = -1


def boot_context_registers(boot: BootSpec) -> list[tuple[int, int]]:
    """The ``(reg, value)`` pairs of ``GH_VM_SET_BOOT_CONTEXT`` for ``boot``: the
    PC, the stack (SP_EL1) and any argument registers.  X0 is left to the
    hypervisor (it passes the device tree there) unless the spec names it."""
    pairs = [(g.boot_context_reg(g.REG_SET_PC, 0), boot.entry)]
    if boot.stack is not None:
        pairs.append((g.boot_context_reg(g.REG_SET_SP, SP_EL1_INDEX), boot.stack))
    for name, value in boot.registers.items():
        key = name.lower()
        if key == "sp":
            pairs.append((g.boot_context_reg(g.REG_SET_SP, SP_EL1_INDEX), value))
            continue
        if not (key.startswith("x") and key[1:].isdigit() and 0 <= int(key[1:]) <= 30):
            raise ConfigError(f"boot register {name!r} is not an aarch64 general register (x0..x30, sp)")
        pairs.append((g.boot_context_reg(g.REG_SET_X, int(key[1:])), value))
    return pairs
