"""KVM exit round trips and VM lifecycle: pyvmm against a raw Python loop and C.

Runs, side by side in one process run, the same guest (real mode, a tight
``out dx, al`` or ``mov [bx], al`` loop) through

* ``c``: ``benchmarks/c/kvm_loop.c``, compiled here with the system compiler;
* ``raw``: ``benchmarks/raw_kvm_loop.py``, fcntl.ioctl and an mmap, no pyvmm;
* ``pyvmm``: the full API path: ``Vcpu.run()`` -> exit -> a device looked up on
  a port/address map -> completion written into ``exit.data``.

A further row runs the MMIO guest with its address in a coalesced zone
(``Vm.register_coalesced_io``): the guest exits only when the ring is full, and
the cost per write (every write still handed to the device, in guest order) is
printed as a ratio to the C loop's exit round trip.

Each is measured in several interleaved rounds (the machine is shared) and the
median is printed with its ratio to C.  Not a test: it prints, it never fails
on a number.

    python benchmarks/bench_kvm_exits.py [--exits N] [--vms N] [--rounds N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import raw_kvm_loop  # noqa: E402 - a sibling script, not a package

from pyvmm.boot import BootSpec, X86Mode  # noqa: E402
from pyvmm.exits import ExitKind, IoExit, MmioExit  # noqa: E402
from pyvmm.vcpu_state import IoEventAddress  # noqa: E402
from pyvmm.vm import Backend, get_backend  # noqa: E402

WARMUP = 16


def build_c_loop(workdir: Path) -> Path | None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    binary = workdir / "kvm_loop"
    subprocess.run([compiler, "-O2", "-o", str(binary), str(HERE / "c" / "kvm_loop.c")], check=True)
    return binary


def c_loop(binary: Path, kind: str, n: int) -> float:
    out = subprocess.run([str(binary), kind, str(n)], check=True, capture_output=True, text=True).stdout
    return float(out.strip().split("=", 1)[1])


def _pyvmm_vm(backend: Backend, kind: str) -> tuple[object, object]:
    vm = backend.create_vm({"arch": "x86_64"})
    vm.add_memory(0, raw_kvm_loop.RAM_SIZE)
    vm.memory.write(raw_kvm_loop.CODE_GPA, raw_kvm_loop.GUEST_CODE[kind])
    vcpu = vm.create_vcpu()
    vm.boot(
        BootSpec(
            arch="x86_64",
            entry=raw_kvm_loop.CODE_GPA,
            x86_mode=X86Mode.REAL,
            registers={"rax": 0x5A, "rdx": raw_kvm_loop.PIO_PORT},
        )
    )
    sregs = vcpu.get_sregs()
    sregs.ds.base, sregs.ds.selector = raw_kvm_loop.MMIO_GPA, raw_kvm_loop.MMIO_DS_SELECTOR
    vcpu.set_sregs(sregs)
    return vm, vcpu


def pyvmm_loop(backend: Backend, kind: str, n: int) -> float:
    """The path a VMM built on pyvmm takes per exit: run, look the device up,
    let it handle the access (a write here: the device keeps the last value)."""
    vm, vcpu = _pyvmm_vm(backend, kind)
    latch = bytearray(8)

    def device(exit_: IoExit | MmioExit) -> None:
        if exit_.is_write:
            latch[0] = exit_.data[0]
        else:
            exit_.data[0] = latch[0]

    ports: dict[int, Callable[[IoExit], None]] = {raw_kvm_loop.PIO_PORT: device}
    mmio: dict[int, Callable[[MmioExit], None]] = {raw_kvm_loop.MMIO_GPA: device}
    run = vcpu.run  # type: ignore[attr-defined]
    io_kind, mmio_kind = ExitKind.IO, ExitKind.MMIO

    def spin(count: int) -> int:
        t0 = time.perf_counter_ns()
        for _ in range(count):
            exit_ = run()
            kind_ = exit_.kind
            if kind_ is io_kind:
                ports[exit_.port](exit_)
            elif kind_ is mmio_kind:
                mmio[exit_.address](exit_)
            else:
                raise RuntimeError(f"unexpected exit {exit_!r}")
        return time.perf_counter_ns() - t0

    try:
        spin(WARMUP)
        return spin(n) / n
    finally:
        vm.close()  # type: ignore[attr-defined]
        assert latch[0] == 0x5A


def pyvmm_coalesced_loop(backend: Backend, n: int) -> float:
    """The MMIO guest's write loop with its address in a coalesced zone: the
    guest exits only when the ring is full; every write still reaches the
    device, in guest order, taken from the ring before the exit is handled."""
    vm, vcpu = _pyvmm_vm(backend, "mmio")
    latch = bytearray(8)
    run = vcpu.run  # type: ignore[attr-defined]
    take = vm.take_coalesced_io  # type: ignore[attr-defined]

    def spin(count: int) -> tuple[int, int]:
        writes = 0
        t0 = time.perf_counter_ns()
        while writes < count:
            exit_ = run()
            for write in take():
                latch[0] = write.data[0]
                writes += 1
            if exit_.kind is not ExitKind.MMIO:
                raise RuntimeError(f"unexpected exit {exit_!r}")
            latch[0] = exit_.data[0]
            writes += 1
        return time.perf_counter_ns() - t0, writes

    try:
        vm.register_coalesced_io(IoEventAddress.mmio(raw_kvm_loop.MMIO_GPA), 8)  # type: ignore[attr-defined]
        spin(WARMUP)
        elapsed, writes = spin(n)
        return elapsed / writes
    finally:
        vm.close()  # type: ignore[attr-defined]
        assert latch[0] == 0x5A


def pyvmm_create(backend: Backend, n: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(n):
        with backend.create_vm({"arch": "x86_64", "backend_options": {"cpuid": "none"}}) as vm:
            vm.add_memory(0, raw_kvm_loop.RAM_SIZE)
            vm.create_vcpu()
    return (time.perf_counter_ns() - t0) / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exits", type=int, default=100_000)
    parser.add_argument("--vms", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    backend = get_backend("kvm")
    with tempfile.TemporaryDirectory() as tmp:
        binary = build_c_loop(Path(tmp))
        if binary is None:
            print("no C compiler: cannot build the C baseline", file=sys.stderr)
            return 1
        rows: list[tuple[str, dict[str, list[float]]]] = []
        for kind in ("pio", "mmio"):
            samples: dict[str, list[float]] = {"c": [], "raw": [], "pyvmm": []}
            for _ in range(args.rounds):
                samples["c"].append(c_loop(binary, kind, args.exits))
                samples["raw"].append(raw_kvm_loop._exit_loop(kind, args.exits))
                samples["pyvmm"].append(pyvmm_loop(backend, kind, args.exits))
            rows.append((f"{kind} exit round trip (ns/exit)", samples))
        coalesced: dict[str, list[float]] = {"c pio": [], "c mmio": [], "pyvmm": []}
        for _ in range(args.rounds):
            coalesced["c pio"].append(c_loop(binary, "pio", args.exits))
            coalesced["c mmio"].append(c_loop(binary, "mmio", args.exits))
            coalesced["pyvmm"].append(pyvmm_coalesced_loop(backend, args.exits))
        samples = {"c": [], "raw": [], "pyvmm": []}
        for _ in range(args.rounds):
            samples["c"].append(c_loop(binary, "create", args.vms))
            samples["raw"].append(raw_kvm_loop.create_loop(args.vms))
            samples["pyvmm"].append(pyvmm_create(backend, args.vms))
        rows.append(("VM create+destroy (ns/VM)", samples))

    print(f"median of {args.rounds} interleaved rounds; {args.exits} exits, {args.vms} VMs per round")
    print(f"{'':34} {'C':>10} {'raw Python':>12} {'pyvmm':>10} {'raw/C':>7} {'pyvmm/C':>8}")
    for label, samples in rows:
        c, raw, ours = (statistics.median(samples[k]) for k in ("c", "raw", "pyvmm"))
        print(f"{label:34} {c:10.0f} {raw:12.0f} {ours:10.0f} {raw / c:7.2f} {ours / c:8.2f}")
    c_pio, c_mmio, write = (statistics.median(coalesced[k]) for k in ("c pio", "c mmio", "pyvmm"))
    print(
        f"coalesced MMIO write, pyvmm (ns/write): {write:.0f}, "
        f"{write / c_pio:.2f}x the C PIO exit round trip ({c_pio:.0f}), "
        f"{write / c_mmio:.2f}x the C MMIO one ({c_mmio:.0f}), same rounds"
    )
    per_second = 1e9 / statistics.median(rows[-1][1]["pyvmm"])
    print(f"pyvmm VM create+destroy: {per_second:.0f} per second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
