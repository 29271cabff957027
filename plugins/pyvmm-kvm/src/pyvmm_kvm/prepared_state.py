"""KVM's prepared vCPU state (``PREPARED_VCPU_STATE``): the argument structs of
the ``KVM_SET_*`` ioctls, filled once, so that writing a saved state back costs
the ioctls alone.

A dirty-page reset writes the same registers back every iteration.  Through
:meth:`KvmVcpu.set_state <pyvmm_kvm.vcpu.KvmVcpu.set_state>` each register set
costs a struct allocation, a field-by-field conversion and, for the sets KVM
returns more of than the record holds, a ``KVM_GET_*`` first: several times the
ioctl.  Here the conversion and the ``KVM_GET_*`` happen once, when the state is
prepared; a restore is one ``KVM_SET_*`` per set, on the prebuilt struct, in the
order of :class:`~pyvmm.prepared_state.SavedVcpuState` (MSRs, register sets,
events).

A register set this module has no struct for (a kind added later) is written
back through ``set_state`` at its place in that order: slower, never skipped.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyvmm.arch.x86_64 import MsrEntry
from pyvmm.errors import HypervisorError, MsrAccessError
from pyvmm.prepared_state import SavedVcpuState
from pyvmm.vcpu_state import StateKind
from pyvmm_kvm import bindings as k
from pyvmm_kvm import regs
from pyvmm_kvm.bindings import ffi

if TYPE_CHECKING:
    from pyvmm_kvm.vcpu import KvmVcpu


class Write:
    """One ``KVM_SET_*`` ioctl on a filled struct, or (``fallback``) a call that
    writes a register set this module builds no struct for."""

    __slots__ = ("address", "fallback", "msrs", "raw", "request")

    def __init__(
        self,
        request: int,
        raw: Any,
        *,
        msrs: tuple[MsrEntry, ...] | None = None,
        fallback: Callable[[], None] | None = None,
    ) -> None:
        self.request = request
        #: The struct: kept here so its memory lives as long as the address.
        self.raw = raw
        self.address = int(ffi.cast("uintptr_t", raw)) if raw is not None else 0
        #: ``KVM_SET_MSRS`` only: the entries, to name the one KVM refuses.
        self.msrs = msrs
        self.fallback = fallback


class PreparedWrites:
    """What :func:`prepare` returns: the writes, in order, for one vCPU (core
    hands it back to that vCPU only)."""

    __slots__ = ("writes",)

    def __init__(self, writes: list[Write]) -> None:
        self.writes = tuple(writes)


def prepare(vcpu: KvmVcpu, state: SavedVcpuState) -> PreparedWrites:
    """The writes that put ``state`` back on ``vcpu``, built and checked now."""
    writes = []
    if state.msrs:
        writes.append(_msrs(state.msrs))
    writes += [_register_set(vcpu, kind, value) for kind, value in state.states]
    if state.events is not None:
        writes.append(Write(k.KVM_SET_VCPU_EVENTS, regs.events_to_kvm(state.events)))
    return PreparedWrites(writes)


def restore(vcpu: KvmVcpu, prepared: PreparedWrites) -> None:
    """Issue the prepared writes on ``vcpu``.

    :raises HypervisorError: an ioctl failed; the writes before it took effect.
    :raises MsrAccessError: KVM wrote fewer MSRs than asked (it stops at the
        first it refuses).
    """
    ioctl, errno_of, fd = vcpu._ioctl, vcpu._errno_of, vcpu.fd
    for write in prepared.writes:
        if write.fallback is not None:
            write.fallback()
            continue
        result = ioctl(fd, write.request, write.address)
        if result < 0:
            raise HypervisorError(vcpu.host.ioctl_name(write.request), errno_of(result))
        if write.request == k.KVM_SET_SREGS:
            vcpu.keep_cr8(write.raw.cr8)
        msrs = write.msrs
        if msrs is not None and result < len(msrs):
            done = tuple((e.index, e.data) for e in msrs[:result])
            raise MsrAccessError("KVM_SET_MSRS", msrs[result].index, result, done, write=True)


def _msrs(entries: tuple[MsrEntry, ...]) -> Write:
    raw = ffi.new("struct kvm_msrs *", {"nmsrs": len(entries), "entries": len(entries)})
    for i, entry in enumerate(entries):
        raw.entries[i].index, raw.entries[i].data = entry.index, entry.data
    return Write(k.KVM_SET_MSRS, raw, msrs=tuple(MsrEntry(e.index, e.data) for e in entries))


def _register_set(vcpu: KvmVcpu, kind: StateKind, value: Any) -> Write:
    """The write of one register set.  SREGS, FPU and debug registers start from
    what KVM holds now: their structs carry more than the records (the
    pending-interrupt bitmap, reserved words), as ``set_state`` does per write."""
    if kind is StateKind.REGS:
        raw = ffi.new("struct kvm_regs *")
        regs.regs_to_kvm(value, raw)
        return Write(k.KVM_SET_REGS, raw)
    if kind is StateKind.SREGS:
        raw = vcpu._get("struct kvm_sregs *", k.KVM_GET_SREGS)
        regs.sregs_to_kvm(value, raw)
        return Write(k.KVM_SET_SREGS, raw)
    if kind is StateKind.FPU:
        raw = vcpu._get("struct kvm_fpu *", k.KVM_GET_FPU)
        regs.fpu_to_kvm(value, raw)
        return Write(k.KVM_SET_FPU, raw)
    if kind is StateKind.DEBUG_REGS:
        raw = vcpu._get("struct kvm_debugregs *", k.KVM_GET_DEBUGREGS)
        regs.debugregs_to_kvm(value, raw)
        return Write(k.KVM_SET_DEBUGREGS, raw)
    if kind is StateKind.XCRS:
        raw = ffi.new("struct kvm_xcrs *")
        raw.nr_xcrs = len(value)
        for i, xcr in enumerate(value):
            raw.xcrs[i].xcr, raw.xcrs[i].value = xcr.index, xcr.value
        return Write(k.KVM_SET_XCRS, raw)
    if kind is StateKind.XSAVE:
        return Write(k.KVM_SET_XSAVE, vcpu.xsave_argument(value))
    if kind is StateKind.MP_STATE:
        return Write(k.KVM_SET_MP_STATE, ffi.new("struct kvm_mp_state *", {"mp_state": int(value)}))
    if kind is StateKind.LAPIC:
        raw = ffi.new("struct kvm_lapic_state *")
        ffi.buffer(raw)[:] = bytes(value.regs).ljust(1024, b"\0")[:1024]
        return Write(k.KVM_SET_LAPIC, raw)
    # Refused now if KVM has no such set, as set_state would refuse it later.
    vcpu.get_state(kind)
    kept = copy.deepcopy(value)
    return Write(0, None, fallback=lambda: vcpu.set_state(kind, kept))
