"""``pyvmm run``: build the machine (the x86_64 PC or the aarch64 ``virt`` board)
and run a guest on it.

Registered by :func:`pyvmm.cli.build_parser` through :func:`add_run_parser`.
Kept apart from the machine so that ``pyvmm --help`` imports none of it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar, cast

from pyvmm.cli import RUN_HELP, RawDescriptionHelpFormatter
from pyvmm.errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

    from pyvmm.config import Arch
    from pyvmm.gdbstub import GdbServer
    from pyvmm.machine.config import MachineConfig
    from pyvmm.machine.console import ConsoleOutput, StatusLine
    from pyvmm.machine.machine import Machine
    from pyvmm.vm import Backend

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
  130               interrupted (Ctrl-C; on an interactive console Ctrl-C goes to
                    the guest and Ctrl-A x quits with 0), also while loading
  128 + N           terminated by signal N (SIGTERM 143, SIGHUP 129)

Files: --kernel and --initrd must be regular files no larger than the guest RAM,
--config a regular file of at most 1 MiB; a FIFO, a device or a directory is
refused without being read.  --serial may also be a terminal, /dev/null or a FIFO
that has a reader; a write error there (a full disk, /dev/full) ends the run with
status 2.  --timeout takes seconds, above 0 and at most 1e9.

Unhandled port and MMIO accesses read as all ones and are logged once per address.

Console (--serial): stdio (the default; interactive when stdin is a terminal:
raw mode while the guest runs, so every key, Ctrl-C too, goes to the guest;
Ctrl-A x quits (status 0), Ctrl-A Ctrl-A sends Ctrl-A, Ctrl-A h lists the
keys), none, pty (the pty's path is printed), unix:PATH (a socket server:
socat -,raw,echo=0 unix-connect:PATH), or file:PATH / PATH.

Debugging (--gdb tcp:HOST:PORT, HOST defaults to localhost, port 0 picks one):
the guest waits before its first instruction until gdb connects and continues
(gdb -ex 'target remote localhost:PORT').  Needs a backend with guest_debug.
Breakpoints are hardware breakpoints (at most 4); memory addresses are
translated through the guest's page tables on x86_64.

Messages: one line names the backend, why it was chosen and the guest arch;
on a terminal a status line shows exits/s while the console is quiet.  -q drops
both, -v/-vv add info/debug messages, --log-level or $PYVMM_LOG sets the level.

Snapshots: --snapshot-to FILE saves the whole machine -- RAM, vCPUs, the
hypervisor's irqchip (x86: PIT and clock too; aarch64: the GICv3), every
device -- and stops (status 0) when the guest writes any value to port 0x5f0
(x86_64) or to MMIO 0x0a002000 (aarch64), or after --snapshot-after S
seconds of running.  --restore FILE continues such a snapshot instead of
booting: give it the options the snapshot was saved with (memory, cpus,
irqchip, kernel); a damaged file or another machine's is an error (status 2)
naming the difference.  A machine with --testdev cannot be saved yet.

Machine files: examples/machine.toml shows every key, with what it does.
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
    "irqchip": "--irqchip",
    "gdb": "--gdb",
}
CONFIG_OPTION = "--config"


class _TypedStore(argparse._StoreAction):
    """Stores the value and remembers how the option was spelled (``--smp`` or
    ``--cpus``, ``-m`` or ``--memory``), so messages name it as typed."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        super().__call__(parser, namespace, values, option_string)
        _remember(namespace, self.dest, option_string)


class _TypedStoreTrue(argparse._StoreTrueAction):
    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        super().__call__(parser, namespace, values, option_string)
        _remember(namespace, self.dest, option_string)


class _TypedBoolean(argparse.BooleanOptionalAction):
    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        super().__call__(parser, namespace, values, option_string)
        _remember(namespace, self.dest, option_string)


def _remember(namespace: Any, dest: str, option_string: str | None) -> None:
    if option_string:
        typed = getattr(namespace, "_typed_options", None)
        if typed is None:
            typed = {}
            namespace._typed_options = typed
        typed[dest] = option_string


def option_names(args: argparse.Namespace) -> dict[str, str]:
    """Each field's option, as the user spelled it where they gave it."""
    return {**OPTION_NAMES, **getattr(args, "_typed_options", {})}


