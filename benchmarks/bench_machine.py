"""Exit round trips through pyvmm's x86_64 machine on KVM, next to C and raw Python.

The machine path is the whole thing ``pyvmm run`` does per exit: the vCPU
thread's run loop, the stop-flag check, the port dict (or MMIO bisect) lookup,
the device's ``write`` and back into the guest.  The PIO guest is the same
real-mode ``out dx, al; jmp`` loop as ``benchmarks/c/kvm_loop.c`` and
``raw_kvm_loop.py``; the MMIO guest is a long-mode ``mov [rbx], al; jmp`` loop
(the machine's RAM covers what a real-mode guest can address), so its C and
raw numbers are for the real-mode MMIO guest and only indicative.

Rounds are interleaved (the machine is shared) and the median is printed with
ratios.  Not a test: it prints, it never fails on a number.

    python benchmarks/bench_machine.py [--exits N] [--rounds N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import raw_kvm_loop  # noqa: E402 - a sibling script, not a package

from pyvmm.boot import X86Mode  # noqa: E402
from pyvmm.devices.base import Device  # noqa: E402
from pyvmm.machine import GuestImage, Machine, MachineConfig, StopReason  # noqa: E402

WARMUP = 16
MMIO_ADDRESS = 0xD000_0000
#: Long mode: ``mov rbx, 0xd0000000`` comes from the boot registers; then
#: ``1: mov [rbx], al; jmp 1b``.
MMIO_LOOP_64 = bytes.fromhex("8803ebfc")


class CountingDevice(Device):
    """Times ``n`` writes after a warm-up, then stops the machine."""

    name = "bench"

    def __init__(self, n: int) -> None:
        self.n = n
        self.count = 0
        self.start_ns = 0
        self.end_ns = 0
        self.machine: Machine | None = None

    def write(self, offset: int, size: int, value: int) -> None:
        self.count += 1
        if self.count == WARMUP:
            self.start_ns = time.perf_counter_ns()
        elif self.count == WARMUP + self.n:
            self.end_ns = time.perf_counter_ns()
            assert self.machine is not None
            self.machine.request_stop(StopReason.POWEROFF, 0, "benchmark done")


def machine_loop(kind: str, n: int) -> float:
    device = CountingDevice(n)
    if kind == "pio":
        image = GuestImage(
            "pio loop",
            ((raw_kvm_loop.CODE_GPA, raw_kvm_loop.GUEST_CODE["pio"]),),
            raw_kvm_loop.CODE_GPA,
            X86Mode.REAL,
            registers={"rax": 0x5A, "rdx": raw_kvm_loop.PIO_PORT},
        )
    else:
        image = GuestImage(
            "mmio loop", ((0x10_0000, MMIO_LOOP_64),), 0x10_0000, X86Mode.LONG, registers={"rbx": MMIO_ADDRESS}
        )
    with Machine(MachineConfig(backend="kvm", serial="none", memory=16 << 20), image=image) as machine:
        device.machine = machine
        if kind == "pio":
            machine.pio.register(raw_kvm_loop.PIO_PORT, 1, device)
        else:
            machine.mmio.register(MMIO_ADDRESS, 0x1000, device)
        result = machine.run()
    if result.reason is not StopReason.POWEROFF:
        raise RuntimeError(f"the benchmark guest stopped early: {result}")
    return (device.end_ns - device.start_ns) / n


def c_loop(binary: Path, kind: str, n: int) -> float:
    out = subprocess.run([str(binary), kind, str(n)], check=True, capture_output=True, text=True).stdout
    return float(out.strip().split("=", 1)[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exits", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    compiler = shutil.which("cc") or shutil.which("gcc")
    with tempfile.TemporaryDirectory() as tmp:
        binary: Path | None = None
        if compiler is not None:
            binary = Path(tmp) / "kvm_loop"
            subprocess.run([compiler, "-O2", "-o", str(binary), str(HERE / "c" / "kvm_loop.c")], check=True)
        rows = []
        for kind in ("pio", "mmio"):
            samples: dict[str, list[float]] = {"c": [], "raw": [], "machine": []}
            for _ in range(args.rounds):
                if binary is not None:
                    samples["c"].append(c_loop(binary, kind, args.exits))
                samples["raw"].append(raw_kvm_loop._exit_loop(kind, args.exits))
                samples["machine"].append(machine_loop(kind, args.exits))
            rows.append((kind, samples))
    print(f"median of {args.rounds} interleaved rounds, {args.exits} exits each (ns per exit)")
    print(f"{'':6} {'C':>9} {'raw Python':>11} {'machine':>9} {'machine/C':>10} {'machine/raw':>12} {'exits/s':>9}")
    for kind, samples in rows:
        c = statistics.median(samples["c"]) if samples["c"] else float("nan")
        raw, ours = statistics.median(samples["raw"]), statistics.median(samples["machine"])
        print(f"{kind:6} {c:9.0f} {raw:11.0f} {ours:9.0f} {ours / c:10.2f} {ours / raw:12.2f} {1e9 / ours:9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
