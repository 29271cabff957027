"""The hook specifications: the contract every pyvmm backend implements.

A backend is an object registered in the entry-point group ``pyvmm`` whose
functions are marked with :data:`pyvmm.hookimpl`.  Core never broadcasts a hook
to every backend: a VM is bound to one backend, and core resolves that backend's
implementations once, when the backend is first used, and then calls them
directly (:class:`pyvmm.vm.BackendHooks`).

**You rarely write these functions yourself.**  The backend template
(:mod:`pyvmm.backend.plugin`, ``docs/writing-a-backend.md``) generates them: a
backend writes a VM class and a vCPU class, and each hook below is forwarded to
the method its metadata names (``pyvmm_map_memory(vm, region)`` calls
``vm.map_memory(region)``).  The metadata (:func:`pyvmm.contract.hook_info`:
which handle, which method, which capability, since which contract version) is
the one source of the capability map, the required-hook list and the guide's
hook table.

Conventions that apply to every hook:

* **Arguments** are passed by the names given here, in this order; an
  implementation takes exactly these parameters (core checks at registration),
  less the trailing ones added after the contract version it declares.
* **Handles.** ``pyvmm_create_vm`` and ``pyvmm_create_vcpu`` return an object of
  the backend's own choosing (its *handle*); core passes it back as ``vm`` or
  ``vcpu`` and never looks inside.
* **Errors.** A failing host call raises :class:`pyvmm.errors.HypervisorError`
  naming the call and its error code; bad arguments a backend cannot accept
  raise :class:`pyvmm.errors.ConfigError`.  A hook that fails leaves nothing
  behind: what it opened, it closes before raising.
* **Optional hooks** belong to one :class:`pyvmm.capabilities.Capability` each.
  A backend implements exactly the optional hooks of the capabilities it
  declares; core calls none of them without the capability and raises
  :class:`pyvmm.errors.UnsupportedCapability` instead.
* **Threads.** vCPU hooks are called on the thread that created the vCPU,
  except three: ``pyvmm_run_vcpu`` may be called from another thread (one at a
  time; the kick then follows the thread that runs it), ``pyvmm_kick_vcpu``
  comes from any thread, and ``pyvmm_destroy_vcpu`` comes from the thread that
  closes the VM, once the vCPU has left the hypervisor.  The backend kit's
  :meth:`pyvmm.backend.SignalKicker.guard_run` implements the run and kick
  rules; core enforces the creating-thread rule for the others.
"""

# mypy: disable-error-code="empty-body"
# (specifications have docstrings for bodies)

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

from pyvmm.capabilities import Capability as Cap
from pyvmm.contract import hook_info

# The argument and return types are for readers and type checkers only: pluggy
# reads argument names, never annotations, and importing these at run time would
# pull pydantic and the boot code into every start-up that only registers hooks.
if TYPE_CHECKING:
    from pyvmm.arch.x86_64 import CpuidEntry, MsrEntry, VcpuEvents
    from pyvmm.boot import BootSpec, VcpuInit
    from pyvmm.coalesced import CoalescedWrite
    from pyvmm.config import VmConfig
    from pyvmm.exits import VcpuExit
    from pyvmm.host import Event
    from pyvmm.interrupts import IrqRoute
    from pyvmm.machine.devicetree import DeviceTree
    from pyvmm.manifest import BackendManifest
    from pyvmm.memory import RamRegion
    from pyvmm.prepared_state import SavedVcpuState
    from pyvmm.served_io import ServedRegister
    from pyvmm.vcpu_state import IoEventAddress, StateKind
    from pyvmm.vm_state import VmStateKind

PROJECT = "pyvmm"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- required hooks -----------------------------------------------------------


@hookspec
@hook_info(on="backend", method="manifest", required=True)
def pyvmm_backend_info() -> BackendManifest:
    """Describe the backend.

    Called once at discovery, before anything else.  Must be cheap and must not
    touch the hypervisor: whether the backend can run here is answered by the
    manifest's ``probe``, which core calls separately and which must never raise
    (a probe that raises is reported as "unavailable").

    :returns: a :class:`pyvmm.manifest.BackendManifest`.  An invalid manifest, or
        one whose capabilities disagree with the hooks the plugin implements,
        gets the plugin refused (reported by ``pyvmm backends``).

    Example::

        def manifest() -> BackendManifest:
            return BackendManifest(name="acme", version="1.0", contract_version=CONTRACT_VERSION,
                                   host_os=("linux",), guest_arches=(Arch.X86_64,),
                                   capabilities=(Capability.IMMEDIATE_EXIT,), probe=probe)
    """


@hookspec
@hook_info(on="backend", required=True)
def pyvmm_create_vm(backend: Any, config: VmConfig) -> Any:
    """Create a VM with no memory and no vCPUs.

    :param backend: the core :class:`pyvmm.vm.Backend` the VM is created on
        (manifest, name).
    :param config: the validated :class:`pyvmm.config.VmConfig`.
    :returns: the backend's VM handle.
    :raises HypervisorError: the hypervisor refused; nothing stays open.
    :raises ConfigError: the config asks for something this backend cannot do
        (a guest arch it lacks, too many vCPUs, an unknown backend option).

    Example::

        def create_vm(backend, config):
            return AcmeVm(HOST.current(), config)   # opens the device, creates the VM
    """


