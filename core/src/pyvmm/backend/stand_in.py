"""Which backends have a stand-in behind their host switch right now.

A driver model (``pyvmm run --model``, a test's fixture) or a recording seam
replaces the operating system's interface for the objects a backend creates.
While one does, the backend's ``host_os`` no longer limits where it can run: the
WHPX model answers on Linux as the DLLs would on Windows.  The switches
(:class:`~pyvmm.backend.host.HostSwitch`, :class:`~pyvmm.backend.dll.DllSwitch`)
record it here, and :meth:`pyvmm.manifest.BackendManifest.check_availability`
asks before it refuses a backend for its host OS.  Kept apart from both so that
the manifest's check imports nothing else.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_active: dict[str, int] = {}


@contextlib.contextmanager
def standing_in(backend: str) -> Iterator[None]:
    """Record a stand-in for ``backend`` for the block (blocks may nest)."""
    with _lock:
        _active[backend] = _active.get(backend, 0) + 1
    try:
        yield
    finally:
        with _lock:
            left = _active[backend] - 1
            if left:
                _active[backend] = left
            else:
                del _active[backend]


def has_stand_in(backend: str) -> bool:
    """Whether a stand-in currently answers for ``backend``'s operating-system interface."""
    with _lock:
        return backend in _active
