"""Guest-memory layout costs for N = 1k, 4k, 16k and 64k regions, side by side.

Issue 10 (item 7) measured adding 65,534 regions at over 120 s: every insertion
scanned every region for overlaps.  This prints, for each N, the total time and
the time per region of

* adding N one-page regions (``allocate`` + ``insert``) in random order, and in
  descending order (every insertion at the front of the sorted lists: the worst
  case for the C-level list insertion, a ``memmove`` of up to N pointers);
* one ``read_u8`` in each region (the lookup);
* removing them all in random order.

A flat "per region" row across N means O(N log N) overall or better.  The region
specs are built before the clock starts (their validation is not the layout's
cost), and each mapping is a real anonymous mmap.  What growth remains with the
cyclic garbage collector on is the collector's (it scans every live object, and
each region is a few); ``--no-gc`` turns it off while timing to show the layout
alone.  Not a test: it prints, it never fails on a number.

    python benchmarks/bench_guest_memory.py [--sizes 1024,4096,16384,65536] [--rounds 3] [--no-gc]
"""

from __future__ import annotations

import argparse
import functools
import gc
import random
import statistics
import time
from collections.abc import Callable

from pyvmm.config import MemoryRegionSpec
from pyvmm.memory import GuestMemory, RamRegion

PAGE = 0x1000


def _specs(count: int, order: str) -> list[MemoryRegionSpec]:
    # A page of hole between regions, so no two are adjacent.
    addresses = [n * 2 * PAGE for n in range(count)]
    if order == "random":
        random.Random(count).shuffle(addresses)
    elif order == "descending":
        addresses.reverse()
    return [MemoryRegionSpec(guest_phys_addr=address, size=PAGE) for address in addresses]


NO_GC = False


def _timed(action: Callable[[], object]) -> float:
    if NO_GC:
        gc.collect()
        gc.disable()
    try:
        start = time.perf_counter()
        action()
        return time.perf_counter() - start
    finally:
        gc.enable()


def _add_all(memory: GuestMemory, specs: list[MemoryRegionSpec], regions: list[RamRegion]) -> None:
    for spec in specs:
        region = memory.allocate(spec)
        memory.insert(region)
        regions.append(region)


def _read_each(memory: GuestMemory, addresses: list[int]) -> None:
    for address in addresses:
        memory.read_u8(address)


def _remove_all(memory: GuestMemory, regions: list[RamRegion]) -> None:
    for region in regions:
        memory.remove(region)


def _one_round(count: int) -> dict[str, float]:
    results: dict[str, float] = {}
    for order in ("random", "descending"):
        specs = _specs(count, order)
        memory = GuestMemory()
        regions: list[RamRegion] = []
        results[f"add ({order})"] = _timed(functools.partial(_add_all, memory, specs, regions))
        if order == "random":
            addresses = [spec.guest_phys_addr for spec in specs]
            results["read_u8 in each"] = _timed(functools.partial(_read_each, memory, addresses))
            random.Random(count + 1).shuffle(regions)
            results["remove (random)"] = _timed(functools.partial(_remove_all, memory, regions))
        memory.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1024,4096,16384,65536", help="comma-separated region counts")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per size; the median is printed")
    parser.add_argument("--no-gc", action="store_true", help="disable the cyclic garbage collector while timing")
    args = parser.parse_args()
    global NO_GC
    NO_GC = args.no_gc
    sizes = [int(size) for size in args.sizes.split(",")]

    medians: dict[int, dict[str, float]] = {}
    for count in sizes:
        rounds = [_one_round(count) for _ in range(args.rounds)]
        medians[count] = {what: statistics.median(r[what] for r in rounds) for what in rounds[0]}

    operations = list(medians[sizes[0]])
    width = max(len(what) for what in operations) + 2
    header = "".join(f"{f'N={count}':>22}" for count in sizes)
    print(f"{'':<{width}}{header}")
    print(f"{'':<{width}}" + "".join(f"{'total s':>11}{'us/region':>11}" for _ in sizes))
    for what in operations:
        cells = "".join(f"{medians[c][what]:>11.4f}{medians[c][what] / c * 1e6:>11.2f}" for c in sizes)
        print(f"{what:<{width}}{cells}")
    first, last = sizes[0], sizes[-1]
    print()
    print(f"cyclic garbage collector: {'off' if NO_GC else 'on'} while timing")
    print(f"growth of the per-region cost from N={first} to N={last} (1.0 = flat, {last // first}.0 = O(N^2)):")
    for what in operations:
        ratio = (medians[last][what] / last) / (medians[first][what] / first)
        print(f"  {what:<{width}}{ratio:6.2f}")


if __name__ == "__main__":
    main()
