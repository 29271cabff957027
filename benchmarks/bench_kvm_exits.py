"""KVM exit round trips and VM lifecycle: pyvmm against a raw Python loop and C.

Runs, side by side in one process run, the same guest (real mode, a tight
``out dx, al`` or ``mov [bx], al`` loop) through

* ``c``: ``benchmarks/c/kvm_loop.c``, compiled here with the system compiler;
* ``raw``: ``benchmarks/raw_kvm_loop.py``, fcntl.ioctl and an mmap, no pyvmm;
* ``pyvmm``: the full API path: ``Vcpu.run()`` -> exit -> a device looked up on
  a port/address map -> completion written into ``exit.data``, once on each of
  pyvmm-kvm's exit paths: ``compiled`` (``pyvmm_kvm._fast_exits``, where it was
  built) and ``pure`` (``PYVMM_KVM_PURE_EXITS=1``);
* ``pyvmm served``: the same guest with the device a served register
  (``Vm.serve_io``, ``LatchedBytes``): answered inside ``Vcpu.run()``, which a
  kick ends after ``--served-seconds``; the time per answered access.

Further rows run the MMIO and the PIO guest with the address or port in a
coalesced zone (``Vm.register_coalesced_io``): the guest exits to user space
only when the ring is full, and the cost per write (every write still handed
to the device, in guest order) is printed as a ratio to the C loop's exit
round trip and to the C loop's own coalesced write (``kvm_loop coalesced`` and
``coalesced-pio``: each write still exits to the kernel, which is the floor).

Each is measured in several interleaved rounds (the machine is shared) and the
median is printed with its ratio to C.  Not a test: it prints, it never fails
on a number.

    python benchmarks/bench_kvm_exits.py [--exits N] [--vms N] [--rounds N] [--served-seconds S]
                                         [--only exits|coalesced|create]

All three VM create + destroy loops issue the same ioctls: KVM_CREATE_VM,
KVM_SET_TSS_ADDR, one memory slot, one vCPU and its run page mapped (pyvmm-kvm
skips KVM_SET_IDENTITY_MAP_ADDR at KVM's default address, and the benchmark's
VMs take no CPUID).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import raw_kvm_loop  # noqa: E402 - a sibling script, not a package

from pyvmm.boot import BootSpec, X86Mode  # noqa: E402
from pyvmm.exits import ExitKind, IoExit, MmioExit  # noqa: E402
from pyvmm.served_io import LatchedBytes  # noqa: E402
from pyvmm.vcpu_state import IoEventAddress  # noqa: E402
from pyvmm.vm import Backend, get_backend  # noqa: E402
from pyvmm_kvm.fast_exits import ENV_PURE_EXITS, compiled_module  # noqa: E402

WARMUP = 16


def build_c_loop(workdir: Path) -> Path | None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    binary = workdir / "kvm_loop"
    subprocess.run([compiler, "-O2", "-o", str(binary), str(HERE / "c" / "kvm_loop.c")], check=True)
    return binary


@contextlib.contextmanager
def exit_path(path: str) -> Iterator[None]:
    """VMs created inside take pyvmm-kvm's ``compiled`` or ``pure`` exit path."""
    before = os.environ.get(ENV_PURE_EXITS)
    os.environ[ENV_PURE_EXITS] = "1" if path == "pure" else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[ENV_PURE_EXITS]
        else:
            os.environ[ENV_PURE_EXITS] = before


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


def pyvmm_served_loop(backend: Backend, kind: str, seconds: float) -> float:
    """The guest's port or MMIO byte as a served register: every access is
    answered inside ``run()``; a kick from another thread ends it."""
    vm, vcpu = _pyvmm_vm(backend, kind)
    address = IoEventAddress.pio(raw_kvm_loop.PIO_PORT) if kind == "pio" else IoEventAddress.mmio(raw_kvm_loop.MMIO_GPA)
    try:
        vm.serve_io(address, 1, LatchedBytes(0))  # type: ignore[attr-defined]
        timer = threading.Timer(seconds, vcpu.kick)  # type: ignore[attr-defined]
        t0 = time.perf_counter_ns()
        timer.start()
        exit_ = vcpu.run()  # type: ignore[attr-defined]
        elapsed = time.perf_counter_ns() - t0
        timer.join()
        if exit_.kind is not ExitKind.INTERRUPTED:
            raise RuntimeError(f"unexpected exit {exit_!r}")
        served: int = vcpu.handle.served_exits  # type: ignore[attr-defined]
        if vm.handle.served.ranges[0].latch[0] != 0x5A:  # type: ignore[attr-defined]
            raise RuntimeError("the served latch did not get the guest's byte")
        return elapsed / served
    finally:
        vm.close()  # type: ignore[attr-defined]


def pyvmm_coalesced_loop(backend: Backend, kind: str, n: int) -> float:
    """The guest's write loop with its port or address in a coalesced zone: the
    guest exits only when the ring is full; every write still reaches the
    device, in guest order, taken from the ring before the exit is handled."""
    vm, vcpu = _pyvmm_vm(backend, kind)
    expected = ExitKind.IO if kind == "pio" else ExitKind.MMIO
    zone = IoEventAddress.pio(raw_kvm_loop.PIO_PORT) if kind == "pio" else IoEventAddress.mmio(raw_kvm_loop.MMIO_GPA)
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
            if exit_.kind is not expected:
                raise RuntimeError(f"unexpected exit {exit_!r}")
            latch[0] = exit_.data[0]
            writes += 1
        return time.perf_counter_ns() - t0, writes

    try:
        vm.register_coalesced_io(zone, 1 if kind == "pio" else 8)  # type: ignore[attr-defined]
        spin(WARMUP)
        elapsed, writes = spin(n)
        return elapsed / writes
    finally:
        vm.close()  # type: ignore[attr-defined]
        assert latch[0] == 0x5A