def _file_path(text: str) -> Path:
    """argparse's type for a file option.  pathlib costs ~5 ms of every start-up
    (it imports urllib and ipaddress): imported when such an option is given."""
    from pathlib import Path

    return Path(text)


def add_run_parser(sub: Any, common: argparse.ArgumentParser | None = None) -> None:
    """Add the ``run`` command to ``pyvmm``'s subparsers (``common``: options
    every command takes)."""
    run = sub.add_parser(
        "run",
        help=RUN_HELP,
        description="Run a guest on pyvmm's x86_64 PC or aarch64 virt machine.",
        epilog=EPILOG,
        formatter_class=RawDescriptionHelpFormatter,
        parents=[common] if common is not None else [],
    )
    run.register("action", None, _TypedStore)
    run.register("action", "store", _TypedStore)
    run.register("action", "store_true", _TypedStoreTrue)
    run.add_argument(
        "--config", type=_file_path, metavar="FILE", help="TOML machine file (options override its values)"
    )
    run.add_argument(
        "--arch",
        choices=("x86_64", "aarch64"),
        help="guest architecture (default: the backend's only one, else x86_64)",
    )
    run.add_argument(
        "--kernel",
        type=_file_path,
        metavar="FILE",
        help="kernel image (x86_64: multiboot, bzImage, PVH, ELF; aarch64: Image)",
    )
    run.add_argument("--initrd", type=_file_path, metavar="FILE", help="initrd, or multiboot module")
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
        "--serial",
        metavar="stdio|none|pty|unix:PATH|FILE",
        help="the console (COM1, PL011): stdio (default; interactive on a terminal, Ctrl-A x quits), none, "
        "pty, unix:PATH (socket server) or a file",
    )
    run.add_argument(
        "--gdb",
        metavar="tcp:HOST:PORT",
        help="wait for gdb on HOST:PORT (HOST defaults to localhost) before the first instruction",
    )
    run.add_argument(
        "--model",
        action="store_true",
        help="run on the backend's driver model instead of its hypervisor (needs --backend); "
        "at the end, list every interface rule the run broke",
    )
    run.add_argument(
        "--stats", action="store_true", default=None, help="print exits per kind and time in guest vs Python"
    )
    run.add_argument(
        "--testdev", action="store_true", default=None, help="x86_64: add QEMU's pc-testdev (for kvm-unit-tests)"
    )
    run.add_argument(
        "--legacy-bios",
        action=_TypedBoolean,
        default=None,
        help="x86_64: set up the PC as a BIOS would: 8259s, PIT, vector table, ACPI tables, S3 resume "
        "(default: for Multiboot kernels only)",
    )
    run.add_argument(
        "--irqchip",
        choices=("auto", "kernel", "userspace", "none"),
        help="the interrupt controllers and timer: the hypervisor's (kernel), pyvmm's 8259s and 8254 "
        "(userspace: x86_64, one vCPU), none, or auto (default: the hypervisor's if it has them, else pyvmm's "
        "where the backend can inject interrupts)",
    )
    run.add_argument(
        "--snapshot-to",
        type=_file_path,
        metavar="FILE",
        help="save a snapshot to FILE and stop when the guest writes port 0x5f0 (x86_64) or MMIO 0x0a002000 "
        "(aarch64), or after --snapshot-after",
    )
    run.add_argument(
        "--snapshot-after", type=float, metavar="S", help="with --snapshot-to: save after S seconds of running"
    )
    run.add_argument(
        "--restore", type=_file_path, metavar="FILE", help="continue the snapshot in FILE instead of booting"
    )
    run.set_defaults(func=cmd_run)


