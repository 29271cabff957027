"""The backend's VM and vCPU classes: their methods are its hooks.

:func:`pyvmm.backend.backend_plugin` (in :mod:`pyvmm_unicorn.plugin`) turns each
method named by a hook specification into that hook: ``pyvmm_map_memory(vm,
region)`` calls :meth:`UnicornVm.map_memory`, ``pyvmm_run_vcpu(vcpu)`` calls
:meth:`UnicornVcpu.run`, and so on; which optional hooks exist follows from which
methods are here, and must match the manifest's capabilities.

A VM holds the guest memory regions core mapped; each vCPU is one
:class:`pyvmm.softcpu.SoftCpu` with those regions mapped into it.
"""

from __future__ import annotations

from typing import Any

from pyvmm.arch.aarch64 import CoreRegs
from pyvmm.arch.x86_64 import Regs, Sregs, VcpuEvents
from pyvmm.arch.x86_64_extra_state import DebugRegs, Fpu
from pyvmm.boot import VcpuInit
from pyvmm.config import Arch, VmConfig
from pyvmm.errors import ConfigError
from pyvmm.exits import VcpuExit
from pyvmm.memory import RamRegion
from pyvmm.softcpu import SoftCpu
from pyvmm.softcpu.engine import EXIT_TIMINGS, INTERCEPTS
from pyvmm.vcpu_state import StateKind

#: ``VmConfig.backend_options`` this backend understands, with their defaults.
#: ``intercept``: x86 instructions that become exits (:data:`pyvmm.softcpu.engine.INTERCEPTS`).
#: ``exit_timing``: x86 MMIO/port exits ``"after"`` the access (KVM's) or
#: ``"before"`` the instruction (WHPX's, completed with
#: :mod:`pyvmm.softcpu.x86_emulate`), see :data:`pyvmm.softcpu.engine.EXIT_TIMINGS`.
#: ``string_batch``: x86 ``INS``/``OUTS`` bytes per exit; 0 is one item per exit
#: (see ``SoftCpu(string_batch=...)``).
OPTIONS: dict[str, object] = {"coherent_code": True, "intercept": (), "exit_timing": "after", "string_batch": 0}

_STATE_KINDS = {
    # A snapshot and a reset point need the FPU and debug registers too.
    Arch.X86_64: (StateKind.REGS, StateKind.SREGS, StateKind.FPU, StateKind.DEBUG_REGS),
    Arch.AARCH64: (StateKind.CORE_REGS,),
}

#: How the software CPU reads and writes each register set, and the record it takes.
_STATE_ACCESS: dict[StateKind, tuple[str, str, type]] = {
    StateKind.REGS: ("get_regs", "set_regs", Regs),
    StateKind.SREGS: ("get_sregs", "set_sregs", Sregs),
    StateKind.FPU: ("get_fpu", "set_fpu", Fpu),
    StateKind.DEBUG_REGS: ("get_debug_regs", "set_debug_regs", DebugRegs),
    StateKind.CORE_REGS: ("get_core_regs", "set_core_regs", CoreRegs),
}


def parse_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        known = ", ".join(sorted(OPTIONS))
        raise ConfigError(
            f"backend_options: unknown option(s) {', '.join(unknown)} (the unicorn backend knows {known})"
        )
    merged = {**OPTIONS, **options}
    if not isinstance(merged["coherent_code"], bool):
        raise ConfigError("backend_options.coherent_code: must be true or false")
    intercept = merged["intercept"]
    if isinstance(intercept, str) or not all(isinstance(i, str) and i in INTERCEPTS for i in intercept):
        raise ConfigError(f"backend_options.intercept: a list of {', '.join(sorted(INTERCEPTS))}")
    merged["intercept"] = tuple(intercept)
    if merged["exit_timing"] not in EXIT_TIMINGS:
        raise ConfigError(f"backend_options.exit_timing: one of {', '.join(sorted(EXIT_TIMINGS))}")
    batch = merged["string_batch"]
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise ConfigError("backend_options.string_batch: a byte count, 0 or more")
    if batch and merged["exit_timing"] != "after":
        raise ConfigError("backend_options.string_batch: needs exit_timing 'after'")
    return merged