@hookspec
@hook_info(on="vm", method="close", required=True)
def pyvmm_destroy_vm(vm: Any) -> None:
    """Release everything the VM handle holds.

    Called once, after every vCPU of the VM has been destroyed and every region
    unmapped from core's side.  Must not raise for a VM that is already partly
    torn down.

    Example::

        def close(self) -> None:           # AcmeVm
            if self.fd >= 0:
                self.host.close(self.fd)
                self.fd = -1
    """


@hookspec
@hook_info(on="vm", required=True)
def pyvmm_map_memory(vm: Any, region: RamRegion) -> None:
    """Make ``region`` guest RAM at ``region.guest_phys_addr``.

    ``region.host_addr`` is the host mapping, ``region.slot`` the slot number core
    chose (lowest free), ``region.read_only`` / ``region.log_dirty`` are only ever
    set when the backend declares ``READ_ONLY_MEMORY`` / ``DIRTY_LOG``.  Core has
    checked alignment and overlap.  On error nothing may remain mapped.
    A backend whose hypervisor takes the pages from the host (memory lent to a
    protected VM) sets ``region.host_accessible = False`` when that happens --
    here, or in :func:`pyvmm_start_vm` where the hypervisor takes them only then
    (Gunyah); core then refuses every host access to the region.

    Example::

        def map_memory(self, region: RamRegion) -> None:       # AcmeVm
            raw = ffi.new("struct acme_region *", {"slot": region.slot, "gpa": region.guest_phys_addr,
                                                   "size": region.size, "hva": region.host_addr})
            self.host.ioctl(self.fd, ACME_SET_REGION, raw)
    """


@hookspec
@hook_info(on="vm", required=True)
def pyvmm_create_vcpu(vm: Any, index: int) -> Any:
    """Create vCPU number ``index`` (0 is the boot vCPU) and return its handle.

    The thread that calls this is the vCPU's thread until another thread runs it.

    Example::

        def create_vcpu(self, index: int) -> AcmeVcpu:        # AcmeVm
            return AcmeVcpu(self, index)   # its fd, its run page, its kicker
    """


@hookspec
@hook_info(on="vcpu", method="close", required=True)
def pyvmm_destroy_vcpu(vcpu: Any) -> None:
    """Release the vCPU handle (unmap its run page, close its descriptor).

    Example::

        def close(self) -> None:           # AcmeVcpu
            self.kicker.close()
            self.page.release()
            self.host.close(self.fd)
    """


@hookspec
@hook_info(on="vcpu", method="run", required=True)
def pyvmm_run_vcpu(vcpu: Any) -> VcpuExit:
    """Run the vCPU until the next exit and return it.

    This is the per-exit path, and core calls the handle's ``run`` method
    directly: keep one exit object per kind and refill it.  A read access (port
    or MMIO) is completed by the VMM writing ``exit.data`` before the next call,
    which must then hand the data to the guest.  An exit reason the backend does
    not recognise raises :class:`pyvmm.errors.UnknownExitError`; an instruction the
    hypervisor cannot emulate is an :class:`pyvmm.exits.InternalErrorExit`
    carrying its bytes.

    Example::

        def run(self) -> VcpuExit:          # AcmeVcpu
            if self.host.seam.ioctl(self.fd, ACME_RUN, 0) == -errno.EINTR:
                self.kicker.acknowledge()
                return self._interrupted
            return self._decode(self.page.view)
    """


# --- vCPU init: required unless the hypervisor owns the boot context -----------


@hookspec
@hook_info(on="vcpu", method="init")
def pyvmm_init_vcpu(vcpu: Any, boot: VcpuInit) -> None:
    """Set the vCPU's boot registers from ``boot`` (an
    :class:`pyvmm.boot.X86VcpuInit` or :class:`pyvmm.boot.Aarch64VcpuInit`).

    Required, except for a backend that declares
    ``HYPERVISOR_INITIALIZED_BOOT_CONTEXT``: such a backend must *not* implement
    it, and core never calls it; the boot entry goes to
    :func:`pyvmm_set_boot_context` instead.

    Example::

        def init(self, boot: VcpuInit) -> None:              # AcmeVcpu
            self.set_state(StateKind.SREGS, boot.sregs)
            self.set_state(StateKind.REGS, boot.regs)
    """


# --- optional hooks, one capability each ---------------------------------------


@hookspec
@hook_info(on="vm", capability=Cap.HYPERVISOR_INITIALIZED_BOOT_CONTEXT)
def pyvmm_set_boot_context(vm: Any, boot: BootSpec) -> None:
    """``HYPERVISOR_INITIALIZED_BOOT_CONTEXT``: hand the boot entry to the hypervisor.

    The hypervisor sets the vCPU registers itself from the PC, device tree
    address and size, and argument registers.  Called once, after memory, vCPUs
    and the device tree exist and before the VM starts.

    Example::

        def set_boot_context(self, boot: BootSpec) -> None:  # GunyahVm
            self.host.ioctl(self.fd, GH_VM_SET_BOOT_CONTEXT, context(REG_SET_PC, boot.entry))
    """


