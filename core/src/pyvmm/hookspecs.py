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

from pyvmm.arch.x86_64 import CpuidEntry, MsrEntry
from pyvmm.boot import BootSpec, VcpuInit
from pyvmm.capabilities import Capability as Cap
from pyvmm.config import VmConfig
from pyvmm.contract import hook_info
from pyvmm.exits import VcpuExit
from pyvmm.manifest import BackendManifest
from pyvmm.memory import RamRegion
from pyvmm.vcpu_state import IoEventAddress, StateKind

if TYPE_CHECKING:
    from pyvmm.host import Event
    from pyvmm.machine.devicetree import DeviceTree

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
    A backend that lends the pages to the guest (the host loses access, as for
    Gunyah's protected VMs) sets ``region.host_accessible = False``; core then
    refuses every host access to the region.

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

    Called once, after the boot context is set and before any vCPU runs.

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
@hook_info(on="vcpu", capability=Cap.MSRS)
def pyvmm_get_msrs(vcpu: Any, indices: list[int]) -> list[MsrEntry]:
    """``MSRS``: read the MSRs ``indices``.

    An MSR the hypervisor refuses raises :class:`pyvmm.errors.HypervisorError`.

    Example::

        def get_msrs(self, indices: list[int]) -> list[MsrEntry]:   # KvmVcpu
            return [MsrEntry(i, value) for i, value in self._read_msrs(indices)]
    """


@hookspec
@hook_info(on="vcpu", capability=Cap.MSRS)
def pyvmm_set_msrs(vcpu: Any, entries: list[MsrEntry]) -> None:
    """``MSRS``: write MSRs; all or an error naming the first refused.

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
    level-triggered interrupt.  (Contract version 1 passed the descriptor as ``fd``.)

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
