"""The VMM-facing API: a backend, its VMs and their vCPUs.

These classes are the only callers of the hooks.  Each VM is bound to one
backend; the backend's hook functions are looked up once, when the VM is made,
and ``Vcpu.run`` is the backend's run function pre-bound to the vCPU handle, so
the per-exit path costs one direct call.  Every optional operation checks the
backend's declared capability first and raises
:class:`~pyvmm.errors.UnsupportedCapability` instead of calling.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import threading
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from pyvmm.arch.x86_64 import CpuidEntry, MsrEntry, Regs, Sregs
from pyvmm.backend.kick import SignalKicker
from pyvmm.backend.plugin import FORWARD_ATTRIBUTE
from pyvmm.boot import Aarch64VcpuInit, BootSpec, VcpuInit, X86VcpuInit
from pyvmm.capabilities import Capability, CapabilitySet
from pyvmm.config import MAX_GUEST_PHYS, PAGE_SIZE, Arch, MemoryRegionSpec, Protection, VmConfig
from pyvmm.contract import HookSpecInfo, specs
from pyvmm.errors import (
    ConfigError,
    GuestMemoryError,
    InterruptNotReady,
    PyvmmError,
    UnsupportedCapability,
    VmStateError,
)
from pyvmm.exits import VcpuExit
from pyvmm.interrupts import IrqchipRoute, IrqRoute, MsiRoute
from pyvmm.manifest import Availability, BackendManifest
from pyvmm.memory import GuestMemory, RamRegion
from pyvmm.plugins import BackendPlugin, PluginRegistry, default_registry
from pyvmm.prepared_state import PreparedVcpuState, SavedVcpuState
from pyvmm.records import RecordError
from pyvmm.vcpu_state import IoEventAddress, StateKind
from pyvmm.vm_state import VmStateKind

if TYPE_CHECKING:
    # Built only when a vCPU's extra state is read or written (a start-up cost).
    from pyvmm.arch.x86_64_extra_state import DebugRegs, Fpu, VcpuEvents
    from pyvmm.coalesced import CoalescedWrite
    from pyvmm.host import Event
    from pyvmm.machine.devicetree import DeviceTree
    from pyvmm.served_io import ServedRegister


def _validated(model: Any, value: Any, what: str) -> Any:
    if isinstance(value, model):
        return value
    try:
        return model.from_mapping(value)
    except RecordError as exc:
        raise ConfigError(f"invalid {what}: {exc}") from exc


class Backend:
    """One registered backend, ready to create VMs."""

    def __init__(self, plugin: BackendPlugin, availability: Availability | None = None) -> None:
        """``availability``: the probe's answer when the caller has just asked it
        (a selection does), else the probe is asked here."""
        self.plugin = plugin
        self.manifest: BackendManifest = plugin.manifest
        self.name: str = plugin.name
        #: Declared capabilities, less those the availability probe found missing here.
        self.capabilities: CapabilitySet = plugin.manifest.host_capabilities(availability or plugin.availability())
        #: The hook implementations, resolved once: every call into the backend goes here.
        self.hooks = BackendHooks(plugin, self.capabilities)

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"

    def supports(self, capability: Capability) -> bool:
        return capability in self.capabilities

    def require(self, capability: Capability, what: str = "") -> None:
        if capability not in self.capabilities:
            raise UnsupportedCapability(self.name, capability, what)

    def availability(self) -> Availability:
        return self.plugin.availability()

    def create_vm(self, config: VmConfig | dict[str, Any] | None = None) -> Vm:
        """Create a VM on this backend.  Nothing is left open if this raises."""
        cfg: VmConfig = _validated(VmConfig, config if config is not None else {}, "VM config")
        if cfg.arch not in self.manifest.guest_arches:
            arches = ", ".join(a.value for a in self.manifest.guest_arches)
            raise ConfigError(f"arch: backend {self.name!r} runs {arches} guests, not {cfg.arch.value}")
        if cfg.vcpus > 1 and not self.supports(Capability.MULTI_VCPU):
            raise UnsupportedCapability(self.name, Capability.MULTI_VCPU, f"a VM with {cfg.vcpus} vCPUs")
        if cfg.protection is Protection.PROTECTED:
            # Creating it unprotected would leave the guest's memory readable by
            # the host while the VMM believes it is not.
            self.require(Capability.PROTECTED, "a protected VM")
        handle = self.hooks.create_vm(self, cfg)
        return Vm(self, cfg, handle)


class BackendHooks:
    """A backend's hook implementations, resolved once per backend.

    Core calls the backend only through these attributes (one per specification
    in :mod:`pyvmm.hookspecs`, named without the ``pyvmm_`` prefix), so a reader
    or an IDE follows ``self._hooks.map_memory`` straight to its specification.
    An optional hook whose capability the backend lacks on this host is a
    function that raises :class:`~pyvmm.errors.UnsupportedCapability` instead of
    calling the backend; a plugin of an older contract version that does not
    take a newer trailing argument is called without it.
    """

    backend_info: Callable[[], BackendManifest]
    create_vm: Callable[[Backend, VmConfig], Any]
    destroy_vm: Callable[[Any], None]
    map_memory: Callable[[Any, RamRegion], None]
    create_vcpu: Callable[[Any, int], Any]
    destroy_vcpu: Callable[[Any], None]
    run_vcpu: Callable[[Any], VcpuExit]
    init_vcpu: Callable[[Any, VcpuInit], None]
    set_boot_context: Callable[[Any, BootSpec], None]
    start_vm: Callable[[Any], None]
    unmap_memory: Callable[[Any, RamRegion], None]
    get_dirty_log: Callable[[Any, RamRegion], bytes]
    get_clock: Callable[[Any], int]
    set_clock: Callable[[Any, int], None]
    kick_vcpu: Callable[[Any], None]
    get_vcpu_state: Callable[[Any, StateKind], Any]
    set_vcpu_state: Callable[[Any, StateKind, Any], None]
    prepare_vcpu_state: Callable[[Any, SavedVcpuState], Any]
    restore_vcpu_state: Callable[[Any, Any], None]
    get_msrs: Callable[[Any, list[int]], list[MsrEntry]]
    set_msrs: Callable[[Any, list[MsrEntry]], None]
    get_supported_cpuid: Callable[[Any], list[CpuidEntry]]
    set_cpuid: Callable[[Any, list[CpuidEntry]], None]
    register_ioevent: Callable[[Any, Event, IoEventAddress, int | None, int], None]
    unregister_ioevent: Callable[[Any, Event, IoEventAddress, int | None, int], None]
    register_coalesced_io: Callable[[Any, IoEventAddress, int], None]
    unregister_coalesced_io: Callable[[Any, IoEventAddress, int], None]
    take_coalesced_io: Callable[[Any], list[CoalescedWrite]]
    serve_io: Callable[[Any, IoEventAddress, int, ServedRegister], None]
    register_irqfd: Callable[[Any, Event, int, bool], None]
    set_irq_line: Callable[[Any, int, bool], None]
    create_irqchip: Callable[[Any], None]
    set_guest_debug: Callable[[Any, bool, list[int]], None]
    add_device_tree_nodes: Callable[[Any, DeviceTree], None]
    ready_for_interrupt: Callable[[Any], bool]
    inject_interrupt: Callable[[Any, int], None]
    request_interrupt_window: Callable[[Any, bool], None]
    inject_nmi: Callable[[Any], None]
    get_vcpu_events: Callable[[Any], VcpuEvents]
    set_vcpu_events: Callable[[Any, VcpuEvents], None]
    unregister_irqfd: Callable[[Any, Event, int], None]
    register_resample_irqfd: Callable[[Any, Event, int, Event], None]
    set_gsi_routing: Callable[[Any, list[IrqRoute]], None]
    signal_msi: Callable[[Any, int, int], bool]
    get_msr_index_list: Callable[[Any], list[int]]
    get_feature_msrs: Callable[[Any], list[MsrEntry]]
    get_tsc_khz: Callable[[Any], int]
    set_tsc_khz: Callable[[Any, int], None]
    get_tsc_offset: Callable[[Any], int]
    set_tsc_offset: Callable[[Any, int], None]
    check_raw_capability: Callable[[Any, int], int]
    enable_raw_capability: Callable[[Any, int, int, tuple[int, ...]], int]
    enable_vcpu_raw_capability: Callable[[Any, int, int, tuple[int, ...]], int]
    get_vm_state: Callable[[Any, VmStateKind], bytes]
    set_vm_state: Callable[[Any, VmStateKind, bytes], None]

    def __init__(self, plugin: BackendPlugin, capabilities: CapabilitySet) -> None:
        version = plugin.manifest.contract_version
        for name, info in specs().items():
            impl = plugin.impls.get(name)
            attr = name.removeprefix("pyvmm_")
            if info.capability is not None and info.capability not in capabilities:
                impl = None
            if impl is None:
                setattr(self, attr, _refusal(plugin.name, info))
                continue
            setattr(self, attr, _adapted(impl, info, version))
        #: ``(target, method)`` of each generated forwarder, so a vCPU can bind its
        #: handle's own method (see :class:`Vcpu`).
        self.forwards: dict[str, tuple[str, str]] = {
            name.removeprefix("pyvmm_"): getattr(fn, FORWARD_ATTRIBUTE)
            for name, fn in plugin.impls.items()
            if hasattr(fn, FORWARD_ATTRIBUTE)
        }


def _refusal(backend: str, info: HookSpecInfo) -> Callable[..., Any]:
    def refuse(*args: object) -> NoReturn:
        raise UnsupportedCapability(backend, info.capability or info.name, info.name)

    return refuse


def _adapted(impl: Callable[..., Any], info: HookSpecInfo, version: int) -> Callable[..., Any]:
    """``impl`` as core calls it: with every argument of the current contract."""
    taken = len(info.argnames_for(version))
    if taken == len(info.argnames) or len(_argnames(impl)) == len(info.argnames):
        return impl

    def adapt(*args: Any) -> Any:
        return impl(*args[:taken])

    return adapt


def _argnames(fn: Callable[..., Any]) -> tuple[str, ...]:
    # inspect follows __wrapped__ (the generated forwarders) and drops a bound self.
    return tuple(inspect.signature(fn).parameters)


def _check_records(value: object) -> None:
    """Run a register record's own range checks (``check()``), or each item's, so
    an out-of-range value is a ConfigError naming the field before the backend
    sees it (not an OverflowError from deep inside a struct conversion)."""
    items = value if isinstance(value, (list, tuple)) else (value,)
    for item in items:
        check = getattr(item, "check", None)
        if callable(check):
            check()


def _check_event(event: object, name: str = "event") -> None:
    from pyvmm.host import Event

    if not isinstance(event, Event):
        raise ConfigError(f"{name}: a pyvmm.host.Event is needed, not {type(event).__name__}")


def _check_uint(name: str, value: object, bits: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise ConfigError(f"{name}: {value!r} is out of range: must be an integer from 0 to {(1 << bits) - 1:#x}")


def _check_line(line: object) -> None:
    _check_uint("line", line, 32)


#: How many arguments a raw capability takes (KVM's ``kvm_enable_cap.args``).
RAW_CAPABILITY_ARGS = 4


def _raw_capability_args(capability: object, flags: object, args: object) -> tuple[int, ...]:
    """``args`` padded with zeros to :data:`RAW_CAPABILITY_ARGS` 64-bit values."""
    _check_uint("capability", capability, 32)
    _check_uint("flags", flags, 32)
    if not isinstance(args, (tuple, list)) or len(args) > RAW_CAPABILITY_ARGS:
        raise ConfigError(f"args: at most {RAW_CAPABILITY_ARGS} integers, not {args!r}")
    for index, value in enumerate(args):
        _check_uint(f"args[{index}]", value, 64)
    return tuple(args) + (0,) * (RAW_CAPABILITY_ARGS - len(args))


def get_backend(
    name: str | None = None, registry: PluginRegistry | None = None, *, arch: Arch | None = None
) -> Backend:
    """Select a backend: ``name``, else ``$PYVMM_BACKEND``, else the best available
    (for guests of ``arch``, when given)."""
    plugin = (registry or default_registry()).select(name, arch=arch)
    return Backend(plugin, plugin.last_availability)


class Vm:
    """A VM bound to one backend.  Use as a context manager, or call :meth:`close`."""

    def __init__(self, backend: Backend, config: VmConfig, handle: Any) -> None:
        self.backend = backend
        self.config = config
        self.handle = handle
        self.memory = GuestMemory()
        self.vcpus: list[Vcpu] = []
        self._boot: BootSpec | None = None
        self._boot_init: VcpuInit | None = None
        self._started = False
        self._closed = False
        self._hooks = backend.hooks
        #: Set by :meth:`create_irqchip`: the hypervisor's interrupt controllers exist.
        self.has_irqchip = False

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self.memory)} regions, {len(self.vcpus)} vCPUs"
        return f"Vm({self.backend.name!r}, {self.config.arch.value}, {state})"

    def _check_open(self) -> None:
        if self._closed:
            raise VmStateError("the VM is closed")

    @property
    def arch(self) -> Arch:
        return self.config.arch

    @property
    def started(self) -> bool:
        return self._started

    # --- memory -------------------------------------------------------------
    def add_memory(
        self,
        guest_phys_addr: int | MemoryRegionSpec,
        size: int | str | None = None,
        *,
        contents: dict[int, bytes] | None = None,
        **flags: bool,
    ) -> RamRegion:
        """Back ``size`` bytes at ``guest_phys_addr`` with fresh host memory.

        ``read_only=True`` needs ``READ_ONLY_MEMORY``; ``log_dirty=True`` needs
        ``DIRTY_LOG``; after :meth:`start` it needs ``LATE_MEMORY``.
        ``contents`` (guest address -> bytes) is written into the region *before*
        the backend maps it: the way to load a protected VM's payload on a backend
        whose hypervisor takes lent memory from the host as soon as it is mapped
        (others, such as Gunyah, take it only when the VM starts).
        """
        self._check_open()
        if isinstance(guest_phys_addr, MemoryRegionSpec):
            spec = guest_phys_addr
        elif not flags:
            # The usual call: only known fields, so no mapping to build and check
            # for unknown keys; the record's own checks are the same.
            try:
                spec = MemoryRegionSpec(guest_phys_addr=guest_phys_addr, size=size)  # type: ignore[arg-type]
            except RecordError as exc:
                raise ConfigError(f"invalid memory region: {exc}") from exc
        else:
            spec = _validated(
                MemoryRegionSpec, {"guest_phys_addr": guest_phys_addr, "size": size, **flags}, "memory region"
            )
        if spec.read_only:
            self.backend.require(Capability.READ_ONLY_MEMORY, "a read-only region")
        if spec.log_dirty:
            self.backend.require(Capability.DIRTY_LOG, "a dirty-logged region")
        if self._started:
            self.backend.require(Capability.LATE_MEMORY, "mapping memory after start")
        for address, data in (contents or {}).items():
            if not (spec.guest_phys_addr <= address and address + len(data) <= spec.end):
                raise GuestMemoryError(
                    f"contents at {address:#x}+{len(data):#x} lie outside the region "
                    f"{spec.guest_phys_addr:#x}..{spec.end:#x}"
                )
        region = self.memory.allocate(spec)
        try:
            for address, data in (contents or {}).items():
                offset = address - spec.guest_phys_addr
                region.view(offset, len(data))[:] = data
            self._hooks.map_memory(self.handle, region)
        except BaseException:
            self.memory.release_slot(region)
            raise
        try:
            self.memory.insert(region)
        except BaseException:
            # The VM's memory was closed meanwhile: the backend has the region
            # mapped, so take it back before the host memory goes.
            if self.backend.supports(Capability.MEMORY_REMOVAL):
                with contextlib.suppress(PyvmmError):
                    self._hooks.unmap_memory(self.handle, region)
            raise
        return region

    def remove_memory(self, region: RamRegion) -> None:
        """Unmap ``region`` from the guest and free its host memory (``MEMORY_REMOVAL``)."""
        self._check_open()
        self.backend.require(Capability.MEMORY_REMOVAL, "remove memory")
        if region not in self.memory:
            raise ConfigError(f"{region!r} is not mapped in this VM")
        self._hooks.unmap_memory(self.handle, region)
        self.memory.remove(region)

    def dirty_log(self, region: RamRegion) -> bytes:
        """Bitmap of the pages of ``region`` written since the last call (``DIRTY_LOG``)."""
        self._check_open()
        self.backend.require(Capability.DIRTY_LOG, "read a dirty log")
        if region not in self.memory:
            raise ConfigError(f"{region!r} is not mapped in this VM")
        if not region.log_dirty:
            raise ConfigError(f"{region!r} was not mapped with log_dirty=True")
        return bytes(self._hooks.get_dirty_log(self.handle, region))

    def dirty_pages(self, region: RamRegion) -> list[int]:
        """Guest-physical addresses of the pages of ``region`` written since the last call."""
        bitmap = self.dirty_log(region)
        base = region.guest_phys_addr
        pages = [i * 8 + bit for i, byte in enumerate(bitmap) if byte for bit in range(8) if byte >> bit & 1]
        return [base + page * PAGE_SIZE for page in pages]

    # --- vCPUs ----------------------------------------------------------------
    def create_vcpu(self, index: int | None = None) -> Vcpu:
        """Create a vCPU.  The calling thread becomes the vCPU's thread."""
        self._check_open()
        index = len(self.vcpus) if index is None else index
        if not 0 <= index < self.config.vcpus:
            raise ConfigError(f"vCPU index {index} is out of range for a VM configured with {self.config.vcpus}")
        for existing in self.vcpus:
            if existing.index == index:
                raise ConfigError(f"vCPU {index} already exists")
        vcpu = Vcpu(self, index, self._hooks.create_vcpu(self.handle, index))
        self.vcpus.append(vcpu)
        if self._boot is not None:
            vcpu._needs_boot = True
        return vcpu

    # --- boot -----------------------------------------------------------------
    def set_boot(self, spec: BootSpec | dict[str, Any]) -> None:
        """Record how the VM boots.

        Where the hypervisor owns the boot context, this hands ``spec`` to it now
        (``pyvmm_set_boot_context``) and no vCPU register is ever set.  Otherwise
        it prepares the boot vCPU's registers (writing the x86 boot tables into
        guest RAM); each vCPU applies them with :meth:`Vcpu.apply_boot` on its own
        thread.
        """
        self._check_open()
        boot: BootSpec = _validated(BootSpec, spec, "boot spec")
        if boot.arch is not self.config.arch:
            raise ConfigError(f"arch: boot spec is for {boot.arch.value}, the VM is {self.config.arch.value}")
        if self._started:
            raise VmStateError("the VM has already started")
        if self.backend.supports(Capability.HYPERVISOR_INITIALIZED_BOOT_CONTEXT):
            self._hooks.set_boot_context(self.handle, boot)
        elif boot.arch is Arch.X86_64:
            from pyvmm.arch.x86_64_boot import build_x86_boot_state

            self._boot_init = build_x86_boot_state(boot, self.memory)
        else:
            from pyvmm.arch.aarch64_boot import build_aarch64_boot_state

            self._boot_init = build_aarch64_boot_state(boot)
        self._boot = boot
        for vcpu in self.vcpus:
            vcpu._needs_boot = True

    def boot_state_for(self, index: int) -> VcpuInit | None:
        """The register record vCPU ``index`` is initialised with, or None when the
        hypervisor initialises the boot context (or no boot was set)."""
        if self._boot_init is None:
            return None
        if index == 0:
            return self._boot_init
        if isinstance(self._boot_init, X86VcpuInit):
            return X86VcpuInit(regs=Regs(), sregs=Sregs(), boot_cpu=False)
        return Aarch64VcpuInit(regs={}, boot_cpu=False, power_off=True)

    def boot(self, spec: BootSpec | dict[str, Any]) -> None:
        """:meth:`set_boot`, :meth:`Vcpu.apply_boot` for every vCPU, then :meth:`start`.
        For VMs whose vCPUs all live on the calling thread."""
        self.set_boot(spec)
        for vcpu in self.vcpus:
            vcpu.apply_boot()
        self.start()

    def start(self) -> None:
        """Start the VM where the backend needs it (``VM_START``); otherwise only
        marks it started.  Idempotent."""
        self._check_open()
        if self._started:
            return
        unbooted = [v.index for v in self.vcpus if v._needs_boot]
        if unbooted and not self.backend.supports(Capability.HYPERVISOR_INITIALIZED_BOOT_CONTEXT):
            raise VmStateError(
                f"vCPU(s) {', '.join(map(str, unbooted))} have not applied the boot state: "
                "call Vcpu.apply_boot() on each vCPU's thread before start()"
            )
        if self.backend.supports(Capability.VM_START):
            self._hooks.start_vm(self.handle)
        self._started = True

    # --- interrupts, events, clock ------------------------------------------
    def create_irqchip(self) -> None:
        self._check_open()
        if self.vcpus:
            raise VmStateError("the irqchip must be created before the first vCPU")
        self._hooks.create_irqchip(self.handle)
        self.has_irqchip = True

    def set_irq_line(self, line: int, level: bool) -> None:
        self._check_open()
        self._hooks.set_irq_line(self.handle, line, level)

    def register_irqfd(self, event: Event, line: int, level: bool = False, resample: Event | None = None) -> None:
        """Make a signal of ``event`` raise interrupt ``line`` (``IRQFD``).

        ``level=True`` makes it level-triggered.  With a ``resample`` event
        (``IRQFD_RESAMPLE``, ``level=True`` only) the line stays raised until the
        guest acknowledges the interrupt; the hypervisor then lowers it and signals
        ``resample``, and the device signals ``event`` again while it still needs
        service.
        """
        self._check_open()
        self.backend.require(Capability.IRQFD, "irqfds")
        _check_event(event)
        _check_line(line)
        if resample is None:
            self._hooks.register_irqfd(self.handle, event, line, level)
            return
        if not level:
            raise ConfigError("resample: a resample event is for a level-triggered irqfd (level=True)")
        self.backend.require(Capability.IRQFD_RESAMPLE, "a level-triggered irqfd with a resample event")
        _check_event(resample, "resample")
        if resample is event:
            raise ConfigError("resample: must be another Event than the irqfd's own")
        self._hooks.register_resample_irqfd(self.handle, event, line, resample)

    def unregister_irqfd(self, event: Event, line: int) -> None:
        """Undo :meth:`register_irqfd` of ``event`` on ``line`` (``IRQFD_REMOVAL``)."""
        self._check_open()
        self.backend.require(Capability.IRQFD_REMOVAL, "unregister an irqfd")
        _check_event(event)
        _check_line(line)
        self._hooks.unregister_irqfd(self.handle, event, line)

    def set_gsi_routing(self, routes: list[IrqRoute]) -> None:
        """Replace the whole GSI routing table (``GSI_ROUTING``): each route is an
        :class:`~pyvmm.interrupts.IrqchipRoute` or an :class:`~pyvmm.interrupts.MsiRoute`.
        Routes left out are gone, the hypervisor's default ones included."""
        self._check_open()
        self.backend.require(Capability.GSI_ROUTING, "GSI routing")
        table = list(routes)
        for route in table:
            if not isinstance(route, (IrqchipRoute, MsiRoute)):
                raise ConfigError(f"routes: an IrqchipRoute or MsiRoute is needed, not {type(route).__name__}")
        self._hooks.set_gsi_routing(self.handle, table)

    def signal_msi(self, address: int, data: int) -> bool:
        """Send a message signalled interrupt (``MSI``): ``data`` to ``address``.
        True if it was delivered, False if it was not delivered anew (blocked by
        the guest, or one still pending), as the hypervisor reports."""
        self._check_open()
        self.backend.require(Capability.MSI, "signal an MSI")
        _check_uint("address", address, 64)
        _check_uint("data", data, 32)
        return bool(self._hooks.signal_msi(self.handle, address, data))

    # --- MSR lists and raw capabilities --------------------------------------
    def msr_index_list(self) -> list[int]:
        """The MSRs the hypervisor saves and restores for a vCPU (``MSR_INDEX_LIST``)."""
        self._check_open()
        return [int(i) for i in self._hooks.get_msr_index_list(self.handle)]

    def feature_msrs(self) -> list[MsrEntry]:
        """The feature MSRs and the values the hypervisor can give a guest (``FEATURE_MSRS``)."""
        self._check_open()
        return list(self._hooks.get_feature_msrs(self.handle))

    def check_raw_capability(self, capability: int) -> int:
        """The escape hatch (``RAW_CAPABILITIES``): ask the hypervisor about one of its
        own capabilities for this VM, by its own number (KVM: a ``KVM_CAP_*``,
        ``docs/backends/kvm.md``).  Returns what the hypervisor answered."""
        self._check_open()
        self.backend.require(Capability.RAW_CAPABILITIES, "query a raw capability")
        _check_uint("capability", capability, 32)
        return int(self._hooks.check_raw_capability(self.handle, capability))

    def enable_raw_capability(self, capability: int, flags: int = 0, args: tuple[int, ...] = ()) -> int:
        """The escape hatch (``RAW_CAPABILITIES``): enable one of the hypervisor's own
        capabilities on the VM, by its own number (KVM: ``KVM_ENABLE_CAP``).  What
        it changes is the caller's to handle.  Returns what the hypervisor returned."""
        self._check_open()
        self.backend.require(Capability.RAW_CAPABILITIES, "enable a raw capability")
        checked = _raw_capability_args(capability, flags, args)
        return int(self._hooks.enable_raw_capability(self.handle, capability, flags, checked))

    def register_ioevent(
        self, event: Event, address: IoEventAddress, datamatch: int | None = None, length: int = 0
    ) -> None:
        """Signal ``event`` instead of exiting on a guest write at ``address`` (``IOEVENTS``)."""
        self._check_ioevent(event, address, datamatch, length)
        self._hooks.register_ioevent(self.handle, event, address, datamatch, length)

    def unregister_ioevent(
        self, event: Event, address: IoEventAddress, datamatch: int | None = None, length: int = 0
    ) -> None:
        self._check_ioevent(event, address, datamatch, length)
        self._hooks.unregister_ioevent(self.handle, event, address, datamatch, length)

    def register_coalesced_io(self, address: IoEventAddress, size: int) -> None:
        """Record guest writes to ``size`` bytes from ``address`` instead of
        exiting (``COALESCED_IO``; ports need ``COALESCED_PIO``).  Collect them
        with :meth:`take_coalesced_io` before handling each exit
        (:mod:`pyvmm.coalesced`).

        :raises ConfigError: ``size`` is not positive, or the zone leaves the
            address space (ports end at 0x10000, guest-physical at 2**52).
        """
        self._check_coalesced(address, size)
        self._hooks.register_coalesced_io(self.handle, address, size)

    def unregister_coalesced_io(self, address: IoEventAddress, size: int) -> None:
        """Undo :meth:`register_coalesced_io` with the same arguments."""
        self._check_coalesced(address, size)
        self._hooks.unregister_coalesced_io(self.handle, address, size)

    def take_coalesced_io(self) -> list[CoalescedWrite]:
        """The guest writes recorded in coalesced zones since the last call, in
        guest order (``COALESCED_IO``)."""
        self._check_open()
        return self._hooks.take_coalesced_io(self.handle)

    def serve_io(self, address: IoEventAddress, size: int, register: ServedRegister) -> None:
        """Answer guest accesses to ``size`` bytes from ``address`` as ``register``
        inside the backend's run, never as exits (``SERVED_IO``; the registers
        and their answers: :mod:`pyvmm.served_io`).

        :raises ConfigError: the record is not a served register or is out of
            range, the range is empty or leaves its address space, or (from the
            backend) it overlaps a served range or a coalesced zone.
        """
        from pyvmm.served_io import check_served

        self._check_open()
        self.backend.require(Capability.SERVED_IO, "served registers")
        limit = 0x1_0000 if address.space.value == "pio" else MAX_GUEST_PHYS
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ConfigError(f"served range size must be a positive number of bytes, not {size!r}")
        if not (address.address >= 0 and address.address + size <= limit):
            space = address.space.value
            raise ConfigError(
                f"served range {address.address:#x}+{size:#x} leaves the {space} space (it ends at {limit:#x})"
            )
        check_served(register, size)
        self._hooks.serve_io(self.handle, address, size, register)

    def _check_coalesced(self, address: IoEventAddress, size: int) -> None:
        self._check_open()
        self.backend.require(Capability.COALESCED_IO, "coalesced I/O")
        is_port = address.space.value == "pio"
        if is_port:
            self.backend.require(Capability.COALESCED_PIO, "a coalesced zone of I/O ports")
        limit = 0x1_0000 if is_port else MAX_GUEST_PHYS
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ConfigError(f"coalesced zone size must be a positive number of bytes, not {size!r}")
        if not (address.address >= 0 and address.address + size <= limit):
            space = address.space.value
            raise ConfigError(
                f"coalesced zone {address.address:#x}+{size:#x} leaves the {space} space (it ends at {limit:#x})"
            )

    def add_device_tree_nodes(self, tree: DeviceTree) -> None:
        """Let the backend add its own nodes to the guest's device tree
        (``DEVICE_TREE_NODES``; the aarch64 board calls this)."""
        self._check_open()
        self._hooks.add_device_tree_nodes(self.handle, tree)

    def _check_ioevent(self, event: Event, address: IoEventAddress, datamatch: int | None, length: int) -> None:
        self._check_open()
        self.backend.require(Capability.IOEVENTS, "ioevents")
        _check_event(event)
        if address.space.value == "pio":
            self.backend.require(Capability.PIO_IOEVENTS, "an ioevent on an I/O port")
        if length not in (0, 1, 2, 4, 8):
            raise ConfigError(f"ioevent length must be 0 (any), 1, 2, 4 or 8, not {length}")
        if datamatch is not None and length == 0:
            raise ConfigError("an ioevent with datamatch needs a length")

    def get_vm_state(self, kind: VmStateKind) -> bytes:
        """The hypervisor's image of one of its VM-wide devices (``VM_STATE``)."""
        self._check_open()
        return bytes(self._hooks.get_vm_state(self.handle, kind))

    def set_vm_state(self, kind: VmStateKind, data: bytes) -> None:
        """Replace one VM-wide device's state with an image :meth:`get_vm_state` returned."""
        self._check_open()
        if not isinstance(data, (bytes, bytearray)):
            raise ConfigError(f"VM state {kind.value}: bytes are needed, not {type(data).__name__}")
        self._hooks.set_vm_state(self.handle, kind, bytes(data))

    def get_clock(self) -> int:
        self._check_open()
        return int(self._hooks.get_clock(self.handle))

    def set_clock(self, nanoseconds: int) -> None:
        self._check_open()
        self._hooks.set_clock(self.handle, nanoseconds)

    def supported_cpuid(self) -> list[CpuidEntry]:
        self._check_open()
        return list(self._hooks.get_supported_cpuid(self.handle))

    # --- teardown -------------------------------------------------------------
    def close(self) -> None:
        """Stop the vCPUs, destroy them and the VM, then free the guest memory.

        Running vCPUs are kicked and each vCPU's destruction waits until it has
        left the hypervisor (the backend kit's rule), so no hypervisor can touch
        host memory after it is unmapped.  A vCPU that cannot leave in time raises
        :class:`~pyvmm.errors.VmStateError`, and then the VM and its guest memory
        are deliberately kept (leaked) rather than freed under a running guest.

        Idempotent, and it completes even when Ctrl-C arrives meanwhile (the
        interrupt is raised once teardown is done).
        """
        if self._closed:
            return
        self._closed = True
        raised: list[BaseException] = []  # re-raised, the first, once teardown is done
        stuck: list[str] = []
        vcpus = self.vcpus
        if vcpus and self.backend.supports(Capability.IMMEDIATE_EXIT):
            for vcpu in vcpus:  # all at once, so they leave together
                kicker = getattr(vcpu.handle, "kicker", None)
                if isinstance(kicker, SignalKicker) and not kicker.running:
                    # Idle, on the backend kit's kicker: its close (in the
                    # destruction below) kicks the vCPU out should a run start
                    # meanwhile.  A kick now would only touch its run page,
                    # for the first time on a VM that never ran (a page fault).
                    continue
                # A kick refused (no signal handler) is not a stuck vCPU: the
                # destruction below finds out whether it leaves.
                with contextlib.suppress(PyvmmError):
                    vcpu.kick()
        for vcpu in reversed(vcpus):
            _teardown_step(stuck, raised, vcpu.close)
        if stuck:
            _ABANDONED.append(self)
            raise VmStateError("the VM could not be closed safely, so its guest memory is kept: " + "; ".join(stuck))
        _teardown_step(stuck, raised, self._hooks.destroy_vm, self.handle)
        _teardown_step(stuck, raised, self.memory.close)
        # Each vCPU points back at this VM: with the list emptied, refcounting
        # frees a closed VM at once instead of leaving the pair to the cyclic GC.
        vcpus.clear()
        if raised:
            raise raised[0]

    def __del__(self) -> None:
        # A VM dropped without close() would keep its descriptors, and its
        # memslots would point at host memory freed under them: close it, and
        # say so, as files do.
        if getattr(self, "_closed", True):
            return
        warnings.warn(f"{self!r} was not closed", ResourceWarning, stacklevel=2)
        with contextlib.suppress(Exception):  # a finaliser must not raise
            self.close()


