"""VM snapshots in a file: guest RAM (only the pages that are not zero), every
vCPU's complete state, the hypervisor's VM-wide device state and the clock, and
-- for a :mod:`pyvmm.machine` -- the state of every device of the machine.

What a snapshot holds, where the backend declares the capability named:

* RAM: every region, the pages that are not zero;
* per vCPU: the register sets of ``kinds`` (by default
  :func:`reset_point.default_kinds`: x86 general, segment/control, FPU/SSE and
  debug registers, XCRs with ``XCRS``; aarch64 the core registers), plus the
  whole XSAVE area (``XSAVE``), and with an in-kernel irqchip the local APIC
  (``IRQCHIP``) and the MP state (``MP_STATE``); the pending events
  (``VCPU_EVENTS``); the MSRs the backend lists and can write back
  (:func:`reset_point.restorable_msrs`); on aarch64 every register the
  hypervisor lists (``REGISTER_LIST``) and the MP state (``MP_STATE``);
* VM-wide, with an in-kernel irqchip: both 8259s, the IOAPIC and the 8254
  (``VM_STATE``, :class:`pyvmm.vm_state.VmStateKind`), and the clock
  (``PVCLOCK``); on aarch64 the GICv3 (:mod:`pyvmm.gicv3_state`), checked
  against the vCPUs when the file is loaded;
* a machine's devices, each as its versioned :mod:`pyvmm.devices.state`
  (:mod:`pyvmm.machine.snapshots` saves and restores those).

The file (version 2; version 1 files, which have no ``vm_states``, ``clock`` or
``devices``, are still read)::

    magic "PYVMMSNP" | u32 version | u32 0 | u64 body length | 32-byte SHA-256 of the body | body
    body: u32 header length | header (JSON) | page runs
    page run: u32 region | u64 first page | u32 page count | count * 4096 bytes

Loading checks everything before anything is created: the magic, the version,
the length against the file, the checksum, the header's every field and type
(vCPU records are rebuilt field by field from their dataclasses, never
unpickled), and every page run against its region.  Any mismatch is a
:class:`SnapshotError` naming it; :func:`restore` then creates no VM, and a
failure while restoring closes the VM it was building.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import itertools
import json
import mmap
import os
import struct
import tempfile
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyvmm.arch import aarch64, x86_64
from pyvmm.capabilities import Capability
from pyvmm.config import PAGE_SIZE, Arch
from pyvmm.devices.state import DeviceImage
from pyvmm.errors import ConfigError, PyvmmError, VmStateError
from pyvmm.exits import ExitKind
from pyvmm.gicv3_state import Gicv3State, Gicv3StateError
from pyvmm.host.residency import touched_pages
from pyvmm.reset_point import default_kinds, restorable_msrs, saves_msrs, settle
from pyvmm.vcpu_state import StateKind
from pyvmm.vm import Backend, Vcpu, Vm
from pyvmm.vm_state import AARCH64_IRQCHIP_KINDS, X86_IRQCHIP_KINDS, VmStateKind

MAGIC = b"PYVMMSNP"
#: The version written.  Version 1 (RAM, registers, events, MSRs) is still read:
#: its files hold a subset of version 2's, so reading them costs one key check.
VERSION = 2
READABLE_VERSIONS = (1, 2)
_V1_KEYS = {"arch", "regions", "vcpus"}
_V2_KEYS = _V1_KEYS | {"vm_states", "clock", "devices"}
_PREAMBLE = struct.Struct("<8sIIQ32s")
_RUN = struct.Struct("<IQI")
_HEADER_LENGTH = struct.Struct("<I")
#: A header larger than this is not a snapshot's (vCPU records are small).
MAX_HEADER = 16 << 20
#: What a file may hold at most: guest RAM this large, no more.
MAX_RAM = 1 << 40

#: The record type each register set is rebuilt as.
STATE_TYPES: dict[StateKind, Any] = {
    StateKind.REGS: x86_64.Regs,
    StateKind.SREGS: x86_64.Sregs,
    StateKind.FPU: x86_64.Fpu,
    StateKind.DEBUG_REGS: x86_64.DebugRegs,
    StateKind.XCRS: list[x86_64.Xcr],
    StateKind.LAPIC: x86_64.Lapic,
    StateKind.MP_STATE: x86_64.MpState,
    StateKind.CORE_REGS: aarch64.CoreRegs,
    StateKind.XSAVE: x86_64.Xsave,
    StateKind.REGISTER_LIST: list[aarch64.OneReg],
}
#: Where an aarch64 register set's record differs from x86's.
AARCH64_STATE_TYPES: dict[StateKind, Any] = {StateKind.MP_STATE: aarch64.MpState}
#: The register sets each architecture's vCPUs have.
ARCH_STATE_KINDS = {
    Arch.X86_64: frozenset(STATE_TYPES) - {StateKind.CORE_REGS, StateKind.REGISTER_LIST},
    Arch.AARCH64: frozenset({StateKind.CORE_REGS, StateKind.REGISTER_LIST, StateKind.MP_STATE}),
}
#: The VM-wide images a VM with the hypervisor's irqchip holds, per architecture.
IRQCHIP_KINDS = {Arch.X86_64: X86_IRQCHIP_KINDS, Arch.AARCH64: AARCH64_IRQCHIP_KINDS}


def state_type(kind: StateKind, arch: Arch) -> Any:
    """The record type ``kind`` is rebuilt as for a vCPU of ``arch``."""
    if arch is Arch.AARCH64 and kind in AARCH64_STATE_TYPES:
        return AARCH64_STATE_TYPES[kind]
    return STATE_TYPES[kind]


#: Where a register set goes when a vCPU is restored: the general and control
#: registers, the FPU and the XSAVE area after it (XSAVE holds the FPU too and
#: wins), the local APIC, and the MP state last, after the pending events too
#: (:func:`apply_vcpu`), as QEMU's ``kvm_arch_put_registers`` does: KVM's
#: ``__set_sregs`` makes a BSP at the reset vector RUNNABLE, so an MP state set
#: before the control registers is lost.  On aarch64 every listed register
#: comes after the core ones it also holds (its values win), and the MP state
#: last too (QEMU's ``kvm_arch_put_registers`` for arm ends with
#: ``kvm_arm_sync_mpstate_to_kvm``).  Kinds a caller chose keep this order.
RESTORE_ORDER = (
    StateKind.REGS,
    StateKind.SREGS,
    StateKind.FPU,
    StateKind.XCRS,
    StateKind.XSAVE,
    StateKind.DEBUG_REGS,
    StateKind.LAPIC,
    StateKind.CORE_REGS,
    StateKind.REGISTER_LIST,
    StateKind.MP_STATE,
)


class SnapshotError(PyvmmError):
    """A snapshot file that is not one, is damaged, or does not fit: nothing was created."""


@dataclass(frozen=True)
class RegionImage:
    guest_phys_addr: int
    size: int
    read_only: bool
    log_dirty: bool


@dataclass
class VcpuImage:
    """One vCPU's saved state."""

    #: The register sets, in the order they are set.
    states: list[tuple[StateKind, Any]]
    events: x86_64.VcpuEvents | None
    #: The MSRs to set first, or None.
    msrs: list[x86_64.MsrEntry] | None