class UnicornVm:
    """A VM: its config and the guest memory core has mapped."""

    @classmethod
    def create(cls, backend: Any, config: VmConfig) -> UnicornVm:
        """``pyvmm_create_vm``."""
        return cls(config)

    def __init__(self, config: VmConfig) -> None:
        self.config = config
        self.options = parse_options(config.backend_options)
        self.regions: list[RamRegion] = []
        self.vcpus: list[UnicornVcpu] = []

    def map_memory(self, region: RamRegion) -> None:
        done: list[UnicornVcpu] = []
        try:
            for vcpu in self.vcpus:
                vcpu.cpu.map_region(region)
                done.append(vcpu)
        except BaseException:
            # The contract: a failed map leaves nothing mapped.
            for vcpu in done:
                vcpu.cpu.unmap_region(region)
            raise
        self.regions.append(region)

    def unmap_memory(self, region: RamRegion) -> None:
        for vcpu in self.vcpus:
            vcpu.cpu.unmap_region(region)
        self.regions.remove(region)

    def get_dirty_log(self, region: RamRegion) -> bytes:
        pages = region.size // 4096
        if not self.vcpus:
            return bytes((pages + 7) // 8)  # nothing ran, nothing was written
        bitmap = bytearray((pages + 7) // 8)
        for vcpu in self.vcpus:
            for i, byte in enumerate(vcpu.cpu.dirty_log(region.guest_phys_addr)):
                bitmap[i] |= byte
        return bytes(bitmap)

    def create_vcpu(self, index: int) -> UnicornVcpu:
        x86 = self.config.arch is Arch.X86_64
        if not x86 and self.options["exit_timing"] != "after":
            raise ConfigError("backend_options.exit_timing 'before' is for x86_64 guests")
        if not x86 and self.options["string_batch"]:
            raise ConfigError("backend_options.string_batch is for x86_64 guests")
        cpu = SoftCpu(
            self.config.arch,
            coherent_code=bool(self.options["coherent_code"]),
            intercept=self.options["intercept"] if x86 else (),
            exit_timing=str(self.options["exit_timing"]),
            string_batch=int(self.options["string_batch"]),
        )
        try:
            for region in self.regions:
                cpu.map_region(region)
        except BaseException:
            cpu.close()
            raise
        vcpu = UnicornVcpu(self, index, cpu)
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        for vcpu in list(self.vcpus):
            vcpu.close()
        self.regions.clear()


class UnicornVcpu:
    """A vCPU: one software CPU."""

    def __init__(self, vm: UnicornVm, index: int, cpu: SoftCpu) -> None:
        self.vm = vm
        self.index = index
        self.cpu = cpu
        # The exit path: core binds the handle's ``run``, and this instance
        # attribute makes that the software CPU's own method (no extra frame).
        self.run = cpu.run  # type: ignore[method-assign]

    def run(self) -> VcpuExit:
        """``pyvmm_run_vcpu`` (each instance replaces this with ``cpu.run`` itself)."""
        return self.cpu.run()

    def init(self, boot: VcpuInit) -> None:
        self.cpu.init(boot)

    def kick(self) -> None:
        self.cpu.kick()

    def set_guest_debug(self, single_step: bool, breakpoints: list[int]) -> None:
        self.cpu.set_guest_debug(single_step, breakpoints)

    # x86 interrupts from userspace: the software CPU delivers them through the
    # guest's IVT/IDT (INTERRUPT_INJECTION, NMI).
    def ready_for_interrupt(self) -> bool:
        return self.vm.config.arch is Arch.X86_64 and self.cpu.ready_for_interrupt()

    def interrupt(self, vector: int) -> None:
        self._x86_only("interrupt injection")
        self.cpu.inject_interrupt(vector)

    def request_interrupt_window(self, requested: bool) -> None:
        self._x86_only("an interrupt window")
        self.cpu.request_interrupt_window(requested)

    def inject_nmi(self) -> None:
        self._x86_only("an NMI")
        self.cpu.inject_nmi()

    def get_events(self) -> VcpuEvents:
        self._x86_only("vCPU events")
        return self.cpu.get_vcpu_events()

    def set_events(self, events: VcpuEvents) -> None:
        self._x86_only("vCPU events")
        self.cpu.set_vcpu_events(events)

    def _x86_only(self, what: str) -> None:
        if self.vm.config.arch is not Arch.X86_64:
            raise ConfigError(f"the unicorn backend has {what} for x86_64 guests only")

    def get_state(self, kind: StateKind) -> Any:
        self._check_kind(kind)
        getter, _, _ = _STATE_ACCESS[kind]
        return getattr(self.cpu, getter)()

    def set_state(self, kind: StateKind, value: Any) -> None:
        self._check_kind(kind)
        _, setter, record = _STATE_ACCESS[kind]
        if not isinstance(value, record):
            raise ConfigError(f"{kind.value}: expected {record.__name__}, got {type(value).__name__}")
        getattr(self.cpu, setter)(value)

    def _check_kind(self, kind: StateKind) -> None:
        kinds = _STATE_KINDS[self.vm.config.arch]
        if kind not in kinds:
            have = ", ".join(k.value for k in kinds)
            raise ConfigError(
                f"the unicorn backend has no {kind.value} state for {self.vm.config.arch.value} guests (it has {have})"
            )

    def close(self) -> None:
        self.cpu.close()
        if self in self.vm.vcpus:
            self.vm.vcpus.remove(self)
