"""Run statistics (``pyvmm run --stats``): exits per kind, time in the guest and
time in Python, per vCPU.

Only collected when asked for: the vCPU loop then calls :meth:`VcpuStats.timed`
instead of the bare run function, which brackets each run with
:func:`time.perf_counter_ns` and counts the exit's kind in a list indexed by the
kind's number (no dict, no allocation).  Time in Python is the loop's wall time
minus the time spent inside run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pyvmm.exits import ExitKind, VcpuExit

_KIND_SLOTS = max(ExitKind) + 1


@dataclass
class VcpuStats:
    index: int
    counts: list[int] = field(default_factory=lambda: [0] * _KIND_SLOTS)
    guest_ns: int = 0
    wall_ns: int = 0

    def timed(self, run: Callable[[], VcpuExit]) -> Callable[[], VcpuExit]:
        """``run`` wrapped to count exits and time the guest."""
        counts = self.counts
        clock = time.perf_counter_ns

        def timed_run() -> VcpuExit:
            start = clock()
            exit_ = run()
            self.guest_ns += clock() - start
            counts[exit_.kind] += 1
            return exit_

        return timed_run

    @property
    def exits(self) -> int:
        return sum(self.counts)

    @property
    def python_ns(self) -> int:
        return max(self.wall_ns - self.guest_ns, 0)

    def by_kind(self) -> dict[str, int]:
        return {ExitKind(i).name.lower(): n for i, n in enumerate(self.counts) if n}


@dataclass
class MachineStats:
    vcpus: list[VcpuStats]

    @property
    def exits(self) -> int:
        return sum(v.exits for v in self.vcpus)

    def by_kind(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for vcpu in self.vcpus:
            for kind, count in vcpu.by_kind().items():
                total[kind] = total.get(kind, 0) + count
        return total

    def format(self) -> str:
        lines = []
        for v in self.vcpus:
            wall = v.wall_ns / 1e9
            rate = v.exits / wall if wall > 0 else 0.0
            kinds = ", ".join(f"{kind} {count}" for kind, count in v.by_kind().items()) or "none"
            guest_pct = 100.0 * v.guest_ns / v.wall_ns if v.wall_ns else 0.0
            lines.append(
                f"vCPU {v.index}: {v.exits} exits in {wall:.3f} s ({rate:.0f}/s): {kinds}; "
                f"in guest {v.guest_ns / 1e9:.3f} s ({guest_pct:.0f}%), in Python {v.python_ns / 1e9:.3f} s"
            )
        return "\n".join(lines)