@dataclass
class Snapshot:
    """A loaded, fully checked snapshot."""

    arch: Arch
    regions: list[RegionImage]
    #: Per region: page index -> 4096 bytes, for the pages that are not zero.
    pages: list[dict[int, bytes]]
    #: Per vCPU: the register sets, in the order they are set.
    vcpus: list[list[tuple[StateKind, Any]]]
    events: list[x86_64.VcpuEvents | None]
    #: Per vCPU: the MSRs to set first, or None.
    msrs: list[list[x86_64.MsrEntry] | None]
    #: The hypervisor's VM-wide device images, in the order they are restored.
    vm_states: list[tuple[VmStateKind, bytes]] = dataclasses.field(default_factory=list)
    #: The guest clock (``PVCLOCK``) in nanoseconds, or None.
    clock: int | None = None
    #: A machine's devices (:mod:`pyvmm.machine.snapshots`); None for a VM
    #: saved on the VM API.
    devices: list[DeviceImage] | None = None

    def vcpu_image(self, index: int) -> VcpuImage:
        return VcpuImage(self.vcpus[index], self.events[index], self.msrs[index])


# --- saving ------------------------------------------------------------------------


def snapshot_kinds(vm: Vm) -> tuple[StateKind, ...]:
    """The register sets a snapshot of ``vm`` holds by default: the reset
    point's, the XSAVE area (``XSAVE``), and with the hypervisor's irqchip the
    local APIC and the MP state (``MP_STATE``)."""
    kinds = list(default_kinds(vm))
    if vm.config.arch is Arch.AARCH64:
        # Every register, not only the core ones: FP/SIMD, the system registers
        # (MMU, vectors, thread pointers) and the timer's; and the MP state with
        # or without the GIC -- a secondary PSCI has not started is powered off.
        if vm.backend.supports(Capability.REGISTER_LIST):
            kinds.append(StateKind.REGISTER_LIST)
        if vm.backend.supports(Capability.MP_STATE):
            kinds.append(StateKind.MP_STATE)
    if vm.config.arch is Arch.X86_64:
        if vm.backend.supports(Capability.XSAVE) and StateKind.XSAVE not in kinds:
            kinds.append(StateKind.XSAVE)
        if vm.has_irqchip:
            kinds.append(StateKind.LAPIC)
            if vm.backend.supports(Capability.MP_STATE):
                kinds.append(StateKind.MP_STATE)
    return tuple(kinds)


