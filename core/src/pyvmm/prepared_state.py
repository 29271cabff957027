"""A vCPU's saved state, made ready once to be written back many times.

A fuzzer resets the same vCPU to the same registers thousands of times a
second.  Writing typed records back each time (:meth:`pyvmm.vm.Vcpu.set_state`)
converts every field into the hypervisor's structs again and checks every
value again: on KVM that costs several times the system calls themselves.  So
the state is prepared once (:meth:`pyvmm.vm.Vcpu.prepare_state`) and written
back from what was prepared (:meth:`pyvmm.vm.Vcpu.restore_state`): on a backend
declaring ``PREPARED_VCPU_STATE``, one hypervisor call per register set with
nothing built in between; on any other, through the register hooks, in the
same order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pyvmm.lean_dataclass import lean_dataclass
from pyvmm.vcpu_state import StateKind

if TYPE_CHECKING:
    from pyvmm.arch.x86_64 import MsrEntry, VcpuEvents
    from pyvmm.vm import Vcpu


@lean_dataclass(frozen=True)
class SavedVcpuState:
    """What is written back to one vCPU, in this order: the MSRs, then the
    register sets in the order given, then the pending events.

    MSRs go first so that the register sets after them win where both hold a
    value (x86 EFER is in the segment registers and in the MSRs); the events go
    last because the hypervisor checks them against the registers (an exception
    pending in real mode has no error code).
    """

    #: ``(kind, record)`` pairs, as :meth:`pyvmm.vm.Vcpu.get_state` returned them.
    states: tuple[tuple[StateKind, Any], ...]
    #: x86 MSRs (backends with ``MSRS``), empty for none.
    msrs: tuple[MsrEntry, ...] = ()
    #: x86 pending events (backends with ``VCPU_EVENTS``), None to leave them.
    events: VcpuEvents | None = None


class PreparedVcpuState:
    """A :class:`SavedVcpuState` made ready for one vCPU by
    :meth:`pyvmm.vm.Vcpu.prepare_state`; only that vCPU takes it back.

    ``backend_state`` is what the backend's ``pyvmm_prepare_vcpu_state``
    returned, or None where the backend lacks ``PREPARED_VCPU_STATE`` (core then
    writes ``state`` back with the register hooks).
    """

    __slots__ = ("backend_state", "state", "vcpu")

    def __init__(self, vcpu: Vcpu, state: SavedVcpuState, backend_state: Any) -> None:
        self.vcpu = vcpu
        self.state = state
        self.backend_state = backend_state

    def __repr__(self) -> str:
        kinds = ", ".join(kind.value for kind, _ in self.state.states)
        return f"PreparedVcpuState(vCPU {self.vcpu.index}: {kinds}, {len(self.state.msrs)} MSRs)"
