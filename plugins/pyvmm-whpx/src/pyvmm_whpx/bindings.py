"""WinHvPlatform.dll and WinHvEmulation.dll: cffi declarations and constants.

Declarations and numbers only; ``docs/backends/whpx.md`` §2 names the header
each comes from (``WinHvPlatformDefs.h``, ``WinHvPlatform.h``,
``WinHvEmulation.h`` of the Windows SDK, as published in Microsoft's
Virtualization-Documentation repository).

The SDK declares several fields as C bit-fields (``AccessInfo``,
``ExecutionState``, the ``WHV_REGISTER_VALUE`` views of pending
interruptions...).  MSVC lays bit-fields out differently from the System V
compilers cffi follows on Linux, so here every bit-field word is declared as
the plain integer it occupies and the bits are packed by the helpers below:
the layout is then the same under both ABIs, which
``tests/test_whpx_bindings_layout.py`` checks with ``gcc -mms-bitfields``
against the documented sizes and offsets.

Functions are called through the backend kit's DLL seam, by name; their
signatures for ``ctypes`` (the production loader) are :data:`PLATFORM_FUNCTIONS`
and :data:`EMULATION_FUNCTIONS`.  Every pointer argument is passed as an
integer address, which ``ctypes.c_void_p`` accepts and a driver model reads.
"""

from __future__ import annotations

import ctypes

from pyvmm.backend import DllFunction
from pyvmm.backend.ffi_cache import declared_ffi