def settle_vcpu(vcpu: Vcpu) -> None:
    """:func:`reset_point.settle` for one vCPU, on its own thread (a machine's
    vCPU threads each settle theirs): finish what its last exit left to the
    hypervisor without running guest code."""
    if not vcpu.vm.backend.supports(Capability.IMMEDIATE_EXIT):
        return
    vcpu.kick()
    exit_ = vcpu.run()
    if exit_.kind is not ExitKind.INTERRUPTED:
        raise VmStateError(
            f"vCPU {vcpu.index}: a kicked run should stop before the guest runs, but it exited with "
            f"{exit_.kind.name}: its state cannot be saved consistently"
        )


def capture_vcpu(vcpu: Vcpu, kinds: Sequence[StateKind] | None = None) -> VcpuImage:
    """``vcpu``'s state, read on its thread (settled: :func:`settle_vcpu`)."""
    vm = vcpu.vm
    chosen = sorted(snapshot_kinds(vm) if kinds is None else kinds, key=RESTORE_ORDER.index)
    with_events = vm.backend.supports(Capability.VCPU_EVENTS) and vm.config.arch is Arch.X86_64
    msrs = restorable_msrs(vcpu, vm.msr_index_list()) if saves_msrs(vm) else None
    states = []
    for kind in chosen:
        try:
            states.append((kind, vcpu.get_state(kind)))
        except ConfigError as exc:
            # A backend without this register set: a snapshot without it would
            # restore a guest whose registers silently changed.
            raise SnapshotError(
                f"vCPU {vcpu.index}: the {vm.backend.name} backend cannot read its {kind.value} state, "
                f"which a snapshot needs ({exc})"
            ) from exc
    return VcpuImage(states, vcpu.get_events() if with_events else None, msrs)


def capture_vm(vm: Vm, vcpus: Sequence[VcpuImage], devices: list[DeviceImage] | None = None) -> Snapshot:
    """A snapshot of stopped ``vm`` from its vCPUs' images (in vCPU order): RAM,
    the VM-wide device state and the clock are read here."""
    if vm.has_irqchip:
        vm.backend.require(Capability.VM_STATE, "a snapshot of a VM with the hypervisor's irqchip")
    kinds = IRQCHIP_KINDS[vm.config.arch] if vm.has_irqchip else ()
    vm_states = [(kind, vm.get_vm_state(kind)) for kind in kinds]
    clock = vm.get_clock() if vm.backend.supports(Capability.PVCLOCK) else None
    regions = list(vm.memory)
    images = [RegionImage(r.guest_phys_addr, r.size, r.read_only, r.log_dirty) for r in regions]
    return Snapshot(
        vm.config.arch,
        images,
        [_nonzero_pages(region.view()) for region in regions],
        [v.states for v in vcpus],
        [v.events for v in vcpus],
        [v.msrs for v in vcpus],
        vm_states,
        clock,
        devices,
    )


def capture(vm: Vm, kinds: Sequence[StateKind] | None = None) -> Snapshot:
    """A snapshot of ``vm`` (stopped: no vCPU running), on the thread that
    created the vCPUs.

    :raises UnsupportedCapability: the backend lacks ``VCPU_REGISTERS``, or
        ``VM_STATE`` for a VM with the hypervisor's irqchip.
    """
    vm.backend.require(Capability.VCPU_REGISTERS, "a snapshot")
    settle(vm)  # no exit half-done in the hypervisor: the state read is whole
    return capture_vm(vm, [capture_vcpu(vcpu, kinds) for vcpu in vm.vcpus])


def save(vm: Vm, path: str | os.PathLike[str], kinds: Sequence[StateKind] | None = None) -> None:
    """Write ``vm`` (stopped: no vCPU running) to ``path``, replacing it whole or
    not at all.  Call it on the thread that created the vCPUs.

    :raises UnsupportedCapability: as :func:`capture`.
    """
    write(capture(vm, kinds), path)


