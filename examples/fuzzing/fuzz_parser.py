"""A snapshot fuzzer in one file: a small guest parser on KVM, reset by dirty pages.

The guest (real mode, 64 KiB of RAM) copies its input to a buffer and checks a
four-byte magic; the planted bug is a wild write outside guest RAM when the
input starts with ``FUZZ``.  Each iteration the harness writes a mutated input
into guest memory, runs the vCPU to its next exit, and tells a crash (an MMIO
exit: a write to memory the guest does not have) from a normal end (the
``out 0x10`` that reports the result), then puts the VM back with
:class:`pyvmm.reset_point.ResetPoint` -- only the pages the iteration dirtied
are copied.  It prints executions per second and the crashing inputs found.

    python examples/fuzzing/fuzz_parser.py [--seconds S | --iterations N] [--seed N]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass, field

from pyvmm.boot import BootSpec, X86Mode
from pyvmm.config import Arch
from pyvmm.exits import ExitKind
from pyvmm.reset_point import ResetPoint
from pyvmm.vm import Vcpu, Vm, get_backend

CODE = 0x1000
INPUT = 0x3000
INPUT_SIZE = 64
REPORT_PORT = 0x10
SEED_INPUTS = (b"FUZ!", b"FOO?", b"QUZZ")


def _parser() -> bytes:
    """The guest, assembled here so each jump's offset is computed, not typed."""
    check = [bytes.fromhex(f"807c{i:02x}{ord(c):02x}") for i, c in enumerate("FUZZ")]
    crash = bytes.fromhex("b8ffff8ec026c606100001")  # es = 0xffff; mov byte [es:0x10], 1 -> 1 MiB
    tail = crash
    for test in reversed(check):  # cmp byte [si+i], c; jne ok -- ok is right after the crash
        tail = test + bytes([0x75, len(tail)]) + tail
    copy = bytes.fromhex("be0030bf0040b94000f3a4be0030")  # rep movsb input to 0x4000, si = input
    return copy + tail + bytes.fromhex("e610f4")  # ok: out 0x10, al; hlt


@dataclass
class Campaign:
    executions: int = 0
    crashes: list[bytes] = field(default_factory=list)
    seconds: float = 0.0


#: Bytes that appear in the seeds: half the mutations pick one of these (a
#: fuzzer's dictionary), the other half any byte.
DICTIONARY = bytes(sorted(set(b"".join(SEED_INPUTS))))


def _mutate(rng: random.Random, data: bytes) -> bytes:
    mutated = bytearray(data)
    for _ in range(rng.choice((1, 1, 2))):
        value = rng.choice(DICTIONARY) if rng.random() < 0.5 else rng.randrange(256)
        mutated[rng.randrange(len(mutated))] = value
    return bytes(mutated)


def _machine() -> tuple[Vm, Vcpu]:
    vm = get_backend("kvm").create_vm({"arch": "x86_64"})
    try:
        vm.add_memory(0, 0x10000, log_dirty=True)
        vm.memory.write(CODE, _parser())
        vcpu = vm.create_vcpu()
        vm.boot(BootSpec(arch=Arch.X86_64, entry=CODE, x86_mode=X86Mode.REAL))
    except BaseException:
        vm.close()
        raise
    return vm, vcpu


def fuzz(*, iterations: int | None, seconds: float | None, seed: int) -> Campaign:
    """Run until ``iterations`` executions or ``seconds`` have passed."""
    rng = random.Random(seed)
    campaign = Campaign()
    vm, vcpu = _machine()
    with vm:
        point = ResetPoint.capture(vm)
        start = time.perf_counter()
        deadline = None if seconds is None else start + seconds
        while (iterations is None or campaign.executions < iterations) and (
            deadline is None or time.perf_counter() < deadline
        ):
            data = _mutate(rng, rng.choice(SEED_INPUTS))
            point.write(INPUT, data.ljust(INPUT_SIZE, b"\0"))
            exit_ = vcpu.run()
            if exit_.kind is ExitKind.MMIO:
                campaign.crashes.append(data)
            elif exit_.kind is not ExitKind.IO or exit_.port != REPORT_PORT:  # type: ignore[attr-defined]
                raise RuntimeError(f"the parser stopped unexpectedly: {exit_!r}")
            point.reset()
            campaign.executions += 1
        campaign.seconds = time.perf_counter() - start
    return campaign


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    limit = parser.add_mutually_exclusive_group()
    limit.add_argument("--seconds", type=float, default=None, help="run this long (default 5 s)")
    limit.add_argument("--iterations", type=int, default=None, help="run this many executions")
    parser.add_argument("--seed", type=int, default=19)
    args = parser.parse_args(argv)
    seconds = 5.0 if args.seconds is None and args.iterations is None else args.seconds
    campaign = fuzz(iterations=args.iterations, seconds=seconds, seed=args.seed)
    rate = campaign.executions / campaign.seconds if campaign.seconds else 0.0
    print(f"{campaign.executions} executions in {campaign.seconds:.2f} s: {rate:.0f} executions per second")
    unique = sorted(set(campaign.crashes))
    print(f"crashes: {len(campaign.crashes)} ({len(unique)} distinct inputs)")
    for data in unique[:5]:
        print(f"  crashing input: {data!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
