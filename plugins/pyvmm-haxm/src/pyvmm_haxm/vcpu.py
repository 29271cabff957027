"""A HAXM vCPU: its device, the tunnel, the run loop and the register calls.

``HAX_VCPU_IOCTL_SETUP_TUNNEL`` maps two driver pages into the process and says
where (``docs/backends/haxm.md`` §7): the **tunnel** (``struct hax_tunnel``: the
exit status, the I/O exit, the interrupt flags, the APIC base) and the **I/O
buffer** (the data of a port exit, or ``struct hax_fastmmio`` of an MMIO exit).
The run loop reads each exit there and refills one exit object per kind; the
data of a read is completed in place, in the I/O buffer, which the driver reads
on the next RUN:

* ``HAX_EXIT_IO``: RIP is already past the instruction (a string instruction:
  RCX/RSI/RDI already stepped by the items in the buffer; RIP past it once the
  last batch is out).  Up to 64 bytes of string data per exit, the lowest guest
  address first -- with the direction flag set that is the *last* item
  transferred, so pyvmm-haxm hands the VMM the items in transfer order and puts
  them back for an ``INS``;
* ``HAX_EXIT_FAST_MMIO``: ``hax_fastmmio`` in the I/O buffer; a read is
  completed in its ``value``; direction 2 is a guest-to-guest copy (read
  ``gpa``, write ``gpa2``), which pyvmm-haxm reports as the read and then the
  write;
* ``HAX_EXIT_HLT``: no RUN until an interrupt is due; ``HAX_EXIT_INTERRUPT``: the
  interrupt window (when requested and open) or a host event/kick;
  ``HAX_EXIT_PAUSED``: the kick's PAUSED request; ``HAX_EXIT_STATECHANGE``: the
  vCPU is dead (triple fault or driver panic).

Its public methods are the backend's vCPU hooks.  All vCPU requests should come
from one thread (HAXM ``docs/api.md``); the kick is the exception.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import struct
from typing import Any

from pyvmm.arch.x86_64 import DebugRegs, Fpu, MsrEntry, Regs, Sregs
from pyvmm.backend import SignalKicker
from pyvmm.boot import VcpuInit, X86VcpuInit
from pyvmm.errors import ConfigError, ErrorSpace, HypervisorError, MsrAccessError, UnknownExitError, VmStateError
from pyvmm.exits import (
    FailEntryExit,
    HltExit,
    InterruptedExit,
    IoExit,
    IrqWindowOpenExit,
    MmioExit,
    ShutdownExit,
    ShutdownReason,
    VcpuExit,
)
from pyvmm.vcpu_state import StateKind
from pyvmm_haxm import bindings as b
from pyvmm_haxm import regs
from pyvmm_haxm.bindings import ffi
from pyvmm_haxm.host import IN, INOUT, OUT
from pyvmm_haxm.kick import KickoffKicker

MSR_EFER = 0xC0000080
MSR_TSC = 0x10
MSR_APIC_BASE = 0x1B
EFER_LMA = 1 << 10
RFLAGS_IF = 1 << 9
#: MSRs per GET/SET_MSRS: the drivers refuse ``nr_msr >= HAX_MAX_MSR_ARRAY``.
MSR_BATCH = b.HAX_MAX_MSR_ARRAY - 1

_TUNNEL_SIZE = ffi.sizeof("struct hax_tunnel")
_IO_STATUS = struct.Struct("<I")
_OFF_STATUS = ffi.offsetof("struct hax_tunnel", "_exit_status")
_OFF_IO = ffi.offsetof("struct hax_tunnel", "io")
#: direction, df, size, port, count, flags, (pads), vaddr
_TUNNEL_IO = struct.Struct("<BBHHHB3x4xQ")
_FASTMMIO = struct.Struct("<QQBB")
_OFF_MMIO_VALUE = ffi.offsetof("struct hax_fastmmio", "value")


def _view(address: int, size: int) -> memoryview:
    """A view of ``size`` bytes the driver mapped into this process at ``address``."""
    return memoryview((ctypes.c_ubyte * size).from_address(address)).cast("B")


class HaxmVcpu:
    """One vCPU of a :class:`pyvmm_haxm.vm.HaxmVm`."""

    def __init__(self, vm: Any, index: int) -> None:
        self.vm = vm
        self.index = index
        self.channel = channel = vm.channel
        self.host_os: str = channel.host_os
        vcpu_id = ffi.new("uint32_t *", index)
        channel.control(vm.handle, "VCPU_CREATE", vcpu_id, IN)
        self.handle = channel.open(channel.paths.vcpu_path(vm.vm_id, index))
        try:
            info = ffi.new("struct hax_tunnel_info *")
            channel.control(self.handle, "SETUP_TUNNEL", info, OUT)
            if info.size < _TUNNEL_SIZE or not info.va or not info.io_va:
                raise HypervisorError(
                    "HAX_SETUP_TUNNEL",
                    errno.EINVAL,
                    f"the driver gave a {int(info.size)}-byte tunnel at {int(info.va):#x}, I/O buffer at "
                    f"{int(info.io_va):#x}; pyvmm-haxm needs {_TUNNEL_SIZE} bytes at non-NULL addresses",
                )
            # vcpu_create leaves the guest's FXSAVE image all zero (FCW 0 and MXCSR 0:
            # every x87 and SSE exception unmasked); load the power-up FCW 0x37F and
            # MXCSR 0x1F80 (IA SDM Vol. 3A, 10.1.1) before the guest runs.
            fx = ffi.new("struct fx_layout *")
            channel.control(self.handle, "GET_FPU", fx, OUT)
            fx.fcw, fx.mxcsr = 0x37F, 0x1F80
            channel.control(self.handle, "SET_FPU", fx, IN)
        except BaseException:
            channel.close(self.handle)
            raise
        self._tunnel_view: memoryview = _view(int(info.va), _TUNNEL_SIZE)
        self._tunnel: Any = ffi.cast("struct hax_tunnel *", int(info.va))
        self._io_view: memoryview = _view(int(info.io_va), b.IOS_MAX_BUFFER)
        self._state = ffi.new("struct vcpu_state_t *")
        # One exit object per kind, refilled on every run.
        self._io = IoExit()
        self._mmio = MmioExit()
        self._hlt = HltExit()
        self._interrupted = InterruptedExit()
        self._window = IrqWindowOpenExit()
        self._mmio_views = {n: self._io_view[_OFF_MMIO_VALUE : _OFF_MMIO_VALUE + n] for n in (1, 2, 4, 8)}
        self._io_views: dict[int, memoryview] = {}
        #: Reversed string data (direction flag set): the VMM sees transfer order.
        self._scratch = bytearray(b.IOS_MAX_BUFFER)
        self._reversed_in: tuple[int, int] | None = None  # (size, count) to copy back
        #: The write half of a fast-MMIO copy (direction 2), reported on the next run.
        self._copy_write: tuple[int, int] | None = None  # (gpa2, size)
        self._copy_data = bytearray(8)
        #: After HAX_EXIT_HLT the driver says "ready" whatever RFLAGS.IF is; the
        #: interrupt could not be taken with IF clear.
        self._halted_with_if_clear = False
        self._ran = False
        self._run_request = channel.run
        kickoff = self._kickoff
        if self.host_os == "win32":
            self.kicker: SignalKicker = KickoffKicker(self._request_exit, kickoff, "HAXM")
        else:
            self.kicker = SignalKicker(self._request_exit, lambda thread, signum: kickoff(), "HAXM")
        self.run = self.kicker.guard_run(self._run_once, self._interrupted)  # type: ignore[method-assign]

    # --- the kick ---------------------------------------------------------------
    def _request_exit(self) -> None:
        tunnel = self._tunnel
        tunnel._exit_reason = b.HAX_EXIT_PAUSED
        tunnel.user_event_pending = 1

    def _kickoff(self) -> None:
        self.channel.interrupt_thread(self.handle, self.kicker.thread)

    def _clear_kick(self) -> None:
        tunnel = self._tunnel
        if tunnel._exit_reason == b.HAX_EXIT_PAUSED:
            tunnel._exit_reason = 0
        tunnel.user_event_pending = 0

    def kick(self) -> None:
        """Any thread: make the current or next run return an :class:`InterruptedExit`."""
        self.kicker.kick()

    # --- run ------------------------------------------------------------------
    def run(self) -> VcpuExit:
        """``pyvmm_run_vcpu``: run until the next exit.  (Each instance replaces
        this with its guarded :meth:`_run_once` in ``__init__``.)"""
        return self.run()

    def _run_once(self) -> VcpuExit:
        copy = self._copy_write
        if copy is not None:
            return self._copy_write_exit(copy)
        reversed_in = self._reversed_in
        if reversed_in is not None:
            self._reversed_in = None
            _put_reversed(self._scratch, self._io_view, *reversed_in)
        code = self._run_request(self.handle)
        if code:
            if self.channel.retryable(code):
                self._clear_kick()
                return self._interrupted
            space = ErrorSpace.WIN32 if self.host_os == "win32" else ErrorSpace.ERRNO
            raise HypervisorError("HAX_VCPU_IOCTL_RUN", code, space=space)
        self._ran = True
        self._halted_with_if_clear = False
        (status,) = _IO_STATUS.unpack_from(self._tunnel_view, _OFF_STATUS)
        if status == b.HAX_EXIT_IO:
            return self._io_exit()
        if status == b.HAX_EXIT_FAST_MMIO:
            return self._mmio_exit()
        return self._other_exit(status)

    def _io_exit(self) -> IoExit:
        direction, df, size, port, count, flags, _ = _TUNNEL_IO.unpack_from(self._tunnel_view, _OFF_IO)
        io = self._io
        io.port, io.size, io.count = port, size, count
        io.is_write = direction == b.HAX_IO_OUT
        nbytes = size * count
        if nbytes > b.IOS_MAX_BUFFER or size not in (1, 2, 4):
            raise HypervisorError("HAX_VCPU_IOCTL_RUN", errno.EINVAL, f"an I/O exit of {count} x {size} bytes")
        if df and count > 1 and flags & b.HAX_IO_STRING:
            # The buffer holds the lowest address first: the last item moved.
            view = memoryview(self._scratch)[:nbytes]
            if io.is_write:
                _put_reversed(self._io_view, self._scratch, size, count)
            else:
                self._reversed_in = (size, count)
            io.data = view
            return io
        data = self._io_views.get(nbytes)
        if data is None:
            data = self._io_views[nbytes] = self._io_view[:nbytes]
        io.data = data
        return io

    def _mmio_exit(self) -> MmioExit:
        gpa, value, size, direction = _FASTMMIO.unpack_from(self._io_view, 0)
        if size not in (1, 2, 4, 8):
            raise HypervisorError("HAX_VCPU_IOCTL_RUN", errno.EINVAL, f"a fast-MMIO exit of {size} bytes")
        mmio = self._mmio
        mmio.address, mmio.size = gpa, size
        mmio.data = self._mmio_views[size]
        if direction == b.HAX_FASTMMIO_WRITE:
            mmio.is_write = True
        elif direction == b.HAX_FASTMMIO_READ:
            mmio.is_write = False
        elif direction == b.HAX_FASTMMIO_COPY:
            # value holds gpa2: read gpa now, write what was read to gpa2 next.
            mmio.is_write = False
            self._copy_write = (value, size)
            mmio.data = memoryview(self._copy_data)[:size]
        else:
            raise UnknownExitError("HAX_VCPU_IOCTL_RUN (fast MMIO direction)", direction)
        return mmio

    def _copy_write_exit(self, copy: tuple[int, int]) -> MmioExit:
        self._copy_write = None
        gpa2, size = copy
        mmio = self._mmio
        mmio.address, mmio.size, mmio.is_write = gpa2, size, True
        mmio.data = memoryview(self._copy_data)[:size]
        return mmio

    def _other_exit(self, status: int) -> VcpuExit:
        tunnel = self._tunnel
        if status == b.HAX_EXIT_HLT:
            self._halted_with_if_clear = not self._get_state().rflags_if
            return self._hlt
        if status == b.HAX_EXIT_INTERRUPT:
            if tunnel.request_interrupt_window and tunnel.ready_for_interrupt_injection:
                return self._window
            self._clear_kick()
            return self._interrupted
        if status == b.HAX_EXIT_PAUSED:
            self._clear_kick()
            return self._interrupted
        if status == b.HAX_EXIT_STATECHANGE:
            return ShutdownExit(ShutdownReason.TRIPLE_FAULT)
        if status == b.HAX_EXIT_UNKNOWN:
            # VM entry failed (core/cpu.c cpu_vmx_run): _exit_reason is 0 then.
            return FailEntryExit(int(tunnel._exit_reason), 0)
        if status == b.HAX_EXIT_REALMODE:
            raise VmStateError("HAXM returned HAX_EXIT_REALMODE: it wants the VMM to emulate real mode")
        raise UnknownExitError("HAX_VCPU_IOCTL_RUN", status)

    # --- interrupts from userspace ------------------------------------------------
    def ready_for_interrupt(self) -> bool:
        """``hax_tunnel.ready_for_interrupt_injection`` as the driver left it at the
        last exit (no interrupt pending, IF set, no STI/MOV SS shadow:
        ``core/cpu.c cpu_vmx_execute``) -- except after HLT, where the driver
        says ready regardless of IF (``exit_hlt``)."""
        return self._ran and bool(self._tunnel.ready_for_interrupt_injection) and not self._halted_with_if_clear

    def interrupt(self, vector: int) -> None:
        """``HAX_VCPU_IOCTL_INTERRUPT``: HAXM queues the vector and injects it at the
        next entry where the guest can take it."""
        if not 0 <= vector <= 0xFF:
            raise ConfigError(f"vector: {vector} is not an x86 interrupt vector (0..255)")
        self.channel.control(self.handle, "INTERRUPT", ffi.new("uint32_t *", vector), IN)

    def request_interrupt_window(self, requested: bool) -> None:
        """``hax_tunnel.request_interrupt_window``, read by the driver at each exit."""
        self._tunnel.request_interrupt_window = int(requested)

    # --- registers --------------------------------------------------------------
    def _get_state(self) -> _State:
        self.channel.control(self.handle, "GET_REGS", self._state, OUT)
        return _State(self._state)

    def init(self, boot: VcpuInit) -> None:
        if not isinstance(boot, X86VcpuInit):
            raise ConfigError(f"HAXM vCPU {self.index} cannot take {type(boot).__name__}")
        self.set_state(StateKind.SREGS, boot.sregs)
        self.set_state(StateKind.REGS, boot.regs)
        if boot.fpu is not None:
            self.set_state(StateKind.FPU, boot.fpu)
        if boot.msrs:
            self.set_msrs(list(boot.msrs))

    def get_state(self, kind: StateKind) -> Any:
        if kind is StateKind.REGS:
            self._get_state()
            return regs.regs_from_state(self._state)
        if kind is StateKind.SREGS:
            self._get_state()
            # The tunnel's apic_base is written only at the end of a RUN
            # (vcpu_execute); the MSR is there from vcpu_init on.  GET_REGS never
            # writes _efer (core/vcpu.c vcpu_get_regs): EFER is read as an MSR.
            apic_base, efer = self.get_msrs([MSR_APIC_BASE, MSR_EFER])
            return regs.sregs_from_state(self._state, apic_base.data, efer.data)
        if kind is StateKind.FPU:
            fx = ffi.new("struct fx_layout *")
            self.channel.control(self.handle, "GET_FPU", fx, OUT)
            return regs.fpu_from_fx(fx, bytes(ffi.buffer(fx)))
        if kind is StateKind.DEBUG_REGS:
            self._get_state()
            return regs.debugregs_from_state(self._state)
        raise ConfigError(f"HAXM vCPUs have no {kind.value} state (regs, sregs, fpu and debug_regs only)")

    def set_state(self, kind: StateKind, value: Any) -> None:
        if kind is StateKind.REGS:
            if not isinstance(value, Regs):
                raise ConfigError(f"regs: a Regs, not {type(value).__name__}")
            self._get_state()
            regs.regs_to_state(value, self._state)
            self.channel.control(self.handle, "SET_REGS", self._state, IN)
        elif kind is StateKind.SREGS:
            if not isinstance(value, Sregs):
                raise ConfigError(f"sregs: an Sregs, not {type(value).__name__}")
            # SET_REGS ignores _efer (core/vcpu.c vcpu_set_regs): EFER goes first, as an MSR.
            self.set_msrs([MsrEntry(MSR_EFER, value.efer)])
            self._get_state()
            regs.sregs_to_state(value, self._state)
            self.channel.control(self.handle, "SET_REGS", self._state, IN)
        elif kind is StateKind.FPU:
            if not isinstance(value, Fpu):
                raise ConfigError(f"fpu: an Fpu, not {type(value).__name__}")
            fx = ffi.new("struct fx_layout *")
            self.channel.control(self.handle, "GET_FPU", fx, OUT)
            raw = bytearray(ffi.buffer(fx))
            regs.fpu_to_fx(value, raw)
            ffi.buffer(fx)[:] = bytes(raw)
            self.channel.control(self.handle, "SET_FPU", fx, IN)
        elif kind is StateKind.DEBUG_REGS:
            if not isinstance(value, DebugRegs):
                raise ConfigError(f"debug_regs: a DebugRegs, not {type(value).__name__}")
            self._get_state()
            regs.debugregs_to_state(value, self._state)
            self.channel.control(self.handle, "SET_REGS", self._state, IN)
        else:
            raise ConfigError(f"HAXM vCPUs have no {kind.value} state (regs, sregs, fpu and debug_regs only)")

    # --- MSRs -------------------------------------------------------------------
    def _msr_batch(self, op: str, entries: list[tuple[int, int]]) -> tuple[int, list[tuple[int, int]]]:
        data = ffi.new("struct hax_msr_data *")
        data.nr_msr = len(entries)
        data.done = 0
        for i, (index, value) in enumerate(entries):
            data.entries[i].entry, data.entries[i].value = index, value
        self.channel.control(self.handle, op, data, INOUT)
        done = min(int(data.done), len(entries))
        return done, [(int(data.entries[i].entry), int(data.entries[i].value)) for i in range(done)]

    def get_msrs(self, indices: list[int]) -> list[MsrEntry]:
        """``HAX_VCPU_IOCTL_GET_MSRS`` in batches of 31: ``done`` says how many the
        driver read; it stops at the first it cannot."""
        read: list[tuple[int, int]] = []
        for start in range(0, len(indices), MSR_BATCH):
            batch = indices[start : start + MSR_BATCH]
            done, values = self._msr_batch("GET_MSRS", [(i, 0) for i in batch])
            read += values
            if done < len(batch):
                raise MsrAccessError("HAX_VCPU_IOCTL_GET_MSRS", batch[done], len(read), tuple(read))
        return [MsrEntry(index, value) for index, value in read]

    def set_msrs(self, entries: list[MsrEntry]) -> None:
        """``HAX_VCPU_IOCTL_SET_MSRS`` in batches of 31.  Windows and macOS return
        ``done``; the Linux driver does not copy it back (``components.c``), so
        there the batch is read back (:meth:`_written_on_linux`)."""
        written: list[tuple[int, int]] = []
        for batch in _write_batches([(e.index, e.data) for e in entries], distinct=self.host_os == "linux"):
            done, _ = self._msr_batch("SET_MSRS", batch)
            if self.host_os == "linux":
                done = self._written_on_linux(batch)
            written += batch[:done]
            if done < len(batch):
                raise MsrAccessError(
                    "HAX_VCPU_IOCTL_SET_MSRS", batch[done][0], len(written), tuple(written), write=True
                )

    def _written_on_linux(self, batch: list[tuple[int, int]]) -> int:
        """How many of ``batch`` the Linux driver wrote: it stops at the first MSR
        it refuses but does not say where, so the batch is read back and the first
        MSR that does not read, or reads another value, is the one refused (EFER's
        LMA is the CPU's to set; the TSC moves on by itself)."""
        done, values = self._msr_batch("GET_MSRS", [(index, 0) for index, _ in batch])
        for position, ((index, wanted), (_, got)) in enumerate(zip(batch[:done], values, strict=True)):
            ignored = EFER_LMA if index == MSR_EFER else 0
            if index != MSR_TSC and (wanted ^ got) & ~ignored:
                return position
        return done

    def close(self) -> None:
        """``pyvmm_destroy_vcpu``: returns once no run is under way; closing the
        device is what destroys the vCPU and unmaps the tunnel (``hax_vcpu_release``)."""
        if self.handle < 0:
            return
        self.kicker.close()
        self.vm.remove_vcpu(self)
        # The tunnel and I/O buffer go with the handle: drop every view first.
        empty = memoryview(b"")
        self._io.data = self._mmio.data = empty
        self._io_views.clear()
        self._mmio_views.clear()
        self._tunnel = None
        with contextlib.suppress(ValueError):
            self._tunnel_view.release()
            self._io_view.release()
        self.channel.close(self.handle)
        self.handle = -1


class _State:
    """What the run loop reads from a ``vcpu_state_t`` it just fetched."""

    __slots__ = ("rflags_if",)

    def __init__(self, state: Any) -> None:
        self.rflags_if = bool(int(state._rflags) & RFLAGS_IF)


def _write_batches(entries: list[tuple[int, int]], *, distinct: bool) -> list[list[tuple[int, int]]]:
    """``entries`` in batches of :data:`MSR_BATCH`; with ``distinct``, a batch also
    ends before an MSR it already holds (a read-back can then tell which were written)."""
    batches: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    for entry in entries:
        if len(current) == MSR_BATCH or (distinct and any(entry[0] == index for index, _ in current)):
            batches.append(current)
            current = []
        current.append(entry)
    if current:
        batches.append(current)
    return batches


def _put_reversed(source: Any, target: Any, size: int, count: int) -> None:
    """Copy ``count`` items of ``size`` bytes from ``source`` to ``target`` in
    reverse item order."""
    for i in range(count):
        j = count - 1 - i
        target[i * size : (i + 1) * size] = source[j * size : (j + 1) * size]
