"""VM snapshots in a file: guest RAM (only the pages that are not zero) and every
vCPU's register sets, saved from a stopped VM and restored into a new one.

What a snapshot holds is what :mod:`pyvmm.reset_point` restores: RAM and, per
vCPU, the register sets of ``kinds`` (by default :func:`reset_point.default_kinds`),
the pending events where the backend declares ``VCPU_EVENTS`` and the MSRs it
lists and can write back (:func:`reset_point.restorable_msrs`).  It does not
hold in-kernel interrupt controller, PIT or clock state, XSAVE beyond the legacy
FPU area, nor the state of a machine's devices: it is for VMs built on the
VM API without those (fuzzing targets, test guests), and :func:`save` refuses
nothing it cannot see -- a VM with an in-kernel irqchip restores without it.

The file::

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

import dataclasses
import enum
import hashlib
import itertools
import json
import os
import struct
import tempfile
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyvmm.arch import aarch64, x86_64
from pyvmm.capabilities import Capability
from pyvmm.config import PAGE_SIZE, Arch
from pyvmm.errors import PyvmmError
from pyvmm.reset_point import default_kinds, restorable_msrs, saves_msrs, settle
from pyvmm.vcpu_state import StateKind
from pyvmm.vm import Backend, Vm

MAGIC = b"PYVMMSNP"
VERSION = 1
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
}


class SnapshotError(PyvmmError):
    """A snapshot file that is not one, is damaged, or does not fit: nothing was created."""


@dataclass(frozen=True)
class RegionImage:
    guest_phys_addr: int
    size: int
    read_only: bool
    log_dirty: bool


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


# --- saving ------------------------------------------------------------------------


def save(vm: Vm, path: str | os.PathLike[str], kinds: Sequence[StateKind] | None = None) -> None:
    """Write ``vm`` (stopped: no vCPU running) to ``path``, replacing it whole or
    not at all.  Call it on the thread that created the vCPUs.

    :raises UnsupportedCapability: the backend lacks ``VCPU_REGISTERS``.
    """
    vm.backend.require(Capability.VCPU_REGISTERS, "a snapshot")
    chosen = tuple(default_kinds(vm) if kinds is None else kinds)
    with_events = vm.backend.supports(Capability.VCPU_EVENTS) and vm.config.arch is Arch.X86_64
    msr_indices = vm.msr_index_list() if saves_msrs(vm) else None
    settle(vm)  # no exit half-done in the hypervisor: the state read is whole
    regions = list(vm.memory)
    header = {
        "arch": vm.config.arch.value,
        "regions": [
            {"guest_phys_addr": r.guest_phys_addr, "size": r.size, "read_only": r.read_only, "log_dirty": r.log_dirty}
            for r in regions
        ],
        "vcpus": [
            {
                "states": [[kind.value, _encode(vcpu.get_state(kind))] for kind in chosen],
                "events": _encode(vcpu.get_events()) if with_events else None,
                "msrs": None if msr_indices is None else _encode(restorable_msrs(vcpu, msr_indices)),
            }
            for vcpu in vm.vcpus
        ],
    }
    encoded = json.dumps(header, separators=(",", ":")).encode()
    parts = [_HEADER_LENGTH.pack(len(encoded)), encoded]
    zero = bytes(PAGE_SIZE)
    for index, region in enumerate(regions):
        view = region.view()
        page, pages = 0, region.size // PAGE_SIZE
        while page < pages:
            if view[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] == zero:
                page += 1
                continue
            first = page
            while page < pages and view[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] != zero:
                page += 1
            parts += [_RUN.pack(index, first, page - first), bytes(view[first * PAGE_SIZE : page * PAGE_SIZE])]
    body = b"".join(parts)
    preamble = _PREAMBLE.pack(MAGIC, VERSION, 0, len(body), hashlib.sha256(body).digest())
    target = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(preamble)
            out.write(body)
        os.replace(temporary, target)
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
    if version != VERSION or reserved != 0:
        raise SnapshotError(f"{where}: snapshot format version {version}, this pyvmm reads version {VERSION}")
    body = memoryview(data)[_PREAMBLE.size :]
    if length != len(body):
        raise SnapshotError(f"{where}: the header says {length} bytes of body, the file has {len(body)}")
    if hashlib.sha256(body).digest() != digest:
        raise SnapshotError(f"{where}: the checksum does not match: the file is damaged")
    try:
        return _parse_body(body)
    except _Bad as bad:
        raise SnapshotError(f"{where}: {bad}") from None


class _Bad(Exception):
    """A damaged part of a body whose checksum matched (written by a broken saver)."""


def _parse_body(body: memoryview) -> Snapshot:
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
    fields = _object(header, "header", {"arch", "regions", "vcpus"})
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
    return Snapshot(arch, regions, pages, vcpus, events, msrs)


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
        if (kind is StateKind.CORE_REGS) != (arch is Arch.AARCH64) or kind in seen:
            raise _Bad(f"{what}.states[{i}]: register set {kind.value!r} is repeated or not of {arch.value}")
        seen.add(kind)
        states.append((kind, _decode(pair[1], STATE_TYPES[kind], f"{what}.{kind.value}")))
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


def restore(backend: Backend, snapshot: Snapshot | str | os.PathLike[str]) -> Vm:
    """A new VM on ``backend`` in the state of ``snapshot`` (a loaded one, or a
    path), its vCPUs created on the calling thread and ready to run.

    :raises SnapshotError: the file is not a valid snapshot (nothing created).
    :raises PyvmmError: the backend refused part of it; the VM being built is
        closed before this propagates.
    """
    image = snapshot if isinstance(snapshot, Snapshot) else load(snapshot)
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
        for states, events, msrs in zip(image.vcpus, image.events, image.msrs, strict=True):
            vcpu = vm.create_vcpu()
            if msrs:  # first: the register sets after them win where both hold a value
                vcpu.set_msrs(msrs)
            for kind, value in states:
                vcpu.set_state(kind, value)
            if events is not None:
                vcpu.set_events(events)
    except BaseException:
        vm.close()
        raise
    return vm
