"""The cache's lock: every bed run holds it shared from its first build step to
QEMU's exit, and pruning takes it exclusively without waiting, so an entry is
never removed while a run may read it (its kernel is read by QEMU until the end).

It is an ``flock`` on ``.lock`` in the cache directory: the kernel drops it when
the process dies, so a killed run never leaves the cache locked."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".lock"


def _open(cache_dir: Path) -> int:

    cache_dir.mkdir(parents=True, exist_ok=True)
    return os.open(cache_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


@contextmanager
def shared(cache_dir: Path) -> Iterator[None]:
    """Held by a bed run; waits only while a prune is removing entries."""

    fd = _open(cache_dir)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


@contextmanager
def exclusive(cache_dir: Path) -> Iterator[bool]:
    """True when no bed run holds the cache (pruning may go ahead), False when
    one does; never waits for a run, which may take half an hour."""

    fd = _open(cache_dir)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)
