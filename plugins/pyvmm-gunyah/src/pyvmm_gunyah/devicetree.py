"""Gunyah's own device-tree nodes: ``/gunyah-vm-config`` and one doorbell per irqfd.

Gunyah's resource manager (RM) builds the VM from the guest's device tree: where
the memory is and how far it may grow, who schedules the vCPUs, and which
doorbells to generate under ``/hypervisor``.  The board (:mod:`pyvmm.machine.virt`)
writes the tree every aarch64 guest needs; these nodes are the backend's, added
through ``Capability.DEVICE_TREE_NODES`` once the board has written its nodes and
registered its irqfds.  crosvm does the same: its Gunyah backend's
``create_fdt`` (``hypervisor/src/gunyah/aarch64.rs``) is the only
``VmAArch64::create_fdt`` that writes anything.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyvmm.errors import ConfigError
from pyvmm.machine.devicetree import GIC_SPI, IRQ_TYPE_EDGE_RISING, IRQ_TYPE_LEVEL_HIGH, PHANDLE_GIC, DeviceTree

#: What the RM accepts as the VM's total memory (crosvm ``MAX_VM_SIZE``).
GUNYAH_SIZE_MAX = 0x7_8000_0000

VM_CONFIG = "/gunyah-vm-config"


def add_vm_config_nodes(
    tree: DeviceTree,
    ram_base: int,
    memory_size: int,
    doorbells: Sequence[tuple[int, bool]],
    *,
    firmware_address: int | None = None,
    image_name: str = "pyvmm-vm",
) -> None:
    """Write ``/gunyah-vm-config`` into ``tree``: the RM reads it to build the VM
    (crosvm ``gunyah/aarch64.rs`` ``create_fdt``).

    :param ram_base: the guest-physical address of the VM's RAM.
    :param memory_size: the VM's RAM size; checked against :data:`GUNYAH_SIZE_MAX`.
    :param doorbells: ``(label, level_triggered)`` of each irqfd.  Each becomes a
        ``bell-<label>`` vdevice, which is how the RM binds the irqfd's doorbell (by
        label) at VM start; the label is also the SPI the guest sees, so it matches
        the ``interrupts`` of the device the irqfd serves.
    :param firmware_address: a protected VM's firmware, written only when given.
    :param image_name: the VM's name as the RM reports it.
    :raises ConfigError: more memory than the RM's ``size-max``; nothing is written.
    """
    if memory_size > GUNYAH_SIZE_MAX:
        raise ConfigError(f"memory: {memory_size:#x} bytes; Gunyah VMs may have at most {GUNYAH_SIZE_MAX:#x}")
    top = VM_CONFIG
    tree.string(top, "image-name", image_name)
    tree.string(top, "os-type", "linux")
    tree.u32(f"{top}/memory", "#address-cells", 2)
    tree.u32(f"{top}/memory", "#size-cells", 2)
    tree.u64(f"{top}/memory", "base-address", ram_base)
    tree.u64(f"{top}/memory", "size-max", GUNYAH_SIZE_MAX)
    if firmware_address is not None:
        tree.u64(f"{top}/memory", "firmware-address", firmware_address)
    tree.u32(f"{top}/interrupts", "config", PHANDLE_GIC)
    tree.string(f"{top}/vcpus", "affinity", "proxy")
    tree.string(f"{top}/vdevices", "generate", "/hypervisor")
    for label, level in doorbells:
        # Node names in hex, as crosvm writes them.
        node = f"{top}/vdevices/bell-{label:x}"
        tree.string(node, "vdevice-type", "doorbell")
        tree.string(node, "generate", f"/hypervisor/bell-{label:x}")
        tree.u32(node, "label", label)
        tree.flag(node, "peer-default")
        tree.flag(node, "source-can-clear")
        tree.u32(node, "interrupts", GIC_SPI, label, IRQ_TYPE_LEVEL_HIGH if level else IRQ_TYPE_EDGE_RISING)
