"""A KVM vCPU on an arm64 host: ``KVM_ARM_VCPU_INIT``, one-reg access, and the exits.

Sources: ``Documentation/virt/kvm/api.rst`` ("KVM_ARM_VCPU_INIT",
"KVM_ARM_PREFERRED_TARGET", "KVM_SET_ONE_REG", "KVM_GET_REG_LIST",
"KVM_EXIT_MMIO", "KVM_EXIT_SYSTEM_EVENT"); ``arch/arm64/kvm/arm.c``
(``kvm_arch_vcpu_ioctl_vcpu_init``, ``kvm_arch_vcpu_ioctl_run``), ``reset.c``
(``kvm_reset_vcpu``: PSTATE EL1h with DAIF masked, MPIDR from the vCPU index),
``psci.c`` (``kvm_psci_call``: CPU_ON/OFF in the kernel, SYSTEM_OFF/RESET as a
system event), ``mmio.c`` (``kvm_handle_mmio_return``); crosvm
``hypervisor/src/kvm/aarch64.rs`` (``init``, ``set_one_reg``).

* Every vCPU is initialised when it is created, with the target KVM prefers and
  PSCI 0.2; vCPUs other than 0 start powered off (``KVM_ARM_VCPU_POWER_OFF``) and
  come up when the guest calls PSCI ``CPU_ON`` -- in the kernel, with no exit.
  KVM takes the feature set only once, so a boot record that wants the opposite
  power state is applied with ``KVM_SET_MP_STATE``.
* MMIO: the read data goes into ``kvm_run.mmio.data`` before the next
  ``KVM_RUN``, which feeds it to the guest register; ``kvm_handle_mmio_return``
  runs before the ``immediate_exit`` check and clears ``mmio_needed``, so a kick
  between the exit and the completion loses nothing.
* A run that fails with ENOSYS is KVM's "MMIO access it cannot decode" (a data
  abort outside memory with no valid syndrome, ``io_mem_abort``): reported as such.

The page, the kick and the thread rules are the backend kit's
(:class:`~pyvmm.backend.RunPage`, :class:`~pyvmm.backend.SignalKicker`).
"""

from __future__ import annotations

import errno
import struct
from typing import Any

from pyvmm.arch.aarch64 import MPIDR_EL1_ID, CoreRegs, MpState, OneReg
from pyvmm.backend import address_of
from pyvmm.boot import Aarch64VcpuInit, VcpuInit
from pyvmm.errors import ConfigError, HypervisorError, UnknownExitError
from pyvmm.exits import (
    FailEntryExit,
    InternalErrorExit,
    InterruptedExit,
    MmioExit,
    SystemEvent,
    SystemEventExit,
    VcpuExit,
)
from pyvmm.vcpu_state import StateKind
from pyvmm_kvm import arm64_regs
from pyvmm_kvm import bindings as k
from pyvmm_kvm.bindings import ffi_aarch64 as ffi
from pyvmm_kvm.vcpu_common import RUN_STRUCT, KvmVcpuCommon

_RUN = RUN_STRUCT
_OFF_EXIT_REASON = ffi.offsetof(_RUN, "exit_reason")
_OFF_UNION = ffi.offsetof(_RUN, "mmio")
_GAP = _OFF_UNION - _OFF_EXIT_REASON - 4
_HEAD_MMIO = struct.Struct(f"<I{_GAP}xQ8xIB")  # reason; phys_addr, (data), len, is_write
_EXIT_MMIO = k.KVM_EXIT_MMIO
_RUN_REQUEST = int(k.KVM_RUN)

#: PSCI SYSTEM_OFF and SYSTEM_RESET(2) arrive as these (psci.c kvm_psci_system_off/_reset).
SYSTEM_EVENTS = {
    k.KVM_SYSTEM_EVENT_SHUTDOWN: SystemEvent.SHUTDOWN,
    k.KVM_SYSTEM_EVENT_RESET: SystemEvent.RESET,
    k.KVM_SYSTEM_EVENT_CRASH: SystemEvent.CRASH,
}


