"""Which KVM this host runs: KVM runs guests of the host's architecture only, so
the entry point hands out the arm64 backend on arm64 hosts and the x86 one
elsewhere.  Kept apart so that deciding imports neither backend."""

from __future__ import annotations

import platform


def host_is_arm64(machine: str | None = None) -> bool:
    """Whether ``machine`` (default: this host's ``platform.machine()``) is arm64."""
    return (platform.machine() if machine is None else machine).lower() in ("aarch64", "arm64")
