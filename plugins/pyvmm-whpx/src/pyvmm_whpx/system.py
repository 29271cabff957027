"""What this host's Windows Hypervisor Platform offers: ``WHvGetCapability``.

Applications "must query the availability of a feature prior to calling the
corresponding APIs" (Microsoft, ``WHvGetCapability``): the backend asks for
``HypervisorPresent``, ``Features`` (dirty-page tracking, local APIC
emulation) and ``ExtendedVmExits`` once per host, and narrows its
capabilities to what is there -- an export an older Windows lacks
(``WHvQueryGpaRangeDirtyBitmap``) counts as absent too.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyvmm.backend import DllHost
from pyvmm.capabilities import Capability
from pyvmm.errors import HypervisorError
from pyvmm.manifest import Availability
from pyvmm_whpx import bindings as w
from pyvmm_whpx.bindings import address, ffi
from pyvmm_whpx.host import HOST


@dataclass(frozen=True)
class Platform:
    """The answers of ``WHvGetCapability`` (and the optional exports) on one host."""

    hypervisor_present: bool
    features: int
    extended_exits: int
    has_dirty_bitmap_export: bool
    has_doorbells: bool = False

    @property
    def dirty_tracking(self) -> bool:
        """``Features.DirtyPageTracking`` and ``WHvQueryGpaRangeDirtyBitmap`` exported."""
        return bool(self.features & w.FEATURE_DIRTY_PAGE_TRACKING) and self.has_dirty_bitmap_export

    def missing_capabilities(self) -> tuple[Capability, ...]:
        missing = () if self.dirty_tracking else (Capability.DIRTY_LOG,)
        return missing if self.has_doorbells else (*missing, Capability.IOEVENTS)


def capability(host: DllHost, code: int, size: int) -> bytes:
    """The raw ``WHvGetCapability(code)`` answer, ``size`` bytes."""
    buffer = ffi.new("uint8_t[]", size)
    written = ffi.new("uint32_t *")
    host.call_hresult("WHvGetCapability", code, address(buffer), size, address(written))
    return bytes(ffi.buffer(buffer, min(size, written[0] or size)))


def query(host: DllHost) -> Platform:
    """Ask the platform what it offers."""
    present = int.from_bytes(capability(host, w.CAPABILITY_HYPERVISOR_PRESENT, 4)[:4], "little")
    if not present:
        return Platform(False, 0, 0, False)
    features = int.from_bytes(capability(host, w.CAPABILITY_FEATURES, 8)[:8], "little")
    exits = int.from_bytes(capability(host, w.CAPABILITY_EXTENDED_VM_EXITS, 8)[:8], "little")
    doorbells = host.has("WHvRegisterPartitionDoorbellEvent") and host.has("WHvUnregisterPartitionDoorbellEvent")
    return Platform(True, features, exits, host.has("WHvQueryGpaRangeDirtyBitmap"), doorbells)


def platform() -> Platform:
    """The current host's platform (the DLLs, or the installed model)."""
    return query(HOST.current())


def probe() -> Availability:
    """The manifest's availability probe: never raises."""
    try:
        found = platform()
    except HypervisorError as exc:
        return Availability.no(str(exc))
    except Exception as exc:  # noqa: BLE001 - a probe never raises
        return Availability.no(f"{type(exc).__name__}: {exc}")
    if not found.hypervisor_present:
        return Availability.no(
            "WHvGetCapability(HypervisorPresent) is FALSE: the hypervisor is not running "
            "(enable 'Windows Hypervisor Platform' and virtualization in the firmware)"
        )
    return Availability.yes(missing_capabilities=found.missing_capabilities())
