"""vCPU exits: what ``Vcpu.run()`` returns.

The kinds follow crosvm's ``VcpuExit`` for x86_64 and aarch64.  Exits sit on the
hot path, so they are plain slotted classes, not pydantic models, and a backend
keeps **one instance of each exit class per vCPU** and refills it on every run.
An exit object is therefore valid until the next ``run()`` of the same vCPU;
copy what you need to keep.

Completing an access: for a read (:class:`IoExit` / :class:`MmioExit` with
``is_write`` false) the VMM writes the value into ``exit.data`` (a writable view,
often straight into the hypervisor's shared run page) before the next ``run()``.
For string port I/O (``rep ins/outs``) ``data`` holds ``count`` items of ``size``
bytes each.
"""

from __future__ import annotations

import enum


class ExitKind(enum.IntEnum):
    IO = 1
    MMIO = 2
    HLT = 3
    SHUTDOWN = 4
    SYSTEM_EVENT = 5
    INTERNAL_ERROR = 6
    FAIL_ENTRY = 7
    INTERRUPTED = 8
    DEBUG = 9
    EXCEPTION = 10
    HYPERCALL = 11
    IRQ_WINDOW_OPEN = 12
    IOAPIC_EOI = 13
    MSR_ACCESS = 14
    CPUID = 15
    OTHER = 16


class SystemEvent(enum.IntEnum):
    SHUTDOWN = 1
    RESET = 2
    CRASH = 3


class ShutdownReason(enum.IntEnum):
    """Why the vCPU shut down (x86: almost always a triple fault)."""

    TRIPLE_FAULT = 1
    DOUBLE_FAULT = 2
    OTHER = 3


class OtherExit(enum.IntEnum):
    """Rare exits carried by :class:`GenericExit`."""

    SET_TPR = 1
    TPR_ACCESS = 2
    RDTSC = 3
    BUS_LOCK = 4
    APIC_SMI_TRAP = 5
    APIC_INIT_SIPI_TRAP = 6
    INVALID_VP_REGISTER = 7
    UNSUPPORTED_FEATURE = 8
    UNRECOVERABLE_EXCEPTION = 9
    NMI_WINDOW_OPEN = 10


class VcpuExit:
    """Base class; ``kind`` tells the subclass without an isinstance chain."""

    __slots__ = ()
    kind: ExitKind

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={_show(getattr(self, name))}" for name in _all_slots(type(self)))
        return f"{type(self).__name__}({fields})"


def _all_slots(cls: type) -> list[str]:
    names: list[str] = []
    for klass in reversed(cls.__mro__):
        names.extend(getattr(klass, "__slots__", ()))
    return names


def _show(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, (bool, enum.Enum)):
        return hex(value)
    if isinstance(value, memoryview):
        return value.tobytes().hex()
    return repr(value)


class IoExit(VcpuExit):
    """Port I/O (x86).  ``data`` has ``size * count`` bytes.

    ``instruction`` is empty when the access is completed by the next ``run()``
    (KVM, HAXM).  Hypervisors that exit *before* the instruction (WHPX) give its
    bytes there; the VMM then completes it itself -- writes the destination
    register of a read and advances RIP by ``len(instruction)``."""

    __slots__ = ("count", "data", "instruction", "is_write", "port", "size")
    kind = ExitKind.IO

    def __init__(self) -> None:
        self.port = 0
        self.size = 0
        self.count = 0
        self.is_write = False
        self.data: memoryview = memoryview(bytearray(8))
        self.instruction = b""


class MmioExit(VcpuExit):
    """An access to guest-physical memory that no RAM backs (or a write to a
    read-only region).  ``data`` has ``size`` bytes, little-endian.

    Exit timing as for :class:`IoExit`: with ``instruction`` empty the next
    ``run()`` completes the access; otherwise the exit came *before* the
    instruction (WHPX), ``instruction`` holds its bytes (its length is
    ``len(instruction)``), ``gva`` the guest-virtual address of the access
    (None where the hypervisor does not say), and the VMM completes it."""

    __slots__ = ("address", "data", "gva", "instruction", "is_write", "size")
    kind = ExitKind.MMIO

    def __init__(self) -> None:
        self.address = 0
        self.size = 0
        self.is_write = False
        self.data: memoryview = memoryview(bytearray(8))
        self.instruction = b""
        self.gva: int | None = None