@hookspec
@hook_info(on="vm", method="start", capability=Cap.VM_START)
def pyvmm_start_vm(vm: Any) -> None:
    """``VM_START``: start the VM.

    Called once, after the boot context is set and before any vCPU runs.  A
    hypervisor that takes lent memory from the host at start: set
    ``region.host_accessible = False`` on those regions here.

    Example::

        def start(self) -> None:            # GunyahVm
            self.host.ioctl(self.fd, GH_VM_START)
    """


@hookspec
@hook_info(on="vm", capability=Cap.MEMORY_REMOVAL)
def pyvmm_unmap_memory(vm: Any, region: RamRegion) -> None:
    """``MEMORY_REMOVAL``: remove a region mapped by :func:`pyvmm_map_memory`.

    Core unmaps the host memory afterwards and reuses the slot.

    Example::

        def unmap_memory(self, region: RamRegion) -> None:   # KvmVm
            self._set_region(region.slot, 0, region.guest_phys_addr, 0, region.host_addr)
    """


@hookspec
@hook_info(on="vm", capability=Cap.DIRTY_LOG)
def pyvmm_get_dirty_log(vm: Any, region: RamRegion) -> bytes:
    """``DIRTY_LOG``: the bitmap of pages written since the last call, and reset it.

    Bit *n* is page *n* of the region, ``ceil(pages / 8)`` bytes.  Only for
    regions mapped with ``log_dirty``.

    Example::

        def get_dirty_log(self, region: RamRegion) -> bytes:  # KvmVm
            self.host.ioctl(self.fd, KVM_GET_DIRTY_LOG, log)
            return bytes(ffi.buffer(bitmap, (pages + 7) // 8))
    """


@hookspec
@hook_info(on="vm", capability=Cap.PVCLOCK)
def pyvmm_get_clock(vm: Any) -> int:
    """``PVCLOCK``: the guest clock in nanoseconds.

    Example::

        def get_clock(self) -> int:         # KvmVm
            self.host.ioctl(self.fd, KVM_GET_CLOCK, data)
            return int(data.clock)
    """


@hookspec
@hook_info(on="vm", capability=Cap.PVCLOCK)
def pyvmm_set_clock(vm: Any, nanoseconds: int) -> None:
    """``PVCLOCK``: set the guest clock.

    Example::

        def set_clock(self, nanoseconds: int) -> None:        # KvmVm
            self.host.ioctl(self.fd, KVM_SET_CLOCK, ffi.new("struct kvm_clock_data *", {"clock": nanoseconds}))
    """


@hookspec
@hook_info(on="vcpu", method="kick", capability=Cap.IMMEDIATE_EXIT)
def pyvmm_kick_vcpu(vcpu: Any) -> None:
    """``IMMEDIATE_EXIT``: make the vCPU's current or next ``run`` return promptly.

    ``run`` then returns an :class:`pyvmm.exits.InterruptedExit`.  Called from any
    thread; must be safe to call while the vCPU runs, idempotent, and coalesced.
    Device-file backends use :class:`pyvmm.backend.SignalKicker`, which follows
    the running thread and never signals a dead one.

    Example::

        def kick(self) -> None:             # AcmeVcpu
            self.kicker.kick()   # immediate_exit + one signal to the running thread
    """


@hookspec
@hook_info(on="vcpu", method="get_state", capability=Cap.VCPU_REGISTERS)
def pyvmm_get_vcpu_state(vcpu: Any, kind: StateKind) -> Any:
    """``VCPU_REGISTERS``: read one register set.

    See :class:`pyvmm.vcpu_state.StateKind` for what each kind returns.  A kind
    the backend does not have raises :class:`pyvmm.errors.ConfigError`.

    Example::

        def get_state(self, kind: StateKind) -> Any:          # KvmVcpu
            if kind is StateKind.REGS:
                return regs_from_kvm(self._get("struct kvm_regs *", KVM_GET_REGS))
            raise ConfigError(f"no {kind.value} state")
    """


@hookspec
@hook_info(on="vcpu", method="set_state", capability=Cap.VCPU_REGISTERS)
def pyvmm_set_vcpu_state(vcpu: Any, kind: StateKind, value: Any) -> None:
    """``VCPU_REGISTERS``: write one register set.

    Example::

        def set_state(self, kind: StateKind, value: Any) -> None:  # KvmVcpu
            if kind is StateKind.REGS:
                self.host.ioctl(self.fd, KVM_SET_REGS, regs_to_kvm(value))
    """


