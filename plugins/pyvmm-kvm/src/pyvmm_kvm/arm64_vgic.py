"""The in-kernel GICv3 (``KVM_DEV_TYPE_ARM_VGIC_V3``) and how lines reach it.

Sources: ``Documentation/virt/kvm/devices/arm-vgic-v3.rst`` (the device and its
attribute groups), ``Documentation/virt/kvm/api.rst`` "KVM_IRQ_LINE" (the arm64
``irq`` encoding), ``arch/arm64/kvm/vgic/vgic-kvm-device.c``
(``vgic_v3_set_attr``), ``vgic-init.c`` (``vgic_init``: CTRL_INIT after the vCPUs)
and ``vgic-irqfd.c`` (``kvm_set_routing_entry``: GSI n is SPI n).  crosvm does the
same in ``devices/src/irqchip/kvm/aarch64.rs`` (``KvmKernelIrqChip::new``,
``finalize``).

The life of the device, as KVM dictates it:

1. create it and give it the distributor and redistributor addresses (any time
   before the first run; pyvmm does it in ``create_irqchip``, before the vCPUs);
2. create every vCPU (a vGIC that is initialised refuses new vCPUs with EBUSY);
3. ``KVM_DEV_ARM_VGIC_CTRL_INIT`` -- pyvmm does it in the VM's ``start``, which core
   calls once every vCPU exists and has its boot state, before any runs;
4. only now do irqfds attach (``kvm_irqfd_assign`` answers EAGAIN while
   ``vgic_initialized`` is false), so the VM keeps earlier ones until here.

KVM never deletes a device: a VM whose vGIC setup failed keeps a half-set vGIC,
so the VM refuses a second ``create_irqchip`` rather than meeting EEXIST.
"""

from __future__ import annotations

from typing import Any

from pyvmm.backend import DeviceHost, address_of
from pyvmm.errors import ConfigError
from pyvmm_kvm import arm64_uapi as a
from pyvmm_kvm import bindings as k
from pyvmm_kvm.bindings import ffi_aarch64 as ffi


def spi_irq_line(spi: int) -> int:
    """``kvm_irq_level.irq`` for SPI ``spi`` of the in-kernel vGIC: type SPI, the
    INTID (SPI + 32) in the low 16 bits, no vCPU (api.rst "KVM_IRQ_LINE").

    :raises ConfigError: ``spi`` is not an SPI number the GIC architecture has.
    """
    if isinstance(spi, bool) or not isinstance(spi, int) or not 0 <= spi < 988:
        raise ConfigError(f"irq line {spi!r}: an SPI number from 0 to 987 (INTID 32..1019)")
    return a.KVM_ARM_IRQ_TYPE_SPI << a.KVM_ARM_IRQ_TYPE_SHIFT | (spi + a.VGIC_NR_PRIVATE_IRQS)


def ppi_irq_line(vcpu: int, ppi: int) -> int:
    """``kvm_irq_level.irq`` for PPI ``ppi`` (0..15, INTID 16..31) of vCPU ``vcpu``,
    with the vCPU index split over the VCPU and VCPU2 fields as
    ``KVM_CAP_ARM_IRQ_LINE_LAYOUT_2`` lays it out."""
    if not 0 <= ppi < 16:
        raise ConfigError(f"PPI {ppi}: from 0 to 15 (INTID 16..31)")
    if not 0 <= vcpu < 1 << 12:
        raise ConfigError(f"vCPU {vcpu}: KVM_IRQ_LINE addresses vCPUs 0 to 4095")
    return (
        (vcpu >> 8) << a.KVM_ARM_IRQ_VCPU2_SHIFT
        | a.KVM_ARM_IRQ_TYPE_PPI << a.KVM_ARM_IRQ_TYPE_SHIFT
        | (vcpu & 0xFF) << a.KVM_ARM_IRQ_VCPU_SHIFT
        | (ppi + 16)
    )


class Vgic3:
    """One in-kernel GICv3 of a VM, placed at ``distributor`` and ``redistributors``
    (the first vCPU's frames; each next vCPU's follow at 128 KiB steps)."""

    def __init__(self, host: DeviceHost, vm_fd: int, distributor: int, redistributors: int) -> None:
        self.host = host
        self.distributor = distributor
        self.redistributors = redistributors
        self.initialized = False
        device = ffi.new("struct kvm_create_device *", {"type": a.KVM_DEV_TYPE_ARM_VGIC_V3})
        host.ioctl(vm_fd, k.KVM_CREATE_DEVICE, device, detail="the in-kernel GICv3 (KVM_DEV_TYPE_ARM_VGIC_V3)")
        self.fd = int(device.fd)
        try:
            self._set_address(a.KVM_VGIC_V3_ADDR_TYPE_DIST, distributor, "distributor")
            self._set_address(a.KVM_VGIC_V3_ADDR_TYPE_REDIST, redistributors, "redistributors")
        except BaseException:
            self.close()
            raise

    def _attr(self, request: int, group: int, attr: int, data: Any, detail: str) -> None:
        raw = ffi.new(
            "struct kvm_device_attr *",
            {"group": group, "attr": attr, "addr": 0 if data is None else address_of(data)},
        )
        self.host.ioctl(self.fd, request, raw, detail=detail)

    def _set_address(self, kind: int, address: int, what: str) -> None:
        value = ffi.new("uint64_t *", address)
        self._attr(k.KVM_SET_DEVICE_ATTR, a.KVM_DEV_ARM_VGIC_GRP_ADDR, kind, value, f"vGIC {what} at {address:#x}")

    def initialize(self) -> None:
        """``KVM_DEV_ARM_VGIC_CTRL_INIT``: once every vCPU exists.  Idempotent."""
        if self.initialized:
            return
        self._attr(k.KVM_SET_DEVICE_ATTR, a.KVM_DEV_ARM_VGIC_GRP_CTRL, a.KVM_DEV_ARM_VGIC_CTRL_INIT, None, "CTRL_INIT")
        self.initialized = True

    def get_attr(self, group: int, attr: int, width: int = 32) -> int:
        """``KVM_GET_DEVICE_ATTR``: a ``width``-bit attribute of ``group``."""
        value = ffi.new(f"uint{width}_t *")
        self._attr(k.KVM_GET_DEVICE_ATTR, group, attr, value, f"vGIC group {group} attribute {attr:#x}")
        return int(value[0])

    def set_attr(self, group: int, attr: int, value: int, width: int = 32) -> None:
        """``KVM_SET_DEVICE_ATTR``: a ``width``-bit attribute of ``group``."""
        raw = ffi.new(f"uint{width}_t *", value)
        self._attr(k.KVM_SET_DEVICE_ATTR, group, attr, raw, f"vGIC group {group} attribute {attr:#x} = {value:#x}")

    def distributor_register(self, offset: int) -> int:
        """A 32-bit distributor register as the guest would read it
        (``KVM_DEV_ARM_VGIC_GRP_DIST_REGS``), e.g. GICD_ISPENDR<n> to see a line's
        pending state from the host."""
        value = ffi.new("uint32_t *")
        self._attr(k.KVM_GET_DEVICE_ATTR, a.KVM_DEV_ARM_VGIC_GRP_DIST_REGS, offset, value, f"GICD+{offset:#x}")
        return int(value[0])

    def close(self) -> None:
        """Close the device's descriptor (the device itself lives as long as the VM)."""
        if self.fd >= 0:
            self.host.close(self.fd)
            self.fd = -1