def _nonzero_pages(view: memoryview) -> dict[int, bytes]:
    """The pages of ``view`` that are not all zero.  Guest RAM is mostly zero:
    pages never touched (:func:`~pyvmm.host.residency.touched_pages`) are
    skipped unread; the rest are compared :data:`_SCAN_PAGES` pages at a time, and only
    a chunk that is not all zero page by page."""
    pages = {}
    zero_page = bytes(PAGE_SIZE)
    zero_chunk = bytes(_SCAN_PAGES * PAGE_SIZE)
    count = len(view) // PAGE_SIZE
    touched = touched_pages(view)
    host_pages_per_chunk = (_SCAN_PAGES * PAGE_SIZE) // mmap.PAGESIZE
    for first in range(0, count, _SCAN_PAGES):
        end = min(first + _SCAN_PAGES, count)
        if touched is not None:
            host_first = first * PAGE_SIZE // mmap.PAGESIZE
            if not any(touched[host_first : host_first + host_pages_per_chunk]):
                continue
        # Copied out first: bytes compare with memcmp, a memoryview item by item.
        chunk = view[first * PAGE_SIZE : end * PAGE_SIZE].tobytes()
        if chunk == zero_chunk[: len(chunk)]:
            continue
        for page in range(first, end):
            contents = chunk[(page - first) * PAGE_SIZE : (page - first + 1) * PAGE_SIZE]
            if contents != zero_page:
                pages[page] = contents
    return pages


#: Pages compared at once when looking for the ones that are not zero (256 KiB).
_SCAN_PAGES = 64


def encode(image: Snapshot) -> bytes:
    """The file's bytes for ``image``."""
    header = {
        "arch": image.arch.value,
        "regions": [dataclasses.asdict(r) for r in image.regions],
        "vcpus": [
            {"states": [[kind.value, _encode(value)] for kind, value in states], "events": _encode(events),
             "msrs": _encode(msrs)}
            for states, events, msrs in zip(image.vcpus, image.events, image.msrs, strict=True)
        ],
        "vm_states": [[kind.value, _encode(data)] for kind, data in image.vm_states],
        "clock": image.clock,
        "devices": None if image.devices is None else [
            {"key": d.key, "version": d.version, "state": {name: _encode(v) for name, v in d.state.items()}}
            for d in image.devices
        ],
    }  # fmt: skip
    encoded = json.dumps(header, separators=(",", ":")).encode()
    parts = [_HEADER_LENGTH.pack(len(encoded)), encoded]
    for index, pages in enumerate(image.pages):
        ordered = sorted(pages)
        i = 0
        while i < len(ordered):
            first = j = ordered[i]
            run = []
            while i < len(ordered) and ordered[i] == j:
                run.append(pages[j])
                i, j = i + 1, j + 1
            parts += [_RUN.pack(index, first, len(run)), *run]
    body = b"".join(parts)
    return _PREAMBLE.pack(MAGIC, VERSION, 0, len(body), hashlib.sha256(body).digest()) + body


def write(image: Snapshot, path: str | os.PathLike[str]) -> None:
    """Write ``image`` to ``path``, replacing it whole or not at all.

    :raises SnapshotError: the file cannot be written (a directory there, no
        room, no permission); what was there is left as it was.
    """
    data = encode(image)
    target = Path(path)
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    except OSError as exc:
        raise SnapshotError(f"{target}: cannot write the snapshot: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temporary, target)
    except OSError as exc:
        raise SnapshotError(f"{target}: cannot write the snapshot: {exc.strerror or exc}") from exc
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _encode(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"$bytes": value.hex()}
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_encode(item) for item in value]
    return value


# --- loading -----------------------------------------------------------------------


