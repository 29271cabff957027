"""A GenieZone vCPU: its fd, the VMM's own ``gzvm_vcpu_run``, registers (set
only), and the exits.

``GZVM_RUN`` takes a pointer to a ``struct gzvm_vcpu_run`` the VMM owns (the
vCPU fd cannot be mapped; crosvm uses an anonymous mapping, and so does this
class).  The driver copies the whole struct in, checks ``padding1`` and
``immediate_exit``, runs the guest until an exit needs userspace or a signal is
pending, copies the struct back out, and returns 0 or an error
(``gzvm_vcpu.c gzvm_vcpu_run``; ``docs/backends/geniezone.md`` §6):

* ``immediate_exit`` set: ``EINTR`` at once, nothing copied back;
* a signal pending as the loop ends: the struct is copied back *and then*
  ``-ERESTARTSYS`` (``EINTR`` here: Python's handlers have no ``SA_RESTART``)
  -- with the exit the hypervisor just made in it, if it made one.  So the run
  writes a sentinel ``exit_reason`` (0: no GenieZone exit reason is 0) before
  each ``GZVM_RUN`` and, after ``EINTR``, returns the exit if the field holds
  one the driver hands to userspace, instead of dropping a write or leaving a
  read's completion unanswered.  IRQ, GZ and IDLE -- the exits the driver
  loops on, the usual ones a signal interrupts -- are no exit: EINTR alone;
  and so is an MMIO write one of the VM's ioeventfds takes (the driver
  signalled the eventfd and looped: delivering it again would repeat it), and
  a ``MEM_RELINQUISH`` hypercall (the driver always handles it).  A ``PTP``
  hypercall the driver answered cannot be told apart (its handler overwrites
  ``args[0..3]``): after EINTR it would reach the VMM as a hypercall;
* the copy back overwrites ``immediate_exit`` with the value copied in: a kick
  that lands while the guest runs would be wiped out.  The kick therefore also
  sets a flag of this object's own, and the run puts ``immediate_exit`` back
  after every call that returned an exit, so the kick stops the next run.

Exits: MMIO (a read is completed by writing ``data`` before the next run, which
hands the struct back), SYSTEM_EVENT (shutdown / reset / crash: PSCI
``SYSTEM_OFF``/``SYSTEM_RESET``), HYPERCALL (a guest HVC the hypervisor and the
driver did not answer; ``result`` goes back in ``hypercall.args[0]``, which the
hypervisor returns in X0), FAIL_ENTRY, INTERNAL_ERROR, EXCEPTION and SHUTDOWN.

Registers: ``GZVM_SET_ONE_REG`` only.  ``GZVM_GET_ONE_REG`` always fails
(``EOPNOTSUPP``), so this backend declares no register access; :meth:`init`
sets the boot registers and keeps no copy that could pass for the vCPU's state.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import struct
from typing import Any

from pyvmm.arch.aarch64 import x_reg_id
from pyvmm.backend import RunPage, SignalKicker
from pyvmm.boot import Aarch64VcpuInit, VcpuInit
from pyvmm.errors import ConfigError, HypervisorError, UnknownExitError
from pyvmm.exits import (
    FailEntryExit,
    HypercallExit,
    InternalErrorExit,
    InterruptedExit,
    MmioExit,
    ShutdownExit,
    ShutdownReason,
    SystemEvent,
    SystemEventExit,
    VcpuExit,
)
from pyvmm_geniezone import bindings as g
from pyvmm_geniezone.bindings import ffi

_RUN = "struct gzvm_vcpu_run"
_OFF_EXIT_REASON = ffi.offsetof(_RUN, "exit_reason")
_OFF_IMMEDIATE_EXIT = ffi.offsetof(_RUN, "immediate_exit")
_OFF_UNION = ffi.offsetof(_RUN, "mmio")
_OFF_MMIO_DATA = ffi.offsetof(_RUN, "mmio", "data")
_OFF_HYPERCALL_ARGS = ffi.offsetof(_RUN, "hypercall", "args")

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_MMIO = struct.Struct("<Q8xQIB")  # phys_addr, (data), size, reg_nr, is_write
_FAIL_ENTRY = struct.Struct("<QI")  # hardware_entry_failure_reason, cpu
_EXCEPTION = struct.Struct("<IIQ")  # exception, error_code, fault_gpa
_HYPERCALL = struct.Struct("<8Q")
_SYSTEM_EVENT = struct.Struct("<II")  # type, ndata (then data[16])
_INTERNAL = struct.Struct("<II")  # suberror, ndata (then data[16])
_DATA16 = struct.Struct("<16Q")

_RUN_REQUEST = int(g.GZVM_RUN)
#: The id prefix of a 64-bit core register (KVM's encoding: arm64, U64, core).
_CORE_U64 = g.GZVM_REG_ARCH_ARM64 | g.GZVM_REG_SIZE_U64 | g.GZVM_REG_TYPE_GENERAL2
_EINTR = -errno.EINTR
#: What the run writes into ``exit_reason`` before each ``GZVM_RUN``.
_NO_EXIT = 0
#: Exit reasons the driver keeps and loops on (``gzvm_vcpu.c gzvm_vcpu_run``):
#: the hypervisor writes them into the run struct, so a signal ending the loop
#: right after one copies it out with EINTR -- no exit for the VMM.
_DRIVER_KEPT = frozenset({_NO_EXIT, g.GZVM_EXIT_IRQ, g.GZVM_EXIT_GZ, g.GZVM_EXIT_IDLE})

#: ``system_event.type`` as crosvm maps it (``GeniezoneVcpu::run``).
SYSTEM_EVENTS: dict[int, SystemEvent] = {
    g.GZVM_SYSTEM_EVENT_SHUTDOWN: SystemEvent.SHUTDOWN,
    g.GZVM_SYSTEM_EVENT_RESET: SystemEvent.RESET,
    g.GZVM_SYSTEM_EVENT_CRASH: SystemEvent.CRASH,
}


class GenieZoneVcpu:
    """One vCPU of a :class:`pyvmm_geniezone.vm.GenieZoneVm`."""

    def __init__(self, vm: Any, index: int) -> None:
        self.vm = vm
        self.index = index
        self.host = host = vm.host
        self.fd = host.ioctl(vm.fd, g.GZVM_CREATE_VCPU, index)
        try:
            mapping = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            host.close(self.fd)
            raise
        anchor = ctypes.c_char.from_buffer(mapping)
        #: What GZVM_RUN takes: the address of the VMM's gzvm_vcpu_run.
        self._run_address = ctypes.addressof(anchor)
        del anchor  # no export left behind: the page can be unmapped at close
        self.page = RunPage(mapping, immediate_exit=_OFF_IMMEDIATE_EXIT, mmio_data=_OFF_MMIO_DATA)
        self._view = self.page.view
        #: A kick asked for an immediate exit that no run has delivered yet.
        self._exit_requested = False
        self.kicker = SignalKicker(self._request_exit, host.signal_thread, "GenieZone")
        self._ioctl = host.seam.ioctl
        # One exit object per kind, refilled on every run.
        self._mmio = MmioExit()
        self._hypercall = HypercallExit()
        self._interrupted = InterruptedExit()
        self._mmio_views = self.page.mmio_views
        self._hypercall_pending = False
        self.run = self.kicker.guard_run(self._run_once, self._interrupted)  # type: ignore[method-assign]

    # --- registers --------------------------------------------------------------
    def init(self, boot: VcpuInit) -> None:
        """``pyvmm_init_vcpu``: ``GZVM_SET_ONE_REG`` for each register of ``boot``;
        on the boot vCPU, first the device tree's location (X0) to the VM.
        Secondary vCPUs start powered off: the hypervisor's PSCI brings them up."""
        if not isinstance(boot, Aarch64VcpuInit):
            raise ConfigError("GenieZone vCPUs take aarch64 boot state")
        for reg_id in boot.regs:
            if reg_id & ~0xFFFF != _CORE_U64:
                raise ConfigError(
                    f"register {reg_id:#x}: GenieZone sets 64-bit core registers only (X0..X30, SP, PC, PSTATE, "
                    "SP_EL1, ELR_EL1)"
                )
        if boot.boot_cpu:
            x0 = boot.regs.get(x_reg_id(0))
            if x0 is not None:
                self.vm.hand_over_device_tree(x0)
        value = ffi.new("uint64_t *")
        one_reg = ffi.new("struct gzvm_one_reg *", {"addr": int(ffi.cast("uintptr_t", value))})
        for reg_id, reg_value in boot.regs.items():
            value[0] = reg_value
            one_reg.id = reg_id
            self.host.ioctl(self.fd, g.GZVM_SET_ONE_REG, one_reg, detail=f"register {reg_id:#x}")

    # --- run ------------------------------------------------------------------
    def run(self) -> VcpuExit:
        """``pyvmm_run_vcpu``: run until the next exit.  (Each instance replaces
        this with its guarded :meth:`_run_once` in ``__init__``.)"""
        return self.run()

    def _request_exit(self) -> None:
        self._exit_requested = True
        self.page.request_immediate_exit()

    def _run_once(self) -> VcpuExit:
        view = self._view
        if self._hypercall_pending:
            self._hypercall_pending = False
            struct.pack_into("<Q", view, _OFF_HYPERCALL_ARGS, self._hypercall.result & 0xFFFF_FFFF_FFFF_FFFF)
        _U32.pack_into(view, _OFF_EXIT_REASON, _NO_EXIT)
        result = self._ioctl(self.fd, _RUN_REQUEST, self._run_address)
        if result < 0:
            if result != _EINTR:
                raise HypervisorError("GZVM_RUN", -result)
            self._exit_requested = False
            self.page.clear_immediate_exit()
            if _U32.unpack_from(view, _OFF_EXIT_REASON)[0] in _DRIVER_KEPT or self._handled_in_driver():
                return self._interrupted
            # EINTR with an exit copied out: a signal came as the hypervisor made it.
            # The signal was delivered, so the kick may signal again.
            self.kicker.acknowledge()
        elif self._exit_requested:
            # The copy back wrote the entry value over a kick's immediate_exit.
            self.page.request_immediate_exit()
        return self._decode()

    def _handled_in_driver(self) -> bool:
        """The copied-out exit is one the driver already handled and looped on
        (a signal ended the loop just then): an MMIO write an ioeventfd took, or
        a ``MEM_RELINQUISH`` hypercall (``gzvm_handle_relinquish`` never fails)."""
        view = self._view
        reason = _U32.unpack_from(view, _OFF_EXIT_REASON)[0]
        if reason == g.GZVM_EXIT_HYPERCALL:
            return bool(_U64.unpack_from(view, _OFF_HYPERCALL_ARGS)[0] == g.GZVM_HVC_MEM_RELINQUISH)
        if reason != g.GZVM_EXIT_MMIO:
            return False
        address, size, _, is_write = _MMIO.unpack_from(view, _OFF_UNION)
        if not is_write or not 0 < size <= 8:
            return False
        return bool(self.vm.ioevents.take_write(address, bytes(view[_OFF_MMIO_DATA : _OFF_MMIO_DATA + size])))

    def _decode(self) -> VcpuExit:
        view = self._view
        reason = _U32.unpack_from(view, _OFF_EXIT_REASON)[0]
        if reason == g.GZVM_EXIT_MMIO:
            address, size, _, is_write = _MMIO.unpack_from(view, _OFF_UNION)
            if not 0 < size <= 8:
                raise HypervisorError("GZVM_RUN", errno.EINVAL, f"an MMIO exit of {size} bytes")
            mmio = self._mmio
            mmio.address, mmio.size, mmio.is_write = address, size, bool(is_write)
            mmio.data = self._mmio_views[size]
            return mmio
        if reason == g.GZVM_EXIT_SYSTEM_EVENT:
            event_type, ndata = _SYSTEM_EVENT.unpack_from(view, _OFF_UNION)
            event = SYSTEM_EVENTS.get(event_type)
            if event is None:
                raise HypervisorError("GZVM_RUN", errno.EPROTO, f"unknown system event type {event_type}")
            data = _DATA16.unpack_from(view, _OFF_UNION + 8)[: min(ndata, 16)]
            return SystemEventExit(event, tuple(data))
        if reason == g.GZVM_EXIT_HYPERCALL:
            args = _HYPERCALL.unpack_from(view, _OFF_HYPERCALL_ARGS)
            call = self._hypercall
            call.number, call.args, call.result = args[0], tuple(args[1:]), 0
            self._hypercall_pending = True
            return call
        if reason == g.GZVM_EXIT_FAIL_ENTRY:
            failure, cpu = _FAIL_ENTRY.unpack_from(view, _OFF_UNION)
            return FailEntryExit(reason=failure, cpu=cpu)
        if reason == g.GZVM_EXIT_INTERNAL_ERROR:
            suberror, ndata = _INTERNAL.unpack_from(view, _OFF_UNION)
            data = _DATA16.unpack_from(view, _OFF_UNION + 8)[: min(ndata, 16)]
            return InternalErrorExit(suberror=suberror, data=tuple(data), description="GenieZone internal error")
        if reason == g.GZVM_EXIT_EXCEPTION:
            kind, code, gpa = _EXCEPTION.unpack_from(view, _OFF_UNION)
            return InternalErrorExit(
                suberror=kind,
                data=(code, gpa),
                description=f"guest exception {kind} (error {code:#x}, address {gpa:#x}) the driver could not handle",
            )
        if reason == g.GZVM_EXIT_SHUTDOWN:
            return ShutdownExit(ShutdownReason.OTHER)
        raise UnknownExitError("GZVM_RUN", reason)

    def kick(self) -> None:
        """Any thread: make the current or next run return EINTR."""
        self.kicker.kick()

    # --- teardown ---------------------------------------------------------------
    def close(self) -> None:
        """``pyvmm_destroy_vcpu``: no kick reaches the vCPU after this starts."""
        if self.fd < 0:
            return
        self.kicker.close()
        self.vm.remove_vcpu(self)
        self._mmio.data = memoryview(b"")
        self.page.release()
        self.host.close(self.fd)
        self.fd = -1
