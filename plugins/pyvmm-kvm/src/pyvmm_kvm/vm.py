"""A KVM VM: memory slots, the in-kernel irqchip, interrupts, eventfds, clock.

Its public methods are the backend's VM hooks (``docs/backends/kvm.md`` §3):
the backend kit's generated adapter forwards ``pyvmm_map_memory(vm, region)`` to
:meth:`KvmVm.map_memory`, and so on.
"""

from __future__ import annotations

import errno
import weakref
from typing import TYPE_CHECKING, Any

from pyvmm.arch.x86_64 import CpuidEntry, MsrEntry
from pyvmm.backend import install_kick_handler
from pyvmm.coalesced import CoalescedWrite
from pyvmm.config import PAGE_SIZE, VmConfig
from pyvmm.errors import ConfigError, HypervisorError
from pyvmm.memory import RamRegion
from pyvmm.served_io import ServedRegister
from pyvmm.vcpu_state import IoEventAddress
from pyvmm.vm_state import VmStateKind
from pyvmm_kvm import bindings as k
from pyvmm_kvm import irqchip_state, regs
from pyvmm_kvm.bindings import ffi
from pyvmm_kvm.coalesced import CoalescedZones
from pyvmm_kvm.fast_exits import compiled_module_for
from pyvmm_kvm.served import ServedRanges
from pyvmm_kvm.system import KvmSystem, system
from pyvmm_kvm.vcpu import KvmVcpu
from pyvmm_kvm.vm_common import KvmVmCommon

if TYPE_CHECKING:
    from collections.abc import Callable

    from pyvmm.host import Event
    from pyvmm.interrupts import IrqRoute

#: Where QEMU and crosvm put the real-mode TSS (3 pages) and the EPT identity map
#: page on Intel hosts without unrestricted guest: just below the 4 GiB BIOS area.
#: The identity map's is also KVM's default, used when userspace never sets one.
DEFAULT_TSS_ADDRESS = 0xFFFBD000
DEFAULT_IDENTITY_MAP_ADDRESS = 0xFFFBC000


