"""One run of a test bed: build (or reuse) the image, boot it, read the result."""

from __future__ import annotations

import os
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import cachelock, image, prune, qemu, wheels
from .arches import Arch
from .errors import GuestFailure
from .framing import FrameError, decode

CHECKOUT = Path(__file__).resolve().parents[2]


@dataclass
class Counts:
    tests: int = 0
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    #: Per-test outcomes: "passed", "failed", "error", "skipped" (xfails are skipped in junit).
    outcomes: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.passed} passed, {self.failed} failed, {self.errors} errors, {self.skipped} skipped"


def junit_counts(xml: str) -> Counts:
    counts = Counts()
    for case in ET.fromstring(xml).iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                break
        counts.outcomes[name] = outcome
        counts.tests += 1
        if outcome == "passed":
            counts.passed += 1
        elif outcome == "failed":
            counts.failed += 1
        elif outcome == "error":
            counts.errors += 1
        else:
            counts.skipped += 1
    return counts


@dataclass
class BedResult:
    arch: str
    mode: str
    exit_status: int | None
    kvm_mode_line: str
    counts: Counts
    junit: str | None
    boot_seconds: float
    console: str
    payload: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


def default_cache() -> Path:
    import os

    explicit = os.environ.get("PYVMM_TESTBED_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pyvmm-testbed"


def prune_cache(
    cache: Path, *, keep: int, in_use: list[Path], dry_run: bool = False, log: Callable[[str], None] = print
) -> bool:
    """Prune the cache unless a bed run holds it; False when one did."""
    with cachelock.exclusive(cache) as alone:
        if not alone:
            log(f"testbed: cache: another bed run is using {cache}; nothing pruned")
            return False
        for line in prune.prune(cache, keep=keep, in_use=in_use, dry_run=dry_run).lines():
            log(line)
    return True


def run_bed(
    arch: Arch,
    mode_name: str | None,
    selection: list[str],
    pytest_args: list[str],
    *,
    cpus: int = 1,
    timeout: float = 1800,
    cache_dir: Path | None = None,
    checkout: Path = CHECKOUT,
    echo: Callable[[str], None] | None = None,
    log: Callable[[str], None] = print,
    command: str | None = None,
    keep: int | None = prune.DEFAULT_KEEP,
) -> BedResult:
    """Boot ``arch``'s bed in KVM mode ``mode_name`` and run
    ``pytest --pyvmm-backend kvm SELECTION PYTEST_ARGS`` inside it (or the shell
    ``command`` instead, its output on the console).  Afterwards the cache is
    pruned to the ``keep`` most recently used entries per kind (None: not pruned)."""
    mode = arch.mode(mode_name)
    qemu.qemu_binary(arch)  # missing QEMU is said before anything is downloaded
    cache = cache_dir or default_cache()
    with cachelock.shared(cache):
        checkout_layer, checkout_wheels = image.build_checkout_layer(cache, checkout)
        base = image.build_base(arch, cache, checkout_wheels, log)
        anchor = image.build_anchor(arch, cache, log)
        wheel_dir = cache / arch.name / f"wheels-{wheels.dependencies_key(checkout_wheels, arch.wheel_platforms)}"
        in_use = [checkout_layer.parent, base.archive.parent, *([anchor] if anchor else []), wheel_dir]
        for entry in in_use:
            if entry.exists():  # a base found in the cache had no need of its wheels
                os.utime(entry)  # the entry's time is its last use: pruning keeps the latest
        settings = {
            "mode": mode.name,
            "kvm_marker": mode.dmesg_marker,
            "pytest": ["--pyvmm-backend", "kvm", *selection, *pytest_args],
            "command": command,
        }
        with tempfile.TemporaryDirectory(prefix="pyvmm-testbed-run-") as scratch:
            run_layer = image.build_run_layer(
                arch, base, checkout, selection=selection, settings=settings, into=Path(scratch)
            )
            initrd = Path(scratch) / "initrd.cpio"
            layers = [base.archive, checkout_layer, *([anchor] if anchor else []), run_layer]
            image.concatenate(layers, initrd)
            argv = qemu.command(arch, mode, base.kernel, initrd, cpus=cpus)
            log(f"testbed: booting the {arch.name} bed ({mode.name}): {' '.join(argv)}")
            booted = qemu.boot(argv, timeout, echo)
    if keep is not None:
        prune_cache(cache, keep=keep, in_use=in_use, log=log)
    try:
        payload = decode(booted.console)
    except FrameError as error:
        tail = booted.console[-3000:]
        raise GuestFailure(f"{error}; QEMU exited {booted.exit_status}; the console's last lines:\n{tail}") from None
    if payload.get("error"):
        kvm = "\n".join(payload.get("kvm_lines") or []) or "(no line about KVM)"
        raise GuestFailure(f"{payload['error']}\nthe guest's dmesg about KVM:\n{kvm}")
    junit = payload.get("junit")
    counts = junit_counts(junit) if junit else Counts()
    return BedResult(
        arch=arch.name,
        mode=mode.name,
        exit_status=payload.get("exit_status"),
        kvm_mode_line=str(payload.get("kvm_mode_line") or ""),
        counts=counts,
        junit=junit,
        boot_seconds=booted.seconds,
        console=booted.console,
        payload=payload,
    )