def load(path: str | os.PathLike[str]) -> Snapshot:
    """Read and check the snapshot at ``path``.

    :raises SnapshotError: it is not a snapshot, or any part of it is damaged
        or out of bounds (the message says which).
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SnapshotError(f"{path}: cannot read the snapshot: {exc.strerror or exc}") from exc
    return parse(data, str(path))


def parse(data: bytes, where: str = "snapshot") -> Snapshot:
    """:func:`load` for bytes already read."""
    if len(data) < _PREAMBLE.size:
        raise SnapshotError(f"{where}: {len(data)} bytes is too short for a snapshot")
    magic, version, reserved, length, digest = _PREAMBLE.unpack_from(data)
    if magic != MAGIC:
        raise SnapshotError(f"{where}: not a pyvmm snapshot (magic {magic!r})")
    if version not in READABLE_VERSIONS or reserved != 0:
        readable = " and ".join(map(str, READABLE_VERSIONS))
        raise SnapshotError(f"{where}: snapshot format version {version}, this pyvmm reads versions {readable}")
    body = memoryview(data)[_PREAMBLE.size :]
    if length != len(body):
        raise SnapshotError(f"{where}: the header says {length} bytes of body, the file has {len(body)}")
    if hashlib.sha256(body).digest() != digest:
        raise SnapshotError(f"{where}: the checksum does not match: the file is damaged")
    try:
        return _parse_body(body, version)
    except _Bad as bad:
        raise SnapshotError(f"{where}: {bad}") from None


class _Bad(Exception):
    """A damaged part of a body whose checksum matched (written by a broken saver)."""


def _parse_body(body: memoryview, version: int) -> Snapshot:
    if len(body) < _HEADER_LENGTH.size:
        raise _Bad("no header")
    (header_length,) = _HEADER_LENGTH.unpack_from(body)
    end = _HEADER_LENGTH.size + header_length
    if header_length > MAX_HEADER or end > len(body):
        raise _Bad(f"a header of {header_length} bytes does not fit")
    try:
        header = json.loads(bytes(body[_HEADER_LENGTH.size : end]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Bad(f"the header is not JSON: {exc}") from None
    fields = _object(header, "header", _V1_KEYS if version == 1 else _V2_KEYS)
    try:
        arch = Arch(fields["arch"])
    except ValueError:
        raise _Bad(f"header.arch: unknown architecture {fields['arch']!r}") from None
    regions = [
        _region(item, f"header.regions[{i}]") for i, item in enumerate(_list(fields["regions"], "header.regions"))
    ]
    _check_layout(regions)
    vcpus, events, msrs = [], [], []
    for i, item in enumerate(_list(fields["vcpus"], "header.vcpus")):
        states, event, vcpu_msrs = _vcpu(item, f"header.vcpus[{i}]", arch)
        vcpus.append(states)
        events.append(event)
        msrs.append(vcpu_msrs)
    vm_states = _vm_states(fields.get("vm_states", []), arch, len(vcpus))
    clock = fields.get("clock")
    if clock is not None:
        _int(clock, "header.clock")
    devices = _devices(fields.get("devices"))
    pages: list[dict[int, bytes]] = [{} for _ in regions]
    offset = end
    while offset < len(body):
        if offset + _RUN.size > len(body):
            raise _Bad(f"a page run at body offset {offset} is cut short")
        index, first, count = _RUN.unpack_from(body, offset)
        offset += _RUN.size
        if index >= len(regions):
            raise _Bad(f"a page run names region {index}; there are {len(regions)}")
        region_pages = regions[index].size // PAGE_SIZE
        if count == 0 or first + count > region_pages:
            raise _Bad(f"a page run {first}+{count} leaves region {index} ({region_pages} pages)")
        if offset + count * PAGE_SIZE > len(body):
            raise _Bad(f"a page run of {count} pages at body offset {offset} is cut short")
        for page in range(first, first + count):
            if page in pages[index]:
                raise _Bad(f"page {page} of region {index} is given twice")
            pages[index][page] = bytes(body[offset : offset + PAGE_SIZE])
            offset += PAGE_SIZE
    return Snapshot(arch, regions, pages, vcpus, events, msrs, vm_states, clock, devices)


def _vm_states(value: Any, arch: Arch, vcpus: int) -> list[tuple[VmStateKind, bytes]]:
    states = []
    seen = set()
    for i, item in enumerate(_list(value, "header.vm_states")):
        pair = _list(item, f"header.vm_states[{i}]")
        if len(pair) != 2:
            raise _Bad(f"header.vm_states[{i}]: expected [kind, state]")
        try:
            kind = VmStateKind(pair[0])
        except ValueError:
            raise _Bad(f"header.vm_states[{i}]: unknown VM state {pair[0]!r}") from None
        if kind in seen or kind not in IRQCHIP_KINDS[arch]:
            raise _Bad(f"header.vm_states[{i}]: VM state {kind.value!r} is repeated or not of {arch.value}")
        seen.add(kind)
        data: bytes = _decode(pair[1], bytes, f"header.vm_states.{kind.value}")
        if kind is VmStateKind.GICV3:
            _check_gicv3(data, vcpus)
        states.append((kind, data))
    return states


def _check_gicv3(data: bytes, vcpus: int) -> None:
    """The GIC image whole, and with one redistributor per vCPU: a restore
    would otherwise fail only once the VM and its vCPUs exist."""
    try:
        gic = Gicv3State.decode(data)
    except Gicv3StateError as exc:
        raise _Bad(f"header.vm_states.gicv3: {exc}") from None
    if gic.vcpus != vcpus:
        raise _Bad(f"header.vm_states.gicv3: the GIC has {gic.vcpus} redistributor(s), the snapshot {vcpus} vCPU(s)")


def _devices(value: Any) -> list[DeviceImage] | None:
    if value is None:
        return None
    devices = []
    keys = set()
    for i, item in enumerate(_list(value, "header.devices")):
        what = f"header.devices[{i}]"
        fields = _object(item, what, {"key", "version", "state"})
        key = fields["key"]
        if not isinstance(key, str) or not key or key in keys:
            raise _Bad(f"{what}.key: expected a device's key, unique, found {key!r}")
        keys.add(key)
        version = _int(fields["version"], f"{what}.version", 1 << 16)
        state = fields["state"]
        if not isinstance(state, dict):
            raise _Bad(f"{what}.state: expected an object, found {type(state).__name__}")
        devices.append(
            DeviceImage(key, version, {name: _state_value(v, f"{what}.state.{name}") for name, v in state.items()})
        )
    return devices


def _state_value(value: Any, what: str) -> int | bool | bytes:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not -(1 << 64) < value < 1 << 64:
            raise _Bad(f"{what}: {value} does not fit 64 bits")
        return value
    if isinstance(value, dict):
        decoded: bytes = _decode(value, bytes, what)
        return decoded
    raise _Bad(f"{what}: expected an integer, true/false or bytes, found {type(value).__name__}")


def _object(value: Any, what: str, keys: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) != keys:
        shown = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise _Bad(f"{what}: expected the fields {sorted(keys)}, found {shown}")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise _Bad(f"{what}: expected a list, found {type(value).__name__}")
    return value


def _int(value: Any, what: str, limit: int = 1 << 64) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
        raise _Bad(f"{what}: expected an integer from 0 to {limit - 1:#x}, found {value!r}")
    return value


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"{what}: expected true or false, found {value!r}")
    return value


def _region(value: Any, what: str) -> RegionImage:
    fields = _object(value, what, {"guest_phys_addr", "size", "read_only", "log_dirty"})
    gpa = _int(fields["guest_phys_addr"], f"{what}.guest_phys_addr", 1 << 52)
    size = _int(fields["size"], f"{what}.size", MAX_RAM + 1)
    if gpa % PAGE_SIZE or size == 0 or size % PAGE_SIZE:
        raise _Bad(f"{what}: {gpa:#x}+{size:#x} is not a whole number of pages")
    read_only = _bool(fields["read_only"], f"{what}.read_only")
    return RegionImage(gpa, size, read_only, _bool(fields["log_dirty"], f"{what}.log_dirty"))


def _check_layout(regions: list[RegionImage]) -> None:
    if sum(r.size for r in regions) > MAX_RAM:
        raise _Bad("the regions add up to more guest RAM than a snapshot may hold")
    ordered = sorted(regions, key=lambda r: r.guest_phys_addr)
    for low, high in itertools.pairwise(ordered):
        if low.guest_phys_addr + low.size > high.guest_phys_addr:
            raise _Bad(f"regions at {low.guest_phys_addr:#x} and {high.guest_phys_addr:#x} overlap")


def _vcpu(
    value: Any, what: str, arch: Arch
) -> tuple[list[tuple[StateKind, Any]], x86_64.VcpuEvents | None, list[x86_64.MsrEntry] | None]:
    fields = _object(value, what, {"states", "events", "msrs"})
    states = []
    seen = set()
    for i, item in enumerate(_list(fields["states"], f"{what}.states")):
        pair = _list(item, f"{what}.states[{i}]")
        if len(pair) != 2:
            raise _Bad(f"{what}.states[{i}]: expected [kind, state]")
        try:
            kind = StateKind(pair[0])
        except ValueError:
            raise _Bad(f"{what}.states[{i}]: unknown register set {pair[0]!r}") from None
        if kind not in ARCH_STATE_KINDS[arch] or kind in seen:
            raise _Bad(f"{what}.states[{i}]: register set {kind.value!r} is repeated or not of {arch.value}")
        seen.add(kind)
        states.append((kind, _decode(pair[1], state_type(kind, arch), f"{what}.{kind.value}")))
    events = fields["events"]
    if events is not None and arch is not Arch.X86_64:
        raise _Bad(f"{what}.events: only x86_64 vCPUs have events")
    decoded = None if events is None else _decode(events, x86_64.VcpuEvents, f"{what}.events")
    msrs = fields["msrs"]
    if msrs is not None and arch is not Arch.X86_64:
        raise _Bad(f"{what}.msrs: only x86_64 vCPUs have MSRs")
    entries = None if msrs is None else _decode(msrs, list[x86_64.MsrEntry], f"{what}.msrs")
    for entry in entries or ():
        _int(entry.index, f"{what}.msrs index", 1 << 32)
        _int(entry.data, f"{what}.msrs data")
    return states, decoded, entries


def _decode(value: Any, kind: Any, what: str) -> Any:
    """``value`` (as :func:`_encode` wrote it) rebuilt as ``kind``, checking
    every field's type on the way."""
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _decode(value, inner, what)
    if origin is list:
        return [_decode(item, args[0], f"{what}[{i}]") for i, item in enumerate(_list(value, what))]
    if origin is tuple:
        items = _list(value, what)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(item, args[0], f"{what}[{i}]") for i, item in enumerate(items))
        if len(items) != len(args):
            raise _Bad(f"{what}: expected {len(args)} items, found {len(items)}")
        return tuple(_decode(item, arg, f"{what}[{i}]") for i, (item, arg) in enumerate(zip(items, args, strict=True)))
    if kind is bool:
        return _bool(value, what)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int) or not -(1 << 64) < value < 1 << 64:
            raise _Bad(f"{what}: expected a 64-bit integer, found {value!r}")
        return value
    if kind is bytes:
        if not isinstance(value, dict) or set(value) != {"$bytes"} or not isinstance(value["$bytes"], str):
            raise _Bad(f"{what}: expected bytes")
        try:
            return bytes.fromhex(value["$bytes"])
        except ValueError:
            raise _Bad(f"{what}: bytes that are not hexadecimal") from None
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        try:
            return kind(value)
        except (ValueError, TypeError):
            raise _Bad(f"{what}: {value!r} is not a {kind.__name__}") from None
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        names = {f.name for f in dataclasses.fields(kind)}
        fields = _object(value, what, names)
        hints = typing.get_type_hints(kind)
        record: Any = kind
        values = {name: _decode(fields[name], hints[name], f"{what}.{name}") for name in names}
        try:
            return record(**values)
        except (PyvmmError, ValueError, TypeError) as exc:  # a record that checks itself (MsrEntry)
            raise _Bad(f"{what}: {exc}") from None
    raise _Bad(f"{what}: cannot rebuild a {kind!r}")