CDEF = """
typedef struct { uint64_t Low64; uint64_t High64; } WHV_REGISTER_VALUE;

typedef struct {
    uint64_t Base;
    uint32_t Limit;
    uint16_t Selector;
    uint16_t Attributes;
} WHV_X64_SEGMENT_REGISTER;

typedef struct {
    uint16_t Pad[3];
    uint16_t Limit;
    uint64_t Base;
} WHV_X64_TABLE_REGISTER;

typedef struct {
    uint16_t ExecutionState;
    uint8_t InstructionLengthCr8;
    uint8_t Reserved;
    uint32_t Reserved2;
    WHV_X64_SEGMENT_REGISTER Cs;
    uint64_t Rip;
    uint64_t Rflags;
} WHV_VP_EXIT_CONTEXT;

typedef struct {
    uint8_t InstructionByteCount;
    uint8_t Reserved[3];
    uint8_t InstructionBytes[16];
    uint32_t AccessInfo;
    uint64_t Gpa;
    uint64_t Gva;
} WHV_MEMORY_ACCESS_CONTEXT;

typedef struct {
    uint8_t InstructionByteCount;
    uint8_t Reserved[3];
    uint8_t InstructionBytes[16];
    uint32_t AccessInfo;
    uint16_t PortNumber;
    uint16_t Reserved2[3];
    uint64_t Rax;
    uint64_t Rcx;
    uint64_t Rsi;
    uint64_t Rdi;
    WHV_X64_SEGMENT_REGISTER Ds;
    WHV_X64_SEGMENT_REGISTER Es;
} WHV_X64_IO_PORT_ACCESS_CONTEXT;

typedef struct {
    uint32_t AccessInfo;
    uint32_t MsrNumber;
    uint64_t Rax;
    uint64_t Rdx;
} WHV_X64_MSR_ACCESS_CONTEXT;

typedef struct {
    uint64_t Rax;
    uint64_t Rcx;
    uint64_t Rdx;
    uint64_t Rbx;
    uint64_t DefaultResultRax;
    uint64_t DefaultResultRcx;
    uint64_t DefaultResultRdx;
    uint64_t DefaultResultRbx;
} WHV_X64_CPUID_ACCESS_CONTEXT;

typedef struct {
    uint8_t InstructionByteCount;
    uint8_t Reserved[3];
    uint8_t InstructionBytes[16];
    uint32_t ExceptionInfo;
    uint8_t ExceptionType;
    uint8_t Reserved2[3];
    uint32_t ErrorCode;
    uint64_t ExceptionParameter;
} WHV_VP_EXCEPTION_CONTEXT;

typedef struct { uint32_t DeliverableType; } WHV_X64_INTERRUPTION_DELIVERABLE_CONTEXT;
typedef struct {
    uint32_t FeatureCode;
    uint32_t Reserved;
    uint64_t FeatureParameter;
} WHV_X64_UNSUPPORTED_FEATURE_CONTEXT;
typedef struct { uint32_t CancelReason; } WHV_RUN_VP_CANCELED_CONTEXT;
typedef struct { uint32_t InterruptVector; } WHV_X64_APIC_EOI_CONTEXT;

typedef struct {
    uint32_t ExitReason;
    uint32_t Reserved;
    WHV_VP_EXIT_CONTEXT VpContext;
    union {
        WHV_MEMORY_ACCESS_CONTEXT MemoryAccess;
        WHV_X64_IO_PORT_ACCESS_CONTEXT IoPortAccess;
        WHV_X64_MSR_ACCESS_CONTEXT MsrAccess;
        WHV_X64_CPUID_ACCESS_CONTEXT CpuidAccess;
        WHV_VP_EXCEPTION_CONTEXT VpException;
        WHV_X64_INTERRUPTION_DELIVERABLE_CONTEXT InterruptWindow;
        WHV_X64_UNSUPPORTED_FEATURE_CONTEXT UnsupportedFeature;
        WHV_RUN_VP_CANCELED_CONTEXT CancelReason;
        WHV_X64_APIC_EOI_CONTEXT ApicEoi;
        uint64_t AsUINT64[22];
    };
} WHV_RUN_VP_EXIT_CONTEXT;

typedef struct {
    uint32_t Function;
    uint32_t Reserved[3];
    uint32_t Eax;
    uint32_t Ebx;
    uint32_t Ecx;
    uint32_t Edx;
} WHV_X64_CPUID_RESULT;

typedef struct {
    uint64_t TypeModes;
    uint32_t Destination;
    uint32_t Vector;
} WHV_INTERRUPT_CONTROL;

typedef struct {
    uint32_t ResultCode;
    uint32_t Reserved;
} WHV_TRANSLATE_GVA_RESULT;

typedef struct {
    uint64_t GuestAddress;
    uint64_t Value;
    uint32_t Length;
    uint32_t MatchFlags;
} WHV_DOORBELL_MATCH_DATA;

typedef struct {
    uint64_t GpaAddress;
    uint8_t Direction;
    uint8_t AccessSize;
    uint8_t Data[8];
} WHV_EMULATOR_MEMORY_ACCESS_INFO;

typedef struct {
    uint8_t Direction;
    uint16_t Port;
    uint16_t AccessSize;
    uint32_t Data;
} WHV_EMULATOR_IO_ACCESS_INFO;

typedef int32_t (*WHV_EMULATOR_IO_PORT_CALLBACK)(void *, WHV_EMULATOR_IO_ACCESS_INFO *);
typedef int32_t (*WHV_EMULATOR_MEMORY_CALLBACK)(void *, WHV_EMULATOR_MEMORY_ACCESS_INFO *);
typedef int32_t (*WHV_EMULATOR_GET_VIRTUAL_PROCESSOR_REGISTERS_CALLBACK)(
    void *, const uint32_t *, uint32_t, WHV_REGISTER_VALUE *);
typedef int32_t (*WHV_EMULATOR_SET_VIRTUAL_PROCESSOR_REGISTERS_CALLBACK)(
    void *, const uint32_t *, uint32_t, const WHV_REGISTER_VALUE *);
typedef int32_t (*WHV_EMULATOR_TRANSLATE_GVA_PAGE_CALLBACK)(void *, uint64_t, uint32_t, uint32_t *, uint64_t *);

typedef struct {
    uint32_t Size;
    uint32_t Reserved;
    WHV_EMULATOR_IO_PORT_CALLBACK WHvEmulatorIoPortCallback;
    WHV_EMULATOR_MEMORY_CALLBACK WHvEmulatorMemoryCallback;
    WHV_EMULATOR_GET_VIRTUAL_PROCESSOR_REGISTERS_CALLBACK WHvEmulatorGetVirtualProcessorRegisters;
    WHV_EMULATOR_SET_VIRTUAL_PROCESSOR_REGISTERS_CALLBACK WHvEmulatorSetVirtualProcessorRegisters;
    WHV_EMULATOR_TRANSLATE_GVA_PAGE_CALLBACK WHvEmulatorTranslateGvaPage;
} WHV_EMULATOR_CALLBACKS;
"""

ffi = declared_ffi(CDEF)

