"""Dirty-page reset (pyvmm.reset_point) on KVM, next to memcpy and a full restore.

A long-mode guest writes one byte to each of N consecutive pages and exits; the
VM is then put back with :meth:`ResetPoint.reset` (dirty log, copy the dirty
pages back, set the registers again).  In the same rounds this prints

* ``memcpy``: one ``memmove`` of N pages between two host buffers -- the floor
  for copying that much memory, with nothing else;
* ``full restore``: :meth:`ResetPoint.restore_all`, the whole guest RAM copied
  back (what a reset costs without a dirty log);

and the reset's ratio to each.  Rounds are interleaved (the machine is shared),
medians printed.  Not a test: it prints, it never fails on a number.

    python benchmarks/bench_reset.py [--rounds N] [--ram MIB]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time

from pyvmm.boot import BootSpec, X86Mode
from pyvmm.config import Arch
from pyvmm.exits import ExitKind
from pyvmm.reset_point import ResetPoint
from pyvmm.vm import Backend, get_backend

PAGE = 4096
CODE = 0x10_0000
DIRTY_BASE = 0x40_0000
#: 1: mov [rbx],al; add rbx,0x1000; dec rcx; jnz 1b; out 0x10,al; hlt
WRITE_PAGES = bytes.fromhex("88034881c30010000048ffc975f2e610f4")
COUNTS = (1, 16, 256, 4096)
REPEATS = 20  # resets timed per round and count (the median one counts)


def measure(backend: Backend, ram: int, count: int) -> tuple[float, float, float]:
    """(reset, memcpy, full restore) in ns for ``count`` dirty pages."""
    vm = backend.create_vm({"arch": "x86_64"})
    with vm:
        vm.add_memory(0, ram, log_dirty=True)
        vm.memory.write(CODE, WRITE_PAGES)
        vcpu = vm.create_vcpu()
        vm.boot(
            BootSpec(arch=Arch.X86_64, entry=CODE, x86_mode=X86Mode.LONG, registers={"rbx": DIRTY_BASE, "rcx": count})
        )
        point = ResetPoint.capture(vm)
        resets, fulls = [], []
        for i in range(REPEATS * 2):
            exit_ = vcpu.run()
            if exit_.kind is not ExitKind.IO:
                raise RuntimeError(f"unexpected exit {exit_!r}")
            t0 = time.perf_counter_ns()
            if i % 2:
                point.restore_all()
                fulls.append(time.perf_counter_ns() - t0)
            else:
                copied = point.reset()
                resets.append(time.perf_counter_ns() - t0)
                if copied < count:
                    raise RuntimeError(f"{copied} pages reset, {count} written")
    source = ctypes.create_string_buffer(count * PAGE)
    target = ctypes.create_string_buffer(count * PAGE)
    copies = []
    for _ in range(REPEATS):
        t0 = time.perf_counter_ns()
        ctypes.memmove(target, source, count * PAGE)
        copies.append(time.perf_counter_ns() - t0)
    return statistics.median(resets), statistics.median(copies), statistics.median(fulls)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ram", type=int, default=64, help="guest RAM in MiB (default 64)")
    args = parser.parse_args()
    ram = args.ram << 20
    if DIRTY_BASE + max(COUNTS) * PAGE > ram:
        parser.error(f"--ram must be at least {(DIRTY_BASE + max(COUNTS) * PAGE) >> 20} MiB")
    backend = get_backend("kvm")
    samples: dict[int, list[tuple[float, float, float]]] = {n: [] for n in COUNTS}
    for _ in range(args.rounds):
        for count in COUNTS:
            samples[count].append(measure(backend, ram, count))
    print(f"median of {args.rounds} interleaved rounds ({REPEATS} resets each); guest RAM {args.ram} MiB")
    print(f"{'dirty pages':>11} {'reset':>11} {'memcpy':>11} {'full':>11} {'reset/memcpy':>13} {'reset/full':>11}")
    for count in COUNTS:
        reset, copy, full = (statistics.median(s[i] for s in samples[count]) for i in range(3))
        print(
            f"{count:>11} {reset / 1e3:8.1f} us {copy / 1e3:8.1f} us {full / 1e3:8.1f} us "
            f"{reset / copy:12.2f}x {reset / full:10.3f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