# --- restoring ---------------------------------------------------------------------


def restore(
    backend: Backend,
    snapshot: Snapshot | str | os.PathLike[str],
    prepare_vcpu: Callable[[Vcpu], None] | None = None,
) -> Vm:
    """A new VM on ``backend`` in the state of ``snapshot`` (a loaded one, or a
    path), its vCPUs created on the calling thread and ready to run.

    ``prepare_vcpu`` is called with each vCPU as it is created, before any of
    its state is set: give it its CPUID there (the snapshot holds none).  KVM
    checks state against the guest's CPUID: an XCR0 with SSE or AVX is EINVAL
    before ``KVM_SET_CPUID2`` (``__kvm_set_xcr``: only ``guest_supported_xcr0``
    bits, from the CPUID), and so is an x2APIC base (``kvm_set_apic_base``).

    :raises SnapshotError: the file is not a valid snapshot (nothing created),
        or the backend refused a part of its state (named, the backend's error
        as the cause); the VM being built is closed before this propagates.
    :raises PyvmmError: the backend could not build the VM itself (memory, vCPUs).
    """
    image = snapshot if isinstance(snapshot, Snapshot) else load(snapshot)
    if image.devices is not None:
        raise SnapshotError(
            "this snapshot is of a pyvmm machine (it holds device state): restore it with the machine "
            "(pyvmm run --restore FILE, or pyvmm.machine.Machine(..., restore=...)), not on the VM API"
        )
    if image.vm_states:
        backend.require(Capability.VM_STATE, "restoring the hypervisor's irqchip state")
    vm = backend.create_vm({"arch": image.arch.value, "vcpus": max(1, len(image.vcpus))})
    try:
        for region_image, pages in zip(image.regions, image.pages, strict=True):
            region = vm.add_memory(
                region_image.guest_phys_addr,
                region_image.size,
                read_only=region_image.read_only,
                log_dirty=region_image.log_dirty,
            )
            view = region.view()
            for page, contents in pages.items():
                view[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] = contents
        if image.vm_states:
            vm.create_irqchip()
        for index in range(len(image.vcpus)):
            vcpu = vm.create_vcpu()
            if prepare_vcpu is not None:
                prepare_vcpu(vcpu)
            apply_vcpu(vcpu, image.vcpu_image(index))
        if vm.backend.supports(Capability.VM_START):
            # Where the hypervisor finishes its irqchip only once every vCPU
            # exists (KVM's vGIC: CTRL_INIT), its state can be set only after.
            vm.start()
        apply_vm(vm, image)
    except BaseException:
        vm.close()
        raise
    return vm