def pyvmm_create_times(backend: Backend, n: int) -> list[int]:
    """Each VM's create + destroy in nanoseconds (a VM's deallocation lands in
    the next one's time, as the name is rebound)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        with backend.create_vm({"arch": "x86_64", "backend_options": {"cpuid": "none"}}) as vm:
            vm.add_memory(0, raw_kvm_loop.RAM_SIZE)
            vm.create_vcpu()
        times.append(time.perf_counter_ns() - t0)
    return times


def c_create(binary: Path, n: int) -> tuple[float, float]:
    """The C loop's mean and median VM create + destroy, in nanoseconds."""
    out = subprocess.run([str(binary), "create", str(n)], check=True, capture_output=True, text=True).stdout
    fields = dict(field.split("=", 1) for field in out.split())
    return float(fields["ns_per_vm"]), float(fields["median_ns_per_vm"])


def _ratio_rows(label: str, samples: dict[str, list[float]], unit: str) -> list[str]:
    base = statistics.median(samples["C"])
    return [
        f"{label:6} {name:34} {statistics.median(values):10.0f} {statistics.median(values) / base:7.2f}x"
        for name, values in samples.items()
    ] + [f"       ({unit})"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exits", type=int, default=100_000)
    parser.add_argument("--vms", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--served-seconds", type=float, default=0.4)
    parser.add_argument(
        "--only", choices=("exits", "coalesced", "create"), help="measure one group of figures (default: all)"
    )
    args = parser.parse_args()
    wanted = {args.only} if args.only else {"exits", "coalesced", "create"}
    backend = get_backend("kvm")
    paths = ["compiled", "pure"] if compiled_module() is not None else ["pure"]
    if paths == ["pure"]:
        print("pyvmm_kvm._fast_exits is not built here: the compiled rows are left out", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        binary = build_c_loop(Path(tmp))
        if binary is None:
            print("no C compiler: cannot build the C baseline", file=sys.stderr)
            return 1
        lines: list[str] = []
        for kind in ("pio", "mmio") if "exits" in wanted else ():
            samples: dict[str, list[float]] = {"C": [], "raw Python": []}
            for path in paths:
                samples[f"pyvmm {path}, device in Python"] = []
            for path in paths:
                samples[f"pyvmm {path}, served register"] = []
            for _ in range(args.rounds):
                samples["C"].append(c_loop(binary, kind, args.exits))
                samples["raw Python"].append(raw_kvm_loop._exit_loop(kind, args.exits))
                for path in paths:
                    with exit_path(path):
                        samples[f"pyvmm {path}, device in Python"].append(pyvmm_loop(backend, kind, args.exits))
                        samples[f"pyvmm {path}, served register"].append(
                            pyvmm_served_loop(backend, kind, args.served_seconds)
                        )
            lines += _ratio_rows(kind, samples, "ns per exit round trip; ratio to the C loop")
        for kind, c_kind in (("mmio", "coalesced"), ("pio", "coalesced-pio")) if "coalesced" in wanted else ():
            coalesced: dict[str, list[float]] = {"C": [], "C coalesced": []}
            for path in paths:
                coalesced[f"pyvmm {path}"] = []
            for _ in range(args.rounds):
                coalesced["C"].append(c_loop(binary, "pio", args.exits))
                coalesced["C coalesced"].append(c_loop(binary, c_kind, args.exits))
                for path in paths:
                    with exit_path(path):
                        coalesced[f"pyvmm {path}"].append(pyvmm_coalesced_loop(backend, kind, args.exits))
            unit = f"ns per coalesced {kind.upper()} write; ratio to the C PIO exit round trip"
            lines += _ratio_rows(f"c-{kind}", coalesced, unit)
            floor = statistics.median(coalesced["C coalesced"])
            for path in paths:
                ours = statistics.median(coalesced[f"pyvmm {path}"])
                lines.append(f"       pyvmm {path} / C coalesced write (the floor): {ours / floor:.2f}x")
        # Per round, each loop's mean VM and its median VM: a preemption on a
        # shared machine lands in a few VMs and moves the mean, not the median.
        create: dict[str, list[float]] = {"C": [], "raw Python": [], "pyvmm": []}
        create_median: dict[str, list[float]] = {"C": [], "raw Python": [], "pyvmm": []}
        for _ in range(args.rounds if "create" in wanted else 0):
            mean, median = c_create(binary, args.vms)
            create["C"].append(mean)
            create_median["C"].append(median)
            for name, times in (
                ("raw Python", raw_kvm_loop.create_times(args.vms)),
                ("pyvmm", pyvmm_create_times(backend, args.vms)),
            ):
                create[name].append(statistics.fmean(times))
                create_median[name].append(statistics.median(times))
        if "create" in wanted:
            lines += _ratio_rows("vm", create, "mean ns per VM create + destroy; ratio to C")
            lines += _ratio_rows("vm-p50", create_median, "median VM's ns; ratio to C")

    load = os.getloadavg()[0]
    print(f"median of {args.rounds} interleaved rounds; {args.exits} exits, {args.vms} VMs per round; load {load:.2f}")
    print(f"{'':6} {'':34} {'median':>10} {'vs C':>8}")
    print("\n".join(lines))
    if "create" in wanted:
        per_second = 1e9 / statistics.median(create["pyvmm"])
        print(f"pyvmm VM create+destroy: {per_second:.0f} per second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
