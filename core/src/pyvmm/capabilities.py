"""Backend capabilities: what a backend may be asked to do beyond the required hooks.

A capability is a member of :class:`Capability`, never a bare string.  A backend
declares its capabilities in its manifest; core reads them through
:class:`CapabilitySet`, where a capability that is not declared (including one this
version of pyvmm does not know yet) reads as ``False``.

Some capabilities gate an optional hook (:data:`HOOKS_BY_CAPABILITY`): the backend
must implement exactly the hooks of the capabilities it declares, and core checks
the capability before every call.  The others are flags that change what core
allows (read-only regions, dirty logging) or how it boots a VM.

The first group mirrors crosvm's ``HypervisorCap`` and ``VmCap``
(``hypervisor/src/caps.rs``); the second is what pyvmm's optional hooks need.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator


class Capability(str, enum.Enum):
    """A capability a backend may declare.  The value is the stable wire name used
    in manifests and ``pyvmm backends --json``."""

    # --- crosvm HypervisorCap -------------------------------------------------
    IMMEDIATE_EXIT = "immediate_exit"
    """A vCPU can be kicked out of ``run()`` from another thread (hook ``pyvmm_kick_vcpu``)."""
    USER_MEMORY = "user_memory"
    """Guest RAM is host memory the VMM allocates and maps."""
    XCRS = "xcrs"
    """x86 extended control registers are accessible."""
    CALIBRATED_TSC_LEAF_REQUIRED = "calibrated_tsc_leaf_required"
    """The VMM must provide CPUID leaf 0x15 with a calibrated TSC frequency."""
    STATIC_SWIOTLB_ALLOCATION_REQUIRED = "static_swiotlb_allocation_required"
    """DMA bounce buffers must live in their own region, described in the device tree."""
    HYPERVISOR_INITIALIZED_BOOT_CONTEXT = "hypervisor_initialized_boot_context"
    """The hypervisor sets the vCPU boot registers.  Core never calls
    ``pyvmm_init_vcpu``; the boot entry goes to ``pyvmm_set_boot_context``."""

    # --- crosvm VmCap ---------------------------------------------------------
    ARM_PMU_V3 = "arm_pmu_v3"
    DIRTY_LOG = "dirty_log"
    """Regions can log written pages (hook ``pyvmm_get_dirty_log``)."""
    PVCLOCK = "pvclock"
    """The paravirtual clock can be read and set (hooks ``pyvmm_get_clock``/``pyvmm_set_clock``)."""
    PROTECTED = "protected"
    """Guest memory is isolated from the host (lent, not shared)."""
    EARLY_INIT_CPUID = "early_init_cpuid"
    """CPUID is fixed at VM creation; ``set_cpuid`` on a vCPU is not possible."""
    BUS_LOCK_DETECT = "bus_lock_detect"
    READ_ONLY_MEMORY = "read_only_memory"
    """A region can be mapped read-only; a guest write becomes an MMIO exit."""
    MEM_NONCOHERENT_DMA = "mem_noncoherent_dma"
    MTE = "mte"
    SVE = "sve"
    NESTED_VIRT = "nested_virt"

    # --- pyvmm optional hooks and flags ---------------------------------------
    MEMORY_REMOVAL = "memory_removal"
    """Mapped regions can be removed again (hook ``pyvmm_unmap_memory``)."""
    LATE_MEMORY = "late_memory"
    """Memory can be mapped after the VM started running (Gunyah: no)."""
    PORT_IO = "port_io"
    """The backend produces port-I/O exits (x86 backends; not Gunyah or GenieZone)."""
    VCPU_REGISTERS = "vcpu_registers"
    """vCPU registers can be read and written (hooks ``pyvmm_get_vcpu_state``/``pyvmm_set_vcpu_state``)."""
    MSRS = "msrs"
    """x86 MSRs can be read and written (hooks ``pyvmm_get_msrs``/``pyvmm_set_msrs``)."""
    CPUID = "cpuid"
    """The backend reports its supported CPUID and accepts a vCPU CPUID table
    (hooks ``pyvmm_get_supported_cpuid``/``pyvmm_set_cpuid``)."""
    IOEVENTS = "ioevents"
    """Guest writes can signal an eventfd without an exit
    (hooks ``pyvmm_register_ioevent``/``pyvmm_unregister_ioevent``)."""
    PIO_IOEVENTS = "pio_ioevents"
    """ioevents may sit on I/O ports, not only on MMIO addresses."""
    IRQFD = "irqfd"
    """An eventfd can raise a guest interrupt (hook ``pyvmm_register_irqfd``)."""
    IRQ_LINE = "irq_line"
    """An interrupt line can be raised and lowered directly (hook ``pyvmm_set_irq_line``)."""
    IRQCHIP = "irqchip"
    """The hypervisor emulates the interrupt controllers and timer (hook ``pyvmm_create_irqchip``)."""
    GUEST_DEBUG = "guest_debug"
    """Single-stepping and hardware breakpoints (hook ``pyvmm_set_guest_debug``)."""
    VM_START = "vm_start"
    """The VM must be started explicitly once set up (hook ``pyvmm_start_vm``)."""
    MULTI_VCPU = "multi_vcpu"
    """More than one vCPU per VM."""


#: Optional hooks and the capability that gates each.  Core calls none of these
#: without the capability, and a backend implements exactly those of the
#: capabilities it declares.
HOOKS_BY_CAPABILITY: dict[Capability, tuple[str, ...]] = {
    Capability.IMMEDIATE_EXIT: ("pyvmm_kick_vcpu",),
    Capability.HYPERVISOR_INITIALIZED_BOOT_CONTEXT: ("pyvmm_set_boot_context",),
    Capability.DIRTY_LOG: ("pyvmm_get_dirty_log",),
    Capability.PVCLOCK: ("pyvmm_get_clock", "pyvmm_set_clock"),
    Capability.MEMORY_REMOVAL: ("pyvmm_unmap_memory",),
    Capability.VCPU_REGISTERS: ("pyvmm_get_vcpu_state", "pyvmm_set_vcpu_state"),
    Capability.MSRS: ("pyvmm_get_msrs", "pyvmm_set_msrs"),
    Capability.CPUID: ("pyvmm_get_supported_cpuid", "pyvmm_set_cpuid"),
    Capability.IOEVENTS: ("pyvmm_register_ioevent", "pyvmm_unregister_ioevent"),
    Capability.IRQFD: ("pyvmm_register_irqfd",),
    Capability.IRQ_LINE: ("pyvmm_set_irq_line",),
    Capability.IRQCHIP: ("pyvmm_create_irqchip",),
    Capability.GUEST_DEBUG: ("pyvmm_set_guest_debug",),
    Capability.VM_START: ("pyvmm_start_vm",),
}

#: The capability each optional hook belongs to.
CAPABILITY_BY_HOOK: dict[str, Capability] = {hook: cap for cap, hooks in HOOKS_BY_CAPABILITY.items() for hook in hooks}

#: ``pyvmm_init_vcpu`` is optional the other way round: required unless the
#: backend declares that the hypervisor initialises the boot context, and
#: forbidden (it would never be called) when it does.
INIT_VCPU_HOOK = "pyvmm_init_vcpu"


def parse_capabilities(names: Iterable[str | Capability]) -> tuple[frozenset[Capability], tuple[str, ...]]:
    """Split declared names into known capabilities and unknown names.

    Unknown names come from backends written for a newer pyvmm; they read as
    ``False`` here rather than failing registration.
    """
    known: set[Capability] = set()
    unknown: list[str] = []
    for name in names:
        if isinstance(name, Capability):
            known.add(name)
            continue
        try:
            known.add(Capability(name))
        except ValueError:
            unknown.append(name)
    return frozenset(known), tuple(unknown)


class CapabilitySet:
    """An immutable set of declared capabilities; anything not declared is ``False``."""

    __slots__ = ("_caps",)

    def __init__(self, caps: Iterable[Capability] = ()) -> None:
        self._caps = frozenset(caps)

    def __contains__(self, cap: object) -> bool:
        return cap in self._caps

    def __iter__(self) -> Iterator[Capability]:
        return iter(sorted(self._caps, key=lambda c: c.value))

    def __len__(self) -> int:
        return len(self._caps)

    def __getitem__(self, cap: Capability) -> bool:
        return cap in self._caps

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CapabilitySet):
            return self._caps == other._caps
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._caps)

    def __repr__(self) -> str:
        return "CapabilitySet({" + ", ".join(c.name for c in self) + "})"
