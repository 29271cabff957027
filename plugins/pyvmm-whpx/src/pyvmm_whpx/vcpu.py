"""A WHPX virtual processor: the vCPU class, whose methods are the vCPU hooks.

``WHvRunVirtualProcessor`` blocks until an exit and fills a 224-byte
``WHV_RUN_VP_EXIT_CONTEXT`` (Microsoft, ``WHvRunVirtualProcessor``).
:meth:`WhpxVcpu._enter` maps every documented exit reason to a pyvmm exit
(``docs/backends/whpx.md`` §4 has the table).  Port and MMIO exits come
*before* the instruction; :mod:`pyvmm_whpx.emulation` finishes them through
the emulator API, and the exit the VMM sees is completed in pyvmm's usual way
(a read's ``data`` is written before the next run).

Interrupts: this backend leaves the local APIC to the VMM (no
``LocalApicEmulationMode``), so an external interrupt is injected as the
documented crosvm/QEMU path does without APIC emulation: when the last exit's
``VpContext`` shows the vCPU interruptible (RFLAGS.IF, no interrupt shadow, no
interruption pending), ``WHvRegisterPendingInterruption`` is written; otherwise
the VMM asks for ``DeliverabilityNotifications.InterruptNotification`` and
gets a ``WHvRunVpExitReasonX64InterruptWindow`` exit once one can be taken.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pyvmm.arch.x86_64 import Regs, Sregs
from pyvmm.boot import VcpuInit, X86VcpuInit
from pyvmm.errors import ConfigError, ErrorSpace, HypervisorError, UnknownExitError
from pyvmm.exits import (
    CpuidExit,
    ExceptionExit,
    FailEntryExit,
    GenericExit,
    HltExit,
    InternalErrorExit,
    InterruptedExit,
    IoapicEoiExit,
    IoExit,
    IrqWindowOpenExit,
    MmioExit,
    MsrAccessExit,
    OtherExit,
    ShutdownExit,
    ShutdownReason,
    VcpuExit,
)
from pyvmm.vcpu_state import StateKind
from pyvmm_whpx import bindings as w
from pyvmm_whpx import regs as r
from pyvmm_whpx.bindings import address, ffi
from pyvmm_whpx.emulation import Accesses, Emulation, Pass
from pyvmm_whpx.kick import CancelKicker

if TYPE_CHECKING:
    from pyvmm_whpx.vm import WhpxVm

_RFLAGS_IF = 1 << 9
_MASK64 = (1 << 64) - 1
#: The longest x86 instruction (Intel SDM vol. 2, 2.3.11).
_MAX_INSTRUCTION_LENGTH = 15
#: What the vCPU waits for the VMM to supply before it can go on.
_NOTHING, _IO_READ, _MMIO_READ, _CPUID, _MSR = range(5)
#: Exit reasons with nothing to complete, as :class:`GenericExit` kinds.
_OTHER_EXITS = {
    w.EXIT_X64_RDTSC: OtherExit.RDTSC,
    w.EXIT_X64_APIC_SMI_TRAP: OtherExit.APIC_SMI_TRAP,
    w.EXIT_X64_APIC_INIT_SIPI_TRAP: OtherExit.APIC_INIT_SIPI_TRAP,
}


class WhpxVcpu:
    """One virtual processor, its exit buffer and its emulator."""

    @classmethod
    def create(cls, vm: WhpxVm, index: int) -> WhpxVcpu:
        vm.host.call_hresult("WHvCreateVirtualProcessor", vm.handle, index, 0)
        try:
            emulation = Emulation(vm.host, vm, index)
        except BaseException:
            vm.host.call_hresult("WHvDeleteVirtualProcessor", vm.handle, index)
            raise
        return cls(vm, index, emulation)

    def __init__(self, vm: WhpxVm, index: int, emulation: Emulation) -> None:
        self.vm = vm
        self.host = vm.host
        self.index = index
        self.emulation = emulation
        self.context = ffi.new("WHV_RUN_VP_EXIT_CONTEXT *")
        self._context_address = address(self.context)
        self._run_function = self.host.seam.function("WHvRunVirtualProcessor")
        # One exit object per kind (pyvmm.exits' rule).
        self._io = IoExit()
        self._mmio = MmioExit()
        self._hlt = HltExit()
        self._interrupted = InterruptedExit()
        self._window = IrqWindowOpenExit()
        self._shutdown = ShutdownExit(ShutdownReason.TRIPLE_FAULT)
        self._cpuid = CpuidExit()
        self._msr = MsrAccessExit()
        self._eoi = IoapicEoiExit()
        self._exception = ExceptionExit()
        self._fail_entry = FailEntryExit()
        self._generic = GenericExit()
        self._awaiting = _NOTHING
        #: Whether the last exit showed the vCPU able to take an interrupt now.
        self._interruptible = False
        self._injected = False
        self.kicker = CancelKicker(self._cancel)
        self.run = self.kicker.guard_run(self._run_once, self._interrupted)  # type: ignore[method-assign]

    # --- run ----------------------------------------------------------------------------
    def run(self) -> VcpuExit:
        """``pyvmm_run_vcpu`` (each instance replaces this with its guarded run)."""
        return self.run()

    def _run_once(self) -> VcpuExit:
        if self._awaiting != _NOTHING:
            failed = self._complete()
            if failed is not None:
                return failed
        self._interruptible = False
        # The export itself, not DllHost.call_hresult: one Python frame less per exit.
        result = int(self._run_function(self.vm.handle, self.index, self._context_address, w.RUN_EXIT_CONTEXT_SIZE))
        if result < 0:
            raise HypervisorError("WHvRunVirtualProcessor", result & 0xFFFF_FFFF, space=ErrorSpace.HRESULT)
        self._injected = False
        return self._exit()

    def _exit(self) -> VcpuExit:
        context = self.context
        reason = int(context.ExitReason)
        vp = context.VpContext
        state = int(vp.ExecutionState)
        self._interruptible = (
            bool(int(vp.Rflags) & _RFLAGS_IF)
            and not state & w.EXECUTION_STATE_INTERRUPT_SHADOW
            and not state & w.EXECUTION_STATE_INTERRUPTION_PENDING
        )
        if reason == w.EXIT_X64_IO_PORT_ACCESS:
            return self._port_exit()
        if reason == w.EXIT_MEMORY_ACCESS:
            return self._memory_exit()
        if reason == w.EXIT_X64_HALT:
            return self._hlt
        if reason == w.EXIT_CANCELED:
            self.kicker.acknowledge()
            return self._interrupted
        if reason == w.EXIT_X64_INTERRUPT_WINDOW:
            return self._window
        if reason == w.EXIT_UNRECOVERABLE_EXCEPTION:
            return self._shutdown
        if reason == w.EXIT_X64_CPUID:
            return self._cpuid_exit()
        if reason == w.EXIT_X64_MSR_ACCESS:
            return self._msr_exit()
        if reason == w.EXIT_X64_APIC_EOI:
            self._eoi.vector = int(context.ApicEoi.InterruptVector)
            return self._eoi
        if reason == w.EXIT_EXCEPTION:
            self._exception.vector = int(context.VpException.ExceptionType)
            self._exception.error_code = int(context.VpException.ErrorCode)
            return self._exception
        if reason == w.EXIT_INVALID_VP_REGISTER_VALUE:
            return FailEntryExit(reason)
        if reason == w.EXIT_UNSUPPORTED_FEATURE:
            feature = context.UnsupportedFeature
            return GenericExit(OtherExit.UNSUPPORTED_FEATURE, (int(feature.FeatureCode), int(feature.FeatureParameter)))
        if reason == w.EXIT_X64_RDTSC:
            return GenericExit(OtherExit.RDTSC)
        if reason == w.EXIT_X64_APIC_SMI_TRAP:
            return GenericExit(OtherExit.APIC_SMI_TRAP)
        if reason == w.EXIT_X64_APIC_INIT_SIPI_TRAP:
            return GenericExit(OtherExit.APIC_INIT_SIPI_TRAP)
        # A reason no header names, or one this backend never enables.
        raise UnknownExitError(f"WHvRunVirtualProcessor ({w.EXIT_REASON_NAMES.get(reason, 'unnamed')})", reason)

    def _other(self, which: OtherExit, data: tuple[int, ...] = ()) -> GenericExit:
        self._generic.which = which
        self._generic.data = data
        return self._generic

    # --- port and MMIO exits ------------------------------------------------------------
    def _port_exit(self) -> VcpuExit:
        port = self.context.IoPortAccess
        info = int(port.AccessInfo)
        if info & w.IO_IS_WRITE:
            accesses = self._emulate(Pass.COMPLETE, [])
            awaiting = _NOTHING
        else:
            accesses = self._emulate(Pass.PROBE, [])
            awaiting = _IO_READ
        if accesses.failure or not accesses.items:
            return self._emulation_failed(accesses, port)
        first = accesses.items[0]
        exit_ = self._io
        exit_.port = first[1]
        exit_.size = first[2]
        exit_.count = len(accesses.items)
        exit_.is_write = first[0]
        exit_.data = memoryview(b"".join(v.to_bytes(s, "little") for _, _, s, v in accesses.items)).cast("B")
        if not exit_.is_write:
            exit_.data = memoryview(bytearray(exit_.size * exit_.count))
        exit_.instruction = self._instruction(port, accesses)
        self._awaiting = awaiting
        return exit_

    def _memory_exit(self) -> VcpuExit:
        memory = self.context.MemoryAccess
        if int(memory.AccessInfo) & 3 == w.MEMORY_ACCESS_EXECUTE:
            # The guest runs where no memory is: no device access to hand over, and no
            # instruction the emulator could fetch (WHV_MEMORY_ACCESS_TYPE Execute).
            self._awaiting = _NOTHING
            gpa = int(memory.Gpa)
            return InternalErrorExit(
                0, b"", (int(self.context.VpContext.Rip), gpa), f"whpx: instruction fetch from GPA {gpa:#x}"
            )
        is_write = int(memory.AccessInfo) & 3 == w.MEMORY_ACCESS_WRITE
        accesses = self._emulate(Pass.COMPLETE if is_write else Pass.PROBE, [])
        if accesses.failure or len(accesses.items) != 1:
            return self._emulation_failed(accesses, memory)
        written, gpa, size, value = accesses.items[0]
        exit_ = self._mmio
        exit_.address = gpa
        exit_.size = size
        exit_.is_write = written
        exit_.data = memoryview(bytearray(value.to_bytes(8, "little")[:size]))
        exit_.instruction = self._instruction(memory, accesses)
        exit_.gva = int(memory.Gva) if int(memory.AccessInfo) & w.MEMORY_GVA_VALID else None
        self._awaiting = _NOTHING if written else _MMIO_READ
        return exit_

    def _instruction(self, access: Any, accesses: Accesses) -> bytes:
        """The exiting instruction's bytes: those the hypervisor handed, cut at the
        length the emulator found (the RIP it set less the exit's RIP).  The
        hypervisor may hand fewer bytes than that or more (the emulator fetches
        what is missing itself; Microsoft, ``WHvEmulatorTryEmulation``)."""
        handed = bytes(access.InstructionBytes[0 : access.InstructionByteCount])
        if accesses.next_rip is None:
            return handed
        length = (accesses.next_rip - int(self.context.VpContext.Rip)) & _MASK64
        return handed[:length] if length <= _MAX_INSTRUCTION_LENGTH else handed

    def _emulate(self, mode: Pass, answers: list[int]) -> Accesses:
        context = self.context
        if int(context.ExitReason) == w.EXIT_X64_IO_PORT_ACCESS:
            function, access = "WHvEmulatorTryIoEmulation", ffi.addressof(context.IoPortAccess)
        else:
            function, access = "WHvEmulatorTryMmioEmulation", ffi.addressof(context.MemoryAccess)
        return self.emulation.run(mode, function, ffi.addressof(context.VpContext), access, answers)

    def _emulation_failed(self, accesses: Accesses, access: Any) -> InternalErrorExit:
        self._awaiting = _NOTHING
        why = accesses.failure or f"the instruction made {len(accesses.items)} device accesses"
        return InternalErrorExit(
            0,
            bytes(access.InstructionBytes[0 : access.InstructionByteCount]),
            (int(self.context.VpContext.Rip),),
            f"whpx: {why}",
        )

    def _complete(self) -> VcpuExit | None:
        awaiting, self._awaiting = self._awaiting, _NOTHING
        if awaiting in (_IO_READ, _MMIO_READ):
            exit_: IoExit | MmioExit = self._io if awaiting == _IO_READ else self._mmio
            count = exit_.count if awaiting == _IO_READ else 1  # type: ignore[union-attr]
            data = bytes(exit_.data)
            answers = [int.from_bytes(data[i * exit_.size : (i + 1) * exit_.size], "little") for i in range(count)]
            accesses = self._emulate(Pass.COMPLETE, answers)
            if accesses.failure or accesses.answers:
                access = self.context.IoPortAccess if awaiting == _IO_READ else self.context.MemoryAccess
                return self._emulation_failed(accesses, access)
            return None
        if awaiting == _CPUID:
            c = self._cpuid
            self._set_and_advance({0: c.eax, 3: c.ebx, 1: c.ecx, 2: c.edx})
        elif awaiting == _MSR and self._msr.error:
            # WHPX leaves the #GP to the VMM (a pending exception), which this
            # backend does not inject: refuse rather than complete the access.
            # RIP is still on the instruction, so the next run exits on it again.
            raise ConfigError(
                f"MsrAccessExit.error for MSR {self._msr.index:#x}: the whpx backend cannot inject the #GP "
                "a refused MSR access needs; answer it instead"
            )
        elif awaiting == _MSR and not self._msr.is_write:
            value = self._msr.value
            self._set_and_advance({0: value & 0xFFFF_FFFF, 2: value >> 32})
        elif awaiting == _MSR:
            self._set_and_advance({})
        return None

    # --- CPUID and MSR exits ------------------------------------------------------------
    def _cpuid_exit(self) -> CpuidExit:
        access = self.context.CpuidAccess
        exit_ = self._cpuid
        exit_.function = int(access.Rax) & 0xFFFF_FFFF
        exit_.index = int(access.Rcx) & 0xFFFF_FFFF
        exit_.eax = int(access.DefaultResultRax) & 0xFFFF_FFFF
        exit_.ebx = int(access.DefaultResultRbx) & 0xFFFF_FFFF
        exit_.ecx = int(access.DefaultResultRcx) & 0xFFFF_FFFF
        exit_.edx = int(access.DefaultResultRdx) & 0xFFFF_FFFF
        self._awaiting = _CPUID
        return exit_

    def _msr_exit(self) -> MsrAccessExit:
        access = self.context.MsrAccess
        exit_ = self._msr
        exit_.index = int(access.MsrNumber)
        exit_.is_write = bool(int(access.AccessInfo) & 1)
        exit_.value = (int(access.Rdx) & 0xFFFF_FFFF) << 32 | int(access.Rax) & 0xFFFF_FFFF
        exit_.error = False
        self._awaiting = _MSR
        return exit_

    def _set_and_advance(self, gprs: dict[int, int]) -> None:
        """Write ``gprs`` (by register name) and move RIP past the exiting
        instruction (``VpContext.InstructionLength``)."""
        vp = self.context.VpContext
        rip = (int(vp.Rip) + w.instruction_length(vp)) & _MASK64
        self._set_registers({**gprs, w.RIP: rip})

    # --- registers ------------------------------------------------------------------------
    def _get_registers(self, names: tuple[int, ...]) -> Any:
        values = r.values_array(len(names))
        # Keep the arrays referenced for the call: the DLL gets bare addresses.
        wanted = r.names_array(names)
        self.host.call_hresult(
            "WHvGetVirtualProcessorRegisters", self.vm.handle, self.index, address(wanted), len(names), address(values)
        )
        return values

    def _set_registers(self, registers: dict[int, int]) -> None:
        names = tuple(registers)
        values = r.values_array(len(names))
        for i, name in enumerate(names):
            values[i].Low64 = registers[name] & _MASK64
        self._write_values(names, values)

    def _write_values(self, names: tuple[int, ...], values: Any) -> None:
        wanted = r.names_array(names)
        self.host.call_hresult(
            "WHvSetVirtualProcessorRegisters", self.vm.handle, self.index, address(wanted), len(names), address(values)
        )

    def init(self, boot: VcpuInit) -> None:
        if not isinstance(boot, X86VcpuInit):
            raise ConfigError(f"whpx vCPU {self.index} cannot take {type(boot).__name__}")
        if boot.fpu is not None or boot.msrs:
            raise ConfigError("whpx: FPU and MSR boot state are not supported by this backend yet")
        self.set_state(StateKind.SREGS, boot.sregs)
        self.set_state(StateKind.REGS, boot.regs)

    def get_state(self, kind: StateKind) -> Any:
        if kind is StateKind.REGS:
            return r.regs_from_values(self._get_registers(r.REGS_NAMES))
        if kind is StateKind.SREGS:
            return r.sregs_from_values(self._get_registers(r.SREGS_NAMES))
        raise ConfigError(f"the whpx backend has no {kind.value} state (it has regs, sregs)")

    def set_state(self, kind: StateKind, value: Any) -> None:
        if kind is StateKind.REGS and isinstance(value, Regs):
            values = r.values_array(len(r.REGS_NAMES))
            r.regs_to_values(value, values)
            self._write_values(r.REGS_NAMES, values)
        elif kind is StateKind.SREGS and isinstance(value, Sregs):
            values = r.values_array(len(r.SREGS_NAMES))
            r.sregs_to_values(value, values)
            self._write_values(r.SREGS_NAMES, values)
        elif kind in (StateKind.REGS, StateKind.SREGS):
            expected = Regs if kind is StateKind.REGS else Sregs
            raise ConfigError(f"{kind.value}: expected {expected.__name__}, got {type(value).__name__}")
        else:
            raise ConfigError(f"the whpx backend has no {kind.value} state (it has regs, sregs)")
        self._awaiting = _NOTHING  # the VMM moved the guest: nothing waits for completion

    # --- interrupts --------------------------------------------------------------------
    def ready_for_interrupt(self) -> bool:
        return self._interruptible and not self._injected

    def interrupt(self, vector: int) -> None:
        self._set_registers({w.PENDING_INTERRUPTION: w.pending_interruption(vector)})
        self._injected = True

    def inject_nmi(self) -> None:
        """An NMI through ``WHvRegisterPendingInterruption`` (type NMI, vector 2):
        taken whatever RFLAGS.IF says."""
        self._set_registers({w.PENDING_INTERRUPTION: w.pending_interruption(2, w.PENDING_NMI)})
        self._injected = True

    def request_interrupt_window(self, requested: bool) -> None:
        self._set_registers({w.DELIVERABILITY_NOTIFICATIONS: w.NOTIFY_INTERRUPT if requested else 0})

    # --- kick and teardown -----------------------------------------------------------------
    def kick(self) -> None:
        self.kicker.kick()

    def _cancel(self) -> None:
        self.host.call_hresult("WHvCancelRunVirtualProcessor", self.vm.handle, self.index, 0)

    def close(self) -> None:
        if self.kicker.closed:
            return
        self.kicker.close()
        try:
            self.emulation.close()
        finally:
            self.host.call_hresult("WHvDeleteVirtualProcessor", self.vm.handle, self.index)
            if self in self.vm.vcpus:
                self.vm.vcpus.remove(self)
