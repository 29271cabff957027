"""What a KVM vCPU does the same on x86 and arm64: the vCPU descriptor and its
shared ``kvm_run`` page, the kick (immediate_exit plus a signal, the kit's
:class:`~pyvmm.backend.SignalKicker`), the guarded run, the vCPU's raw
capabilities and the teardown.  :class:`KvmVcpu` (x86) and :class:`KvmArm64Vcpu`
(arm64) add their exits, registers and initialisation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from pyvmm.backend import DeviceHost, RunPage, SignalKicker
from pyvmm.errors import VmStateError
from pyvmm.exits import InterruptedExit, VcpuExit
from pyvmm_kvm import bindings as k

#: The run struct's type name, the same in both architectures' declarations.
RUN_STRUCT = "struct kvm_run"
_RUN_POINTER = RUN_STRUCT + " *"


class KvmVcpuCommon:
    """The architecture-neutral half of a KVM vCPU.  The subclass calls
    :meth:`_open` from its constructor, provides ``_run_once`` and, for
    :meth:`close`, drops its own views of the run page in :meth:`_drop_exit_views`."""

    vm: Any
    index: int
    host: DeviceHost
    fd: int
    page: RunPage
    kicker: SignalKicker

    def _open(self, vm: Any, index: int, mmap_size: int, ffi: Any, arch_init: Callable[[], None] | None) -> RunPage:
        """``KVM_CREATE_VCPU``, the run page mapped, the kicker made, then
        ``arch_init`` if given (e.g. ``KVM_ARM_VCPU_INIT``); on any error nothing
        is left: the page and the descriptor go with it."""
        self.vm = vm
        self.index = index
        self.host = host = vm.host
        self._ffi = ffi
        self.fd = host.ioctl(vm.fd, k.KVM_CREATE_VCPU, index)
        page: RunPage | None = None
        try:
            mapping = host.map_shared(self.fd, mmap_size, f"vCPU {index} kvm_run")
            page = RunPage(
                mapping,
                immediate_exit=ffi.offsetof(RUN_STRUCT, "immediate_exit"),
                mmio_data=ffi.offsetof(RUN_STRUCT, "mmio", "data"),
            )
            self._run = ffi.from_buffer(_RUN_POINTER, page.view)
            self.kicker = SignalKicker(page.request_immediate_exit, host.signal_thread, "KVM")
            self._ioctl, self._errno_of = host.fast_ioctl()
            if arch_init is not None:
                arch_init()
        except BaseException:
            if page is not None:
                with contextlib.suppress(Exception):
                    ffi.release(self._run)
                page.release()
            host.close(self.fd)
            raise
        self.page = page
        return page

    def _guard_run(self, interrupted: InterruptedExit) -> None:
        """The exit path: one KVM_RUN under the kit's thread rules (the kick
        follows the running thread; close waits for the run to leave the kernel)."""
        self.run = self.kicker.guard_run(self._run_once, interrupted)  # type: ignore[method-assign]

    def _run_once(self) -> VcpuExit:
        raise NotImplementedError

    def run(self) -> VcpuExit:
        """``pyvmm_run_vcpu``: run until the next exit.  (Each instance replaces
        this with its guarded ``_run_once`` in its constructor.)"""
        return self.run()

    def kick(self) -> None:
        """Any thread: make the current or next KVM_RUN return EINTR."""
        self.kicker.kick()

    def enable_raw_capability(self, capability: int, flags: int, args: tuple[int, ...]) -> int:
        """``KVM_ENABLE_CAP`` on the vCPU fd (the escape hatch, docs/backends/kvm.md §8.1)."""
        cap = self._ffi.new("struct kvm_enable_cap *", {"cap": capability, "flags": flags, "args": list(args)})
        return int(self.host.ioctl(self.fd, k.KVM_ENABLE_CAP, cap))

    def _drop_exit_views(self) -> None:
        """Let go of the exits' views of the run page (before it is released)."""

    def close(self) -> None:
        """``pyvmm_destroy_vcpu``: returns once no run is under way (a running vCPU
        is kicked out first); no kick or run reaches the vCPU afterwards.

        :raises VmStateError: the vCPU did not leave KVM_RUN in time; nothing is
            released then.
        """
        if self.fd < 0:
            return
        self.kicker.close()
        self.vm.remove_vcpu(self)
        # Drop our own references to the run page; a view a caller still holds keeps
        # the mapping alive until it goes (never a dangling pointer).
        self._drop_exit_views()
        self._ffi.release(self._run)
        self.page.release()
        self.host.close(self.fd)
        self.fd = -1
        # The guarded run closes over this vCPU's bound ``_run_once``: a cycle
        # through the instance.  Replacing it lets refcounting free the vCPU
        # (and its page, its VM) as soon as the last reference goes.
        self.run = _run_after_close  # type: ignore[method-assign]


def _run_after_close() -> VcpuExit:
    raise VmStateError("this KVM vCPU is closed")
