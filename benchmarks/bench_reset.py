"""Dirty-page reset (pyvmm.reset_point) on KVM, next to memcpy and a full restore.

A long-mode guest writes one byte to each of N consecutive pages and exits; the
VM is then put back with :meth:`ResetPoint.reset` (dirty log, copy the dirty
pages back, write the saved vCPU state back).  In the same rounds this prints

* ``fixed``: a reset with no page dirtied (the vCPU settled, the dirty log read,
  the vCPU state written back): what every reset costs whatever it copies;
* ``copy``: the reset less that fixed cost, i.e. the dirty pages' part;
* ``memcpy``: one ``memmove`` of N pages between two host buffers right after
  each reset -- the floor for copying that much memory in the same state of
  caches and TLB the guest run left (it writes N pages through the hypervisor);
* ``warm``: the same memmove back to back, caches warm: the floor the first
  version of this benchmark used, kept for comparison;
* ``full restore``: :meth:`ResetPoint.restore_all`, the whole guest RAM copied
  back (what a reset costs without a dirty log);

and the ratios: the reset and its page copy to memcpy, the reset to a warm
memcpy and to a full restore.  Rounds are interleaved (the machine is shared), medians printed.
Not a test: it prints, it never fails on a number.

    python benchmarks/bench_reset.py [--rounds N] [--ram MIB]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

from pyvmm.boot import BootSpec, X86Mode
from pyvmm.config import Arch
from pyvmm.exits import ExitKind
from pyvmm.reset_point import ResetPoint
from pyvmm.vm import Backend, Vcpu, get_backend

PAGE = 4096
CODE = 0x10_0000
DIRTY_BASE = 0x40_0000
#: 1: mov [rbx],al; add rbx,0x1000; dec rcx; jnz 1b; out 0x10,al; hlt
WRITE_PAGES = bytes.fromhex("88034881c30010000048ffc975f2e610f4")
COUNTS = (1, 16, 256, 4096)
REPEATS = 20  # resets timed per round and count (the median one counts)


class Sample(NamedTuple):
    """Median nanoseconds of one round at one count."""

    reset: float
    fixed: float
    memcpy: float
    warm_memcpy: float
    full: float


def _timed(vcpu: Vcpu | None, restore: Callable[[], int | None], expected: int | None) -> int:
    """Run the guest to its exit (unless ``vcpu`` is None), then time ``restore``;
    check it copied ``expected`` pages (at least that many: the log may
    over-report) where given."""
    if vcpu is not None:
        exit_ = vcpu.run()
        if exit_.kind is not ExitKind.IO:
            raise RuntimeError(f"unexpected exit {exit_!r}")
    t0 = time.perf_counter_ns()
    copied = restore()
    elapsed = time.perf_counter_ns() - t0
    if expected is not None and (copied is None or copied < expected or (expected == 0 and copied)):
        raise RuntimeError(f"{copied} pages reset, {expected} written")
    return elapsed


def _memcpy(source: ctypes.Array[ctypes.c_char], target: ctypes.Array[ctypes.c_char]) -> int:
    t0 = time.perf_counter_ns()
    ctypes.memmove(target, source, len(source))
    return time.perf_counter_ns() - t0


def measure(backend: Backend, ram: int, count: int) -> Sample:
    """One round at ``count`` dirty pages: resets after the guest wrote them,
    each followed by a memcpy of as many pages, then resets with nothing
    written, then full restores."""
    source = ctypes.create_string_buffer(count * PAGE)
    target = ctypes.create_string_buffer(count * PAGE)
    ctypes.memset(source, 0xA5, count * PAGE)  # real pages, not the shared zero page
    vm = backend.create_vm({"arch": "x86_64"})
    with vm:
        vm.add_memory(0, ram, log_dirty=True)
        vm.memory.write(CODE, WRITE_PAGES)
        vcpu = vm.create_vcpu()
        vm.boot(
            BootSpec(arch=Arch.X86_64, entry=CODE, x86_mode=X86Mode.LONG, registers={"rbx": DIRTY_BASE, "rcx": count})
        )
        point = ResetPoint.capture(vm)
        # In blocks, not alternating: a fuzzer resets after resets, and a full
        # restore (all of RAM written) just before a reset would evict the caches
        # and TLB entries that reset finds warm in a fuzzing loop.  The memcpy
        # runs right after each reset, so both see the same machine (shared, its
        # memory bandwidth changes with the other tenants' load).
        resets, copies = [], []
        for _ in range(REPEATS):
            resets.append(_timed(vcpu, point.reset, count))
            copies.append(_memcpy(source, target))
        fixed = [_timed(None, point.reset, 0) for _ in range(REPEATS)]
        fulls = [_timed(vcpu, point.restore_all, None) for _ in range(REPEATS)]
    warm = [_memcpy(source, target) for _ in range(REPEATS)]
    median = statistics.median
    return Sample(median(resets), median(fixed), median(copies), median(warm), median(fulls))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ram", type=int, default=64, help="guest RAM in MiB (default 64)")
    args = parser.parse_args()
    ram = args.ram << 20
    if DIRTY_BASE + max(COUNTS) * PAGE > ram:
        parser.error(f"--ram must be at least {(DIRTY_BASE + max(COUNTS) * PAGE) >> 20} MiB")
    backend = get_backend("kvm")
    samples: dict[int, list[Sample]] = {n: [] for n in COUNTS}
    for _ in range(args.rounds):
        for count in COUNTS:
            samples[count].append(measure(backend, ram, count))
    print(f"median of {args.rounds} interleaved rounds ({REPEATS} resets each); guest RAM {args.ram} MiB; times in us")
    print(
        f"{'dirty pages':>11} {'reset':>9} {'fixed':>7} {'copy':>9} {'memcpy':>9} {'warm':>9} {'full':>9} "
        f"{'reset/memcpy':>13} {'copy/memcpy':>12} {'reset/warm':>11} {'reset/full':>11}"
    )
    for count in COUNTS:
        rows = samples[count]
        reset, fixed, copy, warm, full = (statistics.median(getattr(s, f) for s in rows) for f in Sample._fields)
        pages = max(reset - fixed, 0.0)
        print(
            f"{count:>11} {reset / 1e3:9.1f} {fixed / 1e3:7.1f} {pages / 1e3:9.1f} {copy / 1e3:9.1f} {warm / 1e3:9.1f} "
            f"{full / 1e3:9.1f} {reset / copy:12.2f}x {pages / copy:11.2f}x {reset / warm:10.2f}x {reset / full:10.3f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
