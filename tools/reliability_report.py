#!/usr/bin/env python3
"""Reliability report: hostile-input campaigns against pyvmm, with a table of
what happened.

Campaigns (``--campaigns``, default all):

``loader:<kind>``   mutated kernel images for each loader (flat, elf, multiboot,
                    bzimage, pvh, arm64), with random command lines and initrds
                    (sometimes a FIFO); clean = loaded with every written byte
                    inside the reported extents, or refused with ImageError and
                    guest RAM untouched;
``machine-file``    random and mutated TOML machine files; clean = a config
                    whose values are in range, or ConfigError;
``guest-memory``    random guest-memory calls (addresses at region edges, values
                    of every size and type); clean = done, or a pyvmm error;
``guests:<mode>``   random bytes run as a guest in real, protected and long mode
                    on the best available backend (KVM here), each case in a
                    worker subprocess so that a crash is seen; clean = the run
                    ended in a documented exit (the exit kinds are histogrammed)
                    or a typed pyvmm error.  A guest still running after
                    ``--kick-after`` seconds is kicked (that counts as clean, as
                    "interrupted").

Columns: cases tried, clean, unclean (an untyped exception, or a broken
contract), hangs (a case that outlived ``--case-timeout``), crashes (a worker
killed by a signal), and the growth of open fds, threads and memory mappings
(``/proc/self/fd``, ``threading.active_count()``, ``/proc/self/maps`` lines
but the allocator's own small anonymous ones)
from after a warm-up case to the end of the campaign.  The goal is zero in every
column but "clean"; the exit status is 0 only then.

Each campaign stops at ``--cases`` cases or ``--time`` seconds, whichever comes
first.  Run from the repository with pyvmm installed (the dev venv)::

    python tools/reliability_report.py --cases 300 --time 20
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The loader tests' image builders make the seed images.
sys.path.insert(0, str(ROOT / "core" / "tests" / "loaders"))

MiB = 1 << 20
X86_RAM = 8 * MiB
ARM_BASE = 0x4000_0000
ARM_RAM = 8 * MiB
LOADERS = ("flat", "elf", "multiboot", "bzimage", "pvh", "arm64")
GUEST_MODES = ("real", "protected", "long")
ALL_CAMPAIGNS = (*(f"loader:{kind}" for kind in LOADERS), "machine-file", "guest-memory",
                 *(f"guests:{mode}" for mode in GUEST_MODES))  # fmt: skip
BOUNDARY = [
    0, 1, 0xFF, 0xFFFF, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 1 << 32, (1 << 63) - 1, (1 << 64) - 1,
    0x10_0000, X86_RAM, ARM_BASE, ARM_BASE + ARM_RAM,
]  # fmt: skip
CMDLINES = ["", "console=ttyS0", "x" * 5000, "a\0b", "bad\udcffbyte"]


# --- bookkeeping ------------------------------------------------------------------------


#: Anonymous mappings this small are the interpreter's allocator growing (pymalloc
#: arenas are 1 MiB, glibc's mmap'd chunks smaller), not something a case leaked:
#: every campaign's guest RAM is larger.
ALLOCATOR_MAPPING = 1 * MiB


def _counted(line: str) -> bool:
    """Whether a ``/proc/self/maps`` line counts: file-backed, or anonymous and
    larger than :data:`ALLOCATOR_MAPPING`."""
    fields = line.split(maxsplit=5)
    if len(fields) > 5 and fields[5].strip():
        return True
    start, end = (int(part, 16) for part in fields[0].split("-"))
    return end - start > ALLOCATOR_MAPPING


def resources() -> tuple[int, int, int]:
    """Open fds, Python threads, memory mappings of this process (those that
    :func:`_counted` keeps)."""
    gc.collect()
    fds = len(os.listdir("/proc/self/fd"))
    with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
        mappings = sum(1 for line in maps if _counted(line))
    return fds, threading.active_count(), mappings


@dataclass
class Tally:
    name: str
    tried: int = 0
    clean: int = 0
    unclean: int = 0
    hangs: int = 0
    crashes: int = 0
    growth: list[int] = field(default_factory=lambda: [0, 0, 0])
    histogram: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def note(self, problem: str) -> None:
        if len(self.problems) < 5:
            self.problems.append(problem)

    def grow(self, before: tuple[int, int, int], after: tuple[int, int, int]) -> None:
        self.growth = [max(old, b - a) for old, a, b in zip(self.growth, before, after, strict=True)]

    @property
    def ok(self) -> bool:
        return not (self.unclean or self.hangs or self.crashes or any(g > 0 for g in self.growth))


class Unclean(Exception):
    """A broken contract (memory written by a refused image, a value out of range
    in an accepted config): counted as unclean like an untyped exception."""


class _Hang(BaseException):
    """The per-case alarm: a BaseException so no ``except Exception`` swallows it."""


@contextlib.contextmanager
def alarm(seconds: float) -> Iterator[None]:
    def fire(signum: int, frame: FrameType | None) -> None:
        raise _Hang

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


Case = Callable[[], str]


def run_in_process(
    name: str,
    make_case: Callable[[random.Random], Case],
    args: argparse.Namespace,
    typed: tuple[type[BaseException], ...],
) -> Tally:
    """Run cases from ``make_case`` until the count or time budget is spent.
    A case returns its outcome label (clean); raising one of ``typed`` is clean
    too (labelled with the type); anything else is unclean."""
    tally = Tally(name)
    rng = random.Random(f"{args.seed}:{name}")
    started = time.monotonic()

    def one() -> None:
        case = make_case(rng)
        tally.tried += 1
        try:
            with alarm(args.case_timeout):
                label = case()
            tally.clean += 1
            tally.histogram[label] += 1
        except _Hang:
            tally.hangs += 1
            tally.note(f"case {tally.tried} ran over {args.case_timeout} s")
        except typed as exc:
            tally.clean += 1
            tally.histogram[type(exc).__name__] += 1
        except Exception as exc:  # noqa: BLE001 - counting what escapes is the point
            tally.unclean += 1
            tally.note(f"case {tally.tried}: {type(exc).__name__}: {exc}"[:300])

    one()  # warm-up: imports, first mappings
    before = resources()
    while tally.tried < args.cases and time.monotonic() - started < args.time:
        one()
    tally.grow(before, resources())
    tally.seconds = time.monotonic() - started
    return tally


# --- loader campaigns ----------------------------------------------------------------------


def seeds() -> dict[str, list[bytes]]:
    import struct

    from loader_images import Seg, build_bzimage, build_elf, multiboot_elf, multiboot_header, note

    from pyvmm.machine.loaders.arm64 import ARM64_MAGIC, HEADER

    high = 0xFFFF_FFFF_8000_0000
    pvh_segments = [Seg(0x20_0000, b"\x90" * 0x100, vaddr=high + 0x20_0000), Seg(0x30_0000, b"d", memsz=0x1000)]
    pvh_notes = note("GNU", 3, b"id") + note("Xen", 18, struct.pack("<Q", 0x20_0040))
    kludge = multiboot_header(1 << 16, (0x10_0000, 0x10_0000, 0, 0x10_4000, 0x10_0020)) + b"\x90" * 0x200
    arm64 = HEADER.pack(0x14000010, 0, 0x8_0000, 0x2_0000, 0b1010, 0, 0, 0, ARM64_MAGIC, 0) + b"\x1f\x20\x03\xd5" * 64
    return {
        "flat": [b"\x90" * 64 + b"\xf4", bytes(range(256)) * 16],
        "elf": [
            build_elf(64, [Seg(0x20_0000, b"\x90" * 64), Seg(0x30_0000, b"D", memsz=0x2000)], 0x20_0000),
            build_elf(32, [Seg(0x20_0000, b"\xf4" * 16)], 0x20_0000),
        ],
        "multiboot": [multiboot_elf(), kludge],
        "bzimage": [build_bzimage(pref_address=0x10_0000), build_bzimage(xloadflags=0, version=0x0206)],
        "pvh": [build_elf(64, pvh_segments, entry=0x20_0000, notes=pvh_notes)],
        "arm64": [arm64],
    }


def mutate(rng: random.Random, seed: bytes, hot: int = 0x300) -> bytes:
    data = bytearray(seed)
    # Mostly few mutations: an image with many is almost always refused at its first check.
    for _ in range(rng.choice((0, 1, 1, 2, 2, 3, 5, 8))):
        if not data:
            break
        where = rng.randrange(min(hot, len(data))) if rng.random() < 0.7 else rng.randrange(len(data))
        action = rng.choice(("byte", "u16", "u32", "u64", "cut", "grow"))
        if action == "byte":
            data[where] = rng.randrange(256)
        elif action == "cut":
            del data[where:]
        elif action == "grow":
            data += rng.randbytes(rng.randrange(512))
        else:
            size = {"u16": 2, "u32": 4, "u64": 8}[action]
            value = rng.choice(BOUNDARY) if rng.random() < 0.5 else rng.getrandbits(8 * size)
            data[where : where + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")[: len(data) - where]
    return bytes(data)


def _memory(base: int, size: int) -> Any:
    from pyvmm.config import MemoryRegionSpec
    from pyvmm.memory import GuestMemory

    memory = GuestMemory()
    memory.insert(memory.allocate(MemoryRegionSpec(guest_phys_addr=base, size=size)))
    return memory


def _outside(memory: Any, extents: list[tuple[int, int]]) -> bool:
    """Whether any byte outside ``extents`` is non-zero."""
    for region in memory:
        buf = bytearray(region.view())
        for start, end in extents:
            lo, hi = max(start, region.guest_phys_addr), min(end, region.end)
            if lo < hi:
                buf[lo - region.guest_phys_addr : hi - region.guest_phys_addr] = bytes(hi - lo)
        if buf.count(0) != len(buf):
            return True
    return False


def loader_campaign(kind: str, workdir: Path) -> Callable[[random.Random], Case]:
    from pyvmm.machine.loaders import ImageError, load_kernel
    from pyvmm.machine.loaders.arm64 import load_arm64_bytes

    images = seeds()[kind]
    kernel, initrd_path = workdir / f"kernel-{kind}", workdir / f"initrd-{kind}"

    def make(rng: random.Random) -> Case:
        data = mutate(rng, rng.choice(images)) if rng.random() < 0.9 else rng.randbytes(rng.randrange(4096))
        cmdline = rng.choice(CMDLINES) if rng.random() < 0.3 else ""
        initrd: Path | None = None
        choice = rng.random()
        with contextlib.suppress(FileNotFoundError):
            initrd_path.unlink()
        if choice < 0.1:
            os.mkfifo(initrd_path)
            initrd = initrd_path
        elif choice < 0.4:
            initrd_path.write_bytes(rng.randbytes(rng.randrange(4096)))
            initrd = initrd_path
        kernel.write_bytes(data)
        if rng.random() < 0.5:
            address: int | None = None if kind == "arm64" else rng.randrange(0x10_0000, X86_RAM - 0x2000)
        else:
            address = rng.choice([None, *BOUNDARY, rng.randrange(ARM_BASE, ARM_BASE + ARM_RAM, 4)])

        def case() -> str:
            base, size = (ARM_BASE, ARM_RAM) if kind == "arm64" else (0, X86_RAM)
            memory = _memory(base, size)
            try:
                try:
                    if kind == "arm64":
                        loaded = load_arm64_bytes(
                            "fuzzed", data, memory, ram_size=size, device_tree=lambda chosen: b"\xd0\x0d\xfe\xed",
                            cmdline=cmdline, initrd=initrd, load_address=address,
                        )  # fmt: skip
                    else:
                        flat = address if kind == "flat" else None
                        loaded = load_kernel(
                            kernel, memory, cmdline=cmdline, initrd=initrd, ram_size=size, cpus=1, load_address=flat
                        )
                except ImageError:
                    if _outside(memory, []):
                        raise Unclean("a refused image wrote guest RAM") from None
                    return "refused (ImageError)"
                if _outside(memory, loaded.extents):
                    raise Unclean("bytes changed outside the reported extents")
                if not base <= loaded.boot.entry < base + size:
                    raise Unclean(f"entry {loaded.boot.entry:#x} outside guest RAM")
                return f"loaded ({loaded.kind})"
            finally:
                memory.close()

        return case

    return make


# --- machine files and guest memory ---------------------------------------------------------

MACHINE_KEYS = ["arch", "kernel", "initrd", "load_address", "append", "memory", "cpus", "backend", "timeout",
                "serial", "stats", "irqchip", "testdev", "legacy_bios", "memroy"]  # fmt: skip


def _toml_value(rng: random.Random, depth: int = 0) -> str:
    pick = rng.randrange(9 if depth < 3 else 7)
    if pick == 0:
        return str(rng.choice([*BOUNDARY, -1, 254, 255, -(1 << 63)]))
    if pick == 1:
        return rng.choice(["inf", "-inf", "nan", "0.0", "1e300", "2.5", "-0.5"])
    if pick == 2:
        return rng.choice(["true", "false"])
    if pick in (3, 4):
        text = rng.choice(["", "128M", "1.5G", "x86_64", "aarch64", "stdio", "none", "k.bin", "é", "9" * 40])
        return json.dumps(text)
    if pick == 5:
        return json.dumps("".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randrange(12))))
    if pick == 6:
        return str(rng.getrandbits(64) - (1 << 63))
    if pick == 7:
        return "[" + ", ".join(_toml_value(rng, depth + 1) for _ in range(rng.randrange(4))) + "]"
    return "{" + ", ".join(f"k{i} = {_toml_value(rng, depth + 1)}" for i in range(rng.randrange(3))) + "}"


def machine_file_campaign(workdir: Path) -> Callable[[random.Random], Case]:
    from pyvmm.machine.config import MAX_CPUS, MAX_TIMEOUT, build_config

    path = workdir / "machine.toml"
    valid = (
        b'kernel = "k.bin"\nmemory = "256M"\ncpus = 2\ntimeout = 9.5\n'
        b'[[cpuid_overrides]]\nfunction = 1\nregister = "ecx"\nmask = 1\n'
    )

    def make(rng: random.Random) -> Case:
        if rng.random() < 0.5:
            keys = rng.sample(MACHINE_KEYS, rng.randrange(len(MACHINE_KEYS)))
            text = "".join(f"{key} = {_toml_value(rng)}\n" for key in keys)
            if rng.random() < 0.3:
                fields = rng.sample(["function", "index", "register", "value", "mask"], 3)
                text += "[[cpuid_overrides]]\n" + "".join(f"{key} = {_toml_value(rng)}\n" for key in fields)
            data = text.encode("utf-8", "surrogatepass")
        else:
            data = mutate(rng, valid, hot=len(valid))

        def case() -> str:
            path.write_bytes(data)
            config = build_config(path)
            if type(config.cpus) is not int or not 1 <= config.cpus <= MAX_CPUS:
                raise Unclean(f"cpus {config.cpus!r} accepted")
            if config.timeout is not None and not (math.isfinite(config.timeout) and 0 < config.timeout <= MAX_TIMEOUT):
                raise Unclean(f"timeout {config.timeout!r} accepted")
            config.append.encode("utf-8")
            return "accepted"

        return case

    return make


def guest_memory_campaign() -> Callable[[random.Random], Case]:
    from pyvmm.config import MemoryRegionSpec
    from pyvmm.memory import GuestMemory

    memory = GuestMemory()
    for start, size in ((0, 0x2000), (0x1_0000, 0x1000), (0x1_1000, 0x1000)):
        memory.insert(memory.allocate(MemoryRegionSpec(guest_phys_addr=start, size=size)))
    edges = [edge + delta for edge in (0, 0x2000, 0x1_0000, 0x1_1000, 0x1_2000) for delta in (-9, -1, 0, 1)]
    oddities: list[Any] = [-1, 1 << 64, (1 << 64) - 1, True, 1.5, "0x10", None, -(1 << 70)]

    def number(rng: random.Random, top: int) -> Any:
        pick = rng.random()
        return rng.choice(oddities) if pick < 0.15 else rng.choice(edges) if pick < 0.5 else rng.randrange(top)

    def make(rng: random.Random) -> Case:
        name = rng.choice(["read", "write", "fill", "view", "contains", "read_u8", "read_u16", "read_u32", "read_u64",
                           "write_u8", "write_u16", "write_u32", "write_u64"])  # fmt: skip
        gpa = number(rng, 0x1_3000)
        if name in ("read", "view", "contains"):
            call_args: tuple[Any, ...] = (gpa, number(rng, 0x40))
        elif name == "write":
            call_args = (gpa, rng.choice([rng.randbytes(rng.randrange(0x30)), "text", 5]))
        elif name == "fill":
            call_args = (gpa, number(rng, 0x40), number(rng, 0x200))
        elif name.startswith("write_"):
            call_args = (gpa, number(rng, 1 << 66))
        else:
            call_args = (gpa,)

        def case() -> str:
            result = getattr(memory, name)(*call_args)
            if isinstance(result, memoryview):
                result.release()
            return f"{name} done"

        return case

    return make


# --- random guests (worker subprocesses) ---------------------------------------------------


def guest_worker(mode: str, seed: str, first: int, count: int, kick_after: float, *, fault: str | None = None) -> None:
    """Run cases ``first .. first+count-1``, one JSON line each, then the resources.
    ``fault`` ("crash", "hang") makes case 1 do that: the report's own check."""
    from pyvmm import BootSpec, get_backend
    from pyvmm.boot import X86Mode
    from pyvmm.config import Arch
    from pyvmm.errors import PyvmmError
    from pyvmm.exits import ExitKind

    backend = get_backend()

    def case(index: int) -> dict[str, Any]:
        if index == 1 and fault == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        if index == 1 and fault == "hang":
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            time.sleep(3600)
        rng = random.Random(f"{seed}:{mode}:{index}")
        try:
            with backend.create_vm({"arch": "x86_64"}) as vm:
                vm.add_memory(0, "2M")
                entry = 0x8000 if mode == "real" else 0x10_0000
                vm.memory.write(entry, rng.randbytes(4096))
                vm.memory.write(0x9_0000 - 0x1000, rng.randbytes(0x1000))  # a random stack too
                vcpu = vm.create_vcpu()
                vm.boot(BootSpec(arch=Arch.X86_64, entry=entry, x86_mode=X86Mode(mode), stack=0x9_0000))
                timer = threading.Timer(kick_after, vcpu.kick)
                timer.start()
                try:
                    kind = "io-budget"
                    for _ in range(64):
                        exit_ = vcpu.run()
                        if exit_.kind not in (ExitKind.IO, ExitKind.MMIO):
                            kind = exit_.kind.name.lower()
                            break
                finally:
                    timer.cancel()
                    timer.join()
            return {"case": index, "result": "clean", "label": kind}
        except PyvmmError as exc:
            return {"case": index, "result": "clean", "label": type(exc).__name__}
        except Exception as exc:  # noqa: BLE001 - reported, not hidden
            text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            return {"case": index, "result": "unclean", "label": type(exc).__name__, "error": text[:300]}

    def emit(record: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()

    emit({"warmup": case(-1)["label"]})
    before = resources()
    for index in range(first, first + count):
        emit(case(index))
    emit({"resources": [before, resources()]})


def run_guests(mode: str, args: argparse.Namespace) -> Tally:
    """Random guests in ``mode`` in worker processes; a worker that dies or stops
    answering marks its case as a crash or a hang and a new worker goes on."""
    tally = Tally(f"guests:{mode}")
    started = time.monotonic()
    next_case = 0
    while next_case < args.cases and time.monotonic() - started < args.time:
        count = args.cases - next_case
        command = [sys.executable, __file__, "--worker", mode, "--seed", str(args.seed), "--first", str(next_case),
                   "--count", str(count), "--kick-after", str(args.kick_after)]  # fmt: skip
        if args.inject_fault:
            command += ["--inject-fault", args.inject_fault]
        # stderr to a file: a worker that logs a lot must not block on a full pipe.
        with (
            tempfile.TemporaryFile() as errors,
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors) as worker,
        ):
            assert worker.stdout is not None
            lines = _lines(worker.stdout.fileno())
            waiting_for = next_case
            while True:
                if time.monotonic() - started >= args.time:
                    worker.kill()
                    break
                line = next(lines, None) if _ready(worker.stdout.fileno(), args.case_timeout) else "<timeout>"
                if line == "<timeout>":
                    tally.tried += 1
                    tally.hangs += 1
                    tally.note(f"case {waiting_for}: no answer within {args.case_timeout} s")
                    worker.kill()
                    next_case = waiting_for + 1
                    break
                if line is None:  # the worker ended
                    status = worker.wait()
                    if status != 0 and waiting_for < next_case + count:
                        tally.tried += 1
                        tally.crashes += 1
                        errors.seek(0)
                        stderr = errors.read().decode(errors="replace")[-300:]
                        tally.note(f"case {waiting_for}: worker exited with {status}: {stderr}")
                        next_case = waiting_for + 1
                    else:
                        next_case = args.cases
                    break
                record = json.loads(line)
                if "warmup" in record:
                    continue
                if "resources" in record:
                    before, after = record["resources"]
                    tally.grow(tuple(before), tuple(after))
                    continue
                tally.tried += 1
                waiting_for = record["case"] + 1
                if record["result"] == "clean":
                    tally.clean += 1
                    tally.histogram[record["label"]] += 1
                else:
                    tally.unclean += 1
                    tally.note(f"case {record['case']}: {record.get('error')}")
    tally.seconds = time.monotonic() - started
    return tally


