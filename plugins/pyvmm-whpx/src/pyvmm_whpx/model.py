"""A driver model of WinHvPlatform.dll and WinHvEmulation.dll (x64).

It answers the exports pyvmm-whpx calls as Microsoft documents them, runs each
virtual processor on pyvmm's x86 software CPU with WHPX's exit timing
(``exit_timing="before"``: port and MMIO exits before the instruction, with its
bytes, length, GVA and GPA; with ``ExtendedVmExits``, CPUID and MSR exits before
the instruction with their access contexts), and emulates instructions for
``WHvEmulatorTry*Emulation`` by calling back into the plugin through the
callbacks it registered -- registers, GVA translation, port and memory
accesses all go through the plugin, as with the real emulator.

It is written from Microsoft's documentation of the API (the ``funcs/*.md``
pages and the SDK headers in the Virtualization-Documentation repository),
never from the plugin: structures are unpacked with :mod:`struct` and the
model's own cffi declarations.  ``docs/backends/whpx.md`` §5 lists every rule
with its source; where the documentation names a constraint but not the
HRESULT that breaks it, the rule says so and the code is the COM convention
for that kind of error (``E_INVALIDARG``) or the winerror.h ``WHV_E_*`` whose
name states the constraint.  What the model cannot answer faithfully raises
:class:`~pyvmm.testing.driver_model.ModelGap`:

* ``LocalApicEmulationMode`` other than None, extended exits other than CPUID
  and MSR accesses (exception, RDTSC, APIC and hypercall exits),
  ``ExtendedVmExits`` changed once a virtual processor exists, a nonempty
  ``CpuidExitList`` with CPUID exits on, and a CPUID of a ``CpuidResultList``
  leaf with CPUID exits on (which leaves exit then is not documented);
* an injected interruption the vCPU cannot take when it runs, an NMI made
  pending while NMIs are blocked (WHPX's answers are not documented), pending
  exceptions, and NMI deliverability notifications;
* overlapping GPA mappings, mappings without read access;
* string I/O with an address-size or segment-override prefix, an item that
  crosses a page, or more than :data:`MAX_STRING_ITEMS` items;
* a guest the engine cannot run (a debug exit...), other than an instruction
  fetch from unbacked memory, which is a memory-access exit (Execute).
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from pyvmm.arch.x86_64 import DescriptorTable, Regs, Segment, Sregs
from pyvmm.errors import ErrorSpace
from pyvmm.exits import (
    CpuidExit,
    HltExit,
    InternalErrorExit,
    InterruptedExit,
    IoExit,
    IrqWindowOpenExit,
    MmioExit,
    MsrAccessExit,
    ShutdownExit,
    VcpuExit,
)
from pyvmm.softcpu import x86_emulate
from pyvmm.testing.driver_model import DllModel, Rule, RuleViolation, exported, pointer_value

PAGE = 4096
EXIT_CONTEXT_SIZE = 224
#: The most items one string I/O instruction is emulated for.
MAX_STRING_ITEMS = 1 << 16

DOCS = "docs/backends/whpx.md"
MS = "Microsoft Virtualization-Documentation, api/hypervisor-platform"


def _rule(rule_id: str, code: int, summary: str, source: str) -> Rule:
    return Rule(rule_id, code, summary, f"{DOCS} §5; {MS} {source}", space=ErrorSpace.HRESULT)


E_INVALIDARG = 0x8007_0057
WHV_E_UNKNOWN_CAPABILITY = 0x8037_0300
WHV_E_INSUFFICIENT_BUFFER = 0x8037_0301
WHV_E_UNKNOWN_PROPERTY = 0x8037_0302
WHV_E_INVALID_PARTITION_CONFIG = 0x8037_0304
WHV_E_GPA_RANGE_NOT_FOUND = 0x8037_0305
WHV_E_VP_ALREADY_EXISTS = 0x8037_0306
WHV_E_VP_DOES_NOT_EXIST = 0x8037_0307
WHV_E_INVALID_VP_STATE = 0x8037_0308
WHV_E_INVALID_VP_REGISTER_NAME = 0x8037_0309
#: winerror.h: ERROR_HV_INVALID_PARAMETER as an HRESULT, and HRESULT_FROM_WIN32(ERROR_NOT_FOUND).
ERROR_HV_INVALID_PARAMETER = 0xC035_0005
HRESULT_ERROR_NOT_FOUND = 0x8007_0490

R_UNKNOWN_CAPABILITY = _rule(
    "WHV-UNKNOWN-CAPABILITY",
    WHV_E_UNKNOWN_CAPABILITY,
    "WHvGetCapability of a capability code WinHvPlatformDefs.h does not define (one it defines but the "
    "model does not answer is a ModelGap)",
    "funcs/WHvGetCapability.md (Return Value)",
)
R_UNKNOWN_PROPERTY = _rule(
    "WHV-UNKNOWN-PROPERTY",
    WHV_E_UNKNOWN_PROPERTY,
    "WHvSetPartitionProperty of a property code WinHvPlatformDefs.h does not define (one it defines may or may "
    "not be available on a given build: the model does not say it is not)",
    "funcs/WHvSetPartitionProperty.md (Return Value)",
)
R_PROPERTY_AFTER_SETUP = _rule(
    "WHV-PROPERTY-AFTER-SETUP",
    E_INVALIDARG,
    "a setup-time partition property set after WHvSetupPartition (only ExtendedVmExits, "
    "ExceptionExitBitmap, X64MsrExitBitmap and CpuidExitList may change later)",
    "funcs/WHvSetPartitionProperty.md (Return Value)",
)
R_SETUP_INCOMPLETE = _rule(
    "WHV-SETUP-INCOMPLETE",
    WHV_E_INVALID_PARTITION_CONFIG,
    "WHvSetupPartition without a property required before setup (the processor count)",
    "funcs/WHvSetupPartition.md (Return Value); samples/WinHvSampleAmd64.cpp sets ProcessorCount first; "
    "github.com/insula-rs/libwhp src/platform.rs test_setup_partition_fail saw it on Windows",
)
R_NOT_SET_UP = _rule(
    "WHV-NOT-SET-UP",
    WHV_E_INVALID_PARTITION_CONFIG,
    "a call that needs the hypervisor partition before WHvSetupPartition made it (code not documented, "
    "unverified on Windows: the WHV_E_* for a partition in the wrong configuration)",
    "funcs/WHvCreatePartition.md (Remarks: the object only; WHvSetupPartition creates the partition)",
)
R_SETUP_TWICE = _rule(
    "WHV-SETUP-TWICE",
    WHV_E_INVALID_PARTITION_CONFIG,
    "WHvSetupPartition of a partition already set up (code not documented, unverified on Windows)",
    "funcs/WHvSetupPartition.md (creates the partition in the hypervisor, once)",
)
R_MAP_ALIGNMENT = _rule(
    "WHV-MAP-ALIGNMENT",
    E_INVALIDARG,
    "WHvMapGpaRange of a source address, guest address or size that is not page-aligned (code not documented; "
    "E_INVALIDARG is what libwhp's test_map_gpa_range saw on Windows for a 1024-byte map into a partition "
    "not set up)",
    "funcs/WHvMapGpaRange.md (Parameters: 'page-aligned address'); github.com/insula-rs/libwhp src/platform.rs, "
    "src/win_hv_platform.rs test_map_gpa_range",
)
R_RANGE_NOT_FOUND = _rule(
    "WHV-GPA-RANGE-NOT-FOUND",
    WHV_E_GPA_RANGE_NOT_FOUND,
    "a GPA range that is not mapped, or not mapped with TrackDirtyPages for a dirty-bitmap query",
    "funcs/WHvQueryGpaRangeDirtyBitmap.md (Return Value); funcs/WHvUnmapGpaRange.md",
)
R_DIRTY_BITMAP_SIZE = _rule(
    "WHV-DIRTY-BITMAP-SIZE",
    WHV_E_INSUFFICIENT_BUFFER,
    "a nonzero dirty bitmap smaller than one bit per page rounded up to 8 bytes (size 0 only clears the "
    "range: the page) (code not documented, and unverified: "
    "WHvGetInterruptTargetVpSet.md shows one undersized buffer answered E_INVALIDARG instead)",
    "funcs/WHvQueryGpaRangeDirtyBitmap.md (Parameters: BitmapSizeInBytes)",
)
R_FLAGS_NOT_ZERO = _rule(
    "WHV-FLAGS-NOT-ZERO",
    E_INVALIDARG,
    "Flags of WHvCreateVirtualProcessor / WHvCancelRunVirtualProcessor not zero (code not documented, "
    "unverified on Windows)",
    "funcs/WHvCreateVirtualProcessor.md, funcs/WHvCancelRunVirtualProcessor.md ('Unused, must be zero')",
)
R_VP_INDEX = _rule(
    "WHV-VP-INDEX",
    E_INVALIDARG,
    "a virtual processor index not below the partition's ProcessorCount",
    "funcs/WHvCreateVirtualProcessor2.md (Return Value: E_INVALIDARG; Remarks: WHvCreateVirtualProcessor(p, i, 0) "
    "is WHvCreateVirtualProcessor2(p, i, NULL, 0))",
)
R_VP_EXISTS = _rule(
    "WHV-VP-ALREADY-EXISTS",
    WHV_E_VP_ALREADY_EXISTS,
    "WHvCreateVirtualProcessor of an index that already has a virtual processor",
    "funcs/WHvCreateVirtualProcessor2.md (Return Value; the same call as WHvCreateVirtualProcessor with no properties)",
)
R_NO_VP = _rule(
    "WHV-VP-DOES-NOT-EXIST",
    WHV_E_VP_DOES_NOT_EXIST,
    "a VpIndex that does not identify an existing virtual processor",
    "funcs/WHvGetVirtualProcessorInterruptControllerState2.md (Return Value), same for every VpIndex",
)
R_EXIT_BUFFER = _rule(
    "WHV-EXIT-BUFFER",
    WHV_E_INSUFFICIENT_BUFFER,
    "WHvRunVirtualProcessor with an exit-context buffer smaller than WHV_RUN_VP_EXIT_CONTEXT (224 bytes); the page "
    "names no code: WHV_E_INSUFFICIENT_BUFFER is what libwhp's test_run_vcpu saw on Windows for a 1-byte buffer",
    "funcs/WHvRunVirtualProcessor.md (ExitContextSizeInBytes); WinHvPlatformDefs.h; github.com/insula-rs/libwhp "
    "src/win_hv_platform.rs test_run_vcpu",
)
R_VP_RUNNING = _rule(
    "WHV-VP-RUNNING",
    WHV_E_INVALID_VP_STATE,
    "registers of a virtual processor read or written while another thread runs it (the register pages name no "
    "code; the interrupt-controller state pages give this one for a running virtual processor)",
    "funcs/WHvSetVirtualProcessorInterruptControllerState.md ('If the virtual processor is currently running'); "
    "funcs/WHvGetVirtualProcessorInterruptControllerState2.md ('cannot be accessed in its current state')",
)
R_REGISTER_NAME = _rule(
    "WHV-REGISTER-NAME",
    WHV_E_INVALID_VP_REGISTER_NAME,
    "a WHV_REGISTER_NAME WinHvPlatformDefs.h does not define for x64 (one it defines that the model does not "
    "hold is a ModelGap)",
    "WinHvPlatformDefs.h WHV_REGISTER_NAME; winerror.h WHV_E_INVALID_VP_REGISTER_NAME",
)
R_CALLBACKS_SIZE = _rule(
    "WHV-EMULATOR-CALLBACKS",
    E_INVALIDARG,
    "WHV_EMULATOR_CALLBACKS whose Size is not sizeof(WHV_EMULATOR_CALLBACKS) or with a NULL callback "
    "(code not documented, unverified on Windows)",
    "headers/WinHvEmulation.h (WHV_EMULATOR_CALLBACKS.Size)",
)

R_INSUFFICIENT_BUFFER = _rule(
    "WHV-INSUFFICIENT-BUFFER",
    WHV_E_INSUFFICIENT_BUFFER,
    "a WHvGetCapability buffer smaller than the capability's value (code not documented, and unverified: the "
    "WHV_E_* that names the constraint, which the state and XSAVE calls document for theirs)",
    "funcs/WHvGetCapability.md (CapabilityBufferSizeInBytes); winerror.h WHV_E_INSUFFICIENT_BUFFER",
)


R_DOORBELL_MATCH = _rule(
    "WHV-DOORBELL-MATCH",
    E_INVALIDARG,
    "malformed WHV_DOORBELL_MATCH_DATA: a reserved bit set, MatchOnLength with a Length not 1/2/4/8, "
    "a Length or MatchOnValue without MatchOnLength, or a Value without MatchOnValue",
    "funcs/WHvRegisterPartitionDoorbellEvent.md (Return Value)",
)
R_DOORBELL_CONFLICT = _rule(
    "WHV-DOORBELL-CONFLICT",
    ERROR_HV_INVALID_PARAMETER,
    "a doorbell that conflicts with one at the same GuestAddress (identical, another Length, or either "
    "matching any value)",
    "funcs/WHvRegisterPartitionDoorbellEvent.md (Return Value)",
)
R_DOORBELL_NOT_FOUND = _rule(
    "WHV-DOORBELL-NOT-FOUND",
    HRESULT_ERROR_NOT_FOUND,
    "WHvUnregisterPartitionDoorbellEvent of match data no doorbell was registered with",
    "funcs/WHvUnregisterPartitionDoorbellEvent.md (Return Value)",
)

# --- numbers (WinHvPlatformDefs.h, WinHvEmulation.h) --------------------------------------
#: The x64 WHV_REGISTER_NAMEs the header defines: only a name outside them is invalid.
_REGISTERS_DEFINED = {
    *range(0x0, 0x2C), *range(0x1000, 0x101A), *range(0x2000, 0x200F), *range(0x2010, 0x2020),
    *range(0x2040, 0x2050), *range(0x2070, 0x207D), *range(0x207E, 0x2080), *range(0x2084, 0x2086),
    *range(0x2087, 0x2089), *range(0x208B, 0x2094), *range(0x2095, 0x2097), *range(0x2098, 0x209B),
    *range(0x20A0, 0x20B5), *range(0x3002, 0x3004), 0x3008, *range(0x300A, 0x300C), 0x300D,
    *range(0x300F, 0x3029), 0x3030, *range(0x3032, 0x303A), *range(0x303E, 0x3040), *range(0x4000, 0x4015),
    *range(0x5000, 0x5003), 0x5013, 0x5017, 0x501A, *range(0x5050, 0x5054), *range(0x8000_0000, 0x8000_0009),
}  # fmt: skip
#: The x64 WHV_CAPABILITY_CODEs the header defines: only a code outside them is "unknown".
_CAPABILITIES_DEFINED = {*range(0x0000, 0x0007), *range(0x1000, 0x100B), *range(0x2000, 0x2011)}
_FEATURE_DIRTY_PAGE_TRACKING = 1 << 3
#: The x64 WHV_PARTITION_PROPERTY_CODEs WinHvPlatformDefs.h defines.  Whether one is available
#: depends on the Windows build, so only a code outside this set is WHV_E_UNKNOWN_PROPERTY.
_PROPERTIES_DEFINED = {*range(0x0001, 0x000E), *range(0x1001, 0x1012), 0x1FFF}
#: The properties the model gives an effect (or knows has none it must show).
_PROPERTIES_SETUP_ONLY = {0x1FFF, 0x1004, 0x1005, 0x0003, 0x0004}
_PROPERTIES_ANY_TIME = {0x0001, 0x0002, 0x0005, 0x1003}
_MAP_READ, _MAP_WRITE, _MAP_TRACK_DIRTY = 0x1, 0x2, 0x8
_EXIT_MEMORY, _EXIT_IO, _EXIT_UNRECOVERABLE = 0x1, 0x2, 0x4
_EXIT_WINDOW, _EXIT_HALT, _EXIT_CANCELED = 0x7, 0x8, 0x2001
_EXIT_MSR, _EXIT_CPUID = 0x1000, 0x1001
#: WHV_EXTENDED_VM_EXITS: X64CpuidExit is bit 0, X64MsrExit bit 1 (WinHvPlatformDefs.h);
#: the other bits (exception, RDTSC, APIC, hypercall exits) the model cannot give.
_X64_CPUID_EXIT, _X64_MSR_EXIT = 1 << 0, 1 << 1
_EXTENDED_EXITS_MODELLED = _X64_CPUID_EXIT | _X64_MSR_EXIT
_GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")  # fmt: skip
_REG_RIP, _REG_RFLAGS = 0x10, 0x11
_SEGMENTS = {0x12: "es", 0x13: "cs", 0x14: "ss", 0x15: "ds", 0x16: "fs", 0x17: "gs", 0x18: "ldt", 0x19: "tr"}
_TABLES = {0x1A: "idt", 0x1B: "gdt"}
_SCALARS = {0x1C: "cr0", 0x1D: "cr2", 0x1E: "cr3", 0x1F: "cr4", 0x20: "cr8", 0x2001: "efer", 0x2003: "apic_base"}
_PENDING_INTERRUPTION, _INTERRUPT_STATE, _DELIVERABILITY = 0x8000_0000, 0x8000_0001, 0x8000_0004
_STATUS_SUCCESS = 1 << 0
_STATUS_IO_FAILED, _STATUS_MEMORY_FAILED, _STATUS_TRANSLATE_FAILED = 1 << 2, 1 << 3, 1 << 4
_STATUS_GPA_NOT_ALIGNED, _STATUS_GET_FAILED, _STATUS_SET_FAILED = 1 << 5, 1 << 6, 1 << 7

_SEGMENT = struct.Struct("<QIHH")
_VP_CONTEXT = struct.Struct("<HBBI16sQQ")
_IO_CONTEXT = struct.Struct("<B3x16sIH6xQQQQ16s16s")
_MEMORY_CONTEXT = struct.Struct("<B3x16sIQQ")
#: WHV_X64_CPUID_ACCESS_CONTEXT: Rax, Rcx, Rdx, Rbx, then DefaultResultRax, -Rcx, -Rdx, -Rbx.
_CPUID_CONTEXT = struct.Struct("<8Q")
#: WHV_X64_MSR_ACCESS_CONTEXT: AccessInfo (IsWrite is bit 0), MsrNumber, Rax, Rdx.
_MSR_CONTEXT = struct.Struct("<IIQQ")
#: WHV_X64_CPUID_RESULT: Function, Reserved[3], Eax, Ebx, Ecx, Edx.
_CPUID_RESULT = struct.Struct("<I12xIIII")


class CallbackFailed(Exception):
    """A callback of the plugin returned a failing HRESULT (the status bit it sets)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"callback failed: status {status:#x}")
        self.status = status


