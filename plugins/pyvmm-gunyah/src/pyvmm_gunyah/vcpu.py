"""A Gunyah vCPU: a VM function, the shared ``gh_vcpu_run`` page, and the exits.

A vCPU is ``GH_VM_ADD_FUNCTION(GH_FN_VCPU{id})``; its fd's page 0 is the run
structure (40 bytes used, ``docs/backends/gunyah.md`` §4.4).  ``GH_VCPU_RUN``
returns 0 with an exit in the page, or ``-errno`` (§6.1):

* **MMIO** -- completed by the *next* run: for a read the VMM writes
  ``data[0..len)`` in the page, and ``resume_action`` HANDLED makes the driver
  feed it back to the hypervisor (``gunyah_vcpu.c gunyah_handle_mmio_resume``, §6.2).
* **STATUS** -- the VM cannot run any more; every later run returns it again.
  Mapped as crosvm maps it: LOAD_FAILED is a failed entry, CRASHED a crash, and
  EXITED goes by the resource manager's exit type (§6.4).
* **PAGE_FAULT** -- the guest fetched an instruction where no memory binding is
  and the driver could not page it in (§6.3).  pyvmm cannot add memory to a
  started Gunyah VM, so it is reported as an :class:`~pyvmm.exits.InternalErrorExit`.
  The driver keeps no state for this exit and never reads
  ``page_fault.resume_action`` (its preset FAULT is only informative): running
  again calls the hypervisor with zeroed resume data, as after a successful
  demand page, and what the hypervisor then does is not visible in the driver.
* ``-EINTR`` -- ``immediate_exit`` was set (a kick) or a signal arrived (§6.5).
  A signal that arrives as the hypervisor makes an exit still gives ``-EINTR``,
  with the exit already in the page and the driver waiting for its completion.
  So the run writes a sentinel ``exit_reason`` (0, which the driver never
  writes) before each ``GH_VCPU_RUN`` and, after ``-EINTR``, returns the exit
  if the field changed -- instead of dropping a write or feeding a read stale
  data on the next run.

There are no register ioctls: the hypervisor owns the vCPU's registers, so this
class has no ``init`` method and core never initialises one.  The page, the kick
and the thread rules are the backend kit's (:class:`~pyvmm.backend.RunPage`,
:class:`~pyvmm.backend.SignalKicker`).  Its public methods are the backend's vCPU
hooks: ``run``, ``kick`` and ``close``.
"""

from __future__ import annotations

import errno
import struct
from typing import Any

from pyvmm.backend import RunPage, SignalKicker
from pyvmm.errors import HypervisorError, UnknownExitError
from pyvmm.exits import (
    FailEntryExit,
    InternalErrorExit,
    InterruptedExit,
    MmioExit,
    SystemEvent,
    SystemEventExit,
    VcpuExit,
)
from pyvmm_gunyah import bindings as g
from pyvmm_gunyah.bindings import ffi

_RUN = "struct gh_vcpu_run"
_OFF_IMMEDIATE_EXIT = ffi.offsetof(_RUN, "immediate_exit")
_OFF_EXIT_REASON = ffi.offsetof(_RUN, "exit_reason")
_OFF_UNION = ffi.offsetof(_RUN, "mmio")
_OFF_MMIO_DATA = ffi.offsetof(_RUN, "mmio", "data")
_OFF_MMIO_RESUME = ffi.offsetof(_RUN, "mmio", "resume_action")

_EXIT_REASON = struct.Struct("<I")
_MMIO = struct.Struct("<Q8xIB")  # phys_addr, (data), len, is_write
_STATUS = struct.Struct("<IHHI8s")  # status, exit_info.{type, padding, reason_size, reason}
_PAGE_FAULT = struct.Struct("<Qi")  # phys_addr, attempt
_RUN_REQUEST = int(g.GH_VCPU_RUN)
_EXIT_MMIO = g.GH_VCPU_EXIT_MMIO
_RESUME_HANDLED = g.GH_VCPU_RESUME_HANDLED
_EINTR = -errno.EINTR
#: What the run writes into ``exit_reason`` before each run (GH_VCPU_EXIT_UNKNOWN:
#: "not used" by the driver).  One byte does: the driver's values fit in it.
_NO_EXIT = g.GH_VCPU_EXIT_UNKNOWN