def fill_ram(vm: Vm, image: Snapshot) -> None:
    """Put ``image``'s RAM into ``vm``, whose regions must be the image's (every
    page written: what a loader left in a fresh machine's RAM is replaced).

    :raises SnapshotError: the regions differ (nothing written).
    """
    regions = list(vm.memory)
    have = [(r.guest_phys_addr, r.size) for r in regions]
    saved = [(r.guest_phys_addr, r.size) for r in image.regions]
    if have != saved:
        shown = ", ".join(f"{a:#x}+{s:#x}" for a, s in saved)
        mine = ", ".join(f"{a:#x}+{s:#x}" for a, s in have)
        raise SnapshotError(f"the snapshot's RAM ({shown}) is not this VM's ({mine}): another memory size?")
    zero = bytes(PAGE_SIZE)
    for region, pages in zip(regions, image.pages, strict=True):
        view = region.view()
        # Only the pages a loader wrote are cleared: writing every page would
        # make all of guest RAM resident where a fresh mapping shares one zero page.
        for page in _nonzero_pages(view).keys() - pages.keys():
            view[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] = zero
        for page, contents in pages.items():
            view[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] = contents


#: ``IA32_TSC_DEADLINE``: the local APIC timer's deadline in TSC-deadline mode.
MSR_TSC_DEADLINE = 0x6E0
#: MSRs set after the local APIC rather than before the register sets.  KVM
#: drops a TSC-deadline write while the LVT timer is not in TSC-deadline mode
#: (``kvm_set_lapic_tscdeadline_msr``, arch/x86/kvm/lapic.c), which it is not in
#: a fresh vCPU, and ``KVM_SET_LAPIC`` switching the mode clears the deadline
#: (``apic_update_lvtt``): set before the LAPIC, an armed timer never fires.
#: QEMU writes it last for this reason (``kvm_put_tscdeadline_msr``).
MSRS_AFTER_LAPIC = frozenset({MSR_TSC_DEADLINE})