@hookspec
@hook_info(on="vcpu", method="prepare_state", capability=Cap.PREPARED_VCPU_STATE, since=3)
def pyvmm_prepare_vcpu_state(vcpu: Any, state: SavedVcpuState) -> Any:
    """``PREPARED_VCPU_STATE``: make ``state`` ready to be written back to this
    vCPU by :func:`pyvmm_restore_vcpu_state`, as often as needed, with nothing
    left to convert or check then (KVM: the ioctl argument structs, filled).

    Fields a register set's record does not carry (KVM's ``interrupt_bitmap`` in
    ``struct kvm_sregs``) take the values they have now, when the state is
    prepared.  Core hands the returned object back unread; it belongs to this
    vCPU only.

    :raises ConfigError: a value the hypervisor cannot take (a register set
        this vCPU does not have).

    Example::

        def prepare_state(self, state: SavedVcpuState) -> list[tuple[int, Any]]:   # KvmVcpu
            return [(KVM_SET_REGS, regs_to_kvm(value)) for kind, value in state.states]
    """


@hookspec
@hook_info(on="vcpu", method="restore_prepared_state", capability=Cap.PREPARED_VCPU_STATE, since=3)
def pyvmm_restore_vcpu_state(vcpu: Any, prepared: Any) -> None:
    """``PREPARED_VCPU_STATE``: write back what :func:`pyvmm_prepare_vcpu_state`
    returned for this vCPU: the MSRs first, then the register sets in the order
    given, then the pending events (the order of
    :class:`pyvmm.prepared_state.SavedVcpuState`).

    :raises HypervisorError: a write failed; those before it took effect.
    :raises MsrAccessError: the hypervisor refused an MSR.

    Example::

        def restore_prepared_state(self, prepared: list[tuple[int, Any]]) -> None:   # KvmVcpu
            for request, raw in prepared:
                self.host.ioctl(self.fd, request, raw)
    """


@hookspec
@hook_info(on="vcpu", capability=Cap.MSRS)
def pyvmm_get_msrs(vcpu: Any, indices: list[int]) -> list[MsrEntry]:
    """``MSRS``: read the MSRs ``indices``.

    An MSR the hypervisor refuses raises :class:`pyvmm.errors.MsrAccessError`
    naming it and carrying the entries read before it; a failing host call raises
    :class:`pyvmm.errors.HypervisorError`.

    Example::

        def get_msrs(self, indices: list[int]) -> list[MsrEntry]:   # KvmVcpu
            return [MsrEntry(i, value) for i, value in self._read_msrs(indices)]
    """


@hookspec
@hook_info(on="vcpu", capability=Cap.MSRS)
def pyvmm_set_msrs(vcpu: Any, entries: list[MsrEntry]) -> None:
    """``MSRS``: write MSRs; all, or :class:`pyvmm.errors.MsrAccessError` naming the
    first one refused (those before it were written).

    Example::

        def set_msrs(self, entries: list[MsrEntry]) -> None:  # KvmVcpu
            done = self.host.ioctl(self.fd, KVM_SET_MSRS, raw)
    """


@hookspec
@hook_info(on="vm", capability=Cap.CPUID)
def pyvmm_get_supported_cpuid(vm: Any) -> list[CpuidEntry]:
    """``CPUID``: the CPUID leaves the hypervisor can give a guest.

    Example::

        def get_supported_cpuid(self) -> list[CpuidEntry]:   # KvmVm
            return self.kvm.supported_cpuid()
    """


@hookspec
@hook_info(on="vcpu", capability=Cap.CPUID)
def pyvmm_set_cpuid(vcpu: Any, entries: list[CpuidEntry]) -> None:
    """``CPUID``: the CPUID table the guest sees on this vCPU.

    Example::

        def set_cpuid(self, entries: list[CpuidEntry]) -> None:  # KvmVcpu
            self.host.ioctl(self.fd, KVM_SET_CPUID2, cpuid_to_kvm(entries))
    """


@hookspec
@hook_info(on="vm", capability=Cap.IOEVENTS)
def pyvmm_register_ioevent(vm: Any, event: Event, address: IoEventAddress, datamatch: int | None, length: int) -> None:
    """``IOEVENTS``: signal ``event`` on a guest write instead of exiting.

    The write is of ``length`` bytes (0 = any length) at ``address``, matching
    ``datamatch`` if not None.  Port addresses only with ``PIO_IOEVENTS``.
    ``event`` is a :class:`pyvmm.host.Event`; a Linux driver takes
    ``event.fileno()``.  (Contract version 1 passed the descriptor as ``fd``.)

    Example::

        def register_ioevent(self, event, address, datamatch, length) -> None:   # KvmVm
            self.host.ioctl(self.fd, KVM_IOEVENTFD, ioeventfd(event.fileno(), address, datamatch, length))
    """


@hookspec
@hook_info(on="vm", capability=Cap.IOEVENTS)
def pyvmm_unregister_ioevent(
    vm: Any, event: Event, address: IoEventAddress, datamatch: int | None, length: int
) -> None:
    """``IOEVENTS``: undo :func:`pyvmm_register_ioevent` with the same arguments.

    Example::

        def unregister_ioevent(self, event, address, datamatch, length) -> None:  # KvmVm
            self.host.ioctl(self.fd, KVM_IOEVENTFD, ioeventfd(..., flags=KVM_IOEVENTFD_FLAG_DEASSIGN))
    """


