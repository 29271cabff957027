"""The unicorn backend's manifest and availability probe (entry point ``unicorn``).

What ``pyvmm backends`` reads of this backend, so it imports nothing of it but
this module: not the software CPU (:mod:`pyvmm.softcpu`), not unicorn.  The
plugin object, :data:`pyvmm_unicorn.plugin.plugin`, is imported when the
backend is first used.

The capabilities below are exactly the optional hooks :mod:`pyvmm_unicorn.machine`
implements as methods, plus flags for what the software CPU really does;
registration fails if the two ever disagree.
"""

from __future__ import annotations

import importlib.util

from pyvmm.capabilities import Capability
from pyvmm.config import Arch
from pyvmm.entry_points import distribution_version
from pyvmm.manifest import CONTRACT_VERSION, Availability, BackendManifest
from pyvmm_unicorn import __version__

#: How to get unicorn (pyvmm.softcpu._uc.INSTALL_HINT, not imported: it loads the engine).
INSTALL_HINT = "pip install 'pyvmm-core[softcpu]'"

CAPABILITIES = (
    Capability.USER_MEMORY,  # guest RAM is core's host memory, mapped zero-copy
    Capability.READ_ONLY_MEMORY,  # guest writes become MMIO write exits
    Capability.MEMORY_REMOVAL,  # UnicornVm.unmap_memory
    Capability.LATE_MEMORY,  # regions can be added after start
    Capability.DIRTY_LOG,  # UnicornVm.get_dirty_log
    Capability.PORT_IO,  # x86 IN/OUT exits
    Capability.VCPU_REGISTERS,  # UnicornVcpu.get_state / set_state
    Capability.IMMEDIATE_EXIT,  # UnicornVcpu.kick
    Capability.GUEST_DEBUG,  # UnicornVcpu.set_guest_debug
    Capability.INTERRUPT_INJECTION,  # ready_for_interrupt / interrupt / request_interrupt_window
    Capability.NMI,  # UnicornVcpu.inject_nmi
    Capability.INTERRUPT_SHADOW,  # the STI/MOV SS shadow is QEMU's, read back from the engine
    Capability.VCPU_EVENTS,  # UnicornVcpu.get_events / set_events: injected exception, interrupt, NMI, shadow
)


def probe() -> Availability:
    """Never raises: whether unicorn 2.x is installed here, asked of the
    installed packages without importing it (importing it loads its shared
    library, which costs more than all of ``pyvmm backends``).  A library that
    is installed but cannot be loaded shows when the first VM is made
    (:class:`pyvmm.softcpu.SoftCpuUnavailable`)."""
    try:
        found = importlib.util.find_spec("unicorn") is not None
    except (ImportError, ValueError) as exc:
        return Availability.no(f"unicorn cannot be found: {type(exc).__name__}: {exc}")
    if not found:
        return Availability.no(f"the software CPU needs unicorn ({INSTALL_HINT}): it is not installed")
    version = distribution_version("unicorn") or "?"
    if not version.startswith("2."):
        return Availability.no(f"the software CPU needs unicorn 2.x, found {version} ({INSTALL_HINT})")
    return Availability.yes()


def manifest() -> BackendManifest:
    return BackendManifest(
        name="unicorn",
        version=__version__,
        contract_version=CONTRACT_VERSION,
        description="software CPU (unicorn): x86_64 and aarch64 guests anywhere, slowly",
        host_os=("linux",),
        guest_arches=(Arch.X86_64, Arch.AARCH64),
        capabilities=CAPABILITIES,
        priority=10,  # any hardware backend that is available wins
        probe=probe,
        plugin="pyvmm_unicorn.plugin:plugin",
    )
