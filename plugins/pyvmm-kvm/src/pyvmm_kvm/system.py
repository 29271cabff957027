"""System-level KVM: ``/dev/kvm``, its API version and what this kernel supports."""

from __future__ import annotations

import dataclasses
import errno
import os
from typing import Any

from pyvmm.arch.x86_64 import CpuidEntry, MsrEntry
from pyvmm.backend import DeviceHost
from pyvmm.capabilities import Capability
from pyvmm.errors import HypervisorError, MsrAccessError
from pyvmm.manifest import Availability
from pyvmm_kvm import bindings as k
from pyvmm_kvm.bindings import ffi
from pyvmm_kvm.host import HOST

# The device and the capability table live with the manifest (stdlib-only, for
# the probe ``pyvmm backends`` runs).
from pyvmm_kvm.manifest import DEVICE
from pyvmm_kvm.manifest import missing_capabilities as _missing_capabilities


class KvmSystem:
    """An open ``/dev/kvm``.  One per host is enough: :func:`system` shares it."""

    def __init__(self, host: DeviceHost, path: str = DEVICE) -> None:
        self.host = host
        self.path = path
        self.fd = host.open_device(path)
        try:
            version = self.host.ioctl(self.fd, k.KVM_GET_API_VERSION)
            if version != k.KVM_API_VERSION:
                raise HypervisorError(
                    "KVM_GET_API_VERSION", errno.EPROTO, f"{path} speaks API {version}, pyvmm-kvm needs 12"
                )
            self.vcpu_mmap_size = self.host.ioctl(self.fd, k.KVM_GET_VCPU_MMAP_SIZE)
        except BaseException:
            host.close(self.fd)
            raise
        self._cpuid: list[CpuidEntry] | None = None
        self._extensions: dict[int, int] = {}
        self._max_vcpus: int | None = None

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION``: 0 when absent, else a cap-specific positive value.

        Cached: on ``/dev/kvm`` the answer is fixed while the module is loaded,
        and VM creation asks on every VM (an ioctl each time otherwise)."""
        answer = self._extensions.get(cap)
        if answer is None:
            answer = self._extensions[cap] = self.host.ioctl(self.fd, k.KVM_CHECK_EXTENSION, cap)
        return answer

    def missing_capabilities(self) -> tuple[Capability, ...]:
        return _missing_capabilities(self.check_extension)

    def max_vcpus(self) -> int:
        # Fixed while the module is loaded, like every answer check_extension
        # caches; asked on every VM created.
        limit = self._max_vcpus
        if limit is None:
            limit = self._max_vcpus = (
                self.check_extension(k.KVM_CAP_MAX_VCPUS) or self.check_extension(k.KVM_CAP_NR_VCPUS) or 4
            )
        return limit

    def supported_cpuid(self) -> list[CpuidEntry]:
        """``KVM_GET_SUPPORTED_CPUID``, cached (it cannot change while the module is loaded)."""
        if self._cpuid is None:
            self._cpuid = cpuid_entries(self._get_cpuid_buffer())
        return [dataclasses.replace(e) for e in self._cpuid]

    def _get_cpuid_buffer(self) -> Any:
        entries = k.KVM_MAX_CPUID_ENTRIES
        while True:
            buf = ffi.new("struct kvm_cpuid2 *", {"nent": entries, "entries": entries})
            try:
                self.host.ioctl(self.fd, k.KVM_GET_SUPPORTED_CPUID, buf)
                return buf
            except HypervisorError as exc:
                if exc.errno != errno.E2BIG or entries > 4096:
                    raise
                entries *= 2

    def msr_index_list(self) -> list[int]:
        """``KVM_GET_MSR_INDEX_LIST``: the MSRs KVM saves and restores."""
        count = 256
        while True:
            buf = ffi.new("struct kvm_msr_list *", {"nmsrs": count, "indices": count})
            try:
                self.host.ioctl(self.fd, k.KVM_GET_MSR_INDEX_LIST, buf)
            except HypervisorError as exc:
                if exc.errno != errno.E2BIG or count > 65536:
                    raise
                count = max(count * 2, buf.nmsrs)
                continue
            return [int(buf.indices[i]) for i in range(buf.nmsrs)]

    def feature_msrs(self) -> list[MsrEntry]:
        """``KVM_GET_MSR_FEATURE_INDEX_LIST``, then ``KVM_GET_MSRS`` on ``/dev/kvm``:
        the feature MSRs and what KVM can give a guest (docs/backends/kvm.md §2.1)."""
        count = 64
        while True:
            buf = ffi.new("struct kvm_msr_list *", {"nmsrs": count, "indices": count})
            try:
                self.host.ioctl(self.fd, k.KVM_GET_MSR_FEATURE_INDEX_LIST, buf)
            except HypervisorError as exc:
                if exc.errno != errno.E2BIG or count > 65536:
                    raise
                count = max(count * 2, buf.nmsrs)
                continue
            break
        indices = [int(buf.indices[i]) for i in range(buf.nmsrs)]
        raw = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
        for i, index in enumerate(indices):
            raw.entries[i].index = index
        done = self.host.ioctl(self.fd, k.KVM_GET_MSRS, raw)
        read = [MsrEntry(raw.entries[i].index, raw.entries[i].data) for i in range(min(done, len(indices)))]
        if done < len(indices):
            raise MsrAccessError("KVM_GET_MSRS", indices[done], done, tuple((e.index, e.data) for e in read))
        return read

    def close(self) -> None:
        if self.fd >= 0:
            self.host.close(self.fd)
            self.fd = -1


def cpuid_entries(buf: Any) -> list[CpuidEntry]:
    """Read a ``struct kvm_cpuid2`` into records."""
    return [
        CpuidEntry(function=e.function, index=e.index, flags=e.flags, eax=e.eax, ebx=e.ebx, ecx=e.ecx, edx=e.edx)
        for e in (buf.entries[i] for i in range(buf.nent))
    ]


def system(host: DeviceHost | None = None) -> KvmSystem:
    """The shared ``/dev/kvm`` handle of ``host`` (default: the current one),
    opened on first use."""
    return (host or HOST.current()).shared("system", KvmSystem, KvmSystem)


def probe() -> Availability:
    """The manifest's availability probe: never raises."""
    if not os.path.exists(DEVICE):
        return Availability.no(f"{DEVICE} does not exist (is the kvm module loaded?)")
    try:
        kvm = system()
        missing = kvm.missing_capabilities()
    except HypervisorError as exc:
        return Availability.no(str(exc))
    except Exception as exc:  # noqa: BLE001 - a probe never raises
        return Availability.no(f"{type(exc).__name__}: {exc}")
    return Availability.yes(missing_capabilities=missing)
