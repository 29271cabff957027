"""Which KVM this host runs: KVM runs guests of the host's architecture only, so
the entry point hands out the arm64 backend on arm64 hosts and the x86 one
elsewhere.  Kept apart so that deciding imports neither backend."""

from __future__ import annotations

import os


def host_is_arm64(machine: str | None = None) -> bool:
    """Whether ``machine`` (default: this host's ``uname`` machine, which is what
    ``platform.machine()`` answers on a POSIX host, without importing
    :mod:`platform`) is arm64."""
    if machine is None:
        machine = os.uname().machine if hasattr(os, "uname") else _platform_machine()
    return machine.lower() in ("aarch64", "arm64")


def _platform_machine() -> str:
    import platform

    return platform.machine()
