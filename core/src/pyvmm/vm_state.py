"""Names for the VM-wide state the hypervisor keeps for its own devices: what
``pyvmm_get_vm_state`` / ``pyvmm_set_vm_state`` move (capability ``VM_STATE``).

Each value is the hypervisor's own image of the device as bytes: core stores
and restores it without reading it, and the backend checks its size.  The kinds
exist only once the VM has the hypervisor's interrupt controllers
(:meth:`pyvmm.vm.Vm.create_irqchip`).
"""

from __future__ import annotations

import enum


class VmStateKind(enum.Enum):
    """A piece of the hypervisor's VM-wide device state."""

    PIC_PRIMARY = "pic_primary"  #: the master 8259 (KVM: ``KVM_GET_IRQCHIP``, chip 0)
    PIC_SECONDARY = "pic_secondary"  #: the slave 8259 (chip 1)
    IOAPIC = "ioapic"  #: the IOAPIC (chip 2)
    PIT = "pit"  #: the 8254 timer (KVM: ``KVM_GET_PIT2``)
    #: aarch64: the GICv3 -- distributor, redistributors, CPU interfaces and line
    #: levels -- as a :class:`pyvmm.gicv3_state.Gicv3State` image (core reads it
    #: to check it against the snapshot's vCPUs before anything is created)
    GICV3 = "gicv3"


#: What a VM with an in-kernel irqchip holds, in the order it is restored.
X86_IRQCHIP_KINDS = (VmStateKind.PIC_PRIMARY, VmStateKind.PIC_SECONDARY, VmStateKind.IOAPIC, VmStateKind.PIT)
#: What an aarch64 VM with the hypervisor's GICv3 holds.
AARCH64_IRQCHIP_KINDS = (VmStateKind.GICV3,)