class KvmArm64Vcpu(KvmVcpuCommon):
    """One vCPU of a :class:`pyvmm_kvm.arm64_vm.KvmArm64Vm`."""

    def __init__(self, vm: Any, index: int, mmap_size: int) -> None:
        #: Whether KVM_ARM_VCPU_INIT started this vCPU powered off.
        self.started_powered_off = index != 0
        page = self._open(
            vm, index, mmap_size, ffi, lambda: self._vcpu_init(vm.target, powered_off=self.started_powered_off)
        )
        self._view = page.view
        self._mmio = MmioExit()
        self._interrupted = InterruptedExit()
        self._mmio_views = page.mmio_views
        self._guard_run(self._interrupted)

    def _vcpu_init(self, target: int, *, powered_off: bool) -> None:
        features = 1 << k.KVM_ARM_VCPU_PSCI_0_2
        if powered_off:
            features |= 1 << k.KVM_ARM_VCPU_POWER_OFF
        init = ffi.new("struct kvm_vcpu_init *", {"target": target, "features": [features]})
        self.host.ioctl(self.fd, k.KVM_ARM_VCPU_INIT, init, detail=f"target {target}, features {features:#x}")

    # --- run ------------------------------------------------------------------
    def _run_once(self) -> VcpuExit:
        result = self._ioctl(self.fd, _RUN_REQUEST, 0)
        if result < 0:
            err = self._errno_of(result)
            if err in (errno.EINTR, errno.EAGAIN):
                self.page.clear_immediate_exit()
                return self._interrupted
            if err == errno.ENOSYS:
                raise HypervisorError(
                    "KVM_RUN",
                    err,
                    "the guest accessed memory no slot backs with an instruction KVM cannot decode "
                    "(no valid syndrome: e.g. a load/store pair or writeback to MMIO)",
                )
            raise HypervisorError("KVM_RUN", err)
        reason, address, length, is_write = _HEAD_MMIO.unpack_from(self._view, _OFF_EXIT_REASON)
        if reason == _EXIT_MMIO:
            mmio = self._mmio
            mmio.address, mmio.size, mmio.is_write = address, length, bool(is_write)
            mmio.data = self._mmio_views[length]
            return mmio
        return self._slow_exit(reason)

    def _slow_exit(self, reason: int) -> VcpuExit:
        run = self._run
        if reason == k.KVM_EXIT_INTR:
            return self._interrupted
        if reason == k.KVM_EXIT_SYSTEM_EVENT:
            event = SYSTEM_EVENTS.get(run.system_event.type)
            if event is None:
                raise UnknownExitError("KVM_RUN", reason)
            ndata = min(run.system_event.ndata, 16)
            return SystemEventExit(event, tuple(run.system_event.data[i] for i in range(ndata)))
        if reason == k.KVM_EXIT_INTERNAL_ERROR:
            internal = run.internal
            ndata = min(internal.ndata, 16)
            data = tuple(internal.data[i] for i in range(ndata))
            return InternalErrorExit(internal.suberror, b"", data, f"KVM internal error {internal.suberror}")
        if reason == k.KVM_EXIT_FAIL_ENTRY:
            return FailEntryExit(run.fail_entry.hardware_entry_failure_reason, run.fail_entry.cpu)
        if reason == k.KVM_EXIT_ARM_NISV:
            nisv = run.arm_nisv
            return InternalErrorExit(
                reason,
                b"",
                (nisv.esr_iss, nisv.fault_ipa),
                f"MMIO at {nisv.fault_ipa:#x} without a valid instruction syndrome (ESR ISS {nisv.esr_iss:#x})",
            )
        raise UnknownExitError("KVM_RUN", reason)

    # --- one-reg access -------------------------------------------------------------
    def get_one_reg(self, reg_id: int) -> int:
        """``KVM_GET_ONE_REG``: the register ``reg_id`` as an unsigned integer."""
        return int.from_bytes(self.get_one_reg_bytes(reg_id), "little")

    def get_one_reg_bytes(self, reg_id: int) -> bytes:
        """``KVM_GET_ONE_REG``: the register ``reg_id`` as KVM moves it (little-endian)."""
        size = arm64_regs.reg_size(reg_id)
        buffer = ffi.new("uint8_t[]", size)
        one = ffi.new("struct kvm_one_reg *", {"id": reg_id, "addr": address_of(buffer)})
        self.host.ioctl(self.fd, k.KVM_GET_ONE_REG, one, detail=f"register {reg_id:#x}")
        return bytes(ffi.buffer(buffer))

    def set_one_reg_bytes(self, reg_id: int, value: bytes) -> None:
        """``KVM_SET_ONE_REG`` with the register's bytes (little-endian, its full width)."""
        size = arm64_regs.reg_size(reg_id)
        if len(value) != size:
            raise ConfigError(f"register {reg_id:#x}: {len(value)} bytes for a {size}-byte register")
        buffer = ffi.new("uint8_t[]", value)
        one = ffi.new("struct kvm_one_reg *", {"id": reg_id, "addr": address_of(buffer)})
        self.host.ioctl(self.fd, k.KVM_SET_ONE_REG, one, detail=f"register {reg_id:#x}")

    def set_one_reg(self, reg_id: int, value: int) -> None:
        """``KVM_SET_ONE_REG``.

        :raises ConfigError: ``value`` does not fit the register's width.
        """
        size = arm64_regs.reg_size(reg_id)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << (8 * size):
            raise ConfigError(f"register {reg_id:#x}: {value!r} does not fit its {8 * size} bits")
        buffer = ffi.new("uint8_t[]", value.to_bytes(size, "little"))
        one = ffi.new("struct kvm_one_reg *", {"id": reg_id, "addr": address_of(buffer)})
        self.host.ioctl(self.fd, k.KVM_SET_ONE_REG, one, detail=f"register {reg_id:#x}")

    def reg_list(self) -> list[int]:
        """``KVM_GET_REG_LIST``: every register id this vCPU has (asked once with
        room for none, KVM answers E2BIG with the count)."""
        count = 0
        while True:
            raw = ffi.new("struct kvm_reg_list *", {"n": count, "reg": count})
            try:
                self.host.ioctl(self.fd, k.KVM_GET_REG_LIST, raw)
            except HypervisorError as exc:
                if exc.errno != errno.E2BIG or raw.n <= count:
                    raise
                count = int(raw.n)
                continue
            return [int(raw.reg[i]) for i in range(raw.n)]

    def mpidr(self) -> int:
        """MPIDR_EL1, which PSCI ``CPU_ON`` names a vCPU by."""
        return self.get_one_reg(MPIDR_EL1_ID)

    # --- init and state -------------------------------------------------------
    def init(self, boot: VcpuInit) -> None:
        if not isinstance(boot, Aarch64VcpuInit):
            raise ConfigError(f"KVM arm64 vCPU {self.index} cannot take {type(boot).__name__}")
        boot.check()
        ordered = arm64_regs.boot_order(boot.regs)
        if boot.power_off != self.started_powered_off:
            state = k.KVM_MP_STATE_STOPPED if boot.power_off else k.KVM_MP_STATE_RUNNABLE
            self.set_mp_state(state)
        for reg_id, value in ordered:
            self.set_one_reg(reg_id, value)

    def get_mp_state(self) -> int:
        raw = ffi.new("struct kvm_mp_state *")
        self.host.ioctl(self.fd, k.KVM_GET_MP_STATE, raw)
        return int(raw.mp_state)

    def set_mp_state(self, state: int) -> None:
        """``KVM_SET_MP_STATE``: RUNNABLE or STOPPED (powered off) on arm64."""
        self.host.ioctl(self.fd, k.KVM_SET_MP_STATE, ffi.new("struct kvm_mp_state *", {"mp_state": state}))

    def get_state(self, kind: StateKind) -> Any:
        if kind is StateKind.CORE_REGS:
            return arm64_regs.read_core_regs(self.get_one_reg)
        if kind is StateKind.REGISTER_LIST:
            return [OneReg(reg_id, self.get_one_reg_bytes(reg_id)) for reg_id in self.reg_list()]
        if kind is StateKind.MP_STATE:
            return _mp_state(self.get_mp_state())
        raise ConfigError(f"KVM arm64 vCPUs have no {kind.value} state (CORE_REGS, REGISTER_LIST, MP_STATE)")

    def set_state(self, kind: StateKind, value: Any) -> None:
        if kind is StateKind.CORE_REGS:
            if not isinstance(value, CoreRegs):
                raise ConfigError(f"CORE_REGS takes CoreRegs, not {type(value).__name__}")
            arm64_regs.write_core_regs(value, self.set_one_reg)
        elif kind is StateKind.REGISTER_LIST:
            self._set_register_list(value)
        elif kind is StateKind.MP_STATE:
            if not isinstance(value, MpState):
                raise ConfigError(f"MP_STATE on aarch64 takes pyvmm.arch.aarch64.MpState, not {value!r}")
            self.set_mp_state(int(value))
        else:
            raise ConfigError(f"KVM arm64 vCPUs have no {kind.value} state (CORE_REGS, REGISTER_LIST, MP_STATE)")

    def _set_register_list(self, registers: Any) -> None:
        """Write every register of a ``REGISTER_LIST`` in its order (KVM lists the
        core registers first, then the firmware, timer and system registers,
        ``kvm_arm_copy_reg_indices`` in arch/arm64/kvm/guest.c: the order QEMU
        writes them too).  Every id must be one this vCPU lists: an id it lacks
        is a snapshot of another vCPU (SVE, PMU, ptrauth features), refused
        before anything is written."""
        if not isinstance(registers, list) or not all(isinstance(r, OneReg) for r in registers):
            raise ConfigError("REGISTER_LIST takes a list of pyvmm.arch.aarch64.OneReg")
        have = set(self.reg_list())
        foreign = [r.reg_id for r in registers if r.reg_id not in have]
        if foreign:
            shown = ", ".join(f"{reg_id:#x}" for reg_id in foreign[:4])
            raise ConfigError(f"vCPU {self.index} has no register(s) {shown} (a vCPU with other features?)")
        for register in registers:
            self.set_one_reg_bytes(register.reg_id, register.value)

    def _drop_exit_views(self) -> None:
        self._mmio.data = memoryview(b"")


def _mp_state(raw: int) -> MpState:
    try:
        return MpState(raw)
    except ValueError:
        raise HypervisorError("KVM_GET_MP_STATE", 0, f"an arm64 MP state pyvmm does not know: {raw}") from None