#: The documented sizes (``C_ASSERT``\\ s of the SDK headers and
#: ``WHvGetRunExitContextSize``): what every structure the plugin passes must be.
DOCUMENTED_SIZES = {
    "WHV_REGISTER_VALUE": 16,
    "WHV_X64_SEGMENT_REGISTER": 16,
    "WHV_X64_TABLE_REGISTER": 16,
    "WHV_VP_EXIT_CONTEXT": 40,
    "WHV_MEMORY_ACCESS_CONTEXT": 40,
    "WHV_X64_IO_PORT_ACCESS_CONTEXT": 96,
    "WHV_X64_MSR_ACCESS_CONTEXT": 24,
    "WHV_X64_CPUID_ACCESS_CONTEXT": 64,
    "WHV_VP_EXCEPTION_CONTEXT": 40,
    "WHV_RUN_VP_EXIT_CONTEXT": 224,
    "WHV_X64_CPUID_RESULT": 32,
    "WHV_INTERRUPT_CONTROL": 16,
    "WHV_TRANSLATE_GVA_RESULT": 8,
    "WHV_DOORBELL_MATCH_DATA": 24,
    "WHV_EMULATOR_MEMORY_ACCESS_INFO": 24,
    "WHV_EMULATOR_IO_ACCESS_INFO": 12,
    "WHV_EMULATOR_CALLBACKS": 48,
}

RUN_EXIT_CONTEXT_SIZE = 224

# --- HRESULTs (winerror.h; docs/backends/whpx.md §2) ---------------------------------
S_OK = 0
E_INVALIDARG = 0x8007_0057
E_POINTER = 0x8000_4003
WHV_E_UNKNOWN_CAPABILITY = 0x8037_0300
WHV_E_INSUFFICIENT_BUFFER = 0x8037_0301
WHV_E_UNKNOWN_PROPERTY = 0x8037_0302
WHV_E_INVALID_PARTITION_CONFIG = 0x8037_0304
WHV_E_GPA_RANGE_NOT_FOUND = 0x8037_0305
WHV_E_VP_ALREADY_EXISTS = 0x8037_0306
WHV_E_VP_DOES_NOT_EXIST = 0x8037_0307
WHV_E_INVALID_VP_STATE = 0x8037_0308
WHV_E_INVALID_VP_REGISTER_NAME = 0x8037_0309

# --- WHV_CAPABILITY_CODE ----------------------------------------------------------
CAPABILITY_HYPERVISOR_PRESENT = 0x0000
CAPABILITY_FEATURES = 0x0001
CAPABILITY_EXTENDED_VM_EXITS = 0x0002
CAPABILITY_PROCESSOR_VENDOR = 0x1000

#: WHV_CAPABILITY_FEATURES bits.
FEATURE_PARTIAL_UNMAP = 1 << 0
FEATURE_LOCAL_APIC_EMULATION = 1 << 1
FEATURE_XSAVE = 1 << 2
FEATURE_DIRTY_PAGE_TRACKING = 1 << 3

#: WHV_EXTENDED_VM_EXITS bits (capability and partition property alike).
EXTENDED_EXIT_CPUID = 1 << 0
EXTENDED_EXIT_MSR = 1 << 1
EXTENDED_EXIT_EXCEPTION = 1 << 2

# --- WHV_PARTITION_PROPERTY_CODE ----------------------------------------------------
PROPERTY_EXTENDED_VM_EXITS = 0x0001
PROPERTY_EXCEPTION_EXIT_BITMAP = 0x0002
PROPERTY_CPUID_EXIT_LIST = 0x1003
PROPERTY_CPUID_RESULT_LIST = 0x1004
PROPERTY_LOCAL_APIC_EMULATION_MODE = 0x1005
PROPERTY_PROCESSOR_COUNT = 0x1FFF
#: ``sizeof(WHV_PARTITION_PROPERTY)``: the buffer size for scalar properties.
PARTITION_PROPERTY_SIZE = 32

LOCAL_APIC_EMULATION_NONE = 0
LOCAL_APIC_EMULATION_XAPIC = 1

# --- WHV_MAP_GPA_RANGE_FLAGS ---------------------------------------------------------
MAP_READ = 0x1
MAP_WRITE = 0x2
MAP_EXECUTE = 0x4
MAP_TRACK_DIRTY_PAGES = 0x8

# --- WHV_TRANSLATE_GVA_FLAGS / RESULT_CODE -----------------------------------------------
TRANSLATE_VALIDATE_READ = 0x1
TRANSLATE_VALIDATE_WRITE = 0x2
TRANSLATE_SUCCESS = 0
TRANSLATE_PAGE_NOT_PRESENT = 1

