"""The hook specifications: the contract every pyvmm backend implements.

A backend is a module (or object) registered in the entry-point group ``pyvmm``
whose functions are marked with :data:`pyvmm.hookimpl`.  Core never broadcasts a
hook to every backend: a VM is bound to one backend, and core resolves that
backend's implementations once, when the VM is created, and then calls them
directly.

Conventions that apply to every hook:

* **Arguments** are passed by the names given here, in this order; an
  implementation must take exactly these parameters (core checks at
  registration).
* **Handles.** ``pyvmm_create_vm`` and ``pyvmm_create_vcpu`` return an object of
  the backend's own choosing (its *handle*); core passes it back as ``vm`` or
  ``vcpu`` and never looks inside.
* **Errors.** A failing host call raises :class:`pyvmm.errors.HypervisorError`
  naming the call and the errno; bad arguments a backend cannot accept raise
  :class:`pyvmm.errors.ConfigError`.  A hook that fails leaves nothing behind:
  what it opened, it closes before raising.
* **Optional hooks** belong to one :class:`pyvmm.capabilities.Capability` each.
  A backend implements exactly the optional hooks of the capabilities it
  declares; core calls none of them without the capability and raises
  :class:`pyvmm.errors.UnsupportedCapability` instead.
* **Threads.** vCPU hooks are called on the thread that created the vCPU,
  except ``pyvmm_kick_vcpu``, which may come from any thread, and
  ``pyvmm_destroy_vcpu``, which comes from the thread that closes the VM.
"""

# mypy: disable-error-code="empty-body"
# (specifications have docstrings for bodies)

from __future__ import annotations

from typing import Any

import pluggy

from pyvmm.arch.x86_64 import CpuidEntry, MsrEntry
from pyvmm.boot import BootSpec, VcpuInit
from pyvmm.config import VmConfig
from pyvmm.exits import VcpuExit
from pyvmm.manifest import BackendManifest
from pyvmm.memory import RamRegion
from pyvmm.vcpu_state import IoEventAddress, StateKind

PROJECT = "pyvmm"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- required hooks -----------------------------------------------------------


@hookspec
def pyvmm_backend_info() -> BackendManifest:
    """Describe the backend.

    Called once at discovery, before anything else.  Must be cheap and must not
    touch the hypervisor: whether the backend can run here is answered by the
    manifest's ``probe``, which core calls separately and which must never raise
    (a probe that raises is reported as "unavailable").

    :returns: a :class:`pyvmm.manifest.BackendManifest`.  An invalid manifest, or
        one whose capabilities disagree with the hooks the plugin implements,
        gets the plugin refused (reported by ``pyvmm backends``).
    """


@hookspec
def pyvmm_create_vm(backend: Any, config: VmConfig) -> Any:
    """Create a VM with no memory and no vCPUs.

    :param backend: the core :class:`pyvmm.vm.Backend` the VM is created on
        (manifest, name).
    :param config: the validated :class:`pyvmm.config.VmConfig`.
    :returns: the backend's VM handle.
    :raises HypervisorError: the hypervisor refused; nothing stays open.
    :raises ConfigError: the config asks for something this backend cannot do
        (a guest arch it lacks, too many vCPUs).
    """


@hookspec
def pyvmm_destroy_vm(vm: Any) -> None:
    """Release everything the VM handle holds.  Called once, after every vCPU
    of the VM has been destroyed and every region unmapped from core's side.
    Must not raise for a VM that is already partly torn down."""


@hookspec
def pyvmm_map_memory(vm: Any, region: RamRegion) -> None:
    """Make ``region`` guest RAM at ``region.guest_phys_addr``.

    ``region.host_addr`` is the host mapping, ``region.slot`` the slot number core
    chose (lowest free), ``region.read_only`` / ``region.log_dirty`` are only ever
    set when the backend declares ``READ_ONLY_MEMORY`` / ``DIRTY_LOG``.  Core has
    checked alignment and overlap.  On error nothing may remain mapped.
    A backend that lends the pages to the guest (the host loses access, as for
    Gunyah's protected VMs) sets ``region.host_accessible = False``; core then
    refuses every host access to the region.
    """


@hookspec
def pyvmm_create_vcpu(vm: Any, index: int) -> Any:
    """Create vCPU number ``index`` (0 is the boot vCPU) and return its handle.
    The thread that calls this is the vCPU's thread: every later vCPU hook but
    the kick comes from it."""


@hookspec
def pyvmm_destroy_vcpu(vcpu: Any) -> None:
    """Release the vCPU handle (unmap its run page, close its descriptor)."""


@hookspec
def pyvmm_run_vcpu(vcpu: Any) -> VcpuExit:
    """Run the vCPU until the next exit and return it.

    This is the per-exit path: keep one exit object per kind and refill it.  A
    read access (port or MMIO) is completed by the VMM writing ``exit.data``
    before the next call, which must then hand the data to the guest.  An exit
    reason the backend does not recognise raises
    :class:`pyvmm.errors.UnknownExitError`; an instruction the hypervisor cannot
    emulate is an :class:`pyvmm.exits.InternalErrorExit` carrying its bytes.
    """


# --- vCPU init: required unless the hypervisor owns the boot context -----------