#: RM exit types of a STATUS/EXITED exit, as crosvm maps them (``gunyah/mod.rs``).
RM_EXIT_EVENTS: dict[int, SystemEvent] = {
    g.GH_RM_EXIT_TYPE_VM_EXIT: SystemEvent.SHUTDOWN,
    g.GH_RM_EXIT_TYPE_PSCI_POWER_OFF: SystemEvent.SHUTDOWN,
    g.GH_RM_EXIT_TYPE_VM_FORCE_STOPPED: SystemEvent.SHUTDOWN,
    g.GH_RM_EXIT_TYPE_PSCI_SYSTEM_RESET: SystemEvent.RESET,
    g.GH_RM_EXIT_TYPE_PSCI_SYSTEM_RESET2: SystemEvent.RESET,
    g.GH_RM_EXIT_TYPE_WDT_BITE: SystemEvent.CRASH,
    g.GH_RM_EXIT_TYPE_HYP_ERROR: SystemEvent.CRASH,
    g.GH_RM_EXIT_TYPE_ASYNC_EXT_ABORT: SystemEvent.CRASH,
}


class GunyahVcpu:
    """One vCPU of a :class:`pyvmm_gunyah.vm.GunyahVm`."""

    def __init__(self, vm: Any, index: int) -> None:
        self.vm = vm
        self.index = index
        self.host = host = vm.host
        self._arg = ffi.new("struct gh_fn_vcpu_arg *", {"id": index})
        self.fd = vm.add_function(g.GH_FN_VCPU, self._arg)
        try:
            size = host.ioctl(self.fd, g.GH_VCPU_MMAP_SIZE)
            mapping = host.map_shared(self.fd, size, f"vCPU {index} gh_vcpu_run")
        except BaseException:
            self._unbind()
            raise
        self.page = RunPage(mapping, immediate_exit=_OFF_IMMEDIATE_EXIT, mmio_data=_OFF_MMIO_DATA)
        self._view = self.page.view
        self.kicker = SignalKicker(self.page.request_immediate_exit, host.signal_thread, "Gunyah")
        self._ioctl = host.seam.ioctl
        # One exit object per kind, refilled on every run.
        self._mmio = MmioExit()
        self._interrupted = InterruptedExit()
        self._mmio_views = self.page.mmio_views
        self._mmio_pending = False
        #: A STATUS exit was seen: every later run returns it with the page untouched.
        self._down = False
        # The exit path: one GH_VCPU_RUN under the kit's thread rules (the kick follows
        # the running thread; close waits for the run to leave the driver).
        self.run = self.kicker.guard_run(self._run_once, self._interrupted)  # type: ignore[method-assign]

    # --- run ------------------------------------------------------------------
    def run(self) -> VcpuExit:
        """``pyvmm_run_vcpu``: run until the next exit.  (Each instance replaces
        this with its guarded :meth:`_run_once` in ``__init__``.)"""
        return self.run()

    def _run_once(self) -> VcpuExit:
        view = self._view
        if self._mmio_pending:
            if view[_OFF_IMMEDIATE_EXIT]:
                # The driver takes the completion out of the page and *then* checks
                # immediate_exit; returning EINTR there would drop a read's data
                # (gunyah_vcpu.c gunyah_vcpu_run, docs/backends/gunyah.md §6.5).
                # Keep the completion for the next run.
                self.page.clear_immediate_exit()
                return self._interrupted
            self._mmio_pending = False
            view[_OFF_MMIO_RESUME] = _RESUME_HANDLED
        if not self._down:
            # The sentinel: the driver writes exit_reason (1..3) only with an exit.
            view[_OFF_EXIT_REASON] = _NO_EXIT
        result = self._ioctl(self.fd, _RUN_REQUEST, 0)
        if result < 0:
            if result != _EINTR:
                raise HypervisorError("GH_VCPU_RUN", -result)
            self.page.clear_immediate_exit()
            if self._down or view[_OFF_EXIT_REASON] == _NO_EXIT:
                return self._interrupted
            # EINTR with an exit in the page: the signal came as the hypervisor made
            # it (docs/backends/gunyah.md §6.5; gunyah_vcpu.c gunyah_vcpu_run).  The
            # driver waits for its completion on the next run: return the exit.
            # The signal was delivered, so the kick may signal again.
            self.kicker.acknowledge()
        reason = _EXIT_REASON.unpack_from(view, _OFF_EXIT_REASON)[0]
        if reason == _EXIT_MMIO:
            address, length, is_write = _MMIO.unpack_from(view, _OFF_UNION)
            mmio = self._mmio
            mmio.address, mmio.size, mmio.is_write = address, length, bool(is_write)
            mmio.data = self._mmio_views[min(length, 8)]
            self._mmio_pending = True
            return mmio
        if reason == g.GH_VCPU_EXIT_STATUS:
            self._down = True
            return self._status_exit()
        if reason == g.GH_VCPU_EXIT_PAGE_FAULT:
            address, attempt = _PAGE_FAULT.unpack_from(view, _OFF_UNION)
            cause = errno.errorcode.get(-attempt, str(attempt))
            return InternalErrorExit(
                suberror=g.GH_VCPU_EXIT_PAGE_FAULT,
                data=(address, attempt),
                description=f"guest page fault at {address:#x} that no memory binding covers (-{cause})",
            )
        raise UnknownExitError("GH_VCPU_RUN", reason)

    def _status_exit(self) -> VcpuExit:
        status, exit_type, _, reason_size, reason = _STATUS.unpack_from(self._view, _OFF_UNION)
        detail = int.from_bytes(reason[: min(reason_size, g.GH_VM_MAX_EXIT_REASON_SIZE)], "little")
        if status == g.GH_VM_STATUS_LOAD_FAILED:
            return FailEntryExit(reason=0, cpu=self.index)
        if status == g.GH_VM_STATUS_CRASHED:
            return SystemEventExit(SystemEvent.CRASH, (exit_type, detail))
        if status == g.GH_VM_STATUS_EXITED:
            event = RM_EXIT_EVENTS.get(exit_type)
            if event is None:
                raise HypervisorError("GH_VCPU_RUN", errno.EINVAL, f"unknown resource-manager exit type {exit_type}")
            return SystemEventExit(event, (exit_type, detail))
        raise HypervisorError("GH_VCPU_RUN", errno.EINVAL, f"unknown VM status {status}")

    def kick(self) -> None:
        """Any thread: make the current or next run return EINTR (``immediate_exit``
        plus one signal to the thread running the vCPU)."""
        self.kicker.kick()

    # --- teardown ---------------------------------------------------------------
    def _unbind(self) -> None:
        """Remove the vCPU function and close its fd: closing alone would leave the
        function (and its id) bound to the VM until the VM goes."""
        try:
            if self.vm.fd >= 0:
                self.vm.remove_function(g.GH_FN_VCPU, self._arg)
        finally:
            self.host.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        """``pyvmm_destroy_vcpu``: no kick reaches the vCPU after this starts."""
        if self.fd < 0:
            return
        self.kicker.close()
        self.vm.remove_vcpu(self)
        # Drop our own references to the run page; a view a caller still holds keeps
        # the mapping alive until it goes (never a dangling pointer).
        self._mmio.data = memoryview(b"")
        self.page.release()
        self._unbind()
