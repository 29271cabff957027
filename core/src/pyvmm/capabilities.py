"""Backend capabilities: what a backend may be asked to do beyond the required hooks.

A capability is a member of :class:`Capability`, never a bare string.  A backend
declares its capabilities in its manifest; core reads them through
:class:`CapabilitySet`, where a capability that is not declared (including one this
version of pyvmm does not know yet) reads as ``False``.

Every capability is one of three kinds, and a test keeps it so:

* it gates optional hooks (each specification in :mod:`pyvmm.hookspecs` names its
  capability; :func:`pyvmm.contract.hooks_by_capability` derives the map): the
  backend implements exactly the hooks of the capabilities it declares, and core
  checks the capability before every call;
* core reads it as a flag (:data:`CORE_READS` says where and why);
* it is informational (:data:`INFORMATIONAL`): core never reads it.

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
    PREPARED_VCPU_STATE = "prepared_vcpu_state"
    """A vCPU's saved state (register sets, MSRs, pending events: a
    :class:`pyvmm.prepared_state.SavedVcpuState`) can be made ready once and then
    written back many times at the cost of the hypervisor's own calls, with no
    conversion per write (hooks ``pyvmm_prepare_vcpu_state``/
    ``pyvmm_restore_vcpu_state``; what a dirty-page reset does every iteration).
    Without it core writes the state back with the register hooks."""
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
    DEVICE_TREE_NODES = "device_tree_nodes"
    """The backend adds nodes of its own to the guest's device tree
    (:meth:`pyvmm.vm.Vm.add_device_tree_nodes`), after the board wrote its nodes and
    registered its irqfds, as crosvm's Gunyah backend does in ``create_fdt``."""

    # --- interrupts from userspace (x86) ----------------------------------------
    INTERRUPT_INJECTION = "interrupt_injection"
    """The VMM delivers x86 external interrupts itself (crosvm's ``VcpuX86_64``
    interrupt methods): whether the vCPU can take one now, inject a vector, and an
    :class:`~pyvmm.exits.IrqWindowOpenExit` when a requested interrupt window opens
    (hooks ``pyvmm_ready_for_interrupt``/``pyvmm_inject_interrupt``/
    ``pyvmm_request_interrupt_window``).  What a VMM without the hypervisor's
    interrupt controllers needs: HAXM has none, WHPX VMMs inject from userspace."""
    NMI = "nmi"
    """A non-maskable interrupt can be injected (hook ``pyvmm_inject_nmi``)."""
    VCPU_EVENTS = "vcpu_events"
    """The pending-event state (exception, interrupt, NMI, SMI being delivered, the
    interrupt shadow, NMI blocking) can be read and written as a
    :class:`pyvmm.arch.x86_64.VcpuEvents` (hooks ``pyvmm_get_vcpu_events``/
    ``pyvmm_set_vcpu_events``)."""
    INTERRUPT_SHADOW = "interrupt_shadow"
    """The hypervisor models the one-instruction interrupt shadow after STI and
    MOV SS: an interrupt window opens after the instruction that follows ``sti``.
    (This machine's software KVM does not, and says so: it reports no
    ``KVM_CAP_INTR_SHADOW``.)"""

    # --- more of the interrupt API --------------------------------------------
    IRQFD_REMOVAL = "irqfd_removal"
    """An irqfd can be unregistered again (hook ``pyvmm_unregister_irqfd``)."""
    IRQFD_RESAMPLE = "irqfd_resample"
    """A level-triggered irqfd with a resample event: the hypervisor lowers the line
    when the guest acknowledges the interrupt and signals the resample event, so the
    device can raise it again if it still needs service (hook
    ``pyvmm_register_resample_irqfd``)."""
    GSI_ROUTING = "gsi_routing"
    """The GSI routing table can be replaced: irqchip pins and MSI routes (hook
    ``pyvmm_set_gsi_routing``)."""
    MSI = "msi"
    """A message signalled interrupt can be sent directly (hook ``pyvmm_signal_msi``)."""

    # --- MSR lists, TSC -------------------------------------------------------
    MSR_INDEX_LIST = "msr_index_list"
    """The MSRs the hypervisor saves and restores can be listed (hook
    ``pyvmm_get_msr_index_list``; crosvm ``get_msr_index_list``)."""
    FEATURE_MSRS = "feature_msrs"
    """The feature MSRs (what the host lets a guest see, such as
    ``IA32_ARCH_CAPABILITIES``) can be read (hook ``pyvmm_get_feature_msrs``)."""
    TSC_FREQUENCY = "tsc_frequency"
    """A vCPU's TSC frequency can be read (hook ``pyvmm_get_tsc_khz``)."""
    TSC_SCALING = "tsc_scaling"
    """A vCPU's TSC frequency can be set (hook ``pyvmm_set_tsc_khz``)."""
    TSC_OFFSET = "tsc_offset"
    """A vCPU's TSC offset (guest TSC minus host TSC) can be read and set
    (hooks ``pyvmm_get_tsc_offset``/``pyvmm_set_tsc_offset``)."""

    # --- exits avoided (contract version 3) -----------------------------------
    COALESCED_IO = "coalesced_io"
    """Guest writes to registered MMIO zones are recorded, not exits (hooks
    ``pyvmm_register_coalesced_io``/``pyvmm_unregister_coalesced_io``/
    ``pyvmm_take_coalesced_io``; :mod:`pyvmm.coalesced`)."""
    COALESCED_PIO = "coalesced_pio"
    """Coalesced zones may be port ranges too (KVM: ``KVM_CAP_COALESCED_PIO``)."""
    SERVED_IO = "served_io"
    """Simple registers (a constant, latched bytes, the ACPI PM timer) can be
    answered inside the backend's run, never exiting to the VMM (hook
    ``pyvmm_serve_io``; :mod:`pyvmm.served_io`)."""

    # --- complete snapshots (issue 19) ----------------------------------------
    XSAVE = "xsave"
    """x86: the whole XSAVE area can be read and written as the register set
    ``StateKind.XSAVE`` (AVX and later state beyond the legacy FPU area)."""
    MP_STATE = "mp_state"
    """x86: the multiprocessing state (running, halted, waiting for SIPI) can be
    read and written as the register set ``StateKind.MP_STATE``; aarch64: running,
    powered off or suspended."""
    REGISTER_LIST = "register_list"
    """aarch64: every register the hypervisor keeps for a vCPU -- core, FP/SIMD,
    system, timer and firmware registers -- can be read and written by id as the
    register set ``StateKind.REGISTER_LIST``."""
    VM_STATE = "vm_state"
    """The hypervisor's VM-wide device state -- the in-kernel interrupt controllers
    and timer (:class:`pyvmm.vm_state.VmStateKind`) -- can be read and written
    (hooks ``pyvmm_get_vm_state``/``pyvmm_set_vm_state``)."""

    # --- the per-backend escape hatch -------------------------------------------
    RAW_CAPABILITIES = "raw_capabilities"
    """The hypervisor's own capabilities can be queried and enabled by their own
    numbers (KVM: ``KVM_CHECK_EXTENSION``, ``KVM_ENABLE_CAP``), so a VMM never
    reaches into a backend's private attributes (hooks
    ``pyvmm_check_raw_capability``/``pyvmm_enable_raw_capability``/
    ``pyvmm_enable_vcpu_raw_capability``).  The numbers and what enabling one does
    are the backend's: see its ``docs/backends/<name>.md``."""


