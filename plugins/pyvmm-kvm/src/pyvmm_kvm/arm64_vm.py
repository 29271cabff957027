"""A KVM VM on an arm64 host: memory slots, the in-kernel GICv3, irqfds, ioeventfds.

Its public methods are the arm64 backend's VM hooks (``docs/backends/kvm.md``,
"arm64").  Memory, the dirty log and ioeventfds are the same ioctls as on x86;
what differs is the VM type (the IPA size), the interrupt controller (a vGICv3
device instead of the PC's chips, :mod:`pyvmm_kvm.arm64_vgic`), and the order KVM
imposes: the vGIC is initialised only once every vCPU exists, which pyvmm does in
:meth:`KvmArm64Vm.start` (``VM_START``), and irqfds attach only after that.
"""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyvmm.backend import install_kick_handler
from pyvmm.config import VmConfig
from pyvmm.errors import ConfigError, HypervisorError, VmStateError
from pyvmm.gicv3_state import Gicv3State
from pyvmm.machine.virt import GIC_DISTRIBUTOR_BASE, GIC_REDISTRIBUTOR_BASE
from pyvmm.memory import RamRegion
from pyvmm.vcpu_state import AddressSpace, IoEventAddress
from pyvmm.vm_state import VmStateKind
from pyvmm_kvm import arm64_uapi as a
from pyvmm_kvm import arm64_vgic_state
from pyvmm_kvm import bindings as k
from pyvmm_kvm.arm64_vcpu import KvmArm64Vcpu
from pyvmm_kvm.arm64_vgic import Vgic3, spi_irq_line
from pyvmm_kvm.bindings import ffi_aarch64 as ffi
from pyvmm_kvm.system import KvmSystem, system
from pyvmm_kvm.vm_common import KvmVmCommon

if TYPE_CHECKING:
    from pyvmm.host import Event

#: The IPA size KVM gives a VM of type 0 (``KVM_PHYS_SHIFT``, 40 bits).
DEFAULT_IPA_BITS = 40


@dataclass(frozen=True)
class _Irqfd:
    fd: int
    gsi: int
    flags: int
    resamplefd: int = 0


