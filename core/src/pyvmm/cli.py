"""The ``pyvmm`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from pyvmm import __version__


def _backends_report() -> dict[str, Any]:
    from pyvmm.plugins import default_registry

    registry = default_registry()
    backends = []
    for name in sorted(registry.backends):
        plugin = registry.backends[name]
        manifest = plugin.manifest
        availability = plugin.availability()
        backends.append(
            {
                "name": name,
                "version": manifest.version,
                "distribution": plugin.source.distribution,
                "distribution_version": plugin.source.version,
                "location": plugin.source.location,
                "contract_version": manifest.contract_version,
                "available": availability.available,
                "reason": availability.reason,
                "host_os": list(manifest.host_os),
                "guest_arches": [a.value for a in manifest.guest_arches],
                "capabilities": [c.value for c in manifest.host_capabilities(availability)],
                "missing_on_host": [c.value for c in availability.missing_capabilities],
                "unknown_capabilities": list(manifest.unknown_capabilities),
                "priority": manifest.priority,
                "auto_select": manifest.auto_select,
            }
        )
    failures = [
        {
            "entry_point": f.source.entry_point,
            "distribution": f.source.distribution,
            "version": f.source.version,
            "error": f.error,
        }
        for f in registry.failures
    ]
    report: dict[str, Any] = {"pyvmm_version": __version__, "backends": backends, "failures": failures}
    # Present only when a policy is in force, so the report of an unrestricted
    # installation keeps its shape.
    policy = registry.policy
    if policy is not None and policy.active:
        report["policy"] = policy.describe()
    if registry.denied:
        report["denied"] = [
            {
                "entry_point": d.source.entry_point,
                "distribution": d.source.distribution,
                "version": d.source.version,
                "location": d.source.location,
                "reason": d.reason,
            }
            for d in registry.denied
        ]
    return report


def _print_backends(report: dict[str, Any]) -> None:
    if not report["backends"] and report.get("denied"):
        print("no backends loaded: the policy denies the installed ones (see DENIED below)")
    elif not report["backends"]:
        print("no backends installed (install one, e.g. pip install ./plugins/pyvmm-kvm)")
    for b in report["backends"]:
        state = "available" if b["available"] else f"unavailable: {b['reason']}"
        print(f"{b['name']} {b['version']}  [{state}]")
        print(f"  from:         {b['distribution']} {b['distribution_version']}  {b['location']}".rstrip())
        print(f"  guest arches: {', '.join(b['guest_arches'])}   host: {', '.join(b['host_os'])}")
        print(f"  capabilities: {', '.join(b['capabilities']) or '(none)'}")
        if b["missing_on_host"]:
            print(f"  declared but missing on this host: {', '.join(b['missing_on_host'])}")
        if b["unknown_capabilities"]:
            print(f"  unknown to this pyvmm (ignored): {', '.join(b['unknown_capabilities'])}")
    for f in report["failures"]:
        print(f"BROKEN {f['entry_point']} from {f['distribution']} {f['version']}: {f['error']}".rstrip())
    for d in report.get("denied", []):
        origin = f"{d['distribution']} {d['version']}  {d['location']}".rstrip()
        print(f"DENIED {d['entry_point']} from {origin}: {d['reason']}")
    policy = report.get("policy")
    if policy is not None:
        if policy["allow"] is not None:
            print(f"policy: only {', '.join(policy['allow']) or 'nothing'} allowed ({policy['allow_source']})")
        if policy["deny"]:
            print(f"policy: {', '.join(policy['deny'])} denied ({policy['deny_source']})")


def _cmd_backends(args: argparse.Namespace) -> int:
    report = _backends_report()
    if args.json:
        import json  # here: a run, or a listing without --json, needs no JSON

        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        _print_backends(report)
    return 0


def _terminal_columns() -> int:
    """What ``shutil.get_terminal_size().columns`` answers ($COLUMNS, else the
    terminal on stdout, else 80), without importing shutil: it imports bz2, lzma
    and zlib, a tenth of ``pyvmm backends``, and argparse asks on every option."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, sized as argparse sizes it (the terminal's width
    less 2) without importing shutil (:func:`_terminal_columns`)."""

    def __init__(
        self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None
    ) -> None:
        super().__init__(prog, indent_increment, max_help_position, _terminal_columns() - 2 if width is None else width)


class RawDescriptionHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """:class:`argparse.RawDescriptionHelpFormatter`, sized as :class:`HelpFormatter`."""


class _Parser(argparse.ArgumentParser):
    """argparse, with "did you mean" for a mistyped option (and
    :class:`HelpFormatter` unless told otherwise)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            hints = []
            for word in message[len(prefix) :].split():
                if word.startswith("-"):
                    close = _close_option(word.split("=", 1)[0], _option_strings(self))
                    if close:
                        hints.append(f"{word} (did you mean {close}?)")
                        continue
                hints.append(word)
            message = prefix + " ".join(hints)
        super().error(message)


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    options: list[str] = []
    for action in parser._actions:
        options += [o for o in action.option_strings if o.startswith("--")]
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                options += _option_strings(sub)
    return options