def _address(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an address: {text!r} (e.g. 0x100000)") from None


def _restorer(number: int, previous: Any) -> Callable[[], object]:
    return lambda: signal.signal(number, previous)


class _Terminated(BaseException):
    """SIGTERM or SIGHUP before the guest started (a BaseException, as
    KeyboardInterrupt is)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


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
        # SIGTERM and SIGHUP end the run as Ctrl-C does, so that the terminal
        # is restored and the VM closed on the way out.
        for name in ("SIGTERM", "SIGHUP"):
            number = getattr(signal, name, None)
            if number is not None:
                self._restore.append(_restorer(number, signal.signal(number, self._on_terminate)))
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

    def _on_terminate(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.machine is None:
            raise _Terminated(signum)
        from pyvmm.machine.outcome import StopReason

        self.machine.request_stop(StopReason.INTERRUPTED, 128 + signum, f"terminated by {name}")

    def _on_alarm(self, signum: int, frame: FrameType | None) -> None:
        if self.machine is None:
            raise _LoadTimeout
        from pyvmm.machine.outcome import STATUS_TIMEOUT, StopReason

        self.machine.request_stop(StopReason.TIMEOUT, STATUS_TIMEOUT, f"timeout after {self.timeout:g} s")


def _named(
    exc: ConfigError, config: MachineConfig, file: Path | None, given: dict[str, Any], names: dict[str, str]
) -> ConfigError:
    """An image or file error from the loader, prefixed with the option (or
    machine-file field) that named the file; the load address is named as the
    user gives it."""
    from pyvmm.machine.config import where_from

    path = getattr(exc, "path", None)
    text = str(exc)
    problem = getattr(exc, "problem", None)
    if isinstance(problem, str) and "load_address" in problem:
        spelled = names["load_address"] if "load_address" in given or file is None else "load_address"
        text = f"{path}: {problem.replace('load_address', spelled)}"
    for field in ("kernel", "initrd"):
        value = getattr(config, field)
        if path is not None and value is not None and str(value) == path:
            return ConfigError(f"{where_from(field, file, given, names)}: {text}")
    return ConfigError(text) if text != str(exc) else exc


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
    except _Terminated as exc:
        name = signal.Signals(exc.signum).name
        print(f"pyvmm: interrupted: terminated by {name}", file=sys.stderr)
        return 128 + exc.signum
    except _LoadTimeout:
        print(
            f"pyvmm: timeout: timeout after {time.monotonic() - started:.3g} s, before the guest started "
            "(building the machine and loading the kernel)",
            file=sys.stderr,
        )
        return STATUS_TIMEOUT


def _run(args: argparse.Namespace) -> int:
    from pyvmm.machine.config import build_config, check_input_files
    from pyvmm.machine.console import open_serial
    from pyvmm.machine.loaders import ImageError
    from pyvmm.machine.machine import Machine
    from pyvmm.machine.outcome import StopReason

    names = option_names(args)
    overrides = {field: getattr(args, field) for field in OPTION_NAMES}
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        config = build_config(args.config, overrides, option_names=names)
    except ConfigError as exc:
        if args.config is not None and str(exc).startswith(f"{args.config}: cannot read"):
            raise ConfigError(f"{CONFIG_OPTION}: {exc}") from None
        raise
    check_input_files(config, args.config, given, option_names=names)
    inputs = {names[field]: getattr(config, field) for field in ("kernel", "initrd") if getattr(config, field)}
    if args.config is not None:
        inputs[CONFIG_OPTION] = args.config
    words = _UserWords(args.config, given, names)
    with contextlib.ExitStack() as models:
        model = models.enter_context(_driver_model(config, words)) if args.model else None
        with _Signals(config.timeout) as signals:
            backend, _ = words.call(lambda: _select_backend(config, words))
            gdb = words.call(lambda: _gdb_server(config, backend, words)) if config.gdb is not None else None
            console = None
            try:
                # The option names it, unless the machine file does (the default, stdio, is the option's).
                from_file = "serial" not in given and args.config is not None and config.serial != "stdio"
                serial_where = f"{args.config}: serial" if from_file else names["serial"]
                console = open_serial(config.serial, serial_where, inputs)
                if console is not None and console.has_input and not console.interactive:
                    _say(f"serial console on {console.name}")
                sys.stdout.flush()
                try:
                    machine = words.call(
                        lambda: Machine(
                            config,
                            backend=backend,
                            serial_output=cast(BinaryIO, console) if console is not None else None,
                            restore=args.restore,
                            snapshot_to=args.snapshot_to,
                            snapshot_after=args.snapshot_after,
                        )
                    )
                except ImageError as exc:
                    raise _named(exc, config, args.config, given, names) from None
                with machine:
                    stub = None
                    if gdb is not None:
                        stub = gdb.attach(machine)
                        _say(
                            f"waiting for gdb on {gdb.host}:{gdb.port} (gdb -ex 'target remote {gdb.host}:{gdb.port}')"
                        )
                    status = _status_line(machine, console) if gdb is None else None
                    signals.machine = machine
                    try:
                        if console is not None:
                            console.connect(machine.devices.uart, machine.console_quit)
                        if status is not None:
                            status.start()
                        from pyvmm.executable import resume_collection

                        resume_collection()
                        result = machine.run()
                    finally:
                        signals.disarm()
                        if status is not None:
                            status.stop()
                        if stub is not None:
                            stub.close()
            finally:
                try:
                    if console is not None:
                        console.close()
                finally:
                    if gdb is not None:
                        gdb.close()
    if result.reason is StopReason.SNAPSHOT:
        _say(f"snapshot saved to {args.snapshot_to}")
    elif result.reason not in (StopReason.DEBUG_EXIT, StopReason.POWEROFF):
        print(f"pyvmm: {result.reason.value}: {result.detail}", file=sys.stderr)
    if result.stats is not None:
        print(f"pyvmm: stats: backend {machine.backend.name}, {result.stats.exits} exits", file=sys.stderr)
        for line in result.stats.format().splitlines():
            print(f"pyvmm: stats: {line}", file=sys.stderr)
    if model is not None and _report_model(model):
        return max(result.status, STATUS_RULE_BROKEN)
    return result.status


#: ``pyvmm run --model``: the run broke a rule of the modelled interface (the
#: plugin did something the real driver refuses), whatever the guest did.
STATUS_RULE_BROKEN = 5


@contextlib.contextmanager
def _driver_model(config: MachineConfig, words: _UserWords) -> Iterator[Any]:
    """The backend's driver model (entry point group ``pyvmm.models``), installed
    behind the backend for the block."""
    from importlib import metadata

    from pyvmm.plugins import ENV_BACKEND

    name = config.backend or os.environ.get(ENV_BACKEND) or None
    if name is None:
        raise ConfigError("--model: name the backend whose driver model to run (--backend NAME)")
    points = [ep for ep in metadata.entry_points(group="pyvmm.models") if ep.name == name]
    if not points:
        raise ConfigError(f"--model: backend {name!r} ships no driver model (entry point group 'pyvmm.models')")
    model = points[0].load()()
    cls = type(model)
    _say(f"running on a driver model of {name} ({cls.__module__}.{cls.__qualname__}), not on its hypervisor")
    with model.installed():
        yield model


def _report_model(model: Any) -> bool:
    """Print every rule the run broke; True if there was one."""
    rejections = list(model.rejections)
    if not rejections:
        _say("driver model: no interface rule was broken")
        return False
    _say(f"driver model: {len(rejections)} interface rule(s) broken:")
    for rejection in rejections:
        rule = rejection.rule
        _say(f"  {rule.id}: {rule.summary} ({rejection.detail}) [{rule.source}]")
    return True


def _say(text: str) -> None:
    """A line the user needs whatever the log level (a pty's path, the gdb port)."""
    from pyvmm.machine.console import clear_status

    clear_status()
    print(f"pyvmm: {text}", file=sys.stderr, flush=True)


class _UserWords:
    """Rewrites a configuration error from the machine layer so that it names
    settings as the user gave them: ``cpus: ...`` becomes ``--smp: ...`` when
    the value came from ``--smp``, or ``machine.toml: cpus: ...`` from the file."""

    def __init__(self, file: Path | None, given: dict[str, Any], names: dict[str, str]) -> None:
        self.file = file
        self.given = given
        self.names = names

    def call(self, action: Callable[[], _T]) -> _T:
        try:
            return action()
        except ConfigError as exc:
            if type(exc) is not ConfigError:
                raise
            raise ConfigError(self.rewrite(str(exc))) from None

    def rewrite(self, message: str) -> str:
        from pyvmm.machine.config import where_from

        head, sep, rest = message.partition(": ")
        fields = [part.strip() for part in head.split(",")]
        if not sep or not fields or not all(field in OPTION_NAMES for field in fields):
            return message
        named = ", ".join(where_from(field, self.file, self.given, self.names) for field in fields)
        return f"{named}: {rest}"


_T = TypeVar("_T")


def _select_backend(config: MachineConfig, words: _UserWords) -> tuple[Backend, Arch]:
    """The backend (``--backend``, the machine file, ``$PYVMM_BACKEND``, else the
    best available one that runs the guest's arch) and the guest arch; one line
    on stderr says which and why."""
    from pyvmm.cli_log import notice
    from pyvmm.machine.machine import machine_arch
    from pyvmm.plugins import ENV_BACKEND, default_registry, registry_for
    from pyvmm.vm import Backend

    env = os.environ.get(ENV_BACKEND) or None
    if config.backend is not None:
        # A backend named by the user is its entry point's own: no other
        # plugin needs importing to use it.
        plugin = registry_for(config.backend).select(config.backend)
        why = words.names["backend"] if "backend" in words.given else f"{words.file}: backend"
    elif env is not None:
        plugin = registry_for(env).select(env)
        why = f"${ENV_BACKEND}"
    else:
        registry = default_registry()
        plugin = registry.select(None, arch=config.arch)
        why = _why_best(registry, plugin, config.arch)
    backend = Backend(plugin, plugin.last_availability)
    arch = machine_arch(config.arch, backend)
    notice(f"backend {backend.name} ({why}), {arch.value} guest")
    return backend, arch


def _why_best(registry: Any, chosen: Any, arch: Arch | None) -> str:
    """ "best available" and what was passed over: backends ranked above the one
    chosen, and those the policy kept out."""
    passed = []
    ranked = sorted(
        (b for b in registry.backends.values() if b.manifest.auto_select), key=lambda b: (-b.manifest.priority, b.name)
    )
    for plugin in ranked:
        if plugin is chosen:
            break
        if arch is not None and arch not in plugin.manifest.guest_arches:
            passed.append(f"{plugin.name} runs no {arch.value} guests")
        else:
            passed.append(f"{plugin.name} unavailable: {plugin.availability().reason}")
    for denied in registry.denied:
        passed.append(f"{denied.backend or denied.source.entry_point} {denied.reason}")
    what = f"best available for {arch.value}" if arch is not None else "best available"
    return what + (f"; {'; '.join(passed)}" if passed else "")


def _gdb_server(config: MachineConfig, backend: Backend, words: _UserWords) -> GdbServer:
    """The gdb stub's listening socket, where the backend can be debugged.

    :raises UnsupportedCapability: the backend has no GUEST_DEBUG or register access.
    """
    from pyvmm.capabilities import Capability
    from pyvmm.gdbstub import GdbServer
    from pyvmm.gdbstub.address import parse_gdb_address
    from pyvmm.machine.config import where_from

    where = where_from("gdb", words.file, words.given, words.names)
    backend.require(Capability.GUEST_DEBUG, f"{where}: the gdb stub (single-step and breakpoints)")
    backend.require(Capability.VCPU_REGISTERS, f"{where}: the gdb stub (registers)")
    assert config.gdb is not None
    host, port = parse_gdb_address(config.gdb)
    return GdbServer(host, port, where=where)


def _status_line(machine: Machine, console: ConsoleOutput | None) -> StatusLine | None:
    """The status line, when stderr is a terminal and notices are shown."""
    from pyvmm.cli_log import NOTICE, enabled
    from pyvmm.machine.console import StatusLine

    try:
        terminal = sys.stderr.isatty()
    except (AttributeError, ValueError):
        terminal = False
    if not terminal or not enabled(NOTICE):
        return None
    on_terminal = console if console is not None and console.name == "stdout" else None
    return StatusLine(sys.stderr, machine.count_exits(), on_terminal)


def _log_to_stderr() -> None:
    """pyvmm's records on stderr, for callers of :func:`cmd_run` that did not go
    through :func:`pyvmm.cli.main` (which sets the level from -v/-q/$PYVMM_LOG)."""
    from pyvmm import cli_log

    if not cli_log.configured():
        cli_log.configure()