# --- WHV_RUN_VP_EXIT_REASON (x64) --------------------------------------------------------
EXIT_NONE = 0x0
EXIT_MEMORY_ACCESS = 0x1
EXIT_X64_IO_PORT_ACCESS = 0x2
EXIT_UNRECOVERABLE_EXCEPTION = 0x4
EXIT_INVALID_VP_REGISTER_VALUE = 0x5
EXIT_UNSUPPORTED_FEATURE = 0x6
EXIT_X64_INTERRUPT_WINDOW = 0x7
EXIT_X64_HALT = 0x8
EXIT_X64_APIC_EOI = 0x9
EXIT_X64_MSR_ACCESS = 0x1000
EXIT_X64_CPUID = 0x1001
EXIT_EXCEPTION = 0x1002
EXIT_X64_RDTSC = 0x1003
EXIT_X64_APIC_SMI_TRAP = 0x1004
EXIT_HYPERCALL = 0x1005
EXIT_X64_APIC_INIT_SIPI_TRAP = 0x1006
EXIT_X64_APIC_WRITE_TRAP = 0x1007
EXIT_CANCELED = 0x2001

#: Exit reason -> its WHV_RUN_VP_EXIT_REASON name, for messages.
EXIT_REASON_NAMES = {
    value: "WHvRunVpExitReason" + "".join(part.capitalize() for part in name[5:].split("_"))
    for name, value in dict(globals()).items()
    if name.startswith("EXIT_") and isinstance(value, int)
}

# --- WHV_REGISTER_NAME (x64) -----------------------------------------------------------
RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI = range(8)
R8 = 0x08
R15 = 0x0F
RIP = 0x10
RFLAGS = 0x11
ES, CS, SS, DS, FS, GS, LDTR, TR = range(0x12, 0x1A)
IDTR = 0x1A
GDTR = 0x1B
CR0 = 0x1C
CR2 = 0x1D
CR3 = 0x1E
CR4 = 0x1F
CR8 = 0x20
EFER = 0x2001
APIC_BASE = 0x2003
PENDING_INTERRUPTION = 0x8000_0000
INTERRUPT_STATE = 0x8000_0001
PENDING_EVENT = 0x8000_0002
DELIVERABILITY_NOTIFICATIONS = 0x8000_0004

#: The general registers in WHV_REGISTER_NAME order (0..15).
GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")  # fmt: skip
SEGMENT_NAMES = ("es", "cs", "ss", "ds", "fs", "gs", "ldt", "tr")

# --- bit-field words -------------------------------------------------------------------
#: WHV_MEMORY_ACCESS_INFO.AccessType (bits 0-1).
MEMORY_ACCESS_READ = 0
MEMORY_ACCESS_WRITE = 1
MEMORY_ACCESS_EXECUTE = 2
#: WHV_MEMORY_ACCESS_INFO: GpaUnmapped bit 2, GvaValid bit 3.
MEMORY_GPA_UNMAPPED = 1 << 2
MEMORY_GVA_VALID = 1 << 3
#: WHV_X64_IO_PORT_ACCESS_INFO: IsWrite bit 0, AccessSize bits 1-3, StringOp bit 4, RepPrefix bit 5.
IO_IS_WRITE = 1 << 0
IO_STRING_OP = 1 << 4
IO_REP_PREFIX = 1 << 5
#: WHV_X64_VP_EXECUTION_STATE bits.
EXECUTION_STATE_INTERRUPTION_PENDING = 1 << 6
EXECUTION_STATE_INTERRUPT_SHADOW = 1 << 12
#: WHV_X64_PENDING_INTERRUPTION_TYPE.
PENDING_INTERRUPT = 0
PENDING_NMI = 2
#: WHV_X64_DELIVERABILITY_NOTIFICATIONS_REGISTER: NmiNotification bit 0, InterruptNotification bit 1.
NOTIFY_NMI = 1 << 0
NOTIFY_INTERRUPT = 1 << 1
#: WHV_DOORBELL_MATCH_DATA: MatchOnValue bit 0, MatchOnLength bit 1 (then 30 reserved bits).
DOORBELL_MATCH_ON_VALUE = 1 << 0
DOORBELL_MATCH_ON_LENGTH = 1 << 1
#: WHV_EMULATOR_STATUS bits.
EMULATOR_SUCCESSFUL = 1 << 0
#: WHV_INTERRUPT_TYPE.
INTERRUPT_TYPE_FIXED = 0
INTERRUPT_TYPE_NMI = 4