def _close_option(word: str, options: list[str]) -> str | None:
    import difflib

    normal = word.replace("_", "-").lower()
    if normal in options:
        return normal
    close = difflib.get_close_matches(normal, options, n=1, cutoff=0.75)
    return close[0] if close else None


def common_options() -> _Parser:
    """-v, -q and --log-level, taken before or after the command."""
    common = _Parser(add_help=False)
    group = common.add_argument_group("messages")
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="more messages on stderr (-v: info, -vv: debug)",
    )
    group.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="only warnings and errors on stderr (no backend line, no status line)",
    )
    group.add_argument(
        "--log-level",
        metavar="LEVEL",
        default=argparse.SUPPRESS,
        help="error, warning, notice (default), info or debug; LOGGER=LEVEL items may follow, "
        "comma-separated (default: $PYVMM_LOG)",
    )
    return common


#: The run command's line in ``pyvmm --help`` (also the stand-in's: see build_parser).
RUN_HELP = "run a guest on the x86_64 or aarch64 machine (the bundled demo guest without --kernel)"


def build_parser(*, with_run: bool = True) -> argparse.ArgumentParser:
    """The ``pyvmm`` parser.  ``with_run=False`` puts a stand-in for ``run`` that
    only lists it (same name and help): building the real one imports the run
    command's module, which a command like ``pyvmm backends`` does not need."""
    common = common_options()
    parser = _Parser(prog="pyvmm", description="Build and run VMs on hardware hypervisors.", parents=[common])
    parser.add_argument("--version", action="version", version=f"pyvmm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    backends = sub.add_parser(
        "backends", help="list installed backends, their capabilities and availability", parents=[common]
    )
    backends.add_argument("--json", action="store_true", help="machine-readable output")
    backends.set_defaults(func=_cmd_backends)
    if with_run:
        from pyvmm.cli_run import add_run_parser

        add_run_parser(sub, common)
    else:
        sub.add_parser("run", help=RUN_HELP, parents=[common])
    return parser


#: 128 + SIGINT, as a shell reports it (pyvmm.machine.outcome.STATUS_INTERRUPTED;
#: not imported from there: ``pyvmm --help`` loads none of the machine).
STATUS_INTERRUPTED = 130


def console_main() -> NoReturn:
    """The ``pyvmm`` executable: :func:`main` with the start-up and exit only
    a process about to end may have (:mod:`pyvmm.executable`)."""
    from pyvmm import executable

    executable.pause_collection()
    try:
        status = main()
    except BrokenPipeError:
        status = executable.quiet_broken_pipe()
    executable.finish(status)


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    # Only a command line that may be the run command (or asks for help on
    # one) builds the run parser; any word "run" counts, erring towards it.
    parser = build_parser(with_run="run" in words)
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    from pyvmm import cli_log

    try:
        cli_log.configure(
            verbose=getattr(args, "verbose", 0) or 0,
            quiet=bool(getattr(args, "quiet", False)),
            level=getattr(args, "log_level", None),
        )
    except cli_log.LogSettingError as exc:
        parser.error(str(exc))
    from pyvmm.errors import PyvmmError

    try:
        return int(args.func(args))
    except PyvmmError as exc:
        print(f"pyvmm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C outside a guest run (listing backends, reading files): the
        # documented status, no traceback.
        print("pyvmm: interrupted: interrupted (Ctrl-C)", file=sys.stderr)
        return STATUS_INTERRUPTED