@hookspec
def pyvmm_init_vcpu(vcpu: Any, boot: VcpuInit) -> None:
    """Set the vCPU's boot registers from ``boot`` (an
    :class:`pyvmm.boot.X86VcpuInit` or :class:`pyvmm.boot.Aarch64VcpuInit`).

    Required, except for a backend that declares
    ``HYPERVISOR_INITIALIZED_BOOT_CONTEXT``: such a backend must *not* implement
    it, and core never calls it; the boot entry goes to
    :func:`pyvmm_set_boot_context` instead.
    """


# --- optional hooks, one capability each ---------------------------------------


@hookspec
def pyvmm_set_boot_context(vm: Any, boot: BootSpec) -> None:
    """``HYPERVISOR_INITIALIZED_BOOT_CONTEXT``: hand the boot entry (PC, device
    tree address and size, argument registers) to the hypervisor, which sets the
    vCPU registers itself.  Called once, after memory, vCPUs and the device tree
    exist and before the VM starts."""


@hookspec
def pyvmm_start_vm(vm: Any) -> None:
    """``VM_START``: start the VM.  Called once, after the boot context is set and
    before any vCPU runs."""


@hookspec
def pyvmm_unmap_memory(vm: Any, region: RamRegion) -> None:
    """``MEMORY_REMOVAL``: remove a region mapped by :func:`pyvmm_map_memory`.
    Core unmaps the host memory afterwards and reuses the slot."""


@hookspec
def pyvmm_get_dirty_log(vm: Any, region: RamRegion) -> bytes:
    """``DIRTY_LOG``: the bitmap of pages written since the last call (bit *n* is
    page *n* of the region, ``ceil(pages / 8)`` bytes), and reset it.  Only for
    regions mapped with ``log_dirty``."""


@hookspec
def pyvmm_get_clock(vm: Any) -> int:
    """``PVCLOCK``: the guest clock in nanoseconds."""


@hookspec
def pyvmm_set_clock(vm: Any, nanoseconds: int) -> None:
    """``PVCLOCK``: set the guest clock."""


@hookspec
def pyvmm_kick_vcpu(vcpu: Any) -> None:
    """``IMMEDIATE_EXIT``: make the vCPU's current or next ``run`` return an
    :class:`pyvmm.exits.InterruptedExit` promptly.  Called from any thread; must
    be safe to call while the vCPU runs, and idempotent."""


@hookspec
def pyvmm_get_vcpu_state(vcpu: Any, kind: StateKind) -> Any:
    """``VCPU_REGISTERS``: read one register set (see
    :class:`pyvmm.vcpu_state.StateKind` for what each kind returns).  A kind the
    backend does not have raises :class:`pyvmm.errors.ConfigError`."""


@hookspec
def pyvmm_set_vcpu_state(vcpu: Any, kind: StateKind, value: Any) -> None:
    """``VCPU_REGISTERS``: write one register set."""


@hookspec
def pyvmm_get_msrs(vcpu: Any, indices: list[int]) -> list[MsrEntry]:
    """``MSRS``: read the MSRs ``indices``; an MSR the hypervisor refuses raises
    :class:`pyvmm.errors.HypervisorError`."""


@hookspec
def pyvmm_set_msrs(vcpu: Any, entries: list[MsrEntry]) -> None:
    """``MSRS``: write MSRs; all or an error naming the first refused."""


@hookspec
def pyvmm_get_supported_cpuid(vm: Any) -> list[CpuidEntry]:
    """``CPUID``: the CPUID leaves the hypervisor can give a guest."""


@hookspec
def pyvmm_set_cpuid(vcpu: Any, entries: list[CpuidEntry]) -> None:
    """``CPUID``: the CPUID table the guest sees on this vCPU."""


@hookspec
def pyvmm_register_ioevent(vm: Any, fd: int, address: IoEventAddress, datamatch: int | None, length: int) -> None:
    """``IOEVENTS``: signal eventfd ``fd`` on a guest write of ``length`` bytes
    (0 = any length) at ``address``, matching ``datamatch`` if not None, instead
    of exiting.  Port addresses only with ``PIO_IOEVENTS``."""


@hookspec
def pyvmm_unregister_ioevent(vm: Any, fd: int, address: IoEventAddress, datamatch: int | None, length: int) -> None:
    """``IOEVENTS``: undo :func:`pyvmm_register_ioevent` with the same arguments."""


@hookspec
def pyvmm_register_irqfd(vm: Any, fd: int, line: int, level: bool) -> None:
    """``IRQFD``: a write to eventfd ``fd`` raises interrupt ``line`` (a GSI on
    KVM, a doorbell label on Gunyah); ``level`` for level-triggered."""


@hookspec
def pyvmm_set_irq_line(vm: Any, line: int, level: bool) -> None:
    """``IRQ_LINE``: drive interrupt ``line`` high or low."""


@hookspec
def pyvmm_create_irqchip(vm: Any) -> None:
    """``IRQCHIP``: create the in-hypervisor interrupt controllers (and, on x86,
    the PIT).  Called before any vCPU is created."""


@hookspec
def pyvmm_set_guest_debug(vcpu: Any, single_step: bool, breakpoints: list[int]) -> None:
    """``GUEST_DEBUG``: enable single-stepping and/or hardware breakpoints at
    guest addresses (empty list and False disables).  Steps and hits end
    ``run`` with a :class:`pyvmm.exits.DebugExit`."""