#: Capabilities core reads itself (beyond gating a hook), and where.  Every
#: other capability either gates hooks (:func:`pyvmm.contract.hooks_by_capability`)
#: or is in :data:`INFORMATIONAL`.
CORE_READS: dict[Capability, str] = {
    Capability.HYPERVISOR_INITIALIZED_BOOT_CONTEXT: "Vm.set_boot/Vcpu.apply_boot: boot entry to the VM, no vCPU init",
    Capability.PROTECTED: "Backend.create_vm: a VmConfig asking for protection needs it",
    Capability.READ_ONLY_MEMORY: "Vm.add_memory: read_only=True needs it",
    Capability.LATE_MEMORY: "Vm.add_memory: mapping after start needs it",
    Capability.PORT_IO: "the pc board and the x86 conformance scenarios need port-I/O exits",
    Capability.PIO_IOEVENTS: "Vm.register_ioevent: an ioevent on a port needs it",
    Capability.COALESCED_PIO: "Vm.register_coalesced_io: a zone of ports needs it",
    Capability.XCRS: "reset_point/snapshot: the XCRs are saved and restored where the backend declares it",
    Capability.EARLY_INIT_CPUID: "Vcpu.set_cpuid refuses; the pc board sets CPUID at VM creation instead",
    Capability.MULTI_VCPU: "Backend.create_vm: more than one vCPU needs it",
    Capability.XSAVE: "snapshot: the XSAVE area is saved and restored where the backend declares it",
    Capability.MP_STATE: "snapshot: a VM with an irqchip saves each vCPU's MP state where the backend declares it",
    Capability.REGISTER_LIST: "snapshot: an aarch64 vCPU's every register is saved where the backend declares it",
}

#: Capabilities core never reads: they mirror crosvm's ``HypervisorCap``/``VmCap``
#: so a VMM (and ``pyvmm backends``) can see them, or say how the hypervisor
#: behaves for a VMM and the conformance suite to know (``INTERRUPT_SHADOW``),
#: and change nothing in core.
INFORMATIONAL: frozenset[Capability] = frozenset(
    {
        Capability.USER_MEMORY,
        Capability.CALIBRATED_TSC_LEAF_REQUIRED,
        Capability.STATIC_SWIOTLB_ALLOCATION_REQUIRED,
        Capability.ARM_PMU_V3,
        Capability.BUS_LOCK_DETECT,
        Capability.MEM_NONCOHERENT_DMA,
        Capability.MTE,
        Capability.SVE,
        Capability.NESTED_VIRT,
        Capability.INTERRUPT_SHADOW,
    }
)


def __getattr__(name: str) -> object:
    # The hook maps moved to pyvmm.contract, derived from the specifications;
    # these names stay importable for plugins' tests written against 0.1.
    from pyvmm import contract

    if name == "HOOKS_BY_CAPABILITY":
        return contract.hooks_by_capability()
    if name == "CAPABILITY_BY_HOOK":
        return contract.capability_by_hook()
    if name == "INIT_VCPU_HOOK":
        return contract.INIT_VCPU_HOOK
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
