"""How a machine run ends: the reason and the process exit status.

Statuses follow one rule so that none can be mistaken for another:

* a write of ``code`` to the debug-exit port: ``(code << 1) | 1`` (always odd),
  exactly QEMU's isa-debug-exit, which kvm-unit-tests' runner decodes;
* a clean stop the guest asked for (power-off, reset, every vCPU halted): 0;
* the guest could not go on (triple fault, crash event, an instruction the
  hypervisor cannot emulate, entry failure, an unexpected exit): 4;
* ``--timeout`` ran out: 124, as timeout(1);
* Ctrl-C: 130 (128 + SIGINT), as a shell reports it.

Status 2 is left to ``pyvmm: error:`` (bad configuration, bad image, a device
that raised), which is reported as an exception, not a :class:`RunResult`.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from pyvmm.lean_dataclass import lean_dataclass

if TYPE_CHECKING:
    from pyvmm.machine.stats import MachineStats

STATUS_CLEAN = 0
#: What ``pyvmm run`` exits with for ``pyvmm: error:`` (the run raised).
STATUS_ERROR = 2
STATUS_GUEST_FAILED = 4
STATUS_TIMEOUT = 124
STATUS_INTERRUPTED = 130


class StopReason(str, enum.Enum):
    DEBUG_EXIT = "debug-exit"
    POWEROFF = "poweroff"
    RESET = "reset"
    HALTED = "halted"
    TRIPLE_FAULT = "triple-fault"
    CRASHED = "crashed"
    EMULATION_ERROR = "emulation-error"
    ENTRY_FAILED = "entry-failed"
    UNEXPECTED_EXIT = "unexpected-exit"
    TIMEOUT = "timeout"
    INTERRUPTED = "interrupted"
    #: The machine stopped to save a snapshot (``--snapshot-to``): status 0.
    SNAPSHOT = "snapshot"
    #: A device or the backend raised; :meth:`Machine.run` re-raises it.
    ERROR = "error"


@lean_dataclass(frozen=True)
class RunResult:
    reason: StopReason
    #: The process exit status ``pyvmm run`` ends with.
    status: int
    #: One line for a human: what happened, on which vCPU.
    detail: str = ""
    #: The debug-exit code the guest wrote (DEBUG_EXIT only).
    code: int | None = None
    stats: MachineStats | None = None

    def __str__(self) -> str:
        return f"{self.reason.value} (status {self.status}){': ' + self.detail if self.detail else ''}"
