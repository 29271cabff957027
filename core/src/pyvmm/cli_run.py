"""``pyvmm run``: build the machine (the x86_64 PC or the aarch64 ``virt`` board)
and run a guest on it.

Registered by :func:`pyvmm.cli.build_parser` through :func:`add_run_parser`.
Kept apart from the machine so that ``pyvmm --help`` imports none of it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

EPILOG = """\
Without --kernel, pyvmm runs its bundled demo guest for the architecture, which
powers off (status 0) when every check passes.

--arch defaults to the backend's only architecture if it has one, else x86_64.
aarch64 kernels: a Linux arm64 Image, or a flat binary with --load-address; the
guest gets a device tree (RAM at 0x80000000, PL011 console at 0x9000000).

Exit status: the guest's.
  (code << 1) | 1   the guest wrote `code` to the debug-exit port 0xf4 (as QEMU's
                    isa-debug-exit, so kvm-unit-tests' runner works unchanged);
                    on aarch64 to the debug-exit register at 0xa001000
  0                 the guest powered off (port 0x8900 "Shutdown", ACPI, PSCI
                    SYSTEM_OFF) or reset the machine (pyvmm does not reboot), or
                    every vCPU halted
  2                 pyvmm: error: bad configuration or image, or a device failed
  4                 the guest could not go on: triple fault, crash, an instruction
                    the hypervisor cannot emulate (its bytes are shown)
  124               --timeout ran out
  130               interrupted (Ctrl-C)

Unhandled port and MMIO accesses read as all ones and are logged once per address.
"""

#: Machine fields and the options that set them, for error messages.
OPTION_NAMES = {
    "arch": "--arch",
    "kernel": "--kernel",
    "initrd": "--initrd",
    "load_address": "--load-address",
    "append": "--append",
    "memory": "--memory",
    "cpus": "--cpus",
    "backend": "--backend",
    "timeout": "--timeout",
    "serial": "--serial",
    "stats": "--stats",
    "testdev": "--testdev",
    "legacy_bios": "--legacy-bios",
}


def add_run_parser(sub: Any) -> None:
    """Add the ``run`` command to ``pyvmm``'s subparsers."""
    run = sub.add_parser(
        "run",
        help="run a guest on the x86_64 or aarch64 machine (the bundled demo guest without --kernel)",
        description="Run a guest on pyvmm's x86_64 PC or aarch64 virt machine.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--config", type=Path, metavar="FILE", help="TOML machine file (options override its values)")
    run.add_argument(
        "--arch",
        choices=("x86_64", "aarch64"),
        help="guest architecture (default: the backend's only one, else x86_64)",
    )
    run.add_argument(
        "--kernel",
        type=Path,
        metavar="FILE",
        help="kernel image (x86_64: multiboot, bzImage, PVH, ELF; aarch64: Image)",
    )
    run.add_argument("--initrd", type=Path, metavar="FILE", help="initrd, or multiboot module")
    run.add_argument("--append", metavar="STR", help="kernel command line")
    run.add_argument(
        "--load-address",
        type=_address,
        metavar="ADDR",
        help="the kernel is a flat binary: load it here (e.g. 0x100000) and enter it there (x86_64: in long mode)",
    )
    run.add_argument("--memory", "-m", metavar="SIZE", help="guest RAM, e.g. 128M or 2G (default 128M)")
    run.add_argument("--cpus", "--smp", type=int, metavar="N", help="vCPUs (default 1)")
    run.add_argument("--backend", metavar="NAME", help="backend (default: $PYVMM_BACKEND, else the best available)")
    run.add_argument("--timeout", type=float, metavar="S", help="stop after S seconds, exit status 124")
    run.add_argument(
        "--serial", metavar="stdio|none|FILE", help="where the console's (COM1, PL011) output goes (default stdio)"
    )
    run.add_argument(
        "--stats", action="store_true", default=None, help="print exits per kind and time in guest vs Python"
    )
    run.add_argument(
        "--testdev", action="store_true", default=None, help="x86_64: add QEMU's pc-testdev (for kvm-unit-tests)"
    )
    run.add_argument(
        "--legacy-bios",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="x86_64: set up the PC as a BIOS would: 8259s, PIT, vector table, ACPI tables, S3 resume "
        "(default: for Multiboot kernels only)",
    )
    run.set_defaults(func=cmd_run)


def _address(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an address: {text!r} (e.g. 0x100000)") from None


def cmd_run(args: argparse.Namespace) -> int:
    from pyvmm.machine.config import build_config
    from pyvmm.machine.machine import Machine
    from pyvmm.machine.outcome import StopReason

    _log_to_stderr()
    overrides = {field: getattr(args, field) for field in OPTION_NAMES}
    config = build_config(args.config, overrides, option_names=OPTION_NAMES)
    sys.stdout.flush()
    with Machine(config) as machine:
        result = machine.run()
    if result.reason not in (StopReason.DEBUG_EXIT, StopReason.POWEROFF):
        print(f"pyvmm: {result.reason.value}: {result.detail}", file=sys.stderr)
    if result.stats is not None:
        print(f"pyvmm: stats: backend {machine.backend.name}, {result.stats.exits} exits", file=sys.stderr)
        for line in result.stats.format().splitlines():
            print(f"pyvmm: stats: {line}", file=sys.stderr)
    return result.status


class _Formatter(logging.Formatter):
    """``pyvmm: warning: ...``: kvm-unit-tests' runner accepts stderr lines that
    say "warning"."""

    def format(self, record: logging.LogRecord) -> str:
        return f"pyvmm: {record.levelname.lower()}: {record.getMessage()}"


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is when a record comes (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging must never take the VMM down
            self.handleError(record)


def _log_to_stderr() -> None:
    logger = logging.getLogger("pyvmm")
    if any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        return
    handler = _StderrHandler()
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)