#: VMs whose vCPUs would not leave the hypervisor on close: kept alive for the
#: life of the process so their guest memory is never unmapped under them.
_ABANDONED: list[Vm] = []


def _teardown_step(stuck: list[str], raised: list[BaseException], action: Callable[..., object], *args: object) -> None:
    """One step of :meth:`Vm.close`: ``action(*args)``, its failure recorded and
    teardown carried on (a module function, not a closure made on every close)."""
    try:
        action(*args)
    except VmStateError as exc:
        stuck.append(str(exc))
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - finish teardown, then re-raise
        raised.append(exc)


class Vcpu:
    """One vCPU.  ``run()`` is the backend's run hook bound to this vCPU."""

    def __init__(self, vm: Vm, index: int, handle: Any) -> None:
        self.vm = vm
        self.index = index
        self.handle = handle
        self.thread_id = threading.get_ident()
        self._needs_boot = False
        self._closed = False
        backend = vm.backend
        self._backend = backend
        self._hooks = hooks = backend.hooks
        #: Run until the next exit.  Bound once, so each call is a direct call: a
        #: backend on the template gets its handle's own ``run`` method.
        self.run: Callable[[], VcpuExit]
        if hooks.forwards.get("run_vcpu") == ("vcpu", "run"):
            self.run = handle.run
        else:
            self.run = functools.partial(hooks.run_vcpu, handle)

    def __repr__(self) -> str:
        return f"Vcpu({self.index}, backend={self._backend.name!r})"

    def _on_thread(self, what: str) -> None:
        if self._closed:
            raise VmStateError(f"vCPU {self.index} is closed")
        if threading.get_ident() != self.thread_id:
            raise VmStateError(f"{what} must be called on the thread that created vCPU {self.index}")

    def apply_boot(self) -> None:
        """Set this vCPU's boot registers from the VM's boot spec.  A no-op (and no
        hook call) where the hypervisor initialises the boot context."""
        self._on_thread("apply_boot")
        if self.vm._boot is None:
            raise VmStateError("no boot spec: call Vm.set_boot first")
        self._needs_boot = False
        if self._backend.supports(Capability.HYPERVISOR_INITIALIZED_BOOT_CONTEXT):
            return
        init = self.vm.boot_state_for(self.index)
        if init is not None:
            self.init(init)

    def init(self, boot: VcpuInit) -> None:
        """Set boot registers directly.  Refused where the hypervisor owns them."""
        self._on_thread("init")
        if self._backend.supports(Capability.HYPERVISOR_INITIALIZED_BOOT_CONTEXT):
            raise UnsupportedCapability(
                self._backend.name,
                Capability.HYPERVISOR_INITIALIZED_BOOT_CONTEXT,
                "set vCPU boot registers",
                because="the hypervisor initialises the boot context",
            )
        _check_records(boot)
        self._hooks.init_vcpu(self.handle, boot)

    def kick(self) -> None:
        """From any thread: make the current or next :meth:`run` return an
        :class:`~pyvmm.exits.InterruptedExit` (``IMMEDIATE_EXIT``)."""
        if self._closed:
            raise VmStateError(f"vCPU {self.index} is closed")
        self._hooks.kick_vcpu(self.handle)

    # --- registers ------------------------------------------------------------
    def get_state(self, kind: StateKind) -> Any:
        self._on_thread("get_state")
        return self._hooks.get_vcpu_state(self.handle, kind)

    def set_state(self, kind: StateKind, value: Any) -> None:
        self._on_thread("set_state")
        _check_records(value)
        self._hooks.set_vcpu_state(self.handle, kind, value)

    def get_regs(self) -> Regs:
        return self.get_state(StateKind.REGS)  # type: ignore[no-any-return]

    def set_regs(self, regs: Regs) -> None:
        self.set_state(StateKind.REGS, regs)

    def get_sregs(self) -> Sregs:
        return self.get_state(StateKind.SREGS)  # type: ignore[no-any-return]

    def set_sregs(self, sregs: Sregs) -> None:
        self.set_state(StateKind.SREGS, sregs)

    def get_fpu(self) -> Fpu:
        return self.get_state(StateKind.FPU)  # type: ignore[no-any-return]

    def get_debug_regs(self) -> DebugRegs:
        return self.get_state(StateKind.DEBUG_REGS)  # type: ignore[no-any-return]

    def get_msrs(self, indices: list[int]) -> list[MsrEntry]:
        self._on_thread("get_msrs")
        return list(self._hooks.get_msrs(self.handle, list(indices)))

    def set_msrs(self, entries: list[MsrEntry]) -> None:
        self._on_thread("set_msrs")
        entries = list(entries)
        _check_records(entries)
        self._hooks.set_msrs(self.handle, entries)

    def set_cpuid(self, entries: list[CpuidEntry]) -> None:
        self._on_thread("set_cpuid")
        if self._backend.supports(Capability.EARLY_INIT_CPUID):
            raise UnsupportedCapability(
                self._backend.name,
                Capability.EARLY_INIT_CPUID,
                "set a vCPU's CPUID",
                because="CPUID is fixed at VM creation",
            )
        entries = list(entries)
        _check_records(entries)
        self._hooks.set_cpuid(self.handle, entries)

    # --- interrupts from userspace (x86) ---------------------------------------
    def ready_for_interrupt(self) -> bool:
        """Whether the vCPU can take an external interrupt now
        (``INTERRUPT_INJECTION``): as the hypervisor reported at the last exit."""
        self._on_thread("ready_for_interrupt")
        return bool(self._hooks.ready_for_interrupt(self.handle))

    def interrupt(self, vector: int) -> None:
        """Deliver external interrupt ``vector`` (0-255) on the next :meth:`run`
        (``INTERRUPT_INJECTION``).  Inject at most one per exit.

        :raises InterruptNotReady: the vCPU cannot take one now (see
            :meth:`ready_for_interrupt`); nothing was queued.  Request an
            interrupt window and inject at its exit instead.
        """
        self._on_thread("interrupt")
        _check_uint("vector", vector, 8)
        hooks = self._hooks
        if not hooks.ready_for_interrupt(self.handle):
            raise InterruptNotReady(self.index, vector)
        hooks.inject_interrupt(self.handle, vector)

    def request_interrupt_window(self, requested: bool = True) -> None:
        """Ask for an :class:`~pyvmm.exits.IrqWindowOpenExit` as soon as the guest
        can take an interrupt, or stop asking (``INTERRUPT_INJECTION``)."""
        self._on_thread("request_interrupt_window")
        self._hooks.request_interrupt_window(self.handle, bool(requested))

    def inject_nmi(self) -> None:
        """Make a non-maskable interrupt pending (``NMI``)."""
        self._on_thread("inject_nmi")
        self._hooks.inject_nmi(self.handle)

    def get_events(self) -> VcpuEvents:
        """The pending-event state: exception, interrupt, NMI and SMI being
        delivered, the interrupt shadow, NMI blocking (``VCPU_EVENTS``)."""
        self._on_thread("get_events")
        return self._hooks.get_vcpu_events(self.handle)

    def set_events(self, events: VcpuEvents) -> None:
        """Replace the pending-event state (``VCPU_EVENTS``); None fields keep the
        hypervisor's values."""
        self._on_thread("set_events")
        from pyvmm.arch.x86_64_extra_state import VcpuEvents  # see TYPE_CHECKING above

        if not isinstance(events, VcpuEvents):
            raise ConfigError(f"events: a pyvmm.arch.x86_64.VcpuEvents is needed, not {type(events).__name__}")
        events.check()
        self._hooks.set_vcpu_events(self.handle, events)

    # --- a saved state, written back many times (pyvmm.prepared_state) ---------------
    def prepare_state(self, state: SavedVcpuState) -> PreparedVcpuState:
        """Check ``state`` and make it ready for :meth:`restore_state` on this
        vCPU, which then writes it back with nothing left to convert or check
        (``PREPARED_VCPU_STATE``; elsewhere through the register hooks).  Later
        changes to the records in ``state`` do not reach what was prepared.

        :raises UnsupportedCapability: ``state`` holds MSRs or events the backend
            cannot write.
        :raises ConfigError: a record is out of range, or not a register set.
        """
        self._on_thread("prepare_state")
        for kind, value in state.states:
            if not isinstance(kind, StateKind):
                raise ConfigError(f"states: a pyvmm.vcpu_state.StateKind is needed, not {type(kind).__name__}")
            _check_records(value)
        if state.msrs:
            self._backend.require(Capability.MSRS, "restore MSRs")
            _check_records(list(state.msrs))
        events: object = state.events
        if events is not None:
            self._backend.require(Capability.VCPU_EVENTS, "restore pending events")
            from pyvmm.arch.x86_64_extra_state import VcpuEvents  # see TYPE_CHECKING above

            if not isinstance(events, VcpuEvents):
                raise ConfigError(f"events: a pyvmm.arch.x86_64.VcpuEvents is needed, not {type(events).__name__}")
            events.check()
        if self._backend.supports(Capability.PREPARED_VCPU_STATE):
            return PreparedVcpuState(self, state, self._hooks.prepare_vcpu_state(self.handle, state))
        # Written back through the register hooks: a copy, so that what was
        # checked here is what is written.
        return PreparedVcpuState(self, copy.deepcopy(state), None)

    def restore_state(self, prepared: PreparedVcpuState) -> None:
        """Write back a state :meth:`prepare_state` made ready for this vCPU: the
        MSRs, the register sets in order, then the pending events."""
        self._on_thread("restore_state")
        if prepared.vcpu is not self:
            raise ConfigError(f"the state was prepared for vCPU {prepared.vcpu.index}, not for vCPU {self.index}")
        hooks, handle = self._hooks, self.handle
        if prepared.backend_state is not None:
            hooks.restore_vcpu_state(handle, prepared.backend_state)
            return
        state = prepared.state
        if state.msrs:
            hooks.set_msrs(handle, list(state.msrs))
        for kind, value in state.states:
            hooks.set_vcpu_state(handle, kind, value)
        if state.events is not None:
            hooks.set_vcpu_events(handle, state.events)

    # --- TSC and raw capabilities -----------------------------------------------
    def get_tsc_khz(self) -> int:
        """The vCPU's TSC frequency in kHz (``TSC_FREQUENCY``)."""
        self._on_thread("get_tsc_khz")
        return int(self._hooks.get_tsc_khz(self.handle))

    def set_tsc_khz(self, khz: int) -> None:
        """Set the vCPU's TSC frequency in kHz (``TSC_SCALING``)."""
        self._on_thread("set_tsc_khz")
        _check_uint("khz", khz, 32)
        if khz == 0:
            raise ConfigError("khz: a TSC frequency must be above 0")
        self._hooks.set_tsc_khz(self.handle, khz)

    def get_tsc_offset(self) -> int:
        """The vCPU's TSC offset, unsigned 64-bit (``TSC_OFFSET``)."""
        self._on_thread("get_tsc_offset")
        return int(self._hooks.get_tsc_offset(self.handle))

    def set_tsc_offset(self, offset: int) -> None:
        """Set the vCPU's TSC offset (``TSC_OFFSET``); a negative ``offset`` is
        taken modulo 2**64."""
        self._on_thread("set_tsc_offset")
        if isinstance(offset, bool) or not isinstance(offset, int) or not -(1 << 63) <= offset < 1 << 64:
            raise ConfigError(f"offset: {offset!r} is not a 64-bit TSC offset")
        self._hooks.set_tsc_offset(self.handle, offset & ((1 << 64) - 1))

    def enable_raw_capability(self, capability: int, flags: int = 0, args: tuple[int, ...] = ()) -> int:
        """The escape hatch (``RAW_CAPABILITIES``): enable one of the hypervisor's own
        capabilities on this vCPU, by its own number (KVM: ``KVM_ENABLE_CAP`` on the
        vCPU).  Returns what the hypervisor returned."""
        self._on_thread("enable_raw_capability")
        self._backend.require(Capability.RAW_CAPABILITIES, "enable a raw capability")
        checked = _raw_capability_args(capability, flags, args)
        return int(self._hooks.enable_vcpu_raw_capability(self.handle, capability, flags, checked))

    def set_guest_debug(self, single_step: bool = False, breakpoints: list[int] | None = None) -> None:
        self._on_thread("set_guest_debug")
        points = list(breakpoints or [])
        if len(points) > 4:
            raise ConfigError(f"at most 4 hardware breakpoints, {len(points)} given")
        for point in points:
            if isinstance(point, bool) or not isinstance(point, int) or not 0 <= point < 1 << 64:
                raise ConfigError(f"breakpoints: {point!r} is not a guest address (an integer from 0 to 2**64-1)")
        self._hooks.set_guest_debug(self.handle, single_step, points)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Never hand the destroyed handle to the run hook.  Not a bound method:
        # that would be a reference cycle through this vCPU.
        self.run = functools.partial(_run_closed, self.index)
        self._hooks.destroy_vcpu(self.handle)


def _run_closed(index: int) -> VcpuExit:
    raise VmStateError(f"vCPU {index} is closed")
