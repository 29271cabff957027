"""Machine snapshots (pyvmm.machine.snapshots) on KVM: what saving and
restoring a running PC machine costs, next to building and booting one.

The guest is ``pyvmm.testing.guests.snapshot_counter`` with the in-kernel
irqchip: it asks for a snapshot after 5 timer ticks and ends after 10.  For
each RAM size, in interleaved rounds, this prints the medians of

* ``build``: building the machine (VM, RAM, irqchip, devices, image);
* ``save``: writing the snapshot once the vCPUs stopped (RAM scanned for the
  pages that are not zero, device and VM-wide state, the file);
* ``load``: reading and checking the file;
* ``restore``: putting it into a freshly built machine (RAM, devices,
  irqchip, PIT, clock; the vCPUs' state is set on their threads as they start);

the file's size, and save and restore as ratios to the build.  Not a test: it
prints, it never fails on a number.

    python benchmarks/bench_machine_snapshot.py [--rounds N] [--memory 128M 1G]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyvmm import snapshot
from pyvmm.machine import Machine, MachineConfig
from pyvmm.machine import snapshots as machine_snapshots
from pyvmm.testing.guests.snapshot_counter import expected_code, snapshot_counter_image


def _timed(record: list[float], function: Callable[..., Any]) -> Callable[..., Any]:
    def timed(*args: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args)
        finally:
            record.append(time.perf_counter() - start)

    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--memory", nargs="+", default=["128M", "1G"])
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; medians of {args.rounds} rounds")
    saves: list[float] = []
    restores: list[float] = []
    machine_snapshots.MachineSnapshots.save = _timed(saves, machine_snapshots.MachineSnapshots.save)  # type: ignore[method-assign]
    machine_snapshots.MachineSnapshots.restore = _timed(restores, machine_snapshots.MachineSnapshots.restore)  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "machine.snap"
        results: dict[str, dict[str, list[float]]] = {m: {"build": [], "load": []} for m in args.memory}
        per_memory: dict[str, tuple[list[float], list[float]]] = {m: ([], []) for m in args.memory}
        sizes: dict[str, int] = {}
        for _ in range(args.rounds):
            for memory in args.memory:
                config = MachineConfig(backend="kvm", irqchip="kernel", timeout=30, serial="none", memory=memory)
                start = time.perf_counter()
                with Machine(config, image=snapshot_counter_image()):
                    results[memory]["build"].append(time.perf_counter() - start)
                with Machine(config, image=snapshot_counter_image(), snapshot_to=path) as saving:
                    saving.run()
                sizes[memory] = path.stat().st_size
                start = time.perf_counter()
                image = snapshot.load(path)
                results[memory]["load"].append(time.perf_counter() - start)
                with Machine(config, image=snapshot_counter_image(), restore=image) as restored:
                    result = restored.run()
                if result.code != expected_code():
                    raise SystemExit(f"{memory}: the restored guest ended with {result}, not its checksum")
                per_memory[memory][0].append(saves[-1])
                per_memory[memory][1].append(restores[-1])
        for memory in args.memory:
            build = statistics.median(results[memory]["build"])
            save = statistics.median(per_memory[memory][0])
            restore = statistics.median(per_memory[memory][1])
            load = statistics.median(results[memory]["load"])
            print(
                f"{memory:>6}: file {sizes[memory]:>8} B  "
                f"build {build * 1e3:7.1f} ms  save {save * 1e3:7.1f} ms ({save / build:.2f}x build)  "
                f"load {load * 1e3:6.1f} ms  restore {restore * 1e3:7.1f} ms ({restore / build:.2f}x build)"
            )


if __name__ == "__main__":
    main()