@hookspec
@hook_info(on="vm", capability=Cap.IRQFD)
def pyvmm_register_irqfd(vm: Any, event: Event, line: int, level: bool) -> None:
    """``IRQFD``: signalling ``event`` raises interrupt ``line``.

    ``line`` is a GSI on KVM, a doorbell label on Gunyah; ``level`` asks for a
    level-triggered interrupt without a resample event (with one:
    :func:`pyvmm_register_resample_irqfd`).  (Contract version 1 passed the
    descriptor as ``fd``.)

    Example::

        def register_irqfd(self, event, line: int, level: bool) -> None:   # KvmVm
            self.host.ioctl(self.fd, KVM_IRQFD, ffi.new("struct kvm_irqfd *", {"fd": event.fileno(), "gsi": line}))
    """


@hookspec
@hook_info(on="vm", capability=Cap.IRQ_LINE)
def pyvmm_set_irq_line(vm: Any, line: int, level: bool) -> None:
    """``IRQ_LINE``: drive interrupt ``line`` high or low.

    Example::

        def set_irq_line(self, line: int, level: bool) -> None:   # KvmVm
            self.host.ioctl(self.fd, KVM_IRQ_LINE, ffi.new("struct kvm_irq_level *", {"irq": line, "level": level}))
    """


@hookspec
@hook_info(on="vm", capability=Cap.IRQCHIP)
def pyvmm_create_irqchip(vm: Any) -> None:
    """``IRQCHIP``: create the in-hypervisor interrupt controllers.

    On x86 this includes the PIT.  Called before any vCPU is created.

    Example::

        def create_irqchip(self) -> None:   # KvmVm
            self.host.ioctl(self.fd, KVM_CREATE_IRQCHIP)
    """


@hookspec
@hook_info(on="vcpu", capability=Cap.GUEST_DEBUG)
def pyvmm_set_guest_debug(vcpu: Any, single_step: bool, breakpoints: list[int]) -> None:
    """``GUEST_DEBUG``: single-stepping and hardware breakpoints at guest addresses.

    An empty list and False disable both.  Steps and hits end ``run`` with a
    :class:`pyvmm.exits.DebugExit`.

    Example::

        def set_guest_debug(self, single_step: bool, breakpoints: list[int]) -> None:  # KvmVcpu
            self.host.ioctl(self.fd, KVM_SET_GUEST_DEBUG, guest_debug(single_step, breakpoints))
    """


@hookspec
@hook_info(on="vm", capability=Cap.DEVICE_TREE_NODES, since=2)
def pyvmm_add_device_tree_nodes(vm: Any, tree: DeviceTree) -> None:
    """``DEVICE_TREE_NODES``: add the backend's own nodes to the guest's device tree.

    Called by the aarch64 board after it wrote its own nodes and after the
    machine registered its irqfds, before the tree is finished; the backend
    computes its nodes from its own state (the regions and irqfds it was given),
    as crosvm's Gunyah backend does in ``create_fdt``.

    Example::

        def add_device_tree_nodes(self, tree: DeviceTree) -> None:   # GunyahVm
            add_vm_config_nodes(tree, self.ram_base, self.ram_size, self.doorbells())
    """


# --- x86 interrupts from userspace (contract version 2) -------------------------


@hookspec
@hook_info(on="vcpu", method="ready_for_interrupt", capability=Cap.INTERRUPT_INJECTION, since=2)
def pyvmm_ready_for_interrupt(vcpu: Any) -> bool:
    """``INTERRUPT_INJECTION``: whether the vCPU can take an external interrupt now.

    True only when the guest has interrupts enabled (RFLAGS.IF), no interrupt
    shadow blocks them and no other event is being delivered, as the hypervisor
    reported at the last exit (before the first run: False).  Core calls it before
    every :func:`pyvmm_inject_interrupt` and refuses the injection with
    :class:`pyvmm.errors.InterruptNotReady` when it is False.

    Example::

        def ready_for_interrupt(self) -> bool:              # KvmVcpu
            run = self._view      # kvm_run: ready_for_interrupt_injection, if_flag
            return bool(run[12] and run[13])
    """


@hookspec
@hook_info(on="vcpu", method="interrupt", capability=Cap.INTERRUPT_INJECTION, since=2)
def pyvmm_inject_interrupt(vcpu: Any, vector: int) -> None:
    """``INTERRUPT_INJECTION``: deliver external interrupt ``vector`` (0-255) on the
    next run.

    Core calls it only right after :func:`pyvmm_ready_for_interrupt` said True.
    A VMM injects at most one vector per exit: some hypervisors keep only the last
    one asked for (KVM, WHPX), others queue them all (HAXM); for the next one it
    requests an interrupt window.  The guest takes it through its IDT (or the
    real-mode vector table) before executing anything else.

    Example::

        def interrupt(self, vector: int) -> None:           # KvmVcpu
            self.host.ioctl(self.fd, KVM_INTERRUPT, ffi.new("struct kvm_interrupt *", {"irq": vector}))
    """