def _pack_segment(seg: Segment) -> bytes:
    present = 0 if seg.unusable else seg.present
    attributes = (
        seg.type & 0xF
        | (seg.s & 1) << 4
        | (seg.dpl & 3) << 5
        | (present & 1) << 7
        | (seg.avl & 1) << 12
        | (seg.l & 1) << 13
        | (seg.db & 1) << 14
        | (seg.g & 1) << 15
    )
    return _SEGMENT.pack(seg.base, seg.limit, seg.selector, attributes)


def _unpack_segment(raw: bytes) -> Segment:
    base, limit, selector, attributes = _SEGMENT.unpack(raw[:16])
    present = attributes >> 7 & 1
    return Segment(
        base=base,
        limit=limit,
        selector=selector,
        type=attributes & 0xF,
        s=attributes >> 4 & 1,
        dpl=attributes >> 5 & 3,
        present=present,
        avl=attributes >> 12 & 1,
        l=attributes >> 13 & 1,
        db=attributes >> 14 & 1,
        g=attributes >> 15 & 1,
        unusable=0 if present else 1,
    )


@dataclass
class Mapping:
    gpa: int
    size: int
    host: int
    flags: int
    #: Pages (indexes in the mapping) written since the part of the range holding them was queried.
    dirty: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class Doorbell:
    """A registered WHV_DOORBELL_MATCH_DATA and the event it signals."""

    gpa: int
    value: int
    length: int
    flags: int
    event: int

    def matches(self, gpa: int, size: int, value: int) -> bool:
        if gpa != self.gpa:
            return False
        if self.flags & 2 and size != self.length:
            return False
        return not (self.flags & 1 and value != self.value)