def io_access_size(access_info: int) -> int:
    """WHV_X64_IO_PORT_ACCESS_INFO.AccessSize (bits 1-3): 1, 2 or 4."""
    return (access_info >> 1) & 0x7


def instruction_length(exit_context: object) -> int:
    """WHV_VP_EXIT_CONTEXT.InstructionLength: the low nibble of its byte."""
    return int(exit_context.InstructionLengthCr8) & 0xF  # type: ignore[attr-defined]


def pending_interruption(vector: int, kind: int = PENDING_INTERRUPT) -> int:
    """WHV_X64_PENDING_INTERRUPTION_REGISTER as a u64: InterruptionPending (bit 0),
    InterruptionType (bits 1-3), InterruptionVector (bits 16-31)."""
    return 1 | (kind & 7) << 1 | (vector & 0xFFFF) << 16


def segment_attributes(*, type_: int, s: int, dpl: int, present: int, avl: int, long: int, db: int, g: int) -> int:
    """WHV_X64_SEGMENT_REGISTER.Attributes: SegmentType 0-3, NonSystemSegment 4,
    DPL 5-6, Present 7, (4 reserved), Available 12, Long 13, Default 14, Granularity 15."""
    return (
        (type_ & 0xF)
        | (s & 1) << 4
        | (dpl & 3) << 5
        | (present & 1) << 7
        | (avl & 1) << 12
        | (long & 1) << 13
        | (db & 1) << 14
        | (g & 1) << 15
    )


_HR = ctypes.c_int32
_P = ctypes.c_void_p
_U32 = ctypes.c_uint32
_U64 = ctypes.c_uint64

#: WinHvPlatform.dll exports the backend calls.  Required: what QEMU's
#: ``whpx-internal.h`` also requires; optional: exported by later Windows builds.
PLATFORM_FUNCTIONS = (
    DllFunction("WHvGetCapability", _HR, (_U32, _P, _U32, _P)),
    DllFunction("WHvCreatePartition", _HR, (_P,)),
    DllFunction("WHvSetupPartition", _HR, (_P,)),
    DllFunction("WHvDeletePartition", _HR, (_P,)),
    DllFunction("WHvSetPartitionProperty", _HR, (_P, _U32, _P, _U32)),
    DllFunction("WHvMapGpaRange", _HR, (_P, _P, _U64, _U64, _U32)),
    DllFunction("WHvUnmapGpaRange", _HR, (_P, _U64, _U64)),
    DllFunction("WHvTranslateGva", _HR, (_P, _U32, _U64, _U32, _P, _P)),
    DllFunction("WHvCreateVirtualProcessor", _HR, (_P, _U32, _U32)),
    DllFunction("WHvDeleteVirtualProcessor", _HR, (_P, _U32)),
    DllFunction("WHvRunVirtualProcessor", _HR, (_P, _U32, _P, _U32)),
    DllFunction("WHvCancelRunVirtualProcessor", _HR, (_P, _U32, _U32)),
    DllFunction("WHvGetVirtualProcessorRegisters", _HR, (_P, _U32, _P, _U32, _P)),
    DllFunction("WHvSetVirtualProcessorRegisters", _HR, (_P, _U32, _P, _U32, _P)),
    DllFunction("WHvQueryGpaRangeDirtyBitmap", _HR, (_P, _U64, _U64, _P, _U32), required=False),
    DllFunction("WHvRequestInterrupt", _HR, (_P, _P, _U32), required=False),
    DllFunction("WHvRegisterPartitionDoorbellEvent", _HR, (_P, _P, _P), required=False),
    DllFunction("WHvUnregisterPartitionDoorbellEvent", _HR, (_P, _P), required=False),
)

#: WinHvEmulation.dll exports.
EMULATION_FUNCTIONS = (
    DllFunction("WHvEmulatorCreateEmulator", _HR, (_P, _P)),
    DllFunction("WHvEmulatorDestroyEmulator", _HR, (_P,)),
    DllFunction("WHvEmulatorTryIoEmulation", _HR, (_P, _P, _P, _P, _P)),
    DllFunction("WHvEmulatorTryMmioEmulation", _HR, (_P, _P, _P, _P, _P)),
)


def address(cdata: object) -> int:
    """The integer address of a cffi pointer: what a DLL function receives."""
    return int(ffi.cast("uintptr_t", cdata))