class KvmVm(KvmVmCommon):
    """The backend's VM handle."""

    @classmethod
    def create(cls, backend: Any, config: VmConfig) -> KvmVm:
        """``pyvmm_create_vm``: a VM on the current host's ``/dev/kvm``."""
        install_kick_handler()
        return cls(system(), config)

    def __init__(self, kvm: KvmSystem, config: VmConfig) -> None:
        options = dict(config.backend_options)
        self.kvm = kvm
        self.host = kvm.host
        self.config = config
        self.irqchip = False
        self.regions: dict[int, RamRegion] = {}
        self._dirty_logs: dict[int, tuple[RamRegion, Any, int, Any]] = {}
        self.vcpus: list[KvmVcpu] = []
        self.cpuid_mode = str(options.pop("cpuid", "host"))
        # KVM_SET_TSS_ADDR takes 3 pages and the identity map 1, both below 4 GiB
        # (api.rst); anything else is refused here, not by the kernel.
        tss = _address_option(options.pop("tss_address", DEFAULT_TSS_ADDRESS), "tss_address", 3 * PAGE_SIZE)
        identity = _address_option(
            options.pop("identity_map_address", DEFAULT_IDENTITY_MAP_ADDRESS), "identity_map_address", PAGE_SIZE
        )
        if options:
            raise ConfigError(f"backend_options: unknown KVM option(s) {', '.join(sorted(options))}")
        if self.cpuid_mode not in ("host", "none"):
            raise ConfigError(f"backend_options.cpuid: 'host' or 'none', not {self.cpuid_mode!r}")
        if config.vcpus > kvm.max_vcpus():
            raise ConfigError(f"vcpus: this KVM allows at most {kvm.max_vcpus()} vCPUs, {config.vcpus} asked")
        self.fd = self.host.ioctl(kvm.fd, k.KVM_CREATE_VM, 0)
        try:
            self.host.ioctl(self.fd, k.KVM_SET_TSS_ADDR, tss)
            # KVM's own default when the ioctl never comes (vmx.c
            # init_rmode_identity_map(), VMX_EPT_IDENTITY_PAGETABLE_ADDR in
            # vmx.h; api.rst: 0 "resets the address to its default"), so
            # setting it to that value would change nothing: an ioctl saved
            # on every VM.
            if identity != DEFAULT_IDENTITY_MAP_ADDRESS and kvm.check_extension(k.KVM_CAP_SET_IDENTITY_MAP_ADDR):
                self.host.ioctl(self.fd, k.KVM_SET_IDENTITY_MAP_ADDR, ffi.new("uint64_t *", identity))
        except BaseException:
            self.host.close(self.fd)
            raise
        self._cpuid: list[CpuidEntry] | None = None
        self._zones: CoalescedZones | None = None
        #: The compiled exit path's module, or None for the pure path (pyvmm_kvm.fast_exits).
        self.compiled = compiled_module_for(self.host)
        # A weak reference back: a closure over ``self`` would put the VM in a
        # reference cycle, left for the cyclic GC instead of freed at close.
        self.served = ServedRanges(self.compiled, _zones_of(weakref.ref(self)))

    # (memory, the dirty log, ioeventfds and the escape hatch: KvmVmCommon)
    # --- vCPUs ------------------------------------------------------------------
    def create_vcpu(self, index: int) -> KvmVcpu:
        vcpu = KvmVcpu(self, index, self.kvm.vcpu_mmap_size)
        try:
            if self.cpuid_mode == "host":
                vcpu.set_cpuid(self.vcpu_cpuid(index))
        except BaseException:
            vcpu.close()
            raise
        self.vcpus.append(vcpu)
        return vcpu

    def get_supported_cpuid(self) -> list[CpuidEntry]:
        return self.kvm.supported_cpuid()

    def vcpu_cpuid(self, index: int) -> list[CpuidEntry]:
        """The supported CPUID with this vCPU's APIC ids filled in (leaf 1 EBX[31:24],
        leaves 0xB/0x1F EDX), so SMP guests see distinct CPUs."""
        entries = self.kvm.supported_cpuid()
        for entry in entries:
            if entry.function == 1:
                entry.ebx = (entry.ebx & 0x00FFFFFF) | (index & 0xFF) << 24
            elif entry.function in (0xB, 0x1F):
                entry.edx = index
        return entries

    def remove_vcpu(self, vcpu: KvmVcpu) -> None:
        if vcpu in self.vcpus:
            self.vcpus.remove(vcpu)

    # --- interrupts and events ----------------------------------------------------
    def create_irqchip(self) -> None:
        """In-kernel PIC, IOAPIC and local APICs, plus the PIT (as QEMU's default pc machine)."""
        self.host.ioctl(self.fd, k.KVM_CREATE_IRQCHIP)
        self.irqchip = True
        pit = ffi.new("struct kvm_pit_config *", {"flags": k.KVM_PIT_SPEAKER_DUMMY})
        self.host.ioctl(self.fd, k.KVM_CREATE_PIT2, pit)

    def set_irq_line(self, line: int, level: bool) -> None:
        self.host.ioctl(self.fd, k.KVM_IRQ_LINE, ffi.new("struct kvm_irq_level *", {"irq": line, "level": int(level)}))

    def register_irqfd(self, event: Event, line: int, level: bool) -> None:
        # A KVM irqfd is an edge; a level-triggered one needs its resample eventfd
        # (docs/backends/kvm.md §6.2): register_resample_irqfd.
        if level:
            raise ConfigError(
                "KVM level-triggered irqfds need a resample event: register_irqfd(event, line, level=True, "
                "resample=Event())"
            )
        self._irqfd(event.fileno(), line, 0)

    def register_resample_irqfd(self, event: Event, line: int, resample: Event) -> None:
        self._irqfd(event.fileno(), line, k.KVM_IRQFD_FLAG_RESAMPLE, resample.fileno())

    def unregister_irqfd(self, event: Event, line: int) -> None:
        # KVM shuts down every irqfd of this eventfd and GSI, and says 0 when there
        # was none (docs/backends/kvm.md §6.2).
        self._irqfd(event.fileno(), line, k.KVM_IRQFD_FLAG_DEASSIGN)

    def _irqfd(self, fd: int, gsi: int, flags: int, resamplefd: int = 0) -> None:
        raw = ffi.new("struct kvm_irqfd *", {"fd": fd, "gsi": gsi, "flags": flags, "resamplefd": resamplefd})
        self.host.ioctl(self.fd, k.KVM_IRQFD, raw)

    def set_gsi_routing(self, routes: list[IrqRoute]) -> None:
        self.host.ioctl(self.fd, k.KVM_SET_GSI_ROUTING, regs.routing_to_kvm(routes))

    def signal_msi(self, address: int, data: int) -> bool:
        """``KVM_SIGNAL_MSI``: > 0 delivered, 0 blocked by the guest; KVM's -1 for "no
        vCPU took it" arrives as EPERM (docs/backends/kvm.md §6.6)."""
        msi = ffi.new(
            "struct kvm_msi *", {"address_lo": address & 0xFFFF_FFFF, "address_hi": address >> 32, "data": data}
        )
        try:
            return self.host.ioctl(self.fd, k.KVM_SIGNAL_MSI, msi) > 0
        except HypervisorError as exc:
            if exc.errno != errno.EPERM:
                raise
            raise HypervisorError(exc.operation, exc.code, "KVM's -1: no vCPU accepted the MSI") from exc

    # --- MSR lists ------------------------------------------------------------------
    def get_msr_index_list(self) -> list[int]:
        return self.kvm.msr_index_list()

    def get_feature_msrs(self) -> list[MsrEntry]:
        return self.kvm.feature_msrs()

    # --- clock ------------------------------------------------------------------
    def get_clock(self) -> int:
        data = ffi.new("struct kvm_clock_data *")
        self.host.ioctl(self.fd, k.KVM_GET_CLOCK, data)
        return int(data.clock)

    def set_clock(self, nanoseconds: int) -> None:
        self.host.ioctl(self.fd, k.KVM_SET_CLOCK, ffi.new("struct kvm_clock_data *", {"clock": nanoseconds}))

    # --- VM-wide device state (pyvmm_kvm.irqchip_state) -------------------------------
    def get_vm_state(self, kind: VmStateKind) -> bytes:
        return irqchip_state.get_vm_state(self.host, self.fd, kind)

    def set_vm_state(self, kind: VmStateKind, data: bytes) -> None:
        irqchip_state.set_vm_state(self.host, self.fd, kind, data)

    # --- coalesced I/O (pyvmm_kvm.coalesced) ---------------------------------------
    def _coalesced(self) -> CoalescedZones:
        if self._zones is None:
            self._zones = CoalescedZones(self.host, self.kvm.check_extension(k.KVM_CAP_COALESCED_MMIO))
        return self._zones

    def register_coalesced_io(self, address: IoEventAddress, size: int) -> None:
        start, end = address.address, address.address + size
        for served in self.served.ranges:
            if served.space is address.space and start < served.end and served.base < end:
                raise ConfigError(f"coalesced zone {start:#x}+{size:#x} overlaps the served range at {served.base:#x}")
        self._coalesced().register(self.fd, address, size)

    def unregister_coalesced_io(self, address: IoEventAddress, size: int) -> None:
        self._coalesced().unregister(self.fd, address, size)

    def take_coalesced_io(self) -> list[CoalescedWrite]:
        zones = self._coalesced()
        return zones.take(zones.ring_view([vcpu.page.view for vcpu in self.vcpus if not vcpu.page.closed]))

    # --- served registers (pyvmm_kvm.served) ---------------------------------------
    def serve_io(self, address: IoEventAddress, size: int, register: ServedRegister) -> None:
        self.served.add(address, size, register)

    def close(self) -> None:
        for vcpu in list(self.vcpus):
            vcpu.close()
        self.vcpus.clear()
        if self.fd >= 0:
            self.host.close(self.fd)
            self.fd = -1


def _zones_of(vm: weakref.ref[KvmVm]) -> Callable[[], list[tuple[IoEventAddress, int]]]:
    """The VM's coalesced zones (none until one is registered), for its served ranges."""

    def zones() -> list[tuple[IoEventAddress, int]]:
        owner = vm()
        return owner._coalesced().zones if owner is not None and owner._zones is not None else []

    return zones


def _address_option(value: object, name: str, size: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"backend_options.{name}: must be an integer address, not {value!r}")
    if value % PAGE_SIZE or not 0 <= value <= (1 << 32) - size:
        raise ConfigError(
            f"backend_options.{name}: {value:#x} must be page-aligned with its {size // PAGE_SIZE} page(s) below 4 GiB"
        )
    return value
