"""A KVM vCPU: its descriptor, the shared ``kvm_run`` page, and the exits.

The run loop reads the exit out of the mmapped ``kvm_run`` page with precompiled
``struct`` unpackers at offsets taken from the cffi layout (checked against the
kernel header by the layout test), and refills one exit object per kind, so a
port or MMIO exit allocates nothing but what ``struct.unpack_from`` returns.
Read data is completed in place: ``exit.data`` is a view of the run page itself.
Accesses to the VM's served registers (:mod:`pyvmm_kvm.served`) are answered in
the run loop and never returned: by ``fx_run`` in C where
:mod:`pyvmm_kvm.fast_exits` found the compiled module, else in :meth:`_run_once`.
The page, the kick and the thread rules are the backend kit's
(:class:`~pyvmm.backend.RunPage`, :class:`~pyvmm.backend.SignalKicker`).

Its public methods are the backend's vCPU hooks (``docs/backends/kvm.md`` §4).
"""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING, Any

from pyvmm.arch import x86_64
from pyvmm.arch.x86_64 import CpuidEntry, MpState, MsrEntry
from pyvmm.boot import VcpuInit, X86VcpuInit
from pyvmm.errors import ConfigError, HypervisorError, MsrAccessError, UnknownExitError
from pyvmm.exits import (
    DebugExit,
    ExceptionExit,
    FailEntryExit,
    GenericExit,
    HltExit,
    HypercallExit,
    InternalErrorExit,
    InterruptedExit,
    IoapicEoiExit,
    IoExit,
    IrqWindowOpenExit,
    MmioExit,
    MsrAccessExit,
    OtherExit,
    ShutdownExit,
    SystemEvent,
    SystemEventExit,
    VcpuExit,
)
from pyvmm.prepared_state import SavedVcpuState
from pyvmm.vcpu_state import StateKind
from pyvmm_kvm import bindings as k
from pyvmm_kvm import prepared_state, regs
from pyvmm_kvm.bindings import ffi
from pyvmm_kvm.served import ServedRanges
from pyvmm_kvm.vcpu_common import RUN_STRUCT, KvmVcpuCommon

if TYPE_CHECKING:
    # Built through ``x86_64`` only when read (loaded on first use there: a start-up cost).
    from pyvmm.arch.x86_64_extra_state import VcpuEvents, Xsave

_RUN = RUN_STRUCT
_OFF_EXIT_REASON = ffi.offsetof(_RUN, "exit_reason")
_OFF_UNION = ffi.offsetof(_RUN, "io")
_OFF_REQUEST_INTERRUPT_WINDOW = ffi.offsetof(_RUN, "request_interrupt_window")
_OFF_READY_FOR_INTERRUPT = ffi.offsetof(_RUN, "ready_for_interrupt_injection")
_OFF_IF_FLAG = ffi.offsetof(_RUN, "if_flag")

# exit_reason and the exit's union member in one unpack: the hot path's
# single biggest cost after the ioctl itself is the number of Python calls.
_GAP = _OFF_UNION - _OFF_EXIT_REASON - 4
_HEAD_IO = struct.Struct(f"<I{_GAP}xBBHIQ")  # reason; direction, size, port, count, data_offset
_HEAD_MMIO = struct.Struct(f"<I{_GAP}xQ8xIB")  # reason; phys_addr, (data), len, is_write
_EXIT_IO = k.KVM_EXIT_IO
_EXIT_MMIO = k.KVM_EXIT_MMIO
_IO_OUT = k.KVM_EXIT_IO_OUT
_HW_REASON = struct.Struct("<Q")
_RUN_REQUEST = int(k.KVM_RUN)

_SYSTEM_EVENTS = {
    k.KVM_SYSTEM_EVENT_SHUTDOWN: SystemEvent.SHUTDOWN,
    k.KVM_SYSTEM_EVENT_RESET: SystemEvent.RESET,
    k.KVM_SYSTEM_EVENT_CRASH: SystemEvent.CRASH,
}