def apply_vcpu(vcpu: Vcpu, image: VcpuImage) -> None:
    """Set ``vcpu``'s saved state, on its thread.

    :raises SnapshotError: the backend refused a part (named): the snapshot's
        state does not fit this vCPU (an XSAVE area from a host with more
        components, an MSR this VM lacks ...).
    """
    msrs = image.msrs or []
    early = [entry for entry in msrs if entry.index not in MSRS_AFTER_LAPIC]
    late = [entry for entry in msrs if entry.index in MSRS_AFTER_LAPIC]
    where = f"vCPU {vcpu.index}"
    if early:  # first: the register sets after them win where both hold a value
        with _refusal_is_snapshot_error(f"{where} MSRs"):
            vcpu.set_msrs(early)
    # The MP state after everything else (RESTORE_ORDER), whatever the file's
    # order: version 2 files written before this put it first.
    states = [(kind, value) for kind, value in image.states if kind is not StateKind.MP_STATE]
    mp_states = [(kind, value) for kind, value in image.states if kind is StateKind.MP_STATE]
    for kind, value in states:
        with _refusal_is_snapshot_error(f"{where} {kind.value}"):
            vcpu.set_state(kind, value)
    if late:
        with _refusal_is_snapshot_error(f"{where} MSRs"):
            vcpu.set_msrs(late)
    if image.events is not None:
        with _refusal_is_snapshot_error(f"{where} events"):
            vcpu.set_events(image.events)
    for _, mp_state in mp_states:
        with _refusal_is_snapshot_error(f"{where} {StateKind.MP_STATE.value}"):
            vcpu.set_state(StateKind.MP_STATE, mp_state)


def apply_vm(vm: Vm, image: Snapshot) -> None:
    """Set the VM-wide device state and, last, the clock.

    :raises SnapshotError: the backend refused an image (named).
    """
    for kind, data in image.vm_states:
        with _refusal_is_snapshot_error(f"VM state {kind.value}"):
            vm.set_vm_state(kind, data)
    if image.clock is not None and vm.backend.supports(Capability.PVCLOCK):
        with _refusal_is_snapshot_error("clock"):
            vm.set_clock(image.clock)


@contextlib.contextmanager
def _refusal_is_snapshot_error(what: str) -> Iterator[None]:
    """A backend's refusal of a value read from the file (wrong size, out of
    range for this host) is the snapshot not fitting: a :class:`SnapshotError`
    naming the part, with the backend's error as its cause."""
    try:
        yield
    except SnapshotError:
        raise
    except PyvmmError as exc:
        raise SnapshotError(f"the snapshot's {what} does not fit this VM: {exc}") from exc
