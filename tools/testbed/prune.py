"""Pruning the bed's cache, which otherwise grows with every checkout and every
new Debian package or wheel version.

The cache holds entries of a few kinds, each named by its key: ``checkout-*``
(one per checkout's sources), and per bed ``<arch>/base-*``, ``<arch>/anchor-*.cpio``,
``<arch>/wheels-*`` and the ``.deb`` files in ``<arch>/debs`` (a kind per package
name).  A run sets the modification time of each entry it uses to now, so the
time orders entries by last use.  Pruning keeps, per kind, the entries the
current run uses and those used within ``min_age`` seconds (a run of an older tool
that does not take the lock), and more of the most recently used up to ``keep``
in all; it removes the rest.  ``pyvmm-testbed-*`` scratch directories are left by killed runs and go
once they are older than ``min_age``.  ``<arch>/apt`` (apt's lists, refreshed
daily in place) and names it does not know are never touched.

Nothing outside the cache is removed: a symbolic link, or a path whose resolved
form leaves the cache directory, is refused and reported, not followed.  The
caller holds the cache's lock exclusively (:mod:`testbed.cachelock`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .arches import ARCHES
from .errors import UsageError

#: Entries kept per kind: two, so two checkouts run in turn rebuild nothing.
DEFAULT_KEEP = 2
#: Entries used this recently are kept whatever ``keep`` says (seconds).
DEFAULT_MIN_AGE = 3600.0
SCRATCH_PREFIX = "pyvmm-testbed-"
SCRATCH = "scratch"


@dataclass(frozen=True)
class Entry:
    path: Path
    kind: str
    last_used: float
    size: int


@dataclass
class PruneReport:
    removed: list[Entry] = field(default_factory=list)
    kept: list[Entry] = field(default_factory=list)
    refused: list[tuple[Path, str]] = field(default_factory=list)
    dry_run: bool = False

    @property
    def freed(self) -> int:
        return sum(entry.size for entry in self.removed)

    def lines(self) -> list[str]:
        verb = "would remove" if self.dry_run else "removed"
        out = [f"testbed: cache: {verb} {e.path} ({human_size(e.size)}, {e.kind})" for e in self.removed]
        out += [f"testbed: cache: refused {path}: {why}" for path, why in self.refused]
        out.append(
            f"testbed: cache: {verb} {len(self.removed)} entries, {human_size(self.freed)}; "
            f"kept {len(self.kept)} ({human_size(sum(e.size for e in self.kept))})"
        )
        return out


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _size(path: Path) -> int:
    """Bytes below ``path``, by lstat: links are counted, never followed."""
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode):
        return info.st_size
    total = 0
    for directory, _, files in os.walk(path):  # os.walk does not follow links to directories
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # a file removed meanwhile
                total += os.lstat(os.path.join(directory, name)).st_size
    return total


def escape_reason(root: Path, path: Path) -> str | None:
    """Why ``path`` may not be removed as part of the cache ``root`` (resolved),
    or None when it may."""
    if path.is_symlink():
        return f"a symbolic link (to {os.readlink(path)}), not followed"
    resolved = path.resolve()
    if root not in resolved.parents:
        return f"resolves to {resolved}, outside the cache {root}"
    return None


def _kind(arch: str, name: str) -> str | None:
    for prefix in ("base-", "anchor-", "wheels-"):
        if name.startswith(prefix):
            return f"{arch}/{prefix[:-1]}"
    return SCRATCH if name.startswith(SCRATCH_PREFIX) else None


def scan(cache_dir: Path) -> tuple[list[Entry], list[tuple[Path, str]]]:
    """The cache's entries with their kinds, and the paths refused as escapes."""
    root = cache_dir.resolve()
    entries: list[Entry] = []
    refused: list[tuple[Path, str]] = []

    def add(path: Path, kind: str) -> None:
        reason = escape_reason(root, path)
        if reason:
            refused.append((path, reason))
        else:
            entries.append(Entry(path, kind, path.lstat().st_mtime, _size(path)))

    def descend(path: Path) -> bool:
        reason = escape_reason(root, path)
        if reason:
            refused.append((path, reason))
        return reason is None and path.is_dir()

    if not root.is_dir():
        return entries, refused
    for child in sorted(root.iterdir()):
        if child.name.startswith("checkout-"):
            add(child, "checkout")
        elif child.name.startswith(SCRATCH_PREFIX):
            add(child, SCRATCH)
        elif child.name in ARCHES and descend(child):
            for item in sorted(child.iterdir()):
                kind = _kind(child.name, item.name)
                if kind:
                    add(item, kind)
                elif item.name == "debs" and descend(item):
                    for deb in sorted(item.glob("*.deb")):
                        add(deb, f"{child.name}/deb {deb.name.split('_', 1)[0]}")
    return entries, refused


def choose(
    entries: Iterable[Entry], *, keep: int, in_use: Iterable[Path] = (), now: float, min_age: float
) -> tuple[list[Entry], list[Entry]]:
    """(kept, removed): per kind, what is in use or recent, then the ``keep``
    most recently used (the entries kept for the first two reasons count toward
    ``keep``); scratch directories are only kept while recent."""
    using = {Path(path).resolve() for path in in_use}
    by_kind: dict[str, list[Entry]] = defaultdict(list)
    for entry in entries:
        by_kind[entry.kind].append(entry)
    kept: list[Entry] = []
    removed: list[Entry] = []
    for kind in sorted(by_kind):

        def protected(entry: Entry) -> bool:
            return entry.path.resolve() in using or now - entry.last_used < min_age

        # What must stay counts first toward ``keep``, then the most recently used.
        ranked = sorted(by_kind[kind], key=lambda e: (not protected(e), -e.last_used))
        for count, entry in enumerate(ranked):
            if protected(entry) or (kind != SCRATCH and count < keep):
                kept.append(entry)
            else:
                removed.append(entry)
    return kept, removed


def _remove(root: Path, entry: Entry) -> str | None:
    reason = escape_reason(root, entry.path)  # checked again: the tree may have changed since the scan
    if reason:
        return reason
    if entry.path.is_dir():
        shutil.rmtree(entry.path)  # removes links inside without following them
    else:
        entry.path.unlink()
    return None


def prune(
    cache_dir: Path,
    *,
    keep: int = DEFAULT_KEEP,
    in_use: Iterable[Path] = (),
    dry_run: bool = False,
    min_age: float = DEFAULT_MIN_AGE,
    now: float | None = None,
) -> PruneReport:
    """Remove what :func:`choose` does not keep (nothing with ``dry_run``).
    The caller holds the cache's lock exclusively."""
    if keep < 0:
        raise UsageError(f"--keep must be 0 or more, not {keep}")
    entries, refused = scan(cache_dir)
    kept, candidates = choose(
        entries, keep=keep, in_use=in_use, now=time.time() if now is None else now, min_age=min_age
    )
    report = PruneReport(kept=kept, refused=refused, dry_run=dry_run)
    root = cache_dir.resolve()
    for entry in candidates:
        reason = None if dry_run else _remove(root, entry)
        if reason:
            report.refused.append((entry.path, reason))
        else:
            report.removed.append(entry)
    return report
