"""The unicorn backend's manifest and availability probe (entry point ``unicorn``).

What ``pyvmm backends`` reads of this backend, so it imports nothing of it but
this module: not the software CPU (:mod:`pyvmm.softcpu`) nor its engine.  The
plugin object, :data:`pyvmm_unicorn.plugin.plugin`, is imported when the
backend is first used.

The capabilities below are exactly the optional hooks :mod:`pyvmm_unicorn.machine`
implements as methods, plus flags for what the software CPU really does;
registration fails if the two ever disagree.
"""

from __future__ import annotations

from pyvmm.capabilities import Capability
from pyvmm.config import Arch
from pyvmm.manifest import CONTRACT_VERSION, Availability, BackendManifest
from pyvmm.softcpu_installed import softcpu_installed
from pyvmm_unicorn import __version__

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
    """Never raises: whether the software CPU's engine is installed, asked
    without importing it (:func:`pyvmm.softcpu_installed.softcpu_installed`)."""
    ok, reason = softcpu_installed()
    return Availability.yes() if ok else Availability.no(reason)


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
