"""Command line of the test bed (the package docstring says more)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .arches import ARCHES, arch_named
from .bed import default_cache, prune_cache, run_bed
from .errors import TestbedError
from .prune import DEFAULT_KEEP


def _echo(line: str) -> None:
    sys.stdout.write(line)
    sys.stdout.flush()


def prune_main(argv: list[str]) -> int:
    """``python3 -m testbed prune``: prune the cache now, without a bed run."""
    parser = argparse.ArgumentParser(
        prog="python3 -m testbed prune",
        description="Remove the cache entries least recently used, keeping the newest per kind.",
    )
    parser.add_argument("--keep", type=int, default=DEFAULT_KEEP, help=f"entries kept per kind ({DEFAULT_KEEP})")
    parser.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"image cache (default {default_cache()})")
    args = parser.parse_args(argv)
    cache = args.cache_dir or default_cache()
    if not cache.is_dir():
        print(f"testbed: cache: no cache at {cache}; nothing to prune")
        return 0
    try:
        return 0 if prune_cache(cache, keep=args.keep, in_use=[], dry_run=args.dry_run) else 1
    except TestbedError as error:
        print(f"testbed: {error}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prune"]:
        return prune_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python3 -m testbed",
        description=__import__("testbed").__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("arch", choices=sorted(ARCHES), help="which bed: arm64 or amd64")
    parser.add_argument("--mode", help="KVM mode (arm64: vhe, nvhe, protected; amd64: amd); default: the first")
    parser.add_argument("--cpus", type=int, default=1, help="vCPUs of the emulated machine (default 1)")
    parser.add_argument("--timeout", type=float, default=1800, help="hard timeout of the boot, seconds")
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"image cache (default {default_cache()})")
    parser.add_argument("--junit", type=Path, help="write the guest's junit XML here")
    parser.add_argument("--command", help="run this shell command in the guest instead of pytest")
    parser.add_argument("--quiet", action="store_true", help="do not echo the guest's console")
    parser.add_argument(
        "--keep", type=int, default=DEFAULT_KEEP, help=f"after the run, keep N cache entries per kind ({DEFAULT_KEEP})"
    )
    parser.add_argument("--no-prune", action="store_true", help="leave the cache as it is after the run")
    parser.add_argument(
        "selection", nargs="*", help="test paths in the checkout (default: the bed's own selection, see --help)"
    )
    split = argv.index("--") if "--" in argv else len(argv)
    # Intermixed: test paths may come before or after the options (plain
    # parse_args would take an empty selection at the first positional).
    args = parser.parse_intermixed_args(argv[:split])
    pytest_args = argv[split + 1 :]
    arch = arch_named(args.arch)
    if not args.selection:
        args.selection, pytest_args = list(arch.default_selection), [*arch.default_pytest_args, *pytest_args]
    try:
        result = run_bed(
            arch,
            args.mode,
            args.selection,
            pytest_args,
            cpus=args.cpus,
            timeout=args.timeout,
            cache_dir=args.cache_dir,
            echo=None if args.quiet else _echo,
            command=args.command,
            keep=None if args.no_prune else args.keep,
        )
    except TestbedError as error:
        print(f"testbed: {error}", file=sys.stderr)
        return 2
    if args.junit and result.junit:
        args.junit.write_text(result.junit)
    if args.command:
        print(result.payload.get("output", ""), end="")
    print(f"testbed: {result.arch} ({result.mode}): KVM reported: {result.kvm_mode_line.strip()}")
    print(f"testbed: QEMU ran {result.boot_seconds:.1f} s; guest pytest exited {result.exit_status}")
    for line in result.payload.get("notes", []):
        print(f"testbed: {line}")
    print(f"testbed: {result.counts.line()}")
    return 0 if result.ok else 1