#: Where the XSAVE header (XSTATE_BV first) starts in the standard-format image,
#: after the 512-byte legacy FXSAVE area (SDM vol. 1 §13.4).
XSAVE_HEADER_OFFSET = 512
#: XSTATE_BV's x87 (bit 0) and SSE (bit 1) components.
XFEATURE_X87_SSE = 0b11


class KvmVcpu(KvmVcpuCommon):
    """One vCPU of a :class:`pyvmm_kvm.vm.KvmVm`."""

    def __init__(self, vm: Any, index: int, mmap_size: int) -> None:
        page = self._open(vm, index, mmap_size, ffi, None)
        self._view = page.view
        # One exit object per kind, refilled on every run.  The debug, hypercall
        # and MSR exits are made at the first such exit: most VMs never see one,
        # and every object made here is a cost of every VM created.
        self._io = IoExit()
        self._mmio = MmioExit()
        self._hlt = HltExit()
        self._interrupted = InterruptedExit()
        self._debug: DebugExit | None = None
        self._hypercall: HypercallExit | None = None
        self._msr: MsrAccessExit | None = None
        self._irq_window = IrqWindowOpenExit()
        self._io_views: dict[int, memoryview] = {}
        self._mmio_views = self.page.mmio_views
        self._pending: VcpuExit | None = None
        self._pure_served = 0
        self._use_entry(vm)
        self._guard_run(self._interrupted)

    def _use_entry(self, vm: Any) -> None:
        """How this vCPU enters the guest.  Compiled (``vm.compiled``): ``fx_run``,
        which answers the VM's served registers itself and returns 0 or
        ``-errno`` at the first exit it does not serve, counting the ones it did.
        Pure: the ``KVM_RUN`` ioctl alone, and :meth:`_run_once` answers them."""
        compiled = vm.compiled
        self._fx_run: Any = None
        self._fx_page: Any = None
        self._fx_table: Any = None
        self._fx_count: Any = None
        self._served: ServedRanges | None = vm.served
        if compiled is None:
            return
        self._served = None
        self._fx_table = vm.served.table
        self._fx_count = compiled.ffi.new("uint64_t *")
        self._fx_page = compiled.ffi.from_buffer(self._view)
        self._fx_run = compiled.lib.fx_run

    @property
    def served_exits(self) -> int:
        """Exits answered in the run loop as served registers, never returned."""
        return self._pure_served + (int(self._fx_count[0]) if self._fx_count is not None else 0)

    # --- run ------------------------------------------------------------------
    def _run_once(self) -> VcpuExit:
        pending = self._pending
        if pending is not None:
            self._complete(pending)
        served = self._served  # the pure path's served registers (None: compiled, answered in C)
        fx_run = self._fx_run
        while True:
            if fx_run is not None:
                result = fx_run(self.fd, self._fx_page, self._fx_table, self._fx_count)
            else:
                result = self._ioctl(self.fd, _RUN_REQUEST, 0)
            if result < 0:
                err = -result if fx_run is not None else self._errno_of(result)  # fx_run returns -errno
                if err in (errno.EINTR, errno.EAGAIN):
                    self.page.clear_immediate_exit()
                    return self._interrupted
                raise HypervisorError("KVM_RUN", err)
            view = self._view
            reason, direction, size, port, count, data_offset = _HEAD_IO.unpack_from(view, _OFF_EXIT_REASON)
            if reason == _EXIT_IO:
                io = self._io
                io.port, io.size, io.count = port, size, count
                io.is_write = direction == _IO_OUT
                nbytes = size * count
                key = data_offset << 32 | nbytes
                data = self._io_views.get(key)
                if data is None:
                    data = self._io_views[key] = view[data_offset : data_offset + nbytes]
                io.data = data
                if served is not None and served.ports and served.serve_port(io):
                    self._pure_served += 1
                    continue
                return io
            if reason == _EXIT_MMIO:
                _, address, length, is_write = _HEAD_MMIO.unpack_from(view, _OFF_EXIT_REASON)
                mmio = self._mmio
                mmio.address, mmio.size, mmio.is_write = address, length, bool(is_write)
                mmio.data = self._mmio_views[length]
                if served is not None and served.mmio and served.serve_mmio(mmio):
                    self._pure_served += 1
                    continue
                return mmio
            return self._slow_exit(reason)

    def _slow_exit(self, reason: int) -> VcpuExit:
        run = self._run
        if reason == k.KVM_EXIT_HLT:
            return self._hlt
        if reason == k.KVM_EXIT_INTR:
            return self._interrupted
        if reason == k.KVM_EXIT_SHUTDOWN:
            return ShutdownExit()
        if reason == k.KVM_EXIT_SYSTEM_EVENT:
            event = _SYSTEM_EVENTS.get(run.system_event.type)
            if event is None:
                raise UnknownExitError("KVM_RUN", reason)
            ndata = min(run.system_event.ndata, 16)
            return SystemEventExit(event, tuple(run.system_event.data[i] for i in range(ndata)))
        if reason == k.KVM_EXIT_INTERNAL_ERROR:
            return self._internal_error()
        if reason == k.KVM_EXIT_FAIL_ENTRY:
            return FailEntryExit(run.fail_entry.hardware_entry_failure_reason, run.fail_entry.cpu)
        if reason == k.KVM_EXIT_DEBUG:
            debug = self._debug
            if debug is None:
                debug = self._debug = DebugExit()
            arch = run.debug.arch
            debug.pc, debug.exception, debug.dr6, debug.dr7 = arch.pc, arch.exception, arch.dr6, arch.dr7
            return debug
        if reason == k.KVM_EXIT_EXCEPTION:
            return ExceptionExit(run.ex.exception, run.ex.error_code)
        if reason == k.KVM_EXIT_HYPERCALL:
            call = self._hypercall
            if call is None:
                call = self._hypercall = HypercallExit()
            call.number = run.hypercall.nr
            call.args = tuple(run.hypercall.args)
            call.result = 0
            self._pending = call
            return call
        if reason == k.KVM_EXIT_IRQ_WINDOW_OPEN:
            return self._irq_window
        if reason == k.KVM_EXIT_IOAPIC_EOI:
            return IoapicEoiExit(run.eoi.vector)
        if reason in (k.KVM_EXIT_X86_RDMSR, k.KVM_EXIT_X86_WRMSR):
            msr = self._msr
            if msr is None:
                msr = self._msr = MsrAccessExit()
            msr.index, msr.is_write = run.msr.index, reason == k.KVM_EXIT_X86_WRMSR
            msr.value, msr.error = run.msr.data, False
            self._pending = msr
            return msr
        if reason == k.KVM_EXIT_SET_TPR:
            return GenericExit(OtherExit.SET_TPR)
        if reason == k.KVM_EXIT_TPR_ACCESS:
            return GenericExit(OtherExit.TPR_ACCESS, (run.tpr_access.rip, run.tpr_access.is_write))
        if reason == k.KVM_EXIT_X86_BUS_LOCK:
            return GenericExit(OtherExit.BUS_LOCK)
        if reason == k.KVM_EXIT_UNKNOWN:
            raise UnknownExitError("KVM_RUN", _HW_REASON.unpack_from(self._view, _OFF_UNION)[0])
        raise UnknownExitError("KVM_RUN", reason)

    def _internal_error(self) -> InternalErrorExit:
        internal = self._run.internal
        suberror = internal.suberror
        ndata = min(internal.ndata, 16)
        data = tuple(internal.data[i] for i in range(ndata))
        instruction = b""
        if suberror == k.KVM_INTERNAL_ERROR_EMULATION:
            failure = self._run.emulation_failure
            if ndata >= 3 and failure.flags & k.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
                size = min(failure.insn_size, 15)
                instruction = bytes(failure.insn_bytes[0:size])
            else:
                instruction = self._instruction_at_rip()
        names = {
            k.KVM_INTERNAL_ERROR_EMULATION: "emulation failure",
            k.KVM_INTERNAL_ERROR_SIMUL_EX: "exception while delivering an exception",
            k.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failed",
            k.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected hardware exit",
        }
        return InternalErrorExit(suberror, instruction, data, names.get(suberror, f"suberror {suberror}"))

    def _instruction_at_rip(self) -> bytes:
        """Older kernels report no instruction bytes: read them from guest memory
        through KVM's own translation of CS:RIP."""
        try:
            raw_regs = self._get("struct kvm_regs *", k.KVM_GET_REGS)
            raw_sregs = self._get("struct kvm_sregs *", k.KVM_GET_SREGS)
            tr = ffi.new("struct kvm_translation *", {"linear_address": raw_sregs.cs.base + raw_regs.rip})
            self.host.ioctl(self.fd, k.KVM_TRANSLATE, tr)
            if not tr.valid:
                return b""
            return bytes(self.vm.read_guest(tr.physical_address, 15))
        except HypervisorError:
            pass
        return b""

    def _complete(self, pending: VcpuExit) -> None:
        """Hand results that do not live in the run page back before the next run."""
        self._pending = None
        run = self._run
        # Only this vCPU's own hypercall or MSR exit is ever pending.
        if isinstance(pending, HypercallExit):
            run.hypercall.ret = pending.result
        elif isinstance(pending, MsrAccessExit):
            run.msr.error = 1 if pending.error else 0
            if not pending.is_write:
                run.msr.data = pending.value

    # --- init and state -------------------------------------------------------
    def init(self, boot: VcpuInit) -> None:
        if not isinstance(boot, X86VcpuInit):
            raise ConfigError(f"KVM x86 vCPU {self.index} cannot take {type(boot).__name__}")
        if not boot.boot_cpu and self.vm.irqchip:
            return  # application processors wait for INIT/SIPI from the guest
        self.set_state(StateKind.SREGS, boot.sregs)
        self.set_state(StateKind.REGS, boot.regs)
        if boot.fpu is not None:
            self.set_state(StateKind.FPU, boot.fpu)
        if boot.msrs:
            self.set_msrs(boot.msrs)

    def _get(self, ctype: str, request: int) -> Any:
        raw = ffi.new(ctype)
        self.host.ioctl(self.fd, request, raw)
        return raw

    def get_state(self, kind: StateKind) -> Any:
        if kind is StateKind.REGS:
            return regs.regs_from_kvm(self._get("struct kvm_regs *", k.KVM_GET_REGS))
        if kind is StateKind.SREGS:
            return regs.sregs_from_kvm(self._get("struct kvm_sregs *", k.KVM_GET_SREGS))
        if kind is StateKind.FPU:
            return regs.fpu_from_kvm(self._get("struct kvm_fpu *", k.KVM_GET_FPU))
        if kind is StateKind.DEBUG_REGS:
            return regs.debugregs_from_kvm(self._get("struct kvm_debugregs *", k.KVM_GET_DEBUGREGS))
        if kind is StateKind.LAPIC:
            return x86_64.Lapic(bytes(ffi.buffer(self._get("struct kvm_lapic_state *", k.KVM_GET_LAPIC))))
        if kind is StateKind.MP_STATE:
            return MpState(self._get("struct kvm_mp_state *", k.KVM_GET_MP_STATE).mp_state)
        if kind is StateKind.XCRS:
            raw = self._get("struct kvm_xcrs *", k.KVM_GET_XCRS)
            return [x86_64.Xcr(raw.xcrs[i].xcr, raw.xcrs[i].value) for i in range(raw.nr_xcrs)]
        if kind is StateKind.XSAVE:
            return self.get_xsave()
        raise ConfigError(f"KVM x86 vCPUs have no {kind.value} state")

    def keep_cr8(self, cr8: int) -> None:
        """After ``KVM_SET_SREGS``: without an in-kernel local APIC, KVM loads CR8
        from ``kvm_run->cr8`` on every ``KVM_RUN``, an immediate exit included
        (``kvm_arch_vcpu_ioctl_run`` in arch/x86/kvm/x86.c calls ``kvm_set_cr8``
        before anything else), and only refreshes that field at an exit: a
        vCPU whose CR8 was just set would get the stale one back on its next
        run. QEMU writes the field before each run (``kvm_arch_pre_run``)."""
        self._run.cr8 = cr8

    def set_state(self, kind: StateKind, value: Any) -> None:
        if kind is StateKind.REGS:
            raw = ffi.new("struct kvm_regs *")
            regs.regs_to_kvm(value, raw)
            self.host.ioctl(self.fd, k.KVM_SET_REGS, raw)
        elif kind is StateKind.SREGS:
            raw = self._get("struct kvm_sregs *", k.KVM_GET_SREGS)
            regs.sregs_to_kvm(value, raw)
            self.host.ioctl(self.fd, k.KVM_SET_SREGS, raw)
            self.keep_cr8(raw.cr8)
        elif kind is StateKind.FPU:
            raw = self._get("struct kvm_fpu *", k.KVM_GET_FPU)
            regs.fpu_to_kvm(value, raw)
            self.host.ioctl(self.fd, k.KVM_SET_FPU, raw)
        elif kind is StateKind.DEBUG_REGS:
            raw = self._get("struct kvm_debugregs *", k.KVM_GET_DEBUGREGS)
            regs.debugregs_to_kvm(value, raw)
            self.host.ioctl(self.fd, k.KVM_SET_DEBUGREGS, raw)
        elif kind is StateKind.LAPIC:
            raw = ffi.new("struct kvm_lapic_state *")
            ffi.buffer(raw)[:] = bytes(value.regs).ljust(1024, b"\0")[:1024]
            self.host.ioctl(self.fd, k.KVM_SET_LAPIC, raw)
        elif kind is StateKind.MP_STATE:
            self.host.ioctl(self.fd, k.KVM_SET_MP_STATE, ffi.new("struct kvm_mp_state *", {"mp_state": int(value)}))
        elif kind is StateKind.XCRS:
            raw = ffi.new("struct kvm_xcrs *")
            raw.nr_xcrs = len(value)
            for i, xcr in enumerate(value):
                raw.xcrs[i].xcr, raw.xcrs[i].value = xcr.index, xcr.value
            self.host.ioctl(self.fd, k.KVM_SET_XCRS, raw)
        elif kind is StateKind.XSAVE:
            self.set_xsave(value)
        else:
            raise ConfigError(f"KVM x86 vCPUs have no {kind.value} state")

    # --- XSAVE (docs/backends/kvm.md §4) --------------------------------------------
    def xsave_size(self) -> int:
        """The bytes of this VM's XSAVE image: ``KVM_CAP_XSAVE2``'s answer where the
        kernel has it (larger than 4 KiB with AMX), else ``struct kvm_xsave``'s 4 KiB."""
        base = int(ffi.sizeof("struct kvm_xsave"))
        return max(base, int(self.vm.check_raw_capability(k.KVM_CAP_XSAVE2)))

    def get_xsave(self) -> Xsave:
        """``KVM_GET_XSAVE2`` into a buffer of :meth:`xsave_size` bytes, or
        ``KVM_GET_XSAVE`` where 4 KiB is all (api.rst: XSAVE2 "with a buffer of the
        size KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) returns")."""
        size = self.xsave_size()
        raw = ffi.new("char[]", size)
        request = k.KVM_GET_XSAVE2 if size > ffi.sizeof("struct kvm_xsave") else k.KVM_GET_XSAVE
        self.host.ioctl(self.fd, request, raw)
        return x86_64.Xsave(bytes(ffi.buffer(raw)))

    def set_xsave(self, value: Xsave) -> None:
        """``KVM_SET_XSAVE``, which reads :meth:`xsave_size` bytes.  A smaller image
        (from a host with fewer XSAVE components) is padded with zeros: its header's
        XSTATE_BV says the components past it are in their initial state."""
        self.host.ioctl(self.fd, k.KVM_SET_XSAVE, self.xsave_argument(value))

    def xsave_argument(self, value: Xsave) -> Any:
        """``KVM_SET_XSAVE``'s argument for ``value``: :meth:`xsave_size` bytes,
        zero-padded; an image larger than this KVM's is a :class:`ConfigError`."""
        size = self.xsave_size()
        region = bytes(value.region)
        if len(region) > size:
            raise ConfigError(
                f"an XSAVE image of {len(region)} bytes does not fit this KVM's {size}: it comes from a host "
                "with XSAVE components this one lacks"
            )
        image = bytearray(region.ljust(size, b"\0"))
        # XSTATE_BV (the header's first word) with x87 or SSE clear says "in the
        # initial state", and the image's legacy area then holds those initial
        # values (KVM_GET_XSAVE writes them).  Not every kernel re-initialises a
        # component whose bit is clear: 6.18 (kvm_pvm) kept the registers the guest
        # had written since, so a reset left xmm0 changed.  Marking both present
        # makes the kernel copy the legacy area, which is the state asked for.
        header = XSAVE_HEADER_OFFSET
        xstate_bv = int.from_bytes(image[header : header + 8], "little") | XFEATURE_X87_SSE
        image[header : header + 8] = xstate_bv.to_bytes(8, "little")
        return ffi.new("char[]", bytes(image))

    def get_msrs(self, indices: list[int]) -> list[MsrEntry]:
        """``KVM_GET_MSRS``.  KVM returns how many it read and stops at the first it
        cannot: a short count is :class:`MsrAccessError` naming that MSR, with the
        ones read before it (``docs/backends/kvm.md`` §2.3); no errno is involved."""
        raw = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
        for i, index in enumerate(indices):
            raw.entries[i].index = index
        done = self.host.ioctl(self.fd, k.KVM_GET_MSRS, raw)
        read = [MsrEntry(raw.entries[i].index, raw.entries[i].data) for i in range(min(done, len(indices)))]
        if done < len(indices):
            raise MsrAccessError("KVM_GET_MSRS", indices[done], done, tuple((e.index, e.data) for e in read))
        return read

    def set_msrs(self, entries: list[MsrEntry]) -> None:
        """``KVM_SET_MSRS``; a short count is :class:`MsrAccessError` naming the first
        MSR KVM refused (those before it were written)."""
        raw = ffi.new("struct kvm_msrs *", {"nmsrs": len(entries), "entries": len(entries)})
        for i, entry in enumerate(entries):
            raw.entries[i].index, raw.entries[i].data = entry.index, entry.data
        done = self.host.ioctl(self.fd, k.KVM_SET_MSRS, raw)
        if done < len(entries):
            done_entries = tuple((e.index, e.data) for e in entries[:done])
            raise MsrAccessError("KVM_SET_MSRS", entries[done].index, done, done_entries, write=True)

    def set_cpuid(self, entries: list[CpuidEntry]) -> None:
        self.host.ioctl(self.fd, k.KVM_SET_CPUID2, regs.cpuid_to_kvm(entries))

    # --- interrupts from userspace (docs/backends/kvm.md §6.4) ----------------------
    def ready_for_interrupt(self) -> bool:
        """``kvm_run.ready_for_interrupt_injection`` and ``if_flag``, as KVM left them
        at the last exit (crosvm reads the same two)."""
        view = self._view
        return bool(view[_OFF_READY_FOR_INTERRUPT] and view[_OFF_IF_FLAG])

    def interrupt(self, vector: int) -> None:
        """``KVM_INTERRUPT``: without an in-kernel irqchip KVM queues the vector for
        the next entry, replacing one queued before (x86 ``kvm_vcpu_ioctl_interrupt()``)."""
        self.host.ioctl(self.fd, k.KVM_INTERRUPT, ffi.new("struct kvm_interrupt *", {"irq": vector}))

    def request_interrupt_window(self, requested: bool) -> None:
        """``kvm_run.request_interrupt_window``, read by KVM at every entry."""
        self._view[_OFF_REQUEST_INTERRUPT_WINDOW] = int(requested)

    def inject_nmi(self) -> None:
        self.host.ioctl(self.fd, k.KVM_NMI)

    def get_events(self) -> VcpuEvents:
        return regs.events_from_kvm(self._get("struct kvm_vcpu_events *", k.KVM_GET_VCPU_EVENTS))

    def set_events(self, events: VcpuEvents) -> None:
        self.host.ioctl(self.fd, k.KVM_SET_VCPU_EVENTS, regs.events_to_kvm(events))

    # --- TSC (docs/backends/kvm.md §7.1) ------------------------------------------------
    def get_tsc_khz(self) -> int:
        return int(self.host.ioctl(self.fd, k.KVM_GET_TSC_KHZ))

    def set_tsc_khz(self, khz: int) -> None:
        self.host.ioctl(self.fd, k.KVM_SET_TSC_KHZ, khz)

    def _tsc_offset_attribute(self, request: int, value: int = 0) -> int:
        data = ffi.new("uint64_t *", value)
        attr = ffi.new(
            "struct kvm_device_attr *",
            {"group": k.KVM_VCPU_TSC_CTRL, "attr": k.KVM_VCPU_TSC_OFFSET, "addr": int(ffi.cast("uintptr_t", data))},
        )
        self.host.ioctl(self.fd, request, attr)
        return int(data[0])

    def get_tsc_offset(self) -> int:
        """The ``KVM_VCPU_TSC_OFFSET`` attribute of the vCPU (``KVM_GET_DEVICE_ATTR``)."""
        return self._tsc_offset_attribute(k.KVM_GET_DEVICE_ATTR)

    def set_tsc_offset(self, offset: int) -> None:
        self._tsc_offset_attribute(k.KVM_SET_DEVICE_ATTR, offset)

    # --- guest debugging (the raw-capability escape hatch: KvmVcpuCommon) --------------
    def set_guest_debug(self, single_step: bool, breakpoints: list[int]) -> None:
        raw = ffi.new("struct kvm_guest_debug *")
        control = 0
        if single_step or breakpoints:
            control = k.KVM_GUESTDBG_ENABLE
        if single_step:
            control |= k.KVM_GUESTDBG_SINGLESTEP
        if breakpoints:
            control |= k.KVM_GUESTDBG_USE_HW_BP
            dr7 = 0
            for i, address in enumerate(breakpoints):
                raw.arch.debugreg[i] = address
                dr7 |= 1 << (2 * i)  # local enable; RW=00 (execute), LEN=00
            raw.arch.debugreg[7] = dr7
        raw.control = control
        self.host.ioctl(self.fd, k.KVM_SET_GUEST_DEBUG, raw)

    # --- prepared state (pyvmm_kvm.prepared_state) ------------------------------------
    def prepare_state(self, state: SavedVcpuState) -> prepared_state.PreparedWrites:
        return prepared_state.prepare(self, state)

    def restore_prepared_state(self, prepared: prepared_state.PreparedWrites) -> None:
        prepared_state.restore(self, prepared)

    def _drop_exit_views(self) -> None:
        self._io.data = self._mmio.data = memoryview(b"")
        self._io_views.clear()
        if self._fx_page is not None:
            self.vm.compiled.ffi.release(self._fx_page)
            self._fx_page = None