@hookspec
@hook_info(on="vcpu", method="request_interrupt_window", capability=Cap.INTERRUPT_INJECTION, since=2)
def pyvmm_request_interrupt_window(vcpu: Any, requested: bool) -> None:
    """``INTERRUPT_INJECTION``: ask for (or stop asking for) an interrupt-window exit.

    While requested, ``run`` returns a :class:`pyvmm.exits.IrqWindowOpenExit` as
    soon as the guest can take an interrupt (after ``sti`` and the instruction it
    shadows, or at once if it already can); the VMM then injects and withdraws the
    request.  The request stays until withdrawn.

    Example::

        def request_interrupt_window(self, requested: bool) -> None:   # KvmVcpu
            self._view[0] = int(requested)    # kvm_run.request_interrupt_window
    """


@hookspec
@hook_info(on="vcpu", method="inject_nmi", capability=Cap.NMI, since=2)
def pyvmm_inject_nmi(vcpu: Any) -> None:
    """``NMI``: make a non-maskable interrupt pending on the vCPU.

    It is delivered on a later run even with interrupts disabled, unless NMIs are
    blocked (an NMI handler has not yet returned with IRET); then it waits.

    Example::

        def inject_nmi(self) -> None:                       # KvmVcpu
            self.host.ioctl(self.fd, KVM_NMI)
    """


@hookspec
@hook_info(on="vcpu", method="get_events", capability=Cap.VCPU_EVENTS, since=2)
def pyvmm_get_vcpu_events(vcpu: Any) -> VcpuEvents:
    """``VCPU_EVENTS``: the vCPU's pending-event state.

    :returns: a :class:`pyvmm.arch.x86_64.VcpuEvents`; a field the hypervisor does
        not report is None.

    Example::

        def get_events(self) -> VcpuEvents:                 # KvmVcpu
            return events_from_kvm(self._get("struct kvm_vcpu_events *", KVM_GET_VCPU_EVENTS))
    """


@hookspec
@hook_info(on="vcpu", method="set_events", capability=Cap.VCPU_EVENTS, since=2)
def pyvmm_set_vcpu_events(vcpu: Any, events: VcpuEvents) -> None:
    """``VCPU_EVENTS``: replace the vCPU's pending-event state; a field that is None
    keeps the hypervisor's value.  Core has checked every field's range.

    Example::

        def set_events(self, events: VcpuEvents) -> None:   # KvmVcpu
            self.host.ioctl(self.fd, KVM_SET_VCPU_EVENTS, events_to_kvm(events))
    """


# --- irqfds, routing, MSIs (contract version 2) ----------------------------------


@hookspec
@hook_info(on="vm", capability=Cap.IRQFD_REMOVAL, since=2)
def pyvmm_unregister_irqfd(vm: Any, event: Event, line: int) -> None:
    """``IRQFD_REMOVAL``: undo :func:`pyvmm_register_irqfd` (or
    :func:`pyvmm_register_resample_irqfd`) of ``event`` on ``line``; a signal of
    ``event`` then raises nothing.

    Example::

        def unregister_irqfd(self, event, line: int) -> None:             # KvmVm
            self.host.ioctl(self.fd, KVM_IRQFD, irqfd(event.fileno(), line, flags=KVM_IRQFD_FLAG_DEASSIGN))
    """


@hookspec
@hook_info(on="vm", capability=Cap.IRQFD_RESAMPLE, since=2)
def pyvmm_register_resample_irqfd(vm: Any, event: Event, line: int, resample: Event) -> None:
    """``IRQFD_RESAMPLE``: a level-triggered irqfd: signalling ``event`` raises
    ``line`` and keeps it raised; when the guest acknowledges the interrupt (its
    EOI), the hypervisor lowers the line and signals ``resample``, and the device
    signals ``event`` again if it still needs service.

    Example::

        def register_resample_irqfd(self, event, line: int, resample) -> None:   # KvmVm
            self.host.ioctl(self.fd, KVM_IRQFD, irqfd(event.fileno(), line, KVM_IRQFD_FLAG_RESAMPLE, resample.fileno()))
    """


@hookspec
@hook_info(on="vm", capability=Cap.GSI_ROUTING, since=2)
def pyvmm_set_gsi_routing(vm: Any, routes: list[IrqRoute]) -> None:
    """``GSI_ROUTING``: replace the whole GSI routing table with ``routes``
    (:class:`pyvmm.interrupts.IrqchipRoute` and :class:`pyvmm.interrupts.MsiRoute`
    records; a GSI may appear more than once).  Routes left out are gone, the
    hypervisor's defaults included.

    Example::

        def set_gsi_routing(self, routes: list[IrqRoute]) -> None:        # KvmVm
            self.host.ioctl(self.fd, KVM_SET_GSI_ROUTING, routing_to_kvm(routes))
    """


@hookspec
@hook_info(on="vm", capability=Cap.MSI, since=2)
def pyvmm_signal_msi(vm: Any, address: int, data: int) -> bool:
    """``MSI``: send the message signalled interrupt ``data`` to ``address``.

    :returns: True if it was delivered, False if it was not delivered anew (as the
        hypervisor reports: KVM returns 0 when the guest blocked it or one is still
        pending).
    :raises HypervisorError: the hypervisor refused it (KVM: no interrupt
        controller in the kernel, or no vCPU took it).

    Example::

        def signal_msi(self, address: int, data: int) -> bool:            # KvmVm
            msi = ffi.new("struct kvm_msi *", {"address_lo": address & 0xFFFFFFFF,
                                               "address_hi": address >> 32, "data": data})
            return self.host.ioctl(self.fd, KVM_SIGNAL_MSI, msi) > 0
    """


