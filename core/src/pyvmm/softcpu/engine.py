"""The software CPU: one guest vCPU emulated by unicorn, stopping where a
hypervisor would exit.  See :mod:`pyvmm.softcpu` for the model and its limits."""

from __future__ import annotations

import ctypes
import errno
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyvmm.arch.aarch64 import CoreRegs
from pyvmm.arch.x86_64 import Regs, Sregs, VcpuEvents
from pyvmm.boot import Aarch64VcpuInit, VcpuInit, X86VcpuInit
from pyvmm.config import PAGE_SIZE, Arch
from pyvmm.errors import ConfigError, HypervisorError, VmStateError
from pyvmm.exits import (
    DebugExit,
    HltExit,
    InternalErrorExit,
    InterruptedExit,
    MmioExit,
    VcpuExit,
)
from pyvmm.softcpu import _uc
from pyvmm.softcpu._isa import INTERNAL_ERROR_EMULATION, Conduit, Hypercall, HypercallHandler, Isa, Stop
from pyvmm.softcpu._uc import RUN_BUDGET, UNREACHABLE

if TYPE_CHECKING:
    from pyvmm.arch.x86_64_extra_state import DebugRegs, Fpu
    from pyvmm.memory import RamRegion
    from pyvmm.softcpu._aarch64 import Aarch64Isa
    from pyvmm.softcpu._x86 import X86Isa
    from pyvmm.softcpu.gic import GicCpu

_PAGE_MASK = PAGE_SIZE - 1
#: How often a kick (or a memory change from another thread) repeats its stop
#: request until the vCPU thread has seen it: unicorn forgets a stop that lands
#: between two emulation slices.
_WATCHDOG_PERIOD = 0.0005

#: Slices in a row that may end with nothing done before run() gives up.
_MAX_IDLE_SLICES = 4

#: What ``SoftCpu(intercept=...)`` can turn into exits (x86_64): CPUID as a
#: :class:`~pyvmm.exits.CpuidExit`, RDMSR/WRMSR as a
#: :class:`~pyvmm.exits.MsrAccessExit`, RDTSC/RDTSCP as a
#: :class:`~pyvmm.softcpu.exits.RdtscExit`, all completed on the next run --
#: except CPUID and RDMSR/WRMSR with ``intercept_timing="before"`` (see there).
INTERCEPTS = frozenset({"cpuid", "msr", "rdtsc"})

#: ``SoftCpu(exit_timing=...)``: when an MMIO or port access exits.  ``"after"``
#: the access (KVM, HAXM): the next run completes it.  ``"before"`` the
#: instruction (WHPX): the exit carries the instruction's bytes (and an MMIO
#: exit the GVA), RIP stays on it, and the VMM completes it itself -- see
#: :mod:`pyvmm.softcpu.x86_emulate`.  x86_64 only.
#:
#: ``SoftCpu(intercept_timing=...)`` is the same choice for intercepted CPUID
#: and RDMSR/WRMSR.  ``"after"``: the VMM fills the exit (``CpuidExit.eax``..,
#: ``MsrAccessExit.value``) and the next run completes it -- pyvmm's exit
#: contract, what a backend hands its users.  ``"before"`` (WHPX's
#: extended exits, for a model of them): RIP on the instruction, registers as
#: before it (a CPUID exit's ``eax``..``edx`` hold the CPU model's own answer,
#: WHPX's default result), and the VMM writes the results and moves RIP past
#: it; an exit whose RIP was not moved comes again.  RDTSC exits stay after the
#: instruction.
EXIT_TIMINGS = frozenset({"after", "before"})


class _Link:
    """The engine as its ISA half sees it (:class:`pyvmm.softcpu._isa.Engine`):
    the few things the half may ask for, and nothing of the engine's state."""

    __slots__ = ("_cpu",)

    def __init__(self, cpu: SoftCpu) -> None:
        self._cpu = cpu

    def read_virtual(self, address: int, size: int) -> bytes | None:
        return self._cpu.read_virtual(address, size)

    def read_physical(self, gpa: int, size: int) -> bytes | None:
        return self._cpu.read_physical(gpa, size)

    def is_ram(self, gpa: int, size: int, *, write: bool) -> bool:
        return self._cpu._ram_mapping(gpa, size, write) is not None

    def write_ram(self, gpa: int, data: bytes) -> bool:
        return self._cpu._write_ram(gpa, data)

    def stop_slice(self, reason: Stop) -> None:
        cpu = self._cpu
        cpu._stop = reason
        cpu._uc.emu_stop()

    def forget_pending(self) -> None:
        self._cpu._forget_pending()

    def internal_error(self, description: str, pc: int, data: tuple[int, ...] = ()) -> InternalErrorExit:
        return self._cpu._internal_error(description, pc, data)

    def hypercall(self, call: Hypercall) -> VcpuExit | bool | None:
        handler = self._cpu.hypercall_handler
        return None if handler is None else handler(self._cpu, call)

    def flush_code(self) -> None:
        self._cpu._uc.ctl_flush_tb()

    def instruction_length(self, pc: int) -> int:
        return self._cpu._instruction_length(pc)


class _Access:
    """One guest memory access that became (or will become) an MMIO exit."""

    __slots__ = ("address", "done", "is_write", "size", "value")

    def __init__(self, address: int, size: int, is_write: bool, value: int = 0) -> None:
        self.address = address
        self.size = size
        self.is_write = is_write
        self.value = value & ((1 << (8 * size)) - 1)
        #: read: the VMM supplied the data; during a replay: matched already.
        self.done = False

    def __repr__(self) -> str:
        kind = "write" if self.is_write else "read"
        return f"_Access({kind} {self.address:#x}/{self.size} = {self.value:#x})"