def _ready(fd: int, timeout: float) -> bool:
    readable, _, _ = select.select([fd], [], [], timeout)
    return bool(readable)


def _lines(fd: int) -> Iterator[str]:
    """Lines from ``fd``; each next() reads at most what is there (select first)."""
    buffer = b""
    while True:
        while b"\n" not in buffer:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            buffer += chunk
            if b"\n" not in buffer:
                # Part of a line: wait for the rest, a worker writes whole lines.
                select.select([fd], [], [], 5.0)
        line, buffer = buffer.split(b"\n", 1)
        yield line.decode()


# --- report ---------------------------------------------------------------------------------


def print_report(tallies: list[Tally]) -> None:
    head = f"{'campaign':<18} {'tried':>6} {'clean':>6} {'unclean':>7} {'hangs':>5} {'crashes':>7} " \
           f"{'fd+':>4} {'thr+':>4} {'maps+':>5} {'secs':>6}"  # fmt: skip
    print(head)
    print("-" * len(head))
    for t in tallies:
        fd, threads, maps = t.growth
        print(f"{t.name:<18} {t.tried:>6} {t.clean:>6} {t.unclean:>7} {t.hangs:>5} {t.crashes:>7} "
              f"{fd:>4} {threads:>4} {maps:>5} {t.seconds:>6.1f}")  # fmt: skip
    total = Tally("total")
    for t in tallies:
        total.tried += t.tried
        total.clean += t.clean
        total.unclean += t.unclean
        total.hangs += t.hangs
        total.crashes += t.crashes
    print("-" * len(head))
    print(f"{'total':<18} {total.tried:>6} {total.clean:>6} {total.unclean:>7} {total.hangs:>5} {total.crashes:>7}")
    for t in tallies:
        if t.histogram:
            outcome = ", ".join(f"{label} {count}" for label, count in t.histogram.most_common())
            print(f"\n{t.name} outcomes: {outcome}")
        for problem in t.problems:
            print(f"  {t.name}: {problem}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--campaigns", default=",".join(ALL_CAMPAIGNS), help="comma-separated (default: all)")
    parser.add_argument("--cases", type=int, default=300, help="cases per campaign at most (default 300)")
    parser.add_argument("--time", type=float, default=20.0, help="seconds per campaign at most (default 20)")
    parser.add_argument("--case-timeout", type=float, default=10.0, help="a case taking longer is a hang (10 s)")
    parser.add_argument("--kick-after", type=float, default=0.5, help="kick a random guest still running (0.5 s)")
    parser.add_argument("--seed", default="pyvmm", help="random seed (the report is reproducible)")
    parser.add_argument("--worker", choices=GUEST_MODES, help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--inject-fault", choices=("crash", "hang"), help="make random-guest case 1 crash or hang (checks the report)"
    )
    args = parser.parse_args(argv)
    if args.worker:
        guest_worker(args.worker, args.seed, args.first, args.count, args.kick_after, fault=args.inject_fault)
        return 0

    from pyvmm.errors import ConfigError, PyvmmError
    from pyvmm.machine.loaders import ImageError

    campaigns = [name.strip() for name in args.campaigns.split(",") if name.strip()]
    unknown = sorted(set(campaigns) - set(ALL_CAMPAIGNS))
    if unknown:
        parser.error(f"unknown campaign(s) {', '.join(unknown)}; known: {', '.join(ALL_CAMPAIGNS)}")
    tallies: list[Tally] = []
    with tempfile.TemporaryDirectory(prefix="pyvmm-reliability-") as tmp:
        workdir = Path(tmp)
        for name in campaigns:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            if name.startswith("loader:"):
                tallies.append(run_in_process(name, loader_campaign(name.split(":")[1], workdir), args, (ImageError,)))
            elif name == "machine-file":
                tallies.append(run_in_process(name, machine_file_campaign(workdir), args, (ConfigError,)))
            elif name == "guest-memory":
                tallies.append(run_in_process(name, guest_memory_campaign(), args, (PyvmmError,)))
            else:
                tallies.append(run_guests(name.split(":")[1], args))
    print_report(tallies)
    return 0 if all(t.ok for t in tallies) else 1


if __name__ == "__main__":
    sys.exit(main())
