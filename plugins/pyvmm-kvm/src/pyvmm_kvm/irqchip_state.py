"""Thin typed wrappers of KVM's VM-wide device-state ioctls, for snapshots:
the in-kernel 8259s and IOAPIC (``KVM_GET_IRQCHIP``/``KVM_SET_IRQCHIP``), the
8254 (``KVM_GET_PIT2``/``KVM_SET_PIT2``) and the clock (``KVM_GET_CLOCK``/
``KVM_SET_CLOCK``).

Each image is the kernel's struct as bytes (``struct kvm_irqchip``'s 512-byte
chip union, ``struct kvm_pit_state2``), handed back unchanged on restore: core
never reads them.  KVM refuses the irqchip and PIT calls with ENXIO until
``KVM_CREATE_IRQCHIP`` / ``KVM_CREATE_PIT2`` made the devices
(``kvm_arch_vm_ioctl`` in ``arch/x86/kvm/x86.c``: "if (!irqchip_kernel(kvm))
goto out" with ``r = -ENXIO``; ``if (!kvm->arch.vpit) goto out``).
"""

from __future__ import annotations

from typing import Any

from pyvmm.errors import ConfigError
from pyvmm.vm_state import VmStateKind
from pyvmm_kvm import bindings as k
from pyvmm_kvm.bindings import ffi

#: ``kvm_irqchip.chip_id`` of each chip.
CHIP_IDS = {
    VmStateKind.PIC_PRIMARY: k.KVM_IRQCHIP_PIC_MASTER,
    VmStateKind.PIC_SECONDARY: k.KVM_IRQCHIP_PIC_SLAVE,
    VmStateKind.IOAPIC: k.KVM_IRQCHIP_IOAPIC,
}
#: The bytes of one chip's image: ``struct kvm_irqchip``'s union.
CHIP_IMAGE_SIZE = int(ffi.sizeof("struct kvm_irqchip")) - int(ffi.offsetof("struct kvm_irqchip", "chip"))
#: The bytes of the PIT's image: ``struct kvm_pit_state2``.
PIT_IMAGE_SIZE = int(ffi.sizeof("struct kvm_pit_state2"))


def _sized(what: str, data: bytes, size: int) -> bytes:
    if not isinstance(data, (bytes, bytearray)) or len(data) != size:
        shown = f"{len(data)} bytes" if isinstance(data, (bytes, bytearray)) else type(data).__name__
        raise ConfigError(f"a KVM {what} image is {size} bytes, not {shown}")
    return bytes(data)


def get_irqchip(host: Any, vm_fd: int, chip_id: int) -> bytes:
    """``KVM_GET_IRQCHIP`` of chip ``chip_id`` (0 master PIC, 1 slave PIC, 2 IOAPIC)."""
    raw = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
    host.ioctl(vm_fd, k.KVM_GET_IRQCHIP, raw)
    return bytes(ffi.buffer(ffi.addressof(raw.chip), CHIP_IMAGE_SIZE))


def set_irqchip(host: Any, vm_fd: int, chip_id: int, image: bytes) -> None:
    """``KVM_SET_IRQCHIP``: chip ``chip_id`` from an image :func:`get_irqchip` returned."""
    raw = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
    ffi.buffer(ffi.addressof(raw.chip), CHIP_IMAGE_SIZE)[:] = _sized("irqchip", image, CHIP_IMAGE_SIZE)
    host.ioctl(vm_fd, k.KVM_SET_IRQCHIP, raw)


def get_pit2(host: Any, vm_fd: int) -> bytes:
    """``KVM_GET_PIT2``: the three counters and the flags."""
    raw = ffi.new("struct kvm_pit_state2 *")
    host.ioctl(vm_fd, k.KVM_GET_PIT2, raw)
    return bytes(ffi.buffer(raw))


def set_pit2(host: Any, vm_fd: int, image: bytes) -> None:
    """``KVM_SET_PIT2``: KVM reloads each counter from its image, counting from now
    (``kvm_vm_ioctl_set_pit2`` -> ``kvm_pit_load_count``)."""
    raw = ffi.new("struct kvm_pit_state2 *")
    ffi.buffer(raw)[:] = _sized("PIT", image, PIT_IMAGE_SIZE)
    host.ioctl(vm_fd, k.KVM_SET_PIT2, raw)


def get_vm_state(host: Any, vm_fd: int, kind: VmStateKind) -> bytes:
    if kind is VmStateKind.PIT:
        return get_pit2(host, vm_fd)
    return get_irqchip(host, vm_fd, CHIP_IDS[kind])


def set_vm_state(host: Any, vm_fd: int, kind: VmStateKind, data: bytes) -> None:
    if kind is VmStateKind.PIT:
        set_pit2(host, vm_fd, data)
    else:
        set_irqchip(host, vm_fd, CHIP_IDS[kind], data)