class HltExit(VcpuExit):
    __slots__ = ()
    kind = ExitKind.HLT


class ShutdownExit(VcpuExit):
    """The vCPU cannot continue: on x86 a triple fault."""

    __slots__ = ("raw_error_code", "reason")
    kind = ExitKind.SHUTDOWN

    def __init__(self, reason: ShutdownReason = ShutdownReason.TRIPLE_FAULT, raw_error_code: int = 0) -> None:
        self.reason = reason
        self.raw_error_code = raw_error_code


class SystemEventExit(VcpuExit):
    """The guest asked for power-off or reset (PSCI, ACPI) or the hypervisor saw it crash."""

    __slots__ = ("data", "event")
    kind = ExitKind.SYSTEM_EVENT

    def __init__(self, event: SystemEvent = SystemEvent.SHUTDOWN, data: tuple[int, ...] = ()) -> None:
        self.event = event
        self.data = data


class InternalErrorExit(VcpuExit):
    """The hypervisor failed to handle something itself, typically an instruction it
    cannot emulate.  ``instruction`` holds the failing instruction's bytes when the
    hypervisor reports them (empty otherwise)."""

    __slots__ = ("data", "description", "instruction", "suberror")
    kind = ExitKind.INTERNAL_ERROR

    def __init__(
        self, suberror: int = 0, instruction: bytes = b"", data: tuple[int, ...] = (), description: str = ""
    ) -> None:
        self.suberror = suberror
        self.instruction = instruction
        self.data = data
        self.description = description


class FailEntryExit(VcpuExit):
    """The hardware refused to enter the guest (invalid guest state)."""

    __slots__ = ("cpu", "reason")
    kind = ExitKind.FAIL_ENTRY

    def __init__(self, reason: int = 0, cpu: int = 0) -> None:
        self.reason = reason
        self.cpu = cpu


class InterruptedExit(VcpuExit):
    """``run()`` returned because of a kick or a signal, not because of the guest."""

    __slots__ = ()
    kind = ExitKind.INTERRUPTED


class DebugExit(VcpuExit):
    """A single step or breakpoint completed; ``pc`` is where the guest stopped."""

    __slots__ = ("dr6", "dr7", "exception", "pc")
    kind = ExitKind.DEBUG

    def __init__(self) -> None:
        self.pc = 0
        self.exception = 0
        self.dr6 = 0
        self.dr7 = 0


class ExceptionExit(VcpuExit):
    __slots__ = ("error_code", "vector")
    kind = ExitKind.EXCEPTION

    def __init__(self, vector: int = 0, error_code: int = 0) -> None:
        self.vector = vector
        self.error_code = error_code


class HypercallExit(VcpuExit):
    """A hypercall routed to the VMM; set ``result`` before the next run."""

    __slots__ = ("args", "number", "result")
    kind = ExitKind.HYPERCALL

    def __init__(self) -> None:
        self.number = 0
        self.args: tuple[int, ...] = ()
        self.result = 0


class IrqWindowOpenExit(VcpuExit):
    __slots__ = ()
    kind = ExitKind.IRQ_WINDOW_OPEN


class IoapicEoiExit(VcpuExit):
    __slots__ = ("vector",)
    kind = ExitKind.IOAPIC_EOI

    def __init__(self, vector: int = 0) -> None:
        self.vector = vector


class MsrAccessExit(VcpuExit):
    """An MSR access the hypervisor forwards; for a read set ``value``."""

    __slots__ = ("error", "index", "is_write", "value")
    kind = ExitKind.MSR_ACCESS

    def __init__(self) -> None:
        self.index = 0
        self.is_write = False
        self.value = 0
        self.error = False


class CpuidExit(VcpuExit):
    """A CPUID the hypervisor forwards; set ``eax``..``edx`` before the next run."""

    __slots__ = ("eax", "ebx", "ecx", "edx", "function", "index")
    kind = ExitKind.CPUID

    def __init__(self) -> None:
        self.function = 0
        self.index = 0
        self.eax = self.ebx = self.ecx = self.edx = 0


class GenericExit(VcpuExit):
    """Exits with nothing to complete: ``which`` says which one."""

    __slots__ = ("data", "which")
    kind = ExitKind.OTHER

    def __init__(self, which: OtherExit = OtherExit.SET_TPR, data: tuple[int, ...] = ()) -> None:
        self.which = which
        self.data = data