@dataclass
class ModelVp:
    """One virtual processor: a software CPU with WHPX's exit timing."""

    index: int
    engine: Any
    running_thread: int | None = None
    window_requested: bool = False


@dataclass
class ModelPartition:
    handle: int
    set_up: bool = False
    processor_count: int | None = None
    properties: dict[int, bytes] = field(default_factory=dict)
    extended_exits: int = 0
    cpuid_exit_list: bool = False
    #: CpuidResultList: Function -> (Eax, Ebx, Ecx, Edx).
    cpuid_results: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)
    mappings: list[Mapping] = field(default_factory=list)
    vps: dict[int, ModelVp] = field(default_factory=dict)
    doorbells: list[Doorbell] = field(default_factory=list)


@dataclass
class ModelEmulator:
    io_port: Callable[..., int]
    memory: Callable[..., int]
    get_registers: Callable[..., int]
    set_registers: Callable[..., int]
    translate: Callable[..., int]


class WhpxModel(DllModel):
    """Both WHPX DLLs, as one :class:`~pyvmm.testing.driver_model.DllModel`.

    :param dirty_tracking: whether ``Features.DirtyPageTracking`` is offered.
    :param extended_exits: whether the CPUID and MSR exits are offered (``ExtendedVmExits``).
    :param missing: exports this "Windows build" lacks.
    """

    def __init__(
        self, *, dirty_tracking: bool = True, extended_exits: bool = True, missing: frozenset[str] = frozenset()
    ) -> None:
        super().__init__()
        self.features = _FEATURE_DIRTY_PAGE_TRACKING if dirty_tracking else 0
        self.extended_exits = _EXTENDED_EXITS_MODELLED if extended_exits else 0
        self.missing = missing
        self.partitions: dict[int, ModelPartition] = {}
        self.emulators: dict[int, ModelEmulator] = {}
        self._next_handle = 0x1000
        self.ffi.cdef(
            """
            typedef int32_t (*model_io_cb)(void *, void *);
            typedef int32_t (*model_memory_cb)(void *, void *);
            typedef int32_t (*model_registers_cb)(void *, void *, uint32_t, void *);
            typedef int32_t (*model_translate_cb)(void *, uint64_t, uint32_t, void *, void *);
            """
        )

    @contextlib.contextmanager
    def installed(self) -> Iterator[WhpxModel]:
        """Install the model as pyvmm-whpx's seam for the block."""
        from pyvmm_whpx.host import HOST

        with HOST.use(self):
            yield self

    def close_all(self) -> None:
        """Close every software CPU a test left behind."""
        for partition in list(self.partitions.values()):
            for vp in partition.vps.values():
                vp.engine.close()
        self.partitions.clear()

    def _handle(self) -> int:
        with self.lock:
            self._next_handle += 0x10
            return self._next_handle

    def _partition(self, handle: Any) -> ModelPartition:
        partition = self.partitions.get(pointer_value(handle))
        if partition is None:
            raise self.not_modelled(f"a call with partition handle {handle!r}, which is not one")
        return partition

    def _set_up(self, handle: Any, call: str) -> ModelPartition:
        partition = self._partition(handle)
        if not partition.set_up:
            raise RuleViolation(R_NOT_SET_UP, f"{call} before WHvSetupPartition")
        return partition

    def _vp(self, handle: Any, index: int) -> tuple[ModelPartition, ModelVp]:
        partition = self._set_up(handle, "a virtual-processor call")
        vp = partition.vps.get(int(index))
        if vp is None:
            raise RuleViolation(R_NO_VP, f"VpIndex {index}")
        return partition, vp

    # --- WinHvPlatform.dll: capabilities and partitions ------------------------------------
    @exported("WHvGetCapability")
    def get_capability(self, code: int, buffer: Any, size: int, written: Any) -> int:
        answers = {
            0x0000: struct.pack("<I", 1),  # HypervisorPresent
            0x0001: struct.pack("<Q", self.features),  # Features
            0x0002: struct.pack("<Q", self.extended_exits),  # ExtendedVmExits: CPUID and MSR exits
            0x1000: struct.pack("<I", 1),  # ProcessorVendor: Intel
        }
        answer = answers.get(int(code))
        if answer is None and int(code) in _CAPABILITIES_DEFINED:  # behaviour: unanswered-capability
            raise self.not_modelled(f"capability {code:#x} (its value on a given build and processor)")
        if answer is None:  # behaviour: unknown-capability
            raise RuleViolation(R_UNKNOWN_CAPABILITY, f"code {code:#x}")
        if size < len(answer):
            raise RuleViolation(R_INSUFFICIENT_BUFFER, f"{size} bytes for {len(answer)}")
        self.copy_to_user(pointer_value(buffer), answer)
        if written:
            self.write_out(written, "<I", len(answer))
        return 0

    @exported("WHvCreatePartition")
    def create_partition(self, out: Any) -> int:
        handle = self._handle()
        self.write_out(out, "<Q", handle)
        self.partitions[handle] = ModelPartition(handle)
        return 0

    @exported("WHvSetPartitionProperty")
    def set_partition_property(self, handle: Any, code: int, buffer: Any, size: int) -> int:
        partition = self._partition(handle)
        code = int(code)
        if code not in _PROPERTIES_DEFINED:
            raise RuleViolation(R_UNKNOWN_PROPERTY, f"code {code:#x}")
        if partition.set_up and code not in _PROPERTIES_ANY_TIME:  # behaviour: setup-only-properties
            raise RuleViolation(R_PROPERTY_AFTER_SETUP, f"code {code:#x}")
        if code not in _PROPERTIES_SETUP_ONLY | _PROPERTIES_ANY_TIME:  # behaviour: unmodelled-property
            raise self.not_modelled(f"partition property {code:#x} (its effect on the guest)")
        value = self.copy_from_user(pointer_value(buffer), int(size))
        if code == 0x1004:
            partition.cpuid_results = self._cpuid_result_list(value)
        elif code == 0x1003:
            self._set_cpuid_exit_list(partition, value)
        if code == 0x0004 and any(value):
            raise self.not_modelled("nested virtualization")
        if code == 0x1FFF:
            partition.processor_count = struct.unpack_from("<I", value)[0]
        elif code == 0x0001:
            self._set_extended_exits(partition, struct.unpack_from("<Q", value)[0])
        elif code == 0x1005 and struct.unpack_from("<I", value)[0]:
            raise self.not_modelled("local APIC emulation")
        partition.properties[code] = value
        return 0

    def _set_extended_exits(self, partition: ModelPartition, bits: int) -> None:
        """ExtendedVmExits: the operations that end WHvRunVirtualProcessor with an
        exit of their own (funcs/WHvPartitionPropertyDataTypes.md, Remarks); CPUID and
        MSR exits "are only generated if they are enabled" so (CPUIDAccess.md,
        MSRAccess.md)."""
        if bits & ~self.extended_exits:
            raise self.not_modelled(f"extended VM exits {bits:#x} beyond those offered ({self.extended_exits:#x})")
        if partition.vps and bits != partition.extended_exits:
            raise self.not_modelled(
                "ExtendedVmExits changed while virtual processors exist (their intercepts are fixed)"
            )
        if bits & _X64_CPUID_EXIT and partition.cpuid_exit_list:
            raise self.not_modelled("CPUID exits with a CpuidExitList (which leaves exit then is not documented)")
        partition.extended_exits = bits

    def _set_cpuid_exit_list(self, partition: ModelPartition, value: bytes) -> None:
        listed = any(value)
        if listed and partition.extended_exits & _X64_CPUID_EXIT:
            raise self.not_modelled("a CpuidExitList with CPUID exits on (which leaves exit then is not documented)")
        partition.cpuid_exit_list = listed

    def _cpuid_result_list(self, value: bytes) -> dict[int, tuple[int, int, int, int]]:
        """CpuidResultList: WHV_X64_CPUID_RESULT elements (funcs/WHvPartitionPropertyDataTypes.md)."""
        if len(value) % _CPUID_RESULT.size:
            raise self.not_modelled(f"a CpuidResultList of {len(value)} bytes (not whole WHV_X64_CPUID_RESULTs)")
        results: dict[int, tuple[int, int, int, int]] = {}
        for function, *registers in _CPUID_RESULT.iter_unpack(value):
            results[function] = (registers[0], registers[1], registers[2], registers[3])
        return results

    @exported("WHvSetupPartition")
    def setup_partition(self, handle: Any) -> int:
        partition = self._partition(handle)
        if partition.set_up:
            raise RuleViolation(R_SETUP_TWICE)
        if not partition.processor_count:
            raise RuleViolation(R_SETUP_INCOMPLETE, "ProcessorCount was never set")
        partition.set_up = True
        return 0

    @exported("WHvDeletePartition")
    def delete_partition(self, handle: Any) -> int:
        partition = self._partition(handle)
        for vp in partition.vps.values():
            vp.engine.close()
        del self.partitions[partition.handle]
        return 0

    # --- memory -------------------------------------------------------------------------
    @exported("WHvMapGpaRange")
    def map_gpa_range(self, handle: Any, source: Any, gpa: int, size: int, flags: int) -> int:
        partition = self._partition(handle)
        host = pointer_value(source)
        # Alignment is checked before the partition's state: libwhp's test_map_gpa_range
        # saw E_INVALIDARG on Windows for 1024 bytes mapped into a partition never set up.
        if (host | gpa | size) % PAGE or size == 0:  # behaviour: map-alignment
            raise RuleViolation(R_MAP_ALIGNMENT, f"source {host:#x} guest {gpa:#x} size {size:#x}")
        if not partition.set_up:
            raise RuleViolation(R_NOT_SET_UP, "WHvMapGpaRange before WHvSetupPartition")
        if not flags & _MAP_READ:
            raise self.not_modelled("a GPA mapping without read access")
        if any(m.gpa < gpa + size and gpa < m.gpa + m.size for m in partition.mappings):
            raise self.not_modelled("overlapping GPA mappings")
        if flags & _MAP_TRACK_DIRTY and not self.features & _FEATURE_DIRTY_PAGE_TRACKING:
            raise self.not_modelled("TrackDirtyPages on a platform without dirty-page tracking")
        mapping = Mapping(int(gpa), int(size), host, int(flags))
        for vp in partition.vps.values():
            self._map_into(vp, mapping)
        partition.mappings.append(mapping)
        return 0

    @staticmethod
    def _map_into(vp: ModelVp, mapping: Mapping) -> None:
        vp.engine.map_host(
            mapping.gpa,
            mapping.size,
            mapping.host,
            read_only=not mapping.flags & _MAP_WRITE,
            log_dirty=bool(mapping.flags & _MAP_TRACK_DIRTY),
        )

    def _mapping(self, partition: ModelPartition, gpa: int, size: int) -> Mapping:
        for mapping in partition.mappings:
            if (mapping.gpa, mapping.size) == (gpa, size):
                return mapping
        if any(m.gpa < gpa + size and gpa < m.gpa + m.size for m in partition.mappings):
            # Features.PartialUnmap, which the model does not offer, is what this would need.
            raise self.not_modelled(f"unmapping {gpa:#x}+{size:#x}, which is not one whole mapping")
        raise RuleViolation(R_RANGE_NOT_FOUND, f"{gpa:#x}+{size:#x}")

    @exported("WHvUnmapGpaRange")
    def unmap_gpa_range(self, handle: Any, gpa: int, size: int) -> int:
        partition = self._partition(handle)
        if not partition.set_up:
            # libwhp's test_unmap_gpa_range saw WHV_E_GPA_RANGE_NOT_FOUND here on early Windows 10
            # builds, and its later versions no longer run that test: today's answer is not known.
            raise self.not_modelled("WHvUnmapGpaRange before WHvSetupPartition")
        mapping = self._mapping(partition, int(gpa), int(size))
        for vp in partition.vps.values():
            vp.engine.unmap(mapping.gpa, mapping.size)
        partition.mappings.remove(mapping)
        return 0

    @exported("WHvQueryGpaRangeDirtyBitmap")
    def query_dirty_bitmap(self, handle: Any, gpa: int, size: int, bitmap: Any, bitmap_size: int) -> int:
        partition = self._set_up(handle, "WHvQueryGpaRangeDirtyBitmap")
        gpa, size, bitmap_size = int(gpa), int(size), int(bitmap_size)
        if gpa % PAGE or size % PAGE or size == 0:
            raise self.not_modelled("a dirty-bitmap query of an unaligned range (the page names no code)")
        mapping = next((m for m in partition.mappings if m.gpa <= gpa and gpa + size <= m.gpa + m.size), None)
        if mapping is None and any(m.gpa < gpa + size and gpa < m.gpa + m.size for m in partition.mappings):
            raise self.not_modelled("a dirty-bitmap query across more than one mapping")
        if mapping is None:
            raise RuleViolation(R_RANGE_NOT_FOUND, f"{gpa:#x}+{size:#x}")
        if not mapping.flags & _MAP_TRACK_DIRTY:  # behaviour: dirty-needs-tracking
            raise RuleViolation(R_RANGE_NOT_FOUND, "the range is not mapped with TrackDirtyPages")
        pages = size // PAGE
        needed = (pages + 63) // 64 * 8
        if bitmap_size and bitmap_size < needed:
            raise RuleViolation(R_DIRTY_BITMAP_SIZE, f"{bitmap_size} bytes for {pages} pages")
        for vp in partition.vps.values():
            for i, byte in enumerate(vp.engine.dirty_log(mapping.gpa)):
                mapping.dirty |= {8 * i + bit for bit in range(8) if byte >> bit & 1}
        first = (gpa - mapping.gpa) // PAGE
        queried = {page for page in mapping.dirty if first <= page < first + pages}
        # A query reads and clears the range; a zero-sized bitmap only clears it (the page).
        mapping.dirty -= queried
        if bitmap_size:  # behaviour: dirty-clear-only
            dirty = bytearray(needed)
            for page in queried:
                dirty[(page - first) // 8] |= 1 << (page - first) % 8
            self.copy_to_user(pointer_value(bitmap), bytes(dirty))
        return 0

    # --- virtual processors ------------------------------------------------------------------
    @exported("WHvCreateVirtualProcessor")
    def create_vp(self, handle: Any, index: int, flags: int) -> int:
        partition = self._set_up(handle, "WHvCreateVirtualProcessor")
        if flags:
            raise RuleViolation(R_FLAGS_NOT_ZERO, f"Flags {flags:#x}")
        if index >= (partition.processor_count or 0):
            raise RuleViolation(R_VP_INDEX, f"VpIndex {index}, ProcessorCount {partition.processor_count}")
        if index in partition.vps:
            raise RuleViolation(R_VP_EXISTS, f"VpIndex {index}")
        from pyvmm.softcpu import SoftCpu

        # CPUID is intercepted for CPUID exits and to answer CpuidResultList leaves.
        intercept = {"cpuid"} if partition.extended_exits & _X64_CPUID_EXIT or partition.cpuid_results else set()
        intercept |= {"msr"} if partition.extended_exits & _X64_MSR_EXIT else set()
        engine = SoftCpu("x86_64", exit_timing="before", intercept=intercept, intercept_timing="before")
        try:
            # The architectural reset state: real mode, CS F000 base FFFF0000, RIP FFF0.
            engine.set_sregs(Sregs())  # behaviour: reset-state
            engine.set_regs(Regs())
            vp = ModelVp(int(index), engine)
            for mapping in partition.mappings:
                self._map_into(vp, mapping)
        except BaseException:
            engine.close()
            raise
        partition.vps[vp.index] = vp
        return 0

    @exported("WHvDeleteVirtualProcessor")
    def delete_vp(self, handle: Any, index: int) -> int:
        partition, vp = self._vp(handle, index)
        vp.engine.close()
        del partition.vps[vp.index]
        return 0

    @exported("WHvCancelRunVirtualProcessor")
    def cancel_run(self, handle: Any, index: int, flags: int) -> int:
        _, vp = self._vp(handle, index)
        if flags:
            raise RuleViolation(R_FLAGS_NOT_ZERO, f"Flags {flags:#x}")
        # A cancel ends the current run, or the next one if none is under way.  The page does not
        # say; Microsoft's openvmm relies on it (github.com/microsoft/openvmm pull 4033, virt_whp:
        # a cancel "ensures the VP returns to the host loop ... whether the target VTL is
        # currently running or runs later").
        vp.engine.kick()  # behaviour: cancel
        return 0

    @exported("WHvRunVirtualProcessor")
    def run_vp(self, handle: Any, index: int, context: Any, size: int) -> int:
        _, vp = self._vp(handle, index)
        if size < EXIT_CONTEXT_SIZE:  # behaviour: exit-buffer-size
            raise RuleViolation(R_EXIT_BUFFER, f"{size} bytes")
        partition = self.partitions[pointer_value(handle)]
        vp.running_thread = threading.get_ident()
        try:
            exit_ = vp.engine.run()
            while (isinstance(exit_, MmioExit) and self._ring_doorbell(partition, vp, exit_)) or (
                isinstance(exit_, CpuidExit) and self._answer_cpuid(partition, vp, exit_)
            ):
                exit_ = vp.engine.run()
        finally:
            vp.running_thread = None
        self.copy_to_user(pointer_value(context), self._exit_context(vp, exit_))
        return 0

    def _ring_doorbell(self, partition: ModelPartition, vp: ModelVp, exit_: MmioExit) -> bool:
        """A guest write a doorbell matches signals its event, and the vCPU goes
        on past the store without exiting (the hypervisor recognises ``mov``
        stores; any other instruction exits as a memory access)."""
        if not exit_.is_write:
            return False
        value = int.from_bytes(bytes(exit_.data[: exit_.size]), "little")
        for doorbell in partition.doorbells:
            if doorbell.matches(exit_.address, exit_.size, value):  # behaviour: doorbell-match
                try:
                    insn = x86_emulate.decode(exit_.instruction)
                except x86_emulate.NotEmulated:
                    return False
                regs = vp.engine.get_regs()
                vp.engine.set_regs(replace(regs, rip=regs.rip + insn.length))
                os.eventfd_write(doorbell.event, 1)  # behaviour: doorbell-signal
                return True
        return False

    def _answer_cpuid(self, partition: ModelPartition, vp: ModelVp, exit_: CpuidExit) -> bool:
        """A CPUID without a CPUID exit: the hypervisor's own answer, "based on the
        partition properties" (CPUIDAccess.md, DefaultResult*) -- a CpuidResultList
        element for its Function (any subleaf: the element has none), else the
        CPU's.  The vCPU goes on past the instruction."""
        listed = partition.cpuid_results.get(exit_.function)
        exits = partition.extended_exits & _X64_CPUID_EXIT
        if exits and listed is not None:
            raise self.not_modelled(f"CPUID {exit_.function:#x}, in CpuidResultList, with CPUID exits on")
        if exits:  # behaviour: cpuid-exit
            return False
        answer = (exit_.eax, exit_.ebx, exit_.ecx, exit_.edx)
        if listed is not None:  # behaviour: cpuid-result-list
            answer = listed
        engine = vp.engine
        regs = engine.get_regs()
        eax, ebx, ecx, edx = answer
        length = self._cpuid_or_msr_length(engine)
        engine.set_regs(replace(regs, rax=eax, rbx=ebx, rcx=ecx, rdx=edx, rip=regs.rip + length))
        return True

    @staticmethod
    def _cpuid_or_msr_length(engine: Any) -> int:
        """CPUID, RDMSR and WRMSR are 0F xx after their prefixes."""
        linear = (engine.get_sregs().cs.base + engine.get_regs().rip) & ((1 << 64) - 1)
        code = engine.read_virtual(linear, 15) or b""
        prefixes = code.find(b"\x0f")
        return (prefixes if prefixes >= 0 else 0) + 2

    def _exit_context(self, vp: ModelVp, exit_: VcpuExit) -> bytes:
        engine = vp.engine
        instruction = b""
        length: int | None = None  # of an instruction whose bytes the context does not carry
        body = b""
        if isinstance(exit_, IoExit):
            reason = _EXIT_IO
            instruction = exit_.instruction
            body = self._io_context(engine, exit_)
        elif isinstance(exit_, MmioExit):
            reason = _EXIT_MEMORY
            instruction = exit_.instruction
            unmapped = engine.read_physical(exit_.address, 1) is None
            info = (1 if exit_.is_write else 0) | (unmapped << 2) | ((exit_.gva is not None) << 3)
            body = _MEMORY_CONTEXT.pack(
                len(instruction), instruction.ljust(16, b"\0"), info, exit_.address, exit_.gva or 0
            )
        elif isinstance(exit_, CpuidExit):
            # Before the instruction: the registers it reads, and the answer the
            # hypervisor would give (CPUIDAccess.md).
            reason = _EXIT_CPUID
            length = self._cpuid_or_msr_length(engine)
            regs = engine.get_regs()
            body = _CPUID_CONTEXT.pack(
                regs.rax, regs.rcx, regs.rdx, regs.rbx, exit_.eax, exit_.ecx, exit_.edx, exit_.ebx
            )
        elif isinstance(exit_, MsrAccessExit):
            # Before the instruction: its MSR, direction and EDX:EAX (MSRAccess.md).
            reason = _EXIT_MSR
            length = self._cpuid_or_msr_length(engine)
            regs = engine.get_regs()
            body = _MSR_CONTEXT.pack(int(exit_.is_write), exit_.index, regs.rax, regs.rdx)  # behaviour: msr-exit
        elif isinstance(exit_, HltExit):
            reason = _EXIT_HALT
        elif isinstance(exit_, InterruptedExit):
            reason = _EXIT_CANCELED
            body = struct.pack("<I", 0)  # WHvRunVpCancelReasonUser
        elif isinstance(exit_, IrqWindowOpenExit):
            reason = _EXIT_WINDOW
            body = struct.pack("<I", 0)  # WHvX64PendingInterrupt
        elif isinstance(exit_, ShutdownExit):
            reason = _EXIT_UNRECOVERABLE
        elif isinstance(exit_, InternalErrorExit):
            reason, body = _EXIT_MEMORY, self._unbacked_fetch(engine, exit_)
        else:
            raise self.not_modelled(f"the exit {type(exit_).__name__}")
        head = struct.pack("<II", reason, 0) + self._vp_context(engine, len(instruction) if length is None else length)
        return (head + body).ljust(EXIT_CONTEXT_SIZE, b"\0")

    def _unbacked_fetch(self, engine: Any, exit_: InternalErrorExit) -> bytes:
        """The memory-access context of an instruction fetch from a GPA no memory
        backs: AccessType Execute, GpaUnmapped, no instruction bytes.  libwhp's
        test_run_vcpu saw a new VP with nothing mapped exit as a memory access."""
        from pyvmm.softcpu import _uc

        linear = (engine.get_sregs().cs.base + engine.get_regs().rip) & ((1 << 64) - 1)
        gpa = _uc.vmem_translate(engine._uc, linear, engine._u.UC_PROT_EXEC)
        if gpa is None or engine.read_physical(gpa, 1) is not None:
            raise self.not_modelled(f"what WHPX reports for a guest the engine cannot run ({exit_.description})")
        info = 2 | 1 << 2 | 1 << 3  # behaviour: unbacked-fetch
        return _MEMORY_CONTEXT.pack(0, bytes(16), info, gpa, linear)

    @staticmethod
    def _vp_context(engine: Any, instruction_length: int) -> bytes:
        regs = engine.get_regs()
        sregs = engine.get_sregs()
        pending, _, _, shadow = engine.x86_events()
        # WHV_X64_VP_EXECUTION_STATE: Cpl:2, Cr0Pe:1, Cr0Am:1, EferLma:1, DebugActive:1,
        # InterruptionPending:1, Reserved:5, InterruptShadow:1 (WinHvPlatformDefs.h).
        state = (
            sregs.cs.dpl & 3
            | (sregs.cr0 & 1) << 2
            | ((sregs.cr0 >> 18) & 1) << 3
            | ((sregs.efer >> 10) & 1) << 4
            | (pending is not None) << 6
            | bool(shadow) << 12
        )
        # WHV_X64_VP_EXIT_CONTEXT: InstructionLength:4 and Cr8:4 share the byte at offset 2.
        length_and_cr8 = instruction_length & 0xF | (sregs.cr8 & 0xF) << 4
        return _VP_CONTEXT.pack(state, length_and_cr8, 0, 0, _pack_segment(sregs.cs), regs.rip, regs.rflags)

    @staticmethod
    def _io_context(engine: Any, exit_: IoExit) -> bytes:
        regs = engine.get_regs()
        sregs = engine.get_sregs()
        code = exit_.instruction
        string = any(byte in (0x6C, 0x6D, 0x6E, 0x6F) for byte in code[-2:])
        rep = 0xF3 in code[:-1] or 0xF2 in code[:-1]
        info = int(exit_.is_write) | exit_.size << 1 | string << 4 | (rep and string) << 5
        return _IO_CONTEXT.pack(
            len(code),
            code.ljust(16, b"\0"),
            info,
            exit_.port,
            regs.rax,
            regs.rcx,
            regs.rsi,
            regs.rdi,
            _pack_segment(sregs.ds),
            _pack_segment(sregs.es),
        )

    # --- registers ------------------------------------------------------------------------
    def _check_not_running(self, vp: ModelVp) -> None:
        if vp.running_thread is not None and vp.running_thread != threading.get_ident():
            raise RuleViolation(R_VP_RUNNING, f"VP {vp.index} runs on thread {vp.running_thread}")

    @exported("WHvGetVirtualProcessorRegisters")
    def get_registers(self, handle: Any, index: int, names: Any, count: int, values: Any) -> int:
        _, vp = self._vp(handle, index)
        self._check_not_running(vp)
        wanted = struct.unpack(f"<{count}I", self.copy_from_user(pointer_value(names), 4 * count))
        regs = vp.engine.get_regs()
        sregs = vp.engine.get_sregs() if any(n in _SEGMENTS or n in _TABLES or n in _SCALARS for n in wanted) else None
        out = b"".join(self._read_register(vp, name, regs, sregs) for name in wanted)
        self.copy_to_user(pointer_value(values), out)
        return 0

    def _read_register(self, vp: ModelVp, name: int, regs: Regs, sregs: Sregs | None) -> bytes:
        if name < 16:
            return struct.pack("<QQ", getattr(regs, _GPRS[name]), 0)
        if name in (_REG_RIP, _REG_RFLAGS):
            return struct.pack("<QQ", regs.rip if name == _REG_RIP else regs.rflags, 0)
        if sregs is not None and name in _SEGMENTS:
            return _pack_segment(getattr(sregs, _SEGMENTS[name]))
        if sregs is not None and name in _TABLES:
            table: DescriptorTable = getattr(sregs, _TABLES[name])
            return struct.pack("<6xHQ", table.limit, table.base)
        if sregs is not None and name in _SCALARS:
            return struct.pack("<QQ", getattr(sregs, _SCALARS[name]), 0)
        if name == _PENDING_INTERRUPTION:
            pending, nmi, _, _ = vp.engine.x86_events()
            if nmi:
                return struct.pack("<QQ", 1 | 2 << 1 | 2 << 16, 0)
            return struct.pack("<QQ", 0 if pending is None else 1 | pending << 16, 0)
        if name == _INTERRUPT_STATE:
            _, _, masked, shadow = vp.engine.x86_events()
            return struct.pack("<QQ", int(bool(shadow)) | int(masked) << 1, 0)
        if name == _DELIVERABILITY:
            return struct.pack("<QQ", int(vp.window_requested) << 1, 0)
        if name in _REGISTERS_DEFINED:  # behaviour: unheld-register-read
            raise self.not_modelled(f"register {name:#x} (the model does not hold it)")
        raise RuleViolation(R_REGISTER_NAME, f"{name:#x}")

    @exported("WHvSetVirtualProcessorRegisters")
    def set_registers(self, handle: Any, index: int, names: Any, count: int, values: Any) -> int:
        _, vp = self._vp(handle, index)
        self._check_not_running(vp)
        wanted = struct.unpack(f"<{count}I", self.copy_from_user(pointer_value(names), 4 * count))
        raw = self.copy_from_user(pointer_value(values), 16 * count)
        known = set(range(16)) | {_REG_RIP, _REG_RFLAGS, _PENDING_INTERRUPTION, _DELIVERABILITY}
        known |= set(_SEGMENTS) | set(_TABLES) | set(_SCALARS)
        for name in wanted:
            if name not in known and name in _REGISTERS_DEFINED:  # behaviour: unheld-register-write
                raise self.not_modelled(f"writing register {name:#x} (the model does not hold it)")
            if name not in known:
                raise RuleViolation(R_REGISTER_NAME, f"{name:#x}")
        engine = vp.engine
        regs = engine.get_regs()
        sregs = engine.get_sregs() if any(n in _SEGMENTS or n in _TABLES or n in _SCALARS for n in wanted) else None
        new_regs = replace(regs)
        events: list[tuple[int, int]] = []
        for i, name in enumerate(wanted):
            value = raw[16 * i : 16 * i + 16]
            low = struct.unpack_from("<Q", value)[0]
            if name < 16:
                setattr(new_regs, _GPRS[name], low)
            elif name == _REG_RIP:
                new_regs.rip = low
            elif name == _REG_RFLAGS:
                new_regs.rflags = low
            elif sregs is not None and name in _SEGMENTS:
                setattr(sregs, _SEGMENTS[name], _unpack_segment(value))
            elif sregs is not None and name in _TABLES:
                limit, base = struct.unpack_from("<6xHQ", value)
                setattr(sregs, _TABLES[name], DescriptorTable(base=base, limit=limit))
            elif sregs is not None and name in _SCALARS:
                setattr(sregs, _SCALARS[name], low)
            else:
                events.append((name, low))
        if sregs is not None:
            engine.set_sregs(sregs)
        if new_regs != regs or sregs is not None:
            engine.set_regs(new_regs)
        for name, low in events:
            self._set_event(vp, name, low)
        return 0

    def _set_event(self, vp: ModelVp, name: int, value: int) -> None:
        engine = vp.engine
        if name == _PENDING_INTERRUPTION:
            if not value & 1:
                return
            kind = (value >> 1) & 7
            if kind == 2:  # WHvX64PendingNmi
                if engine.x86_events()[2]:
                    raise self.not_modelled("an NMI made pending while NMIs are blocked")
                engine.inject_nmi()  # behaviour: inject-nmi
                return
            if kind != 0:
                raise self.not_modelled("pending exceptions")
            if not engine.ready_for_interrupt():
                raise self.not_modelled("an interruption made pending while the vCPU cannot take it")
            engine.inject_interrupt(value >> 16 & 0xFF)  # behaviour: inject
        elif name == _DELIVERABILITY:
            if value & 1:
                raise self.not_modelled("NMI deliverability notifications")
            vp.window_requested = bool(value & 2)
            engine.request_interrupt_window(vp.window_requested)  # behaviour: interrupt-window

    @exported("WHvTranslateGva")
    def translate_gva(  # noqa: PLR0917 - WHvTranslateGva's own six arguments
        self, handle: Any, index: int, gva: int, flags: int, result: Any, gpa: Any
    ) -> int:
        _, vp = self._vp(handle, index)
        from pyvmm.softcpu import _uc

        engine = vp.engine
        # The engine keeps no public translation; its MMU is unicorn's (see read_virtual).
        prot = engine._u.UC_PROT_WRITE if flags & 0x2 else engine._u.UC_PROT_READ
        physical = _uc.vmem_translate(engine._uc, int(gva), prot)
        self.write_out(result, "<II", 0 if physical is not None else 1, 0)
        self.write_out(gpa, "<Q", physical or 0)
        return 0

    @exported("WHvRegisterPartitionDoorbellEvent")
    def register_doorbell(self, handle: Any, match: Any, event: Any) -> int:
        partition = self._set_up(handle, "WHvRegisterPartitionDoorbellEvent")
        doorbell = self._doorbell(match, pointer_value(event))
        for other in partition.doorbells:
            if other.gpa != doorbell.gpa:
                continue
            identical = (other.value, other.length, other.flags) == (doorbell.value, doorbell.length, doorbell.flags)
            if identical or other.length != doorbell.length or not (other.flags & doorbell.flags & 1):
                raise RuleViolation(R_DOORBELL_CONFLICT, f"GuestAddress {doorbell.gpa:#x}")
        if (doorbell.gpa & (PAGE - 1)) + doorbell.length > PAGE:  # behaviour: doorbell-straddle
            raise self.not_modelled("a doorbell write straddling a page (the page forbids it, naming no code)")
        page = doorbell.gpa & ~(PAGE - 1)
        if any(m.gpa <= page < m.gpa + m.size for m in partition.mappings):
            raise self.not_modelled("a doorbell in a mapped page (the page is unmapped while it is registered)")
        if not self.is_eventfd(doorbell.event):
            raise self.not_modelled(f"an event handle {doorbell.event} that is not an eventfd of this process")
        partition.doorbells.append(doorbell)
        return 0

    @exported("WHvUnregisterPartitionDoorbellEvent")
    def unregister_doorbell(self, handle: Any, match: Any) -> int:
        partition = self._set_up(handle, "WHvUnregisterPartitionDoorbellEvent")
        wanted = self._doorbell(match, 0)
        for doorbell in partition.doorbells:
            if (doorbell.gpa, doorbell.value, doorbell.length, doorbell.flags) == (
                wanted.gpa,
                wanted.value,
                wanted.length,
                wanted.flags,
            ):
                partition.doorbells.remove(doorbell)
                return 0
        raise RuleViolation(R_DOORBELL_NOT_FOUND, f"GuestAddress {wanted.gpa:#x}")

    def _doorbell(self, match: Any, event: int) -> Doorbell:
        gpa, value, length, flags = self.read_in(match, "<QQII")
        on_value, on_length = flags & 1, flags & 2
        malformed = (
            flags & ~3
            or (on_length and length not in (1, 2, 4, 8))
            or (not on_length and (length or on_value))
            or (not on_value and value)
        )
        if malformed:  # behaviour: doorbell-malformed
            raise RuleViolation(
                R_DOORBELL_MATCH, f"GuestAddress {gpa:#x} Value {value:#x} Length {length} flags {flags:#x}"
            )
        return Doorbell(gpa, value, length, flags, event)

    @staticmethod
    def is_eventfd(fd: int) -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
        except OSError:
            return False

    @exported("WHvRequestInterrupt")
    def request_interrupt(self, handle: Any, control: Any, size: int) -> int:
        raise self.not_modelled("WHvRequestInterrupt (it needs the local APIC emulation)")

    # --- WinHvEmulation.dll ----------------------------------------------------------------------
    @exported("WHvEmulatorCreateEmulator")
    def create_emulator(self, callbacks: Any, out: Any) -> int:
        size, _, *pointers = self.read_in(callbacks, "<II5Q")
        if size != 48 or not all(pointers):  # behaviour: callbacks-size
            raise RuleViolation(R_CALLBACKS_SIZE, f"Size {size}, callbacks {[hex(p) for p in pointers]}")
        io_port, memory, get_registers, set_registers, translate = pointers
        emulator = ModelEmulator(
            self.callback(io_port, "model_io_cb", "WHvEmulatorIoPortCallback"),
            self.callback(memory, "model_memory_cb", "WHvEmulatorMemoryCallback"),
            self.callback(get_registers, "model_registers_cb", "WHvEmulatorGetVirtualProcessorRegisters"),
            self.callback(set_registers, "model_registers_cb", "WHvEmulatorSetVirtualProcessorRegisters"),
            self.callback(translate, "model_translate_cb", "WHvEmulatorTranslateGvaPage"),
        )
        handle = self._handle()
        self.write_out(out, "<Q", handle)
        self.emulators[handle] = emulator
        return 0

    @exported("WHvEmulatorDestroyEmulator")
    def destroy_emulator(self, handle: Any) -> int:
        if self.emulators.pop(pointer_value(handle), None) is None:
            raise self.not_modelled(f"an emulator handle {handle!r} that is not one")
        return 0

    def _emulator(self, handle: Any) -> ModelEmulator:
        emulator = self.emulators.get(pointer_value(handle))
        if emulator is None:
            raise self.not_modelled(f"an emulator handle {handle!r} that is not one")
        return emulator

    @exported("WHvEmulatorTryIoEmulation")
    def try_io_emulation(self, handle: Any, context: Any, vp_context: Any, io_context: Any, status: Any) -> int:
        emulator = self._emulator(handle)
        vp = _VP_CONTEXT.unpack(self.copy_from_user(pointer_value(vp_context), _VP_CONTEXT.size))
        io = _IO_CONTEXT.unpack(self.copy_from_user(pointer_value(io_context), _IO_CONTEXT.size))
        run = _Emulation(self, emulator, context)
        self.write_out(status, "<I", run.outcome(lambda: run.io(vp, io)))
        return 0

    @exported("WHvEmulatorTryMmioEmulation")
    def try_mmio_emulation(self, handle: Any, context: Any, vp_context: Any, mmio_context: Any, status: Any) -> int:
        emulator = self._emulator(handle)
        vp = _VP_CONTEXT.unpack(self.copy_from_user(pointer_value(vp_context), _VP_CONTEXT.size))
        memory = _MEMORY_CONTEXT.unpack(self.copy_from_user(pointer_value(mmio_context), _MEMORY_CONTEXT.size))
        run = _Emulation(self, emulator, context)
        self.write_out(status, "<I", run.outcome(lambda: run.mmio(vp, memory)))
        return 0


def _code_bits(state: int, cs: Segment) -> int:
    """The default operand and address size of the code the VpContext describes:
    64 in long mode with CS.L, else 32 with CS.D in protected mode, else 16."""
    if state >> 4 & 1 and cs.l:  # ExecutionState.EferLma
        return 64
    if state >> 2 & 1:  # ExecutionState.Cr0Pe
        return 32 if cs.db else 16
    return 16


class _Emulation:
    """One ``WHvEmulatorTry*Emulation`` call: the instruction emulated through
    the plugin's callbacks, as WinHvEmulation.dll does it."""

    def __init__(self, model: WhpxModel, emulator: ModelEmulator, context: Any) -> None:
        self.model = model
        self.emulator = emulator
        self.ffi = model.ffi
        # The opaque Context the plugin passed, handed back to every callback.
        self.context = self.ffi.cast("void *", pointer_value(context))

    def outcome(self, emulate: Callable[[], None]) -> int:
        """The WHV_EMULATOR_STATUS of running ``emulate``."""
        try:
            emulate()
        except CallbackFailed as failed:
            return failed.status
        except x86_emulate.NotEmulated as why:
            # Windows' emulator knows far more instructions than this decoder, and which it
            # refuses (InternalEmulationFailure) is not documented.
            gap = self.model.not_modelled(f"emulating an instruction the model's decoder does not know ({why})")
            raise gap from why  # behaviour: undecoded-instruction
        return _STATUS_SUCCESS

    # --- callbacks ---------------------------------------------------------------------
    def get(self, names: tuple[int, ...]) -> list[int]:
        array = self.ffi.new("uint32_t[]", list(names))
        values = self.ffi.new("uint8_t[]", 16 * len(names))
        if self.emulator.get_registers(self.context, array, len(names), values) < 0:
            raise CallbackFailed(_STATUS_GET_FAILED)
        raw = bytes(self.ffi.buffer(values))
        return [struct.unpack_from("<Q", raw, 16 * i)[0] for i in range(len(names))]

    def set(self, registers: dict[int, int]) -> None:
        names = tuple(registers)
        array = self.ffi.new("uint32_t[]", list(names))
        values = self.ffi.new("uint8_t[]", b"".join(struct.pack("<QQ", registers[n], 0) for n in names))
        if self.emulator.set_registers(self.context, array, len(names), values) < 0:
            raise CallbackFailed(_STATUS_SET_FAILED)

    def translate(self, gva: int, write: bool) -> int:
        """The GPA of ``gva`` through the TranslateGvaPage callback, which gets the
        page and hands back "exactly what WHvTranslateGva returned"
        (hypervisor-instruction-emulator ``WHvEmulatorTranslateGVAPageCallback.md``)."""
        code = self.ffi.new("uint32_t *")
        gpa = self.ffi.new("uint64_t *")
        page = gva & ~(PAGE - 1)
        if self.emulator.translate(self.context, page, 0x2 if write else 0x1, code, gpa) < 0:
            raise CallbackFailed(_STATUS_TRANSLATE_FAILED)
        if code[0] != 0:  # behaviour: translation-result
            raise self.model.not_modelled(
                f"what the emulator does with the translation result {code[0]} (a fault to inject?)"
            )
        if gpa[0] % PAGE:  # behaviour: gpa-page-aligned
            # "GpaPage must be 4K aligned or the current emulation call will fail" (same page).
            raise CallbackFailed(_STATUS_GPA_NOT_ALIGNED)
        return int(gpa[0]) | gva & (PAGE - 1)

    def port(self, is_write: bool, port: int, size: int, value: int = 0) -> int:
        info = self.ffi.new("uint8_t[]", struct.pack("<BxHHxxI", int(is_write), port, size, value))
        if self.emulator.io_port(self.context, info) < 0:
            raise CallbackFailed(_STATUS_IO_FAILED)
        return int(struct.unpack_from("<I", bytes(self.ffi.buffer(info)), 8)[0]) & ((1 << (8 * size)) - 1)

    def memory(self, is_write: bool, gpa: int, size: int, value: int = 0) -> int:
        info = self.ffi.new("uint8_t[]", struct.pack("<QBB8s6x", gpa, int(is_write), size, value.to_bytes(8, "little")))
        if self.emulator.memory(self.context, info) < 0:
            raise CallbackFailed(_STATUS_MEMORY_FAILED)
        return int.from_bytes(bytes(self.ffi.buffer(info))[10 : 10 + size], "little")

    # --- instructions -----------------------------------------------------------------------
    def io(self, vp: tuple[Any, ...], io: tuple[Any, ...]) -> None:
        state, length_byte, _, _, cs_raw, rip, _rflags = vp
        count, code, info, port, _rax, _rcx, _rsi, _rdi, ds_raw, es_raw = io
        size = (info >> 1) & 7
        is_write = bool(info & 1)
        next_rip = rip + (length_byte & 0xF)
        if not info & (1 << 4):  # behaviour: plain-port
            rax = self.get((0,))[0]
            if is_write:
                self.port(True, port, size, rax & ((1 << (8 * size)) - 1))
                self.set({_REG_RIP: next_rip})
            else:
                value = self.port(False, port, size)
                mask = (1 << (8 * size)) - 1
                merged = value if size == 4 else rax & ~mask | value
                self.set({0: merged, _REG_RIP: next_rip})
            return
        address_bits = _code_bits(state, _unpack_segment(cs_raw))
        self.string_io(
            code[:count], is_write, port, size, next_rip, ds_raw, es_raw, bool(info & (1 << 5)), address_bits
        )

    def string_io(  # noqa: PLR0917 - the parts of one string instruction
        self,
        code: bytes,
        is_write: bool,
        port: int,
        size: int,
        next_rip: int,
        ds: bytes,
        es: bytes,
        rep: bool,
        address_bits: int,
    ) -> None:
        if 0x67 in code or any(b in (0x26, 0x2E, 0x36, 0x64, 0x65) for b in code):
            raise self.model.not_modelled("string I/O with an address-size or segment-override prefix")
        # The address size (16, 32 or 64 bits by the code segment) picks CX/ECX/RCX and SI/ESI/RSI,
        # DI/EDI/RDI (Intel SDM vol. 2, INS/OUTS and REP); the register bits above it are left alone.
        mask = (1 << address_bits) - 1
        rcx, rsi, rdi, rflags = self.get((1, 6, 7, _REG_RFLAGS))
        count = rcx & mask if rep else 1
        if count > MAX_STRING_ITEMS:
            raise self.model.not_modelled(f"string I/O of {count} items")
        step = -size if rflags & (1 << 10) else size
        base = _unpack_segment(ds).base if is_write else _unpack_segment(es).base
        for _ in range(count):
            offset = (rsi if is_write else rdi) & mask
            gva = (base + offset) & ((1 << 64) - 1)
            if (gva & (PAGE - 1)) + size > PAGE:
                raise self.model.not_modelled("a string I/O item crossing a page")
            gpa = self.translate(gva, write=not is_write)
            if is_write:
                self.port(True, port, size, self.memory(False, gpa, size))
                rsi = rsi & ~mask | (rsi + step) & mask
            else:
                self.memory(True, gpa, size, self.port(False, port, size))
                rdi = rdi & ~mask | (rdi + step) & mask
        registers = {6: rsi, 7: rdi, _REG_RIP: next_rip}
        if rep:
            registers[1] = rcx & ~mask
        self.set(registers)

    def mmio(self, vp: tuple[Any, ...], memory: tuple[Any, ...]) -> None:
        state, _length, _, _, cs_raw, _rip, _ = vp
        count, code, _info, gpa, _gva = memory
        bits = _code_bits(state, _unpack_segment(cs_raw))
        insn = x86_emulate.decode(code[:count], bits=bits)
        names = (*range(16), _REG_RIP, _REG_RFLAGS)
        values = self.get(names)
        regs = Regs(**dict(zip((*_GPRS, "rip", "rflags"), values, strict=True)))
        bases: dict[str, int] = {}
        if bits == 64 and insn.segment in ("fs", "gs"):
            raise self.model.not_modelled("MMIO through an FS/GS override")
        linear = x86_emulate.effective_address(insn, regs, bases)
        if (linear & (PAGE - 1)) + insn.operand_size > PAGE:  # behaviour: mmio-page-crossing
            # The emulator splits it into two memory callbacks (WhvEmulatorMemoryCallback.md).
            raise self.model.not_modelled("an MMIO operand crossing a page")
        is_write = insn.opcode in (0x88, 0x89, 0xA2, 0xA3, 0xC6, 0xC7)
        physical = self.translate(linear, write=is_write)
        if physical != gpa:
            raise self.model.not_modelled(f"an MMIO operand at GPA {physical:#x} while the exit reported {gpa:#x}")
        exit_ = MmioExit()
        exit_.address = physical
        exit_.size = insn.operand_size
        exit_.is_write = is_write
        exit_.instruction = code[: insn.length]
        if is_write:
            self.memory(True, physical, insn.operand_size, x86_emulate.write_value(insn, regs))
        else:
            value = self.memory(False, physical, insn.operand_size)
            exit_.data = memoryview(bytearray(value.to_bytes(8, "little")))
        after = x86_emulate.complete_mmio(regs, exit_, bits=bits)
        changed = {
            number: getattr(after, name)
            for number, name in enumerate(_GPRS)
            if getattr(after, name) != getattr(regs, name)
        }
        changed[_REG_RIP] = after.rip
        self.set(changed)


__all__ = ["WhpxModel"]