# --- MSR lists and the TSC (contract version 2) ---------------------------------


@hookspec
@hook_info(on="vm", capability=Cap.MSR_INDEX_LIST, since=2)
def pyvmm_get_msr_index_list(vm: Any) -> list[int]:
    """``MSR_INDEX_LIST``: the indices of the MSRs the hypervisor saves and restores
    for a vCPU (what a VMM snapshots).

    Example::

        def get_msr_index_list(self) -> list[int]:          # KvmVm
            return self.kvm.msr_index_list()     # KVM_GET_MSR_INDEX_LIST on /dev/kvm
    """


@hookspec
@hook_info(on="vm", capability=Cap.FEATURE_MSRS, since=2)
def pyvmm_get_feature_msrs(vm: Any) -> list[MsrEntry]:
    """``FEATURE_MSRS``: the feature MSRs and the values the hypervisor can give a
    guest (what a VMM may put in a vCPU's MSRs, as it does with CPUID).

    :raises MsrAccessError: the hypervisor listed a feature MSR it then did not read.

    Example::

        def get_feature_msrs(self) -> list[MsrEntry]:       # KvmVm
            return self.kvm.feature_msrs()   # KVM_GET_MSR_FEATURE_INDEX_LIST, then KVM_GET_MSRS on /dev/kvm
    """


@hookspec
@hook_info(on="vcpu", method="get_tsc_khz", capability=Cap.TSC_FREQUENCY, since=2)
def pyvmm_get_tsc_khz(vcpu: Any) -> int:
    """``TSC_FREQUENCY``: the vCPU's TSC frequency in kHz.

    Example::

        def get_tsc_khz(self) -> int:                       # KvmVcpu
            return self.host.ioctl(self.fd, KVM_GET_TSC_KHZ)
    """


@hookspec
@hook_info(on="vcpu", method="set_tsc_khz", capability=Cap.TSC_SCALING, since=2)
def pyvmm_set_tsc_khz(vcpu: Any, khz: int) -> None:
    """``TSC_SCALING``: set the vCPU's TSC frequency (kHz, above 0).

    Example::

        def set_tsc_khz(self, khz: int) -> None:            # KvmVcpu
            self.host.ioctl(self.fd, KVM_SET_TSC_KHZ, khz)
    """


@hookspec
@hook_info(on="vcpu", method="get_tsc_offset", capability=Cap.TSC_OFFSET, since=2)
def pyvmm_get_tsc_offset(vcpu: Any) -> int:
    """``TSC_OFFSET``: what the hypervisor adds to the host TSC for this vCPU, as an
    unsigned 64-bit value (guest TSC = host TSC + offset, modulo 2**64, at equal
    frequencies).

    Example::

        def get_tsc_offset(self) -> int:                    # KvmVcpu
            return self._tsc_attribute(KVM_GET_DEVICE_ATTR)
    """


@hookspec
@hook_info(on="vcpu", method="set_tsc_offset", capability=Cap.TSC_OFFSET, since=2)
def pyvmm_set_tsc_offset(vcpu: Any, offset: int) -> None:
    """``TSC_OFFSET``: set the vCPU's TSC offset (unsigned 64-bit; a negative offset
    is its two's complement).

    Example::

        def set_tsc_offset(self, offset: int) -> None:      # KvmVcpu
            self._tsc_attribute(KVM_SET_DEVICE_ATTR, offset)
    """


# --- the per-backend escape hatch (contract version 2) ---------------------------


@hookspec
@hook_info(on="vm", capability=Cap.RAW_CAPABILITIES, since=2)
def pyvmm_check_raw_capability(vm: Any, capability: int) -> int:
    """``RAW_CAPABILITIES``: ask the hypervisor about one of its own capabilities,
    by its own number, for this VM.

    The numbers are the backend's (KVM: ``KVM_CAP_*``), listed in its
    ``docs/backends/<name>.md``; pyvmm passes them through unchanged.

    :returns: what the hypervisor answered (KVM: 0 for absent, a positive value,
        sometimes a count, for present).

    Example::

        def check_raw_capability(self, capability: int) -> int:          # KvmVm
            return self.host.ioctl(self.fd, KVM_CHECK_EXTENSION, capability)
    """


@hookspec
@hook_info(on="vm", capability=Cap.RAW_CAPABILITIES, since=2)
def pyvmm_enable_raw_capability(vm: Any, capability: int, flags: int, args: tuple[int, ...]) -> int:
    """``RAW_CAPABILITIES``: enable one of the hypervisor's own capabilities on the
    VM, by its own number, with its flags and arguments (KVM: ``KVM_ENABLE_CAP``
    on the VM fd, four 64-bit arguments; core pads ``args`` with zeros).

    What an enabled capability changes (new exits, different behaviour) is the
    VMM's to handle; the backend does not track it.

    :returns: what the hypervisor returned (KVM: 0, or a capability's own value).

    Example::

        def enable_raw_capability(self, capability: int, flags: int, args) -> int:   # KvmVm
            return self.host.ioctl(self.fd, KVM_ENABLE_CAP, enable_cap(capability, flags, args))
    """


