"""``pyvmm run``: build the machine (the x86_64 PC or the aarch64 ``virt`` board)
and run a guest on it.

Registered by :func:`pyvmm.cli.build_parser` through :func:`add_run_parser`.
Kept apart from the machine so that ``pyvmm --help`` imports none of it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from pyvmm.errors import ConfigError
from pyvmm.machine.console import open_serial

if TYPE_CHECKING:
    from pyvmm.machine.config import MachineConfig
    from pyvmm.machine.machine import Machine

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
  124               --timeout ran out (the time counts from before the kernel
                    is loaded: a load that takes too long ends with 124 too)
  130               interrupted (Ctrl-C), also while loading

Files: --kernel and --initrd must be regular files no larger than the guest RAM,
--config a regular file of at most 1 MiB; a FIFO, a device or a directory is
refused without being read.  --serial may also be a terminal, /dev/null or a FIFO
that has a reader; a write error there (a full disk, /dev/full) ends the run with
status 2.  --timeout takes seconds, above 0 and at most 1e9.

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
CONFIG_OPTION = "--config"


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


class _LoadTimeout(BaseException):
    """--timeout ran out before the guest started.  A BaseException, as
    KeyboardInterrupt is: no ``except Exception`` on the way may swallow it."""


class _Signals:
    """SIGALRM for the --timeout deadline, SIGINT for Ctrl-C, while the machine is
    built and the kernel loaded (the machine handles Ctrl-C itself while it runs).

    The deadline starts before the machine is built, so --timeout bounds loading
    too.  Before the machine exists, the alarm raises :class:`_LoadTimeout`;
    once it exists, it stops the machine with status 124.  The first Ctrl-C
    raises KeyboardInterrupt; another one while pyvmm cleans up is ignored, so
    the clean-up finishes.  Signals can only be handled on the main thread:
    elsewhere, the machine's own timeout (which starts when the guest does) is
    all there is.
    """

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self.machine: Machine | None = None
        self.interrupted = False
        self.active = threading.current_thread() is threading.main_thread()
        self._restore: list[Callable[[], object]] = []

    def __enter__(self) -> _Signals:
        if not self.active:
            return self
        previous_int = signal.signal(signal.SIGINT, self._on_sigint)
        self._restore.append(lambda: signal.signal(signal.SIGINT, previous_int))
        if self.timeout is not None:
            previous_alarm = signal.signal(signal.SIGALRM, self._on_alarm)
            self._restore.append(lambda: signal.signal(signal.SIGALRM, previous_alarm))
            signal.setitimer(signal.ITIMER_REAL, self.timeout)
            self._restore.append(lambda: signal.setitimer(signal.ITIMER_REAL, 0))
        return self

    def __exit__(self, *exc: object) -> None:
        self.disarm()
        while self._restore:
            self._restore.pop()()

    def disarm(self) -> None:
        """Stop the deadline (the run is over: a late alarm must not be taken for
        a timeout while loading)."""
        self.machine = None
        if self.active and self.timeout is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.interrupted:
            return
        self.interrupted = True
        raise KeyboardInterrupt

    def _on_alarm(self, signum: int, frame: FrameType | None) -> None:
        if self.machine is None:
            raise _LoadTimeout
        from pyvmm.machine.outcome import STATUS_TIMEOUT, StopReason

        self.machine.request_stop(StopReason.TIMEOUT, STATUS_TIMEOUT, f"timeout after {self.timeout:g} s")


def _named(exc: ConfigError, config: MachineConfig, file: Path | None, given: dict[str, Any]) -> ConfigError:
    """An image or file error from the loader, prefixed with the option (or
    machine-file field) that named the file."""
    from pyvmm.machine.config import where_from

    path = getattr(exc, "path", None)
    for field in ("kernel", "initrd"):
        value = getattr(config, field)
        if path is not None and value is not None and str(value) == path:
            return ConfigError(f"{where_from(field, file, given, OPTION_NAMES)}: {exc}")
    return exc


def cmd_run(args: argparse.Namespace) -> int:
    from pyvmm.machine.outcome import STATUS_INTERRUPTED, STATUS_TIMEOUT

    _log_to_stderr()
    started = time.monotonic()
    try:
        return _run(args)
    except KeyboardInterrupt:
        # The machine turns Ctrl-C into a result while the guest runs: this one
        # came while the machine was built or torn down.
        print("pyvmm: interrupted: interrupted (Ctrl-C)", file=sys.stderr)
        return STATUS_INTERRUPTED
    except _LoadTimeout:
        print(
            f"pyvmm: timeout: timeout after {time.monotonic() - started:.3g} s, before the guest started "
            "(building the machine and loading the kernel)",
            file=sys.stderr,
        )
        return STATUS_TIMEOUT


def _run(args: argparse.Namespace) -> int:
    from pyvmm.machine.config import build_config, check_input_files
    from pyvmm.machine.loaders import ImageError
    from pyvmm.machine.machine import Machine
    from pyvmm.machine.outcome import StopReason

    overrides = {field: getattr(args, field) for field in OPTION_NAMES}
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        config = build_config(args.config, overrides, option_names=OPTION_NAMES)
    except ConfigError as exc:
        if args.config is not None and str(exc).startswith(f"{args.config}: cannot read"):
            raise ConfigError(f"{CONFIG_OPTION}: {exc}") from None
        raise
    check_input_files(config, args.config, given, option_names=OPTION_NAMES)
    inputs = {OPTION_NAMES[field]: getattr(config, field) for field in ("kernel", "initrd") if getattr(config, field)}
    if args.config is not None:
        inputs[CONFIG_OPTION] = args.config
    with _Signals(config.timeout) as signals:
        # The option names it, unless the machine file does (the default, stdio, is the option's).
        from_file = "serial" not in given and args.config is not None and config.serial != "stdio"
        serial_where = f"{args.config}: serial" if from_file else OPTION_NAMES["serial"]
        console = open_serial(config.serial, serial_where, inputs)
        try:
            sys.stdout.flush()
            try:
                machine = Machine(config, serial_output=cast(BinaryIO, console) if console is not None else None)
            except ImageError as exc:
                raise _named(exc, config, args.config, given) from None
            with machine:
                signals.machine = machine
                try:
                    result = machine.run()
                finally:
                    signals.disarm()
        finally:
            if console is not None:
                console.close()
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