@dataclass(slots=True)
class _Mapping:
    guest_phys_addr: int
    size: int
    host_addr: int
    read_only: bool
    dirty: bytearray | None = None
    dirty_hook: int | None = None

    @property
    def end(self) -> int:
        return self.guest_phys_addr + self.size


class SoftCpu:
    """One emulated vCPU with its view of guest-physical memory.

    A plain class, no pluggy: a backend's hooks or a driver model's ``RUN``
    handler wrap it.  All methods but :meth:`kick` belong to the thread that
    calls :meth:`run` (the vCPU thread); memory changes from another thread are
    handed to the vCPU thread and waited for.

    :param arch: the guest architecture.
    :param coherent_code: invalidate unicorn's translated code at every
        :meth:`run`, so code the VMM rewrites in guest memory between runs is
        seen (what hardware does; costs ~35 µs per run).  With False the owner
        calls :meth:`invalidate_code` after writing code itself.
    :param intercept: x86_64: what of :data:`INTERCEPTS` becomes an exit
        (``"cpuid"``, ``"msr"``, ``"rdtsc"``) instead of being answered by
        unicorn's CPU model -- the exit is taken after the instruction and the
        VMM's answer (``CpuidExit.eax``.., ``MsrAccessExit.value``/``error``,
        ``RdtscExit.tsc``/``aux``) goes in on the next run; with
        ``intercept_timing="before"`` CPUID and MSR exits come before the
        instruction instead.  ``"msr"`` looks at every instruction (unicorn
        2.1 cannot hook RDMSR/WRMSR), so it is slow, and sees only RDMSR/WRMSR
        without prefixes.
    :param exit_timing: x86_64: ``"after"`` (default) or ``"before"``, see
        :data:`EXIT_TIMINGS`.
    :param intercept_timing: x86_64: the same for intercepted CPUID and
        RDMSR/WRMSR, see :data:`EXIT_TIMINGS`.
    :param string_batch: x86_64 with exits after the access: the most bytes
        one ``INS``/``OUTS`` exit carries.  0 (default): one item per exit, a
        plain :class:`~pyvmm.exits.IoExit`.  Above 0: a
        :class:`~pyvmm.softcpu.exits.StringIoExit` with up to that many bytes
        of items (at least one item; never beyond the buffer's page), which the
        next run completes as a whole.  A string instruction whose buffer is
        not RAM goes item by item, as with 0.
    :raises SoftCpuUnavailable: unicorn is not installed.
    """

    def __init__(
        self,
        arch: Arch | str,
        *,
        coherent_code: bool = True,
        intercept: Iterable[str] = (),
        exit_timing: str = "after",
        string_batch: int = 0,
        intercept_timing: str = "after",
    ) -> None:
        self.arch = Arch(arch)
        wanted = frozenset(intercept)
        if not wanted <= INTERCEPTS or (wanted and self.arch is not Arch.X86_64):
            raise ConfigError(
                f"softcpu: intercept {sorted(wanted)}: x86_64 guests can intercept {sorted(INTERCEPTS)} only"
            )
        if exit_timing not in EXIT_TIMINGS or (exit_timing == "before" and self.arch is not Arch.X86_64):
            raise ConfigError(
                f"softcpu: exit_timing {exit_timing!r}: one of {sorted(EXIT_TIMINGS)}, and 'before' for x86_64 only"
            )
        if intercept_timing not in EXIT_TIMINGS or (intercept_timing == "before" and self.arch is not Arch.X86_64):
            raise ConfigError(
                f"softcpu: intercept_timing {intercept_timing!r}: one of {sorted(EXIT_TIMINGS)}, "
                "and 'before' for x86_64 only"
            )
        if isinstance(string_batch, bool) or not isinstance(string_batch, int) or string_batch < 0:
            raise ConfigError(f"softcpu: string_batch {string_batch!r}: a byte count, 0 or more")
        if string_batch and (self.arch is not Arch.X86_64 or exit_timing != "after"):
            raise ConfigError(
                "softcpu: string_batch is for x86_64 guests with exit_timing 'after' "
                "(before the instruction, the VMM emulates the whole string instruction)"
            )
        #: True: MMIO and port exits come before the instruction (WHPX).
        self.exits_before = exit_timing == "before"
        #: True: intercepted CPUID and RDMSR/WRMSR exit before the instruction (WHPX).
        self.intercepts_before = intercept_timing == "before"
        uc = _uc.unicorn()
        self._u = uc
        self._closed = False
        self.coherent_code = coherent_code
        #: See :data:`HypercallHandler`; aarch64 only.
        self.hypercall_handler: HypercallHandler | None = None
        self._mappings: list[_Mapping] = []
        # One exit object per kind, refilled on every run (pyvmm.exits' rule).
        self._mmio = MmioExit()
        self._buffer = bytearray(8)
        self._views = {n: memoryview(self._buffer)[:n] for n in (1, 2, 4, 8)}
        self._hlt = HltExit()
        self._interrupted = InterruptedExit()
        self._debug = DebugExit()
        self._last: VcpuExit | None = None
        self._last_access: _Access | None = None
        # Run-state shared with other threads (kick, memory changes).
        self._lock = threading.Lock()
        self._running = False
        self._run_thread: int | None = None
        self._kicked = False
        self._ops: list[tuple[Callable[[], None], threading.Event, list[BaseException]]] = []
        self._watchdog: threading.Thread | None = None
        # MMIO: the accesses of the instruction that is waiting to be re-executed,
        # and accesses to report before the guest runs again.
        self._log: list[_Access] = []
        self._queue: deque[_Access] = deque()
        self._replay_new: list[_Access] = []
        self._replay_used: dict[int, bool] = {}
        self._replay_pages: dict[int, _Mapping | None] = {}
        # What the hooks saw during the current slice.
        self._stop = Stop.NONE
        self._stop_access: _Access | None = None
        self._stop_value = 0
        # Debugging.
        self._single_step = False
        self._breakpoints: dict[int, int] = {}
        self._resume_breakpoint: int | None = None
        self._idle_slices = 0

        if self.arch is Arch.X86_64:
            from pyvmm.softcpu._x86 import X86Isa

            self._uc: Any = uc.Uc(uc.UC_ARCH_X86, uc.UC_MODE_64)
            x86 = X86Isa(_Link(self), uc, self._uc)
            x86.intercept = wanted
            x86.exits_before = self.exits_before
            x86.intercepts_before = self.intercepts_before
            x86.string_batch = string_batch
            self._isa: Isa = x86
        else:
            from pyvmm.softcpu._aarch64 import Aarch64Isa

            self._uc = uc.Uc(uc.UC_ARCH_ARM64, uc.UC_MODE_ARM)
            self._isa = Aarch64Isa(_Link(self), uc, self._uc)
        # No end address: unicorn translates the one emu_start is given through
        # the guest's MMU when a run ends, and under x86 paging the
        # (non-canonical) UNREACHABLE raised a #GP there, unseen -- QEMU then
        # took the guest's next #GP or #PF for a double fault.  With the exit
        # list enabled and empty, emu_start ignores its end address.
        self._uc.ctl_exits_enabled(True)
        self._uc.ctl_set_exits([])
        memory_events = (
            uc.UC_HOOK_MEM_READ_UNMAPPED
            | uc.UC_HOOK_MEM_WRITE_UNMAPPED
            | uc.UC_HOOK_MEM_FETCH_UNMAPPED
            | uc.UC_HOOK_MEM_WRITE_PROT
        )
        self._uc.hook_add(memory_events, self._on_memory_fault)
        self._uc.hook_add(uc.UC_HOOK_INTR, self._on_interrupt)
        self._uc.hook_add(uc.UC_HOOK_INSN_INVALID, self._on_invalid)
        self._isa.install()

    # --- lifetime ---------------------------------------------------------------
    def close(self) -> None:
        """Release the emulator.  The memory mapped into it is the owner's and stays."""
        with self._lock:
            if self._closed:
                return
            if self._running:
                raise VmStateError("the software CPU is running; kick it and let run() return first")
            self._closed = True
        self._uc = None

    def __enter__(self) -> SoftCpu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise VmStateError("the software CPU is closed")

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._mappings)} regions"
        return f"SoftCpu({self.arch.value}, {state})"

    # --- guest memory -------------------------------------------------------------
    def map_region(self, region: RamRegion) -> None:
        """Map a core :class:`~pyvmm.memory.RamRegion` zero-copy: the guest uses
        the region's host pages.  A read-only region is mapped without write
        permission, so a guest write to it ends ``run()`` with an MMIO write exit
        and the memory keeps its contents."""
        self.map_host(
            region.guest_phys_addr,
            region.size,
            region.host_addr,
            read_only=region.read_only,
            log_dirty=region.log_dirty,
        )

    def map_host(
        self, guest_phys_addr: int, size: int, host_addr: int, *, read_only: bool = False, log_dirty: bool = False
    ) -> None:
        """Map ``size`` bytes of this process's memory at ``host_addr`` as guest RAM
        at ``guest_phys_addr`` (both page-aligned).  The memory must stay mapped
        until :meth:`unmap`.  ``log_dirty`` records written pages for
        :meth:`dirty_log` (every guest write to the region then costs a callback)."""
        self._check_open()
        if guest_phys_addr & _PAGE_MASK or size & _PAGE_MASK or size <= 0 or host_addr & _PAGE_MASK:
            raise ConfigError(
                f"softcpu: region {guest_phys_addr:#x}+{size:#x} at host {host_addr:#x} is not page-aligned"
            )
        mapping = _Mapping(guest_phys_addr, size, host_addr, read_only)
        self._on_vcpu_thread(lambda: self._do_map(mapping, log_dirty))

    def _do_map(self, mapping: _Mapping, log_dirty: bool) -> None:
        u = self._u
        for other in self._mappings:
            if mapping.guest_phys_addr < other.end and other.guest_phys_addr < mapping.end:
                raise HypervisorError(
                    "uc_mem_map_ptr",
                    errno.EEXIST,
                    f"{mapping.guest_phys_addr:#x}+{mapping.size:#x} overlaps "
                    f"{other.guest_phys_addr:#x}+{other.size:#x}",
                )
        try:
            self._uc.mem_map_ptr(mapping.guest_phys_addr, mapping.size, self._perms(mapping), mapping.host_addr)
        except u.UcError as exc:
            raise HypervisorError("uc_mem_map_ptr", errno.EINVAL, str(exc)) from exc
        if log_dirty:
            mapping.dirty = bytearray((mapping.size // PAGE_SIZE + 7) // 8)
            mapping.dirty_hook = self._uc.hook_add(
                u.UC_HOOK_MEM_WRITE, self._on_dirty_write, mapping, mapping.guest_phys_addr, mapping.end - 1
            )
            self._uc.ctl_flush_tb()  # code translated before the hook would bypass it
        self._mappings.append(mapping)
        self._mappings.sort(key=lambda m: m.guest_phys_addr)

    def _perms(self, mapping: _Mapping) -> int:
        u = self._u
        perms: int = u.UC_PROT_READ | u.UC_PROT_EXEC
        return perms if mapping.read_only else perms | u.UC_PROT_WRITE

    def unmap_region(self, region: RamRegion) -> None:
        """Undo :meth:`map_region`."""
        self.unmap(region.guest_phys_addr, region.size)

    def unmap(self, guest_phys_addr: int, size: int) -> None:
        """Remove a mapping made by :meth:`map_host` (same address and size).
        Returns once the emulator no longer references the host memory."""
        self._check_open()
        self._on_vcpu_thread(lambda: self._do_unmap(guest_phys_addr, size))

    def _do_unmap(self, guest_phys_addr: int, size: int) -> None:
        mapping = next(
            (m for m in self._mappings if m.guest_phys_addr == guest_phys_addr and m.size == size),
            None,
        )
        if mapping is None:
            raise HypervisorError("uc_mem_unmap", errno.ENOENT, f"no mapping at {guest_phys_addr:#x}+{size:#x}")
        try:
            self._uc.mem_unmap(guest_phys_addr, size)
        except self._u.UcError as exc:
            raise HypervisorError("uc_mem_unmap", errno.EINVAL, str(exc)) from exc
        if mapping.dirty_hook is not None:
            self._uc.hook_del(mapping.dirty_hook)
        self._mappings.remove(mapping)
        # Translations of code from the region must not outlive it.
        self._uc.ctl_flush_tb()

    def dirty_log(self, guest_phys_addr: int) -> bytes:
        """The bitmap of pages written since the last call (bit n = page n) of the
        region mapped with ``log_dirty`` at ``guest_phys_addr``, and reset it."""
        self._check_open()
        for mapping in self._mappings:
            if mapping.guest_phys_addr == guest_phys_addr and mapping.dirty is not None:
                bitmap = bytes(mapping.dirty)
                mapping.dirty[:] = bytes(len(mapping.dirty))
                return bitmap
        raise ConfigError(f"softcpu: no region mapped with log_dirty at {guest_phys_addr:#x}")

    def _mapping_at(self, gpa: int) -> _Mapping | None:
        for mapping in self._mappings:
            if mapping.guest_phys_addr <= gpa < mapping.end:
                return mapping
        return None

    def _ram_mapping(self, gpa: int, size: int, write: bool) -> _Mapping | None:
        mapping = self._mapping_at(gpa)
        if mapping is None or gpa + size > mapping.end or (write and mapping.read_only):
            return None
        return mapping

    def _write_ram(self, gpa: int, data: bytes) -> bool:
        """Write guest RAM on the guest's behalf (host pages, zero-copy), logging
        the pages as the guest's own writes would be."""
        mapping = self._ram_mapping(gpa, len(data), True)
        if mapping is None:
            return False
        ctypes.memmove(mapping.host_addr + (gpa - mapping.guest_phys_addr), data, len(data))
        if mapping.dirty is not None and data:
            self._on_dirty_write(self._uc, 0, gpa, len(data), 0, mapping)
        return True

    def invalidate_code(self) -> None:
        """Forget translated code (after the owner rewrote guest code in place)."""
        self._check_open()
        self._uc.ctl_flush_tb()

    def read_physical(self, gpa: int, size: int) -> bytes | None:
        """Read guest-physical memory the emulator can see, or None where it cannot."""
        self._check_open()
        try:
            return bytes(self._uc.mem_read(gpa, size))
        except self._u.UcError:
            return None

    def read_virtual(self, address: int, size: int) -> bytes | None:
        """Read guest-virtual memory through the guest's current translation (its
        page tables, if paging is on), or None where some of it is not mapped."""
        out = bytearray()
        while size > 0:
            chunk = min(size, PAGE_SIZE - (address & _PAGE_MASK))
            gpa = _uc.vmem_translate(self._uc, address, self._u.UC_PROT_READ)
            data = None if gpa is None else self.read_physical(gpa, chunk)
            if data is None:
                return None
            out += data
            address += chunk
            size -= chunk
        return bytes(out)

    # --- registers: x86 ---------------------------------------------------------------
    def get_regs(self) -> Regs:
        """x86 general-purpose registers, RIP and RFLAGS."""
        return self._x86("get_regs").get_regs()

    def set_regs(self, regs: Regs) -> None:
        self._x86("set_regs").set_regs(regs)

    def get_fpu(self) -> Fpu:
        """x86 x87/SSE registers, in FXSAVE's layout (:class:`~pyvmm.arch.x86_64_extra_state.Fpu`)."""
        return self._x86("get_fpu").get_fpu()

    def set_fpu(self, fpu: Fpu) -> None:
        self._x86("set_fpu").set_fpu(fpu)

    def get_debug_regs(self) -> DebugRegs:
        """x86 DR0-DR3, DR6 and DR7 (kept, not acted on: see :meth:`set_guest_debug`)."""
        return self._x86("get_debug_regs").get_debug_regs()

    def set_debug_regs(self, debug: DebugRegs) -> None:
        self._x86("set_debug_regs").set_debug_regs(debug)

    def get_sregs(self) -> Sregs:
        """x86 segment and control registers (see the module notes on what the
        descriptor caches can hold)."""
        return self._x86("get_sregs").get_sregs()

    def set_sregs(self, sregs: Sregs) -> None:
        """Set the x86 CPU mode, control and segment registers.

        Every segment's hidden descriptor cache is set as ``sregs`` gives it
        (real mode, 16-bit and non-flat protected mode included).

        :raises ConfigError: a state the CPU cannot be in (long mode without
            CR4.PAE, real mode with paging); with a unicorn whose hidden state
            could not be found, also real mode, 16-bit protected mode and
            segments with a non-zero base outside 64-bit mode.
        """
        self._x86("set_sregs").set_sregs(sregs)

    # --- x86 events: interrupts from the VMM ------------------------------------------
    def ready_for_interrupt(self) -> bool:
        """Whether an external interrupt injected now is taken before the next
        instruction: the vCPU has run, RFLAGS.IF is set, no STI/MOV SS shadow, and
        no injected vector waits."""
        return self._x86("ready_for_interrupt").ready_for_interrupt()

    def inject_interrupt(self, vector: int) -> None:
        """Deliver external interrupt ``vector`` through the guest's IVT (real
        mode) or IDT on the next run, as soon as the guest is interruptible."""
        self._x86("inject_interrupt").inject_interrupt(vector)

    def inject_nmi(self) -> None:
        """Make an NMI pending: taken (vector 2) regardless of IF unless an NMI
        handler is still running (NMIs stay blocked until its IRET)."""
        self._x86("inject_nmi").inject_nmi()

    def request_interrupt_window(self, requested: bool) -> None:
        """While requested, :meth:`run` returns an
        :class:`~pyvmm.exits.IrqWindowOpenExit` as soon as the guest is
        interruptible (past STI's shadow).  Until the window opens the guest is
        single-stepped."""
        self._x86("request_interrupt_window").request_interrupt_window(requested)

    def inject_exception(self, vector: int, error_code: int | None = None, *, cr2: int | None = None) -> None:
        """Deliver exception ``vector`` (0-31, not 2) through the guest's IDT
        (or IVT) at the next run, before any NMI or interrupt and whatever IF
        says, as a hypervisor's event injection does.  ``error_code`` is pushed
        in protected and long mode (give it for the vectors that have one:
        #DF, #TS, #NP, #SS, #GP, #PF, #AC, ...); ``cr2`` is a #PF's address,
        written to CR2 on delivery.  The return address is RIP as it is then.
        A second call before the run replaces the first."""
        self._x86("inject_exception").inject_exception(vector, error_code, cr2)

    def get_vcpu_events(self) -> VcpuEvents:
        """x86 pending events as a :class:`~pyvmm.arch.x86_64.VcpuEvents`: an
        injected exception not yet delivered, an injected interrupt waiting
        for IF, the interrupt shadow (STI or MOV SS), NMI pending/blocked."""
        return self._x86("get_vcpu_events").get_vcpu_events()

    def set_vcpu_events(self, events: VcpuEvents) -> None:
        """Replace the x86 pending events (fields that are None keep theirs).

        :raises ConfigError: SMM, SIPI, a pending triple fault or a software
            interrupt, which the software CPU has no state for.
        """
        self._x86("set_vcpu_events").set_vcpu_events(events)

    def x86_events(self) -> tuple[int | None, bool, bool, bool]:
        """(injected vector not yet taken, NMI pending, NMI blocked, interrupt shadow)."""
        return self._x86("x86_events").get_events()

    def set_x86_nmi(self, *, pending: bool | None = None, masked: bool | None = None) -> None:
        """Set the NMI pending / blocked state (None keeps it)."""
        self._x86("set_x86_nmi").set_nmi(pending=pending, masked=masked)

    def _x86(self, what: str) -> X86Isa:
        self._check_open()
        from pyvmm.softcpu._x86 import X86Isa

        if not isinstance(self._isa, X86Isa):
            raise ConfigError(f"softcpu: {what} is for x86_64 guests; this vCPU runs {self.arch.value}")
        return self._isa

    # --- registers: aarch64 -------------------------------------------------------------
    def get_one_reg(self, reg_id: int) -> int:
        """An aarch64 register by its KVM "one reg" id (:mod:`pyvmm.arch.aarch64`)."""
        return self._aarch64("get_one_reg").get_one_reg(reg_id)

    def set_one_reg(self, reg_id: int, value: int) -> None:
        self._aarch64("set_one_reg").set_one_reg(reg_id, value)

    def get_core_regs(self) -> CoreRegs:
        """aarch64 X0..X30, the current SP, PC and PSTATE."""
        return self._aarch64("get_core_regs").get_core_regs()

    def set_core_regs(self, regs: CoreRegs) -> None:
        self._aarch64("set_core_regs").set_core_regs(regs)

    def attach_gic(self, cpu: GicCpu) -> None:
        """aarch64: connect this vCPU to its GICv3 CPU interface and virtual
        timer (:mod:`pyvmm.softcpu.gic`).  From then on the ICC_* and CNTV_*
        system registers are the GIC's, an IRQ it signals is taken through the
        guest's VBAR_EL1 vectors when PSTATE.I allows, and WFI returns a
        :class:`~pyvmm.exits.HltExit` only while no interrupt is signalled.
        The owner routes guest MMIO to the distributor/redistributors
        (:meth:`pyvmm.softcpu.gic.Gic.mmio_read`) and kicks a running vCPU
        after raising an interrupt from another thread."""
        self._aarch64("a GIC").attach_gic(cpu)

    def irq_signalled(self) -> bool:
        """aarch64 with a GIC: an interrupt waits for this vCPU (WFI would wake)."""
        return self._aarch64("irq_signalled").irq_signalled()

    def _aarch64(self, what: str) -> Aarch64Isa:
        self._check_open()
        from pyvmm.softcpu._aarch64 import Aarch64Isa

        if not isinstance(self._isa, Aarch64Isa):
            raise ConfigError(f"softcpu: {what} is for aarch64 guests; this vCPU runs {self.arch.value}")
        return self._isa

    def init(self, boot: VcpuInit) -> None:
        """Apply a boot register record from :mod:`pyvmm.boot`."""
        self._check_open()
        if isinstance(boot, X86VcpuInit):
            self._x86("an x86 boot state").init(boot)
        elif isinstance(boot, Aarch64VcpuInit):
            self._aarch64("an aarch64 boot state").init(boot)
        else:
            raise ConfigError(f"softcpu: unknown boot state {type(boot).__name__}")
        self._forget_pending()

    @property
    def pc(self) -> int:
        """The guest's program counter (x86: RIP)."""
        self._check_open()
        return self._isa.pc()

    # --- debugging ------------------------------------------------------------------------
    def set_guest_debug(self, single_step: bool, breakpoints: list[int]) -> None:
        """Stop with a :class:`~pyvmm.exits.DebugExit` after every instruction
        and/or before executing any of ``breakpoints`` (guest-virtual PCs)."""
        self._check_open()
        self._single_step = single_step
        wanted = set(breakpoints)
        for address in list(self._breakpoints):
            if address not in wanted:
                self._uc.hook_del(self._breakpoints.pop(address))
        for address in wanted - set(self._breakpoints):
            self._breakpoints[address] = self._uc.hook_add(
                self._u.UC_HOOK_CODE, self._on_breakpoint, None, address, address
            )
        # Code already translated was translated without the breakpoint hooks.
        self._uc.ctl_flush_tb()

    # --- running ---------------------------------------------------------------------------
    def kick(self) -> None:
        """From any thread: make the current or next :meth:`run` return an
        :class:`~pyvmm.exits.InterruptedExit` promptly.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._kicked = True
            if self._running:
                self._request_stop()

    def _request_stop(self) -> None:
        # Called with the lock held.  unicorn drops a stop request made just
        # before it starts a slice, so a watchdog repeats it until the vCPU
        # thread has acted on it.
        self._uc.emu_stop()
        if self._watchdog is None or not self._watchdog.is_alive():
            self._watchdog = threading.Thread(target=self._watch, name="pyvmm-softcpu-kick", daemon=True)
            self._watchdog.start()

    def _watch(self) -> None:
        while True:
            time.sleep(_WATCHDOG_PERIOD)
            with self._lock:
                if self._closed or not self._running or not (self._kicked or self._ops):
                    return
                self._uc.emu_stop()

    def _take_kick(self) -> bool:
        with self._lock:
            kicked, self._kicked = self._kicked, False
            return kicked

    def _on_vcpu_thread(self, operation: Callable[[], None]) -> None:
        errors: list[BaseException] = []
        with self._lock:
            if not self._running or self._run_thread == threading.get_ident():
                operation()
                return
            done = threading.Event()
            self._ops.append((operation, done, errors))
            self._request_stop()
        done.wait()
        if errors:
            raise errors[0]

    def _apply_ops(self) -> None:
        with self._lock:
            ops, self._ops = self._ops, []
        for operation, done, errors in ops:
            try:
                operation()
            except BaseException as exc:  # noqa: BLE001 - handed back to the calling thread
                errors.append(exc)
            finally:
                done.set()

    def run(self) -> VcpuExit:
        """Run the guest until the next exit and return it.

        The exit object belongs to this CPU and is refilled by the next run.  A
        read (port or MMIO) is completed by writing ``exit.data`` before the next
        call, which hands the data to the guest.
        """
        self._check_open()
        self._complete_last()
        if self._queue:
            return self._report(self._queue.popleft())
        with self._lock:
            # A kick stops the vCPU before it runs guest code, but an instruction
            # that reported an exit is finished first (its MMIO re-executed, its
            # port access completed), as KVM completes a pending I/O exit even
            # on a run that exits at once: the state read afterwards is the one
            # after the instruction, which a snapshot or a reset depends on.
            if self._kicked and not (self._log or self._isa.instruction_in_flight()):
                self._kicked = False
                return self._interrupted
            self._running = True
            self._run_thread = threading.get_ident()
        try:
            if self.coherent_code:
                self._uc.ctl_flush_tb()
            exit_ = self._run_loop()
        finally:
            with self._lock:
                self._running = False
                self._run_thread = None
            self._apply_ops()
        self._last = exit_
        return exit_

    def _run_loop(self) -> VcpuExit:
        while True:
            self._apply_ops()
            if self._log:
                exit_ = self._replay()
                if exit_ is None and self._queue:
                    exit_ = self._report(self._queue.popleft())
                if exit_ is None and self._single_step and not self._log:
                    exit_ = self._debug_exit(self._isa.pc())
                if exit_ is None and not self._log and self._take_kick():
                    exit_ = self._interrupted  # the instruction is done; the kick stops the rest
            else:
                exit_ = self._emulate()
            if exit_ is not None:
                return exit_

    def _clear_stop(self) -> None:
        self._stop = Stop.NONE
        self._stop_access = None
        self._stop_value = 0

    def _emulate(self) -> VcpuExit | None:
        pc = self._isa.pc()
        if self._resume_breakpoint is not None and self._resume_breakpoint != pc:
            self._resume_breakpoint = None
        self._clear_stop()
        # Kicked with an instruction in flight (run()): finish that one alone.
        finishing = self._kicked and self._isa.instruction_in_flight()
        early = self._isa.before_run()
        if early is not None:
            return early
        pc = self._isa.pc()
        self._isa.before_slice()
        count = 1 if self._single_step or finishing else self._isa.slice_budget(RUN_BUDGET)
        try:
            self._uc.emu_start(pc, UNREACHABLE, 0, count)
        except self._u.UcError as exc:
            return self._after_error(exc, pc)
        return self._after_slice(pc)

    def _after_error(self, exc: Exception, pc: int) -> VcpuExit | None:
        if self._stop is Stop.MEMORY and self._stop_access is not None and self.exits_before:
            return self._report_before(self._stop_access)
        if self._stop is Stop.MEMORY and self._stop_access is not None:
            self._log.append(self._stop_access)
            return self._report(self._stop_access)
        if self._stop is Stop.FETCH:
            return self._internal_error(
                f"instruction fetch from {self._stop_value:#x}, which no RAM backs", self._isa.pc()
            )
        if self._stop is Stop.INVALID:
            return self._isa.invalid_instruction_exit(self._isa.pc())
        return self._internal_error(f"unicorn stopped the guest: {exc}", self._isa.pc())

    def _after_slice(self, start_pc: int) -> VcpuExit | None:
        stop = self._stop
        if stop is Stop.PORT:
            return self._isa.port_exit()
        if stop is Stop.INTERRUPT:
            return self._isa.interrupt_exit(self._stop_value)
        if stop is Stop.ISA:
            return self._isa.isa_exit()
        if stop is Stop.BREAKPOINT:
            self._resume_breakpoint = self._stop_value
            return self._debug_exit(self._stop_value)
        if self._isa.halted(start_pc if self._single_step else None):
            return self._hlt
        quiet = self._isa.after_quiet_slice(start_pc)
        if quiet is not None:
            return quiet
        if self._single_step:
            return self._debug_exit(self._isa.pc())
        if self._take_kick():
            return self._interrupted
        # A stop nobody asked for: a stale stop request, normally, and the next
        # slice goes on.  unicorn 2.1 can also return at once, forever, without
        # executing anything (seen: #UD after the host rewrote code and it was
        # re-translated); that must become an exit, not a hang.
        if self._isa.pc() != start_pc or self._isa.budget_limited:
            self._idle_slices = 0
            return None
        self._idle_slices += 1
        if self._idle_slices < _MAX_IDLE_SLICES:
            return None
        self._idle_slices = 0
        return self._internal_error(
            f"unicorn returned {_MAX_IDLE_SLICES} times without executing the instruction at {start_pc:#x}",
            start_pc,
        )

    def _debug_exit(self, pc: int) -> DebugExit:
        self._debug.pc = pc
        self._debug.exception = self._isa.debug_exception
        return self._debug

    def _internal_error(self, description: str, pc: int, data: tuple[int, ...] = ()) -> InternalErrorExit:
        instruction = self.read_virtual(pc, self._isa.max_instruction) or b""
        return InternalErrorExit(INTERNAL_ERROR_EMULATION, instruction, data, description)

    # --- MMIO --------------------------------------------------------------------------------
    def _report(self, access: _Access) -> MmioExit:
        exit_ = self._mmio
        exit_.address = access.address
        exit_.size = access.size
        exit_.is_write = access.is_write
        data = self._views[access.size]
        data[:] = access.value.to_bytes(access.size, "little") if access.is_write else bytes(access.size)
        exit_.data = data
        exit_.instruction = b""
        exit_.gva = None
        self._last = exit_
        self._last_access = access
        return exit_

    def _report_before(self, access: _Access) -> MmioExit:
        """An MMIO exit before the instruction: nothing waits for re-execution;
        the VMM completes the instruction and moves RIP past it."""
        exit_ = self._report(access)
        exit_.instruction, exit_.gva = self._isa.describe_access(access.address)
        self._last_access = None
        return exit_

    def _instruction_length(self, pc: int) -> int:
        """Run the instruction at ``pc`` once more with a code hook that sees
        its length, then put every register back (it faults again or is undone)."""
        u = self._u
        sizes: list[int] = []

        def on_code(uc: Any, _address: int, size: int, _data: Any) -> None:
            sizes.append(size)
            uc.emu_stop()

        saved = (self._stop, self._stop_access, self._stop_value)
        context = self._uc.context_save()
        hook = self._uc.hook_add(u.UC_HOOK_CODE, on_code)
        self._uc.ctl_remove_cache(pc, pc + 1)
        try:
            self._uc.emu_start(pc, UNREACHABLE, 0, 1)
        except u.UcError:
            pass
        finally:
            self._uc.hook_del(hook)
            self._uc.context_restore(context)
            self._uc.ctl_remove_cache(pc, pc + 1)
            self._stop, self._stop_access, self._stop_value = saved
        return sizes[0] if sizes else 0

    def _complete_last(self) -> None:
        last, self._last = self._last, None
        if last is None:
            return
        if last is self._mmio:
            access, self._last_access = self._last_access, None
            if access is not None and not access.is_write:
                access.value = int.from_bytes(self._mmio.data[: access.size], "little")
                access.done = True
        else:
            self._isa.complete(last)

    def _forget_pending(self) -> None:
        """The VMM moved the guest elsewhere: nothing waits for re-execution."""
        self._log.clear()
        self._queue.clear()
        self._last = None
        self._last_access = None
        self._isa.forget_pending()

    def _replay(self) -> VcpuExit | None:
        """Re-execute the instruction whose MMIO accesses were reported.

        The pages it touched are mapped, for one instruction, as scratch RAM
        holding the data the VMM supplied (or a copy of the read-only page), and
        a memory hook checks every access against the log.  Scratch RAM rather
        than unicorn's MMIO regions because those split 8-byte accesses in two.

        Every access of the instruction has to be answered in one go, so an
        instruction with several MMIO accesses is re-executed until none of them
        is new; its registers are rolled back in between.  Writes found during a
        re-execution that completes are reported after it.
        """
        u = self._u
        pages: set[int] = set()
        for access in self._log:
            pages.add(access.address & ~_PAGE_MASK)
            pages.add((access.address + access.size - 1) & ~_PAGE_MASK)
        for page in pages:
            mapping = self._mapping_at(page)
            if mapping is not None and not mapping.read_only:
                # RAM appeared where the MMIO was: let the instruction use it.
                self._log.clear()
                return None
        context = self._uc.context_save()
        self._replay_pages = {}
        self._replay_used = {id(a): False for a in self._log}
        self._replay_new = []
        hook = None
        try:
            for page in sorted(pages):
                mapping = self._mapping_at(page)
                scratch = bytearray(PAGE_SIZE)
                if mapping is not None:
                    scratch[:] = self._read_host(mapping, page, PAGE_SIZE)
                    self._uc.mem_unmap(page, PAGE_SIZE)
                self._replay_pages[page] = mapping
                self._uc.mem_map(page, PAGE_SIZE, u.UC_PROT_READ | u.UC_PROT_WRITE)
                for access in self._log:
                    if not access.is_write:
                        data = access.value.to_bytes(access.size, "little")
                        for i, byte in enumerate(data):
                            if (access.address + i) & ~_PAGE_MASK == page:
                                scratch[(access.address + i) & _PAGE_MASK] = byte
                self._uc.mem_write(page, bytes(scratch))
            hook = self._uc.hook_add(
                u.UC_HOOK_MEM_READ | u.UC_HOOK_MEM_WRITE,
                self._on_replay_access,
                None,
                min(pages),
                max(pages) + PAGE_SIZE - 1,
            )
            # A translation of the instruction made before the hook existed
            # would not call it.
            pc = self._isa.pc()
            self._uc.ctl_remove_cache(pc, pc + 1)
            self._clear_stop()
            self._isa.before_slice()
            aborted = False
            try:
                self._uc.emu_start(pc, UNREACHABLE, 0, 1)
            except u.UcError:
                aborted = True
        finally:
            if hook is not None:
                self._uc.hook_del(hook)
            for page, mapping in self._replay_pages.items():
                self._uc.mem_unmap(page, PAGE_SIZE)
                if mapping is not None:
                    host = mapping.host_addr + (page - mapping.guest_phys_addr)
                    self._uc.mem_map_ptr(page, PAGE_SIZE, self._perms(mapping), host)
            self._replay_pages = {}
        used = self._replay_used
        new = self._replay_new
        if aborted:
            if self._stop is not Stop.MEMORY or self._stop_access is None:
                self._uc.context_restore(context)
                self._log.clear()
                return self._after_error(RuntimeError("the re-executed MMIO instruction faulted"), self._isa.pc())
            new.append(self._stop_access)
        executed = bool(new) or any(used.values())
        if not executed:
            self._uc.context_restore(context)
            if self._take_kick():
                return self._interrupted
            self._log.clear()  # the guest was moved: run it afresh
            return None
        if aborted or any(not a.is_write for a in new) or not all(used.values()):
            self._uc.context_restore(context)
            if not new:
                self._log.clear()
                return None
            first_read = next((i for i, a in enumerate(new) if not a.is_write), len(new) - 1)
            report = new[: first_read + 1]
            self._log.extend(report)
            self._queue.extend(report[1:])
            return self._report(report[0])
        self._log.clear()
        self._queue.extend(new)  # the instruction retired: its other writes, in order
        if self._stop is Stop.PORT:
            return self._isa.port_exit()
        if self._stop is Stop.INTERRUPT:
            return self._isa.interrupt_exit(self._stop_value)
        if self._stop is Stop.ISA:
            return self._isa.isa_exit()
        return None

    def _on_replay_access(self, _uc_: Any, kind: int, address: int, size: int, value: int, _data: Any) -> None:
        page = address & ~_PAGE_MASK
        if page not in self._replay_pages:
            return
        is_write = kind == self._u.UC_MEM_WRITE
        value = value & ((1 << (8 * size)) - 1) if is_write else 0
        for access in self._log:
            if (
                access.is_write == is_write
                and access.address == address
                and access.size == size
                and (not is_write or access.value == value)
                and not self._replay_used[id(access)]
            ):
                self._replay_used[id(access)] = True
                return
        if not is_write and self._replay_pages[page] is not None:
            return  # a read of the read-only RAM page itself sees its contents
        self._replay_new.append(_Access(address, size, is_write, value))

    @staticmethod
    def _read_host(mapping: _Mapping, gpa: int, size: int) -> bytes:
        return ctypes.string_at(mapping.host_addr + (gpa - mapping.guest_phys_addr), size)

    # --- hooks (called by unicorn on the vCPU thread, inside emu_start) ---------------------
    def _on_memory_fault(self, _uc_: Any, access: int, address: int, size: int, value: int, _data: Any) -> bool:
        u = self._u
        if access == u.UC_MEM_FETCH_UNMAPPED:
            self._stop = Stop.FETCH
            self._stop_value = address
            return False
        is_write = access in (u.UC_MEM_WRITE_UNMAPPED, u.UC_MEM_WRITE_PROT)
        self._stop = Stop.MEMORY
        self._stop_access = _Access(address, size, is_write, value if is_write else 0)
        return False

    def _on_interrupt(self, uc: Any, intno: int, _data: Any) -> None:
        self._stop = Stop.INTERRUPT
        self._stop_value = intno
        self._isa.at_interrupt(intno)
        uc.emu_stop()

    def _on_invalid(self, _uc_: Any, _data: Any) -> bool:
        self._stop = Stop.INVALID
        return False

    def _on_breakpoint(self, uc: Any, address: int, _size: int, _data: Any) -> None:
        if self._resume_breakpoint == address:
            # Resuming from this breakpoint: execute it once.
            self._resume_breakpoint = None
            return
        self._stop = Stop.BREAKPOINT
        self._stop_value = address
        uc.emu_stop()

    @staticmethod
    def _on_dirty_write(_uc_: Any, _access: int, address: int, size: int, _value: int, mapping: _Mapping) -> None:
        bitmap = mapping.dirty
        if bitmap is None:
            return
        first = (address - mapping.guest_phys_addr) // PAGE_SIZE
        last = (address + size - 1 - mapping.guest_phys_addr) // PAGE_SIZE
        for page in range(first, min(last, mapping.size // PAGE_SIZE - 1) + 1):
            bitmap[page >> 3] |= 1 << (page & 7)


__all__ = ["EXIT_TIMINGS", "INTERCEPTS", "Conduit", "Hypercall", "HypercallHandler", "SoftCpu"]