@hookspec
@hook_info(on="vcpu", method="enable_raw_capability", capability=Cap.RAW_CAPABILITIES, since=2)
def pyvmm_enable_vcpu_raw_capability(vcpu: Any, capability: int, flags: int, args: tuple[int, ...]) -> int:
    """``RAW_CAPABILITIES``: as :func:`pyvmm_enable_raw_capability`, for one vCPU
    (KVM: ``KVM_ENABLE_CAP`` on the vCPU fd; crosvm's ``enable_raw_capability``).

    Example::

        def enable_raw_capability(self, capability: int, flags: int, args) -> int:   # KvmVcpu
            return self.host.ioctl(self.fd, KVM_ENABLE_CAP, enable_cap(capability, flags, args))
    """


# --- contract version 3: exits avoided ------------------------------------------


@hookspec
@hook_info(on="vm", capability=Cap.COALESCED_IO, since=3)
def pyvmm_register_coalesced_io(vm: Any, address: IoEventAddress, size: int) -> None:
    """``COALESCED_IO``: record guest writes to ``size`` bytes from ``address``
    instead of exiting (a port range only with ``COALESCED_PIO``; core checks).

    Writes are kept in guest order until :func:`pyvmm_take_coalesced_io`; reads
    in the zone still exit.  The hypervisor may still exit on a write (a full
    ring): the VMM drains the recorded writes before handling any exit.

    Example::

        def register_coalesced_io(self, address, size) -> None:   # KvmVm
            self.host.ioctl(self.fd, KVM_REGISTER_COALESCED_MMIO, zone(address, size))
    """


@hookspec
@hook_info(on="vm", capability=Cap.COALESCED_IO, since=3)
def pyvmm_unregister_coalesced_io(vm: Any, address: IoEventAddress, size: int) -> None:
    """``COALESCED_IO``: undo :func:`pyvmm_register_coalesced_io` with the same
    arguments.  Writes already recorded stay to be taken.

    Example::

        def unregister_coalesced_io(self, address, size) -> None:   # KvmVm
            self.host.ioctl(self.fd, KVM_UNREGISTER_COALESCED_MMIO, zone(address, size))
    """


@hookspec
@hook_info(on="vm", capability=Cap.COALESCED_IO, since=3)
def pyvmm_take_coalesced_io(vm: Any) -> list[CoalescedWrite]:
    """``COALESCED_IO``: the writes recorded since the last call, oldest first,
    removed from the hypervisor's ring (an empty list when there are none).

    Called by the VMM before it handles each exit, from any one thread at a time.

    Example::

        def take_coalesced_io(self) -> list[CoalescedWrite]:   # KvmVm
            return self.ring.take()   # entries first..last of the shared ring page
    """


# --- complete snapshots (contract version 3) -------------------------------------


@hookspec
@hook_info(on="vm", capability=Cap.VM_STATE, since=3)
def pyvmm_get_vm_state(vm: Any, kind: VmStateKind) -> bytes:
    """``VM_STATE``: the hypervisor's image of one of its VM-wide devices (see
    :class:`pyvmm.vm_state.VmStateKind`), as bytes core stores unread.

    :raises HypervisorError: the VM has no such device (KVM: no irqchip yet).

    Example::

        def get_vm_state(self, kind: VmStateKind) -> bytes:   # KvmVm
            if kind is VmStateKind.PIT:
                return self.get_pit2()            # KVM_GET_PIT2
            return self.get_irqchip(CHIPS[kind])  # KVM_GET_IRQCHIP
    """


@hookspec
@hook_info(on="vm", capability=Cap.VM_STATE, since=3)
def pyvmm_set_vm_state(vm: Any, kind: VmStateKind, data: bytes) -> None:
    """``VM_STATE``: replace one VM-wide device's state with an image
    :func:`pyvmm_get_vm_state` returned (on this hypervisor).

    :raises ConfigError: ``data`` is not the size the hypervisor's image has.

    Example::

        def set_vm_state(self, kind: VmStateKind, data: bytes) -> None:   # KvmVm
            self.set_pit2(data) if kind is VmStateKind.PIT else self.set_irqchip(CHIPS[kind], data)
    """


@hookspec
@hook_info(on="vm", capability=Cap.SERVED_IO, since=3)
def pyvmm_serve_io(vm: Any, address: IoEventAddress, size: int, register: ServedRegister) -> None:
    """``SERVED_IO``: answer guest accesses to ``size`` bytes from ``address`` as
    ``register`` inside the vCPU's run, without an exit to the VMM (core has
    checked the record and the range; :mod:`pyvmm.served_io` gives each
    register's answers).

    Refuse (``ConfigError``) a range that overlaps a served range or a coalesced
    zone.  Takes effect at every vCPU's next entry into the guest.

    Example::

        def serve_io(self, address, size, register) -> None:   # KvmVm
            self.served.add(address, size, register)   # read by every vCPU's run loop
    """