class KvmArm64Vm(KvmVmCommon):
    """The arm64 backend's VM handle."""

    _ffi = ffi

    @classmethod
    def create(cls, backend: Any, config: VmConfig) -> KvmArm64Vm:
        """``pyvmm_create_vm``: a VM on the current host's ``/dev/kvm``."""
        install_kick_handler()
        return cls(system(), config)

    def __init__(self, kvm: KvmSystem, config: VmConfig) -> None:
        options = dict(config.backend_options)
        self.kvm = kvm
        self.host = kvm.host
        self.config = config
        self.regions: dict[int, RamRegion] = {}
        self._dirty_logs: dict[int, tuple[RamRegion, Any, int, Any]] = {}
        self.vcpus: list[KvmArm64Vcpu] = []
        self.vgic: Vgic3 | None = None
        self._vgic_attempted = False
        # irqfds registered before the vGIC is initialised (KVM answers EAGAIN).
        self._pending_irqfds: list[_Irqfd] = []
        self._lock = threading.Lock()
        self.gic_distributor = _address_option(options.pop("gic_distributor", GIC_DISTRIBUTOR_BASE), "gic_distributor")
        self.gic_redistributors = _address_option(
            options.pop("gic_redistributors", GIC_REDISTRIBUTOR_BASE), "gic_redistributors"
        )
        ipa_bits = options.pop("ipa_bits", DEFAULT_IPA_BITS)
        if options:
            raise ConfigError(f"backend_options: unknown KVM option(s) {', '.join(sorted(options))}")
        vm_type = self._vm_type(ipa_bits)
        if config.vcpus > kvm.max_vcpus():
            raise ConfigError(f"vcpus: this KVM allows at most {kvm.max_vcpus()} vCPUs, {config.vcpus} asked")
        self.ipa_bits = ipa_bits
        self.fd = self.host.ioctl(kvm.fd, k.KVM_CREATE_VM, vm_type, detail=f"{ipa_bits}-bit IPA space")
        try:
            init = ffi.new("struct kvm_vcpu_init *")
            self.host.ioctl(self.fd, k.KVM_ARM_PREFERRED_TARGET, init)
            #: What ``KVM_ARM_PREFERRED_TARGET`` answers: the target every vCPU is initialised with.
            self.target = int(init.target)
        except BaseException:
            self.host.close(self.fd)
            raise

    def _vm_type(self, ipa_bits: object) -> int:
        """``KVM_CREATE_VM``'s type: 0 for the default 40 bits, else the IPA size,
        which KVM accepts up to ``KVM_CAP_ARM_VM_IPA_SIZE`` (``kvm_arm_setup_stage2``)."""
        if isinstance(ipa_bits, bool) or not isinstance(ipa_bits, int) or not 32 <= ipa_bits <= 52:
            raise ConfigError(f"backend_options.ipa_bits: an IPA size from 32 to 52 bits, not {ipa_bits!r}")
        if ipa_bits == DEFAULT_IPA_BITS:
            return 0
        limit = self.kvm.check_extension(k.KVM_CAP_ARM_VM_IPA_SIZE)
        if ipa_bits > max(limit, DEFAULT_IPA_BITS):
            raise ConfigError(f"backend_options.ipa_bits: this KVM offers at most {max(limit, DEFAULT_IPA_BITS)} bits")
        return ipa_bits & a.KVM_VM_TYPE_ARM_IPA_SIZE_MASK

    # --- memory: the slots are KvmVmCommon's, the IPA limit is arm64's -------------
    def _check_region(self, region: RamRegion) -> None:
        if region.end > 1 << self.ipa_bits:
            raise ConfigError(
                f"memory at {region.guest_phys_addr:#x}+{region.size:#x} ends beyond this VM's "
                f"{self.ipa_bits}-bit guest-physical space (backend_options.ipa_bits)"
            )

    def create_vcpu(self, index: int) -> KvmArm64Vcpu:
        if self.vgic is not None and self.vgic.initialized:
            raise VmStateError(f"vCPU {index}: the VM has started; KVM's initialised vGIC takes no new vCPUs")
        vcpu = KvmArm64Vcpu(self, index, self.kvm.vcpu_mmap_size)
        self.vcpus.append(vcpu)
        return vcpu

    def remove_vcpu(self, vcpu: KvmArm64Vcpu) -> None:
        if vcpu in self.vcpus:
            self.vcpus.remove(vcpu)

    def start(self) -> None:
        """``VM_START``: every vCPU exists, none has run.  Initialise the vGIC and
        attach the irqfds registered so far."""
        with self._lock:
            if self.vgic is None or self.vgic.initialized:
                return
            self.vgic.initialize()
            pending, self._pending_irqfds = self._pending_irqfds, []
            for irqfd in pending:
                self._irqfd(irqfd)

    # --- the in-kernel GICv3 ----------------------------------------------------------
    def create_irqchip(self) -> None:
        """The in-kernel GICv3 at the board's addresses (``backend_options``
        ``gic_distributor`` / ``gic_redistributors`` move it)."""
        if self._vgic_attempted:
            raise VmStateError("this VM already has an in-kernel GICv3 (KVM devices cannot be removed)")
        self._vgic_attempted = True
        self.vgic = Vgic3(self.host, self.fd, self.gic_distributor, self.gic_redistributors)

    def _require_vgic(self, what: str) -> Vgic3:
        if self.vgic is None:
            raise ConfigError(f"{what} on arm64 KVM needs the in-kernel GICv3: create_irqchip() first")
        return self.vgic

    def set_irq_line(self, line: int, level: bool) -> None:
        """Raise or lower SPI ``line`` (the number the device tree gives it)."""
        self._require_vgic("KVM_IRQ_LINE")
        raw = ffi.new("struct kvm_irq_level *", {"irq": spi_irq_line(line), "level": int(level)})
        self.host.ioctl(self.fd, k.KVM_IRQ_LINE, raw)

    def register_irqfd(self, event: Event, line: int, level: bool) -> None:
        if level:
            raise ConfigError(
                "KVM level-triggered irqfds need a resample event: register_irqfd(event, line, level=True, "
                "resample=Event())"
            )
        self._add_irqfd(_Irqfd(event.fileno(), _spi(line), 0))

    def register_resample_irqfd(self, event: Event, line: int, resample: Event) -> None:
        self._add_irqfd(_Irqfd(event.fileno(), _spi(line), k.KVM_IRQFD_FLAG_RESAMPLE, resample.fileno()))

    def _add_irqfd(self, irqfd: _Irqfd) -> None:
        vgic = self._require_vgic("an irqfd")
        with self._lock:
            if not vgic.initialized:
                if any(p.fd == irqfd.fd and p.gsi == irqfd.gsi for p in self._pending_irqfds):
                    # What KVM answers for a second irqfd on one eventfd (kvm_irqfd_assign).
                    detail = f"eventfd {irqfd.fd} already drives SPI {irqfd.gsi}"
                    raise HypervisorError("KVM_IRQFD", errno.EBUSY, detail)
                self._pending_irqfds.append(irqfd)
                return
        self._irqfd(irqfd)

    def unregister_irqfd(self, event: Event, line: int) -> None:
        gsi = _spi(line)
        with self._lock:
            before = len(self._pending_irqfds)
            self._pending_irqfds = [p for p in self._pending_irqfds if not (p.fd == event.fileno() and p.gsi == gsi)]
            if len(self._pending_irqfds) != before or self.vgic is None or not self.vgic.initialized:
                return
        self._irqfd(_Irqfd(event.fileno(), gsi, k.KVM_IRQFD_FLAG_DEASSIGN))

    def _irqfd(self, irqfd: _Irqfd) -> None:
        # GSI n is SPI n on arm64 (vgic-irqfd.c kvm_set_routing_entry adds the 32).
        raw = ffi.new(
            "struct kvm_irqfd *",
            {"fd": irqfd.fd, "gsi": irqfd.gsi, "flags": irqfd.flags, "resamplefd": irqfd.resamplefd},
        )
        self.host.ioctl(self.fd, k.KVM_IRQFD, raw)

    # --- VM-wide state: the vGIC (VM_STATE) ------------------------------------------
    def _mpidrs(self) -> list[int]:
        """Each vCPU's MPIDR_EL1, in index order: the vGIC names a vCPU by it."""
        return [vcpu.mpidr() for vcpu in sorted(self.vcpus, key=lambda v: v.index)]

    def get_vm_state(self, kind: VmStateKind) -> bytes:
        """``VM_STATE``: the vGIC's registers (:mod:`pyvmm_kvm.arm64_vgic_state`),
        every vCPU stopped."""
        vgic = self._vgic_state(kind)
        return arm64_vgic_state.save(vgic, self._mpidrs()).encode()

    def set_vm_state(self, kind: VmStateKind, data: bytes) -> None:
        """``VM_STATE``: the vGIC's registers from an image :meth:`get_vm_state`
        returned, once the vGIC is initialised (``start``) and before any vCPU ran."""
        vgic = self._vgic_state(kind)
        arm64_vgic_state.restore(vgic, self._mpidrs(), Gicv3State.decode(data))

    def _vgic_state(self, kind: VmStateKind) -> Vgic3:
        if kind is not VmStateKind.GICV3:
            raise ConfigError(f"KVM arm64 VMs have no {kind.value} state: their VM state is the GICv3's")
        return self._require_vgic("the GICv3's state")

    # --- ioeventfds (MMIO only: arm64 has no port I/O) ----------------------------------
    def _check_ioevent(self, address: IoEventAddress) -> None:
        if address.space is not AddressSpace.MMIO:
            raise ConfigError("ioevents on arm64 are MMIO addresses: the architecture has no port I/O")

    # --- teardown -------------------------------------------------------------------
    def close(self) -> None:
        for vcpu in list(self.vcpus):
            vcpu.close()
        self.vcpus.clear()
        self._pending_irqfds.clear()
        if self.vgic is not None:
            self.vgic.close()
        if self.fd >= 0:
            self.host.close(self.fd)
            self.fd = -1


def _spi(line: int) -> int:
    spi_irq_line(line)  # the range check
    return line


def _address_option(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value % 0x10000:
        raise ConfigError(f"backend_options.{name}: a 64 KiB-aligned guest-physical address, not {value!r}")
    return value
