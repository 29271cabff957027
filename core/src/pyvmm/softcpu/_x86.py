"""The x86_64 half of the software CPU: port I/O, exceptions, HLT, and the
register sets (:class:`~pyvmm.arch.x86_64.Regs` / :class:`~pyvmm.arch.x86_64.Sregs`).

unicorn runs x86 guests in a ``UC_MODE_64`` engine whose register interface can
set a segment *selector* but not the hidden descriptor cache behind it (only FS
and GS load a descriptor), and whose fresh state is a pseudo long mode (LMA and
64-bit code, no paging).  :meth:`X86Isa.set_sregs` therefore starts from that
fresh state, moves the CPU into the requested mode with control-register
writes, and then writes the descriptor caches and QEMU's mode flags into the
engine's saved context (:class:`pyvmm.softcpu._x86_state.Layout` finds
where they are).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import struct
from dataclasses import dataclass
from typing import Any

from pyvmm.arch.x86_64 import (
    CR0_PE,
    CR0_PG,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    GPR_NAMES,
    DescriptorTable,
    ExceptionEvent,
    InterruptEvent,
    InterruptShadow,
    NmiEvent,
    Regs,
    Segment,
    SmiEvent,
    Sregs,
    VcpuEvents,
)
from pyvmm.arch.x86_64_extra_state import DebugRegs, Fpu
from pyvmm.boot import X86VcpuInit
from pyvmm.errors import ConfigError
from pyvmm.exits import (
    CpuidExit,
    InternalErrorExit,
    IoExit,
    IrqWindowOpenExit,
    MsrAccessExit,
    ShutdownExit,
    ShutdownReason,
    VcpuExit,
)
from pyvmm.softcpu import _uc, x86_emulate
from pyvmm.softcpu import _x86_string_io as _string_io
from pyvmm.softcpu._isa import INTERNAL_ERROR_EMULATION, Engine, Isa, Stop
from pyvmm.softcpu._x86_state import (
    HF_ADDSEG,
    HF_CPL,
    HF_CS32,
    HF_CS64,
    HF_INHIBIT_IRQ,
    HF_LMA,
    HF_PE,
    HF_SS32,
    SEG_INDEX,
    SEG_SIZE,
    Layout,
    cache_flags,
    cache_of,
    decode_descriptor,
    exception_fields,
    segment_from_cache,
)
from pyvmm.softcpu.exits import RdtscExit, StringIoExit

MSR_EFER = 0xC0000080
_PAGE_SIZE = 4096
_MSR_TSC_AUX = 0xC0000103
#: MSRs a mode change must not lose (set_sregs restarts from the fresh CPU state).
_KEPT_MSRS = (0x174, 0x175, 0x176, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084, 0xC0000102)
_VECTOR_NAMES = {
    0: "#DE",
    1: "#DB",
    2: "NMI",
    3: "#BP",
    4: "#OF",
    5: "#BR",
    6: "#UD",
    7: "#NM",
    8: "#DF",
    10: "#TS",
    11: "#NP",
    12: "#SS",
    13: "#GP",
    14: "#PF",
    16: "#MF",
    17: "#AC",
    18: "#MC",
    19: "#XM",
}
_UD = 6
_PF = 14
_DB = 1
_NMI = 2

RFLAGS_TF = 1 << 8
RFLAGS_IF = 1 << 9
RFLAGS_DF = 1 << 10
RFLAGS_NT = 1 << 14
RFLAGS_RF = 1 << 16
RFLAGS_VM = 1 << 17
RFLAGS_AC = 1 << 18

#: MSRs the CPU keeps itself even when MSR accesses are exits (as a hypervisor
#: does: mode, syscall and segment-base MSRs, the TSC, PAT).
_CPU_MSRS = frozenset((0x10, 0x174, 0x175, 0x176, 0x277, MSR_EFER, 0xC0000081, 0xC0000082, 0xC0000083))
_CPU_MSRS |= {0xC0000084, 0xC0000100, 0xC0000101, 0xC0000102}
#: Vectors whose exceptions push an error code.
_ERROR_CODE_VECTORS = frozenset((8, 10, 11, 12, 13, 14, 17, 21, 29, 30))


@dataclass(slots=True)
class _PortAccess:
    port: int
    size: int
    is_write: bool
    value: int
    rip: int
    #: RIP, RAX, RCX, RSI, RDI before the instruction: all an IN/OUT/INS/OUTS changes.
    before: tuple[int, int, int, int, int]
    #: A write is ready to be consumed at once; a read once the VMM supplied data.
    ready: bool = False


@dataclass(frozen=True, slots=True)
class _Gate:
    """An IDT interrupt or trap gate, as delivery reads it."""

    vector: int
    selector: int
    offset: int
    ist: int
    trap: bool


@dataclass(frozen=True, slots=True)
class _Exception:
    """An exception the VMM injected, delivered at the next run."""

    vector: int
    error_code: int | None
    cr2: int | None


@dataclass(slots=True)
class _Batch:
    """A string I/O batch: ``count`` items from the one at ``gva``/``gpa``;
    ``low_gpa`` is the lowest address of the block (the last item's, for DF=1)."""

    op: _string_io.StringOp
    port: int
    size: int
    count: int
    df: bool
    gva: int
    gpa: int
    low_gpa: int
    rip: int


def _transfer_order(block: bytes, batch: _Batch) -> bytes:
    """The items of ``block`` (memory order) in the order the instruction moves
    them -- the reverse for DF=1 -- and back (the reversal is its own inverse)."""
    if not batch.df:
        return block
    size = batch.size
    return b"".join(block[i : i + size] for i in range(len(block) - size, -1, -size))


class X86Isa(Isa):
    debug_exception = _DB
    max_instruction = 15

    def __init__(self, engine: Engine, u: Any, uc: Any) -> None:
        super().__init__(engine, u, uc)
        c = self.u.x86_const
        self._io = IoExit()
        self._buffer = bytearray(8)
        self._views = {n: memoryview(self._buffer)[:n] for n in (1, 2, 4, 8)}
        self.c: Any = c
        self.gpr_ids: tuple[int, ...] = tuple(getattr(c, f"UC_X86_REG_{name.upper()}") for name in GPR_NAMES)
        self.rip_id: int = c.UC_X86_REG_RIP
        self._current: _PortAccess | None = None
        self._pending: _PortAccess | None = None
        self._segment_ids: dict[str, int] = {
            "cs": c.UC_X86_REG_CS,
            "ds": c.UC_X86_REG_DS,
            "es": c.UC_X86_REG_ES,
            "fs": c.UC_X86_REG_FS,
            "gs": c.UC_X86_REG_GS,
            "ss": c.UC_X86_REG_SS,
        }
        #: The hidden segment state last set, per register.  unicorn cannot report
        #: it; while the selector is unchanged this is what the CPU holds.
        self._shadow: dict[str, Segment] = {}
        #: (CS selector, CS base or -1 in 64-bit code) as _linear_pc last read them.
        self._code_base: tuple[int, int] | None = None
        self._apic_base = Sregs().apic_base
        # The fresh state set_sregs starts every mode change from.
        self._fresh: Any = self.uc.context_save()
        self._layout = Layout(self.u, self.uc)
        # Events from the VMM (INTERRUPT_INJECTION, NMI): an external interrupt
        # to deliver, NMI pending/blocked, the interrupt-window request.
        self._ran = False
        self._irq: int | None = None
        self._nmi_pending = False
        self._nmi_masked = False
        self._exception: _Exception | None = None
        #: (error code, is INT n) of the exception unicorn raised last.
        self._raised: tuple[int, bool] = (0, False)
        self._iret_hook: Any = None
        self._window = False
        self._window_exit = IrqWindowOpenExit()
        # CPUID / MSR exits (see SoftCpu's ``intercept``).
        self.intercept: frozenset[str] = frozenset()
        self._cpuid = CpuidExit()
        self._msr = MsrAccessExit()
        self._rdtsc = RdtscExit()
        self._rdtsc_hooks: tuple[_uc.InstructionHook, ...] = ()
        #: With exits before the instruction: RIP, RAX, RBX, RCX, RDX as they were
        #: when the CPUID hook let unicorn compute its default answer.
        self._cpuid_before: tuple[int, ...] | None = None
        self._isa_exit: VcpuExit | None = None
        self._awaiting: VcpuExit | None = None
        #: Port and MMIO exits before the instruction (SoftCpu's ``exit_timing``).
        self.exits_before = False
        #: Intercepted CPUID and RDMSR/WRMSR before the instruction (``intercept_timing``).
        self.intercepts_before = False
        #: Most bytes of one INS/OUTS exit; 0: an item per exit (SoftCpu's ``string_batch``).
        self.string_batch = 0
        self._string_io = StringIoExit()
        self._batch_buffer = bytearray(_PAGE_SIZE)
        self._planned: _Batch | None = None  # found by the port hook, not yet an exit
        self._batch: _Batch | None = None  # reported, completed by the next run

    def install(self) -> None:
        self.uc.hook_add(self.u.UC_HOOK_INSN, self._on_in, None, 1, 0, self.c.UC_X86_INS_IN)
        self.uc.hook_add(self.u.UC_HOOK_INSN, self._on_out, None, 1, 0, self.c.UC_X86_INS_OUT)
        self.uc.hook_add(self.u.UC_HOOK_INSN, self._on_cpuid, None, 1, 0, self.c.UC_X86_INS_CPUID)
        if "rdtsc" in self.intercept:
            self._rdtsc_hooks = (
                _uc.InstructionHook(self.uc, self.c.UC_X86_INS_RDTSC, lambda: self._on_rdtsc(rdtscp=False)),
                _uc.InstructionHook(self.uc, self.c.UC_X86_INS_RDTSCP, lambda: self._on_rdtsc(rdtscp=True)),
            )
        if "msr" in self.intercept:
            # unicorn 2.1 cannot hook RDMSR/WRMSR (UC_HOOK_INSN takes IN, OUT,
            # SYSCALL, SYSENTER, CPUID, RDTSC(P)): every instruction is looked at
            # instead, which is why MSR exits are an option.
            self.uc.hook_add(self.u.UC_HOOK_CODE, self._on_code_msr)
        # The FPU as a new KVM vCPU has it (after FNINIT: FCW 0x37F, every
        # register empty, MXCSR 0x1F80); unicorn starts with FCW 0 and all eight
        # registers tagged in use.
        self.set_fpu(Fpu())

    # --- run-loop interface -------------------------------------------------------
    def pc(self) -> int:
        return self.regs.read(self.rip_id)

    def _read(self, reg: int) -> int:
        return self.regs.read(reg)

    def halted(self, step_start: int | None) -> bool:
        rip = self.pc()
        base = self._linear_pc() - rip
        if step_start is not None:
            return rip == step_start + 1 and self.engine.read_virtual(base + step_start, 1) == b"\xf4"
        # HLT is the only way a slice ends with no hook having fired: unicorn
        # stops after it, with RIP past the one-byte instruction.
        return self.engine.read_virtual(base + rip - 1, 1) == b"\xf4"

    # IN/OUT: the hook stops emulation right after the instruction (the engine
    # always runs with an instruction budget, which makes unicorn honour a stop
    # before the next instruction).  The instruction is then rewound to where it
    # began, and the next run re-executes it: the hook recognises the access it
    # reported and answers it -- the VMM's data for a read, nothing for a write --
    # without stopping.  Rewinding makes plain and string forms alike (unicorn
    # retires a plain IN/OUT but abandons the current item of a REP INS/OUTS).
    def _on_in(self, uc: Any, port: int, size: int, _data: Any) -> int:
        rip = self.pc()
        pending = self._pending
        if (
            pending is not None
            and pending.ready
            and not pending.is_write
            and (pending.port, pending.size, pending.rip) == (port, size, rip)
        ):
            self._pending = None
            return pending.value
        self._begin(uc, rip, port, size, is_write=False)
        return 0

    def _on_out(self, uc: Any, port: int, size: int, value: int, _data: Any) -> None:
        rip = self.pc()
        value &= (1 << (8 * size)) - 1
        pending = self._pending
        if (
            pending is not None
            and pending.is_write
            and (pending.port, pending.size, pending.rip, pending.value) == (port, size, rip, value)
        ):
            self._pending = None
            return
        self._begin(uc, rip, port, size, is_write=True, value=value)

    def _begin(self, uc: Any, rip: int, port: int, size: int, *, is_write: bool, value: int = 0) -> None:
        if self._current is not None:
            return  # a second access in the same instruction: it is redone on re-execution
        c = self.c
        before = (
            rip,
            self._read(c.UC_X86_REG_RAX),
            self._read(c.UC_X86_REG_RCX),
            self._read(c.UC_X86_REG_RSI),
            self._read(c.UC_X86_REG_RDI),
        )
        self._current = _PortAccess(port, size, is_write, value, rip, before)
        self._planned = self._plan_batch(self._current) if self.string_batch else None
        self.engine.stop_slice(Stop.PORT)

    # String I/O in batches (``string_batch``): the hook sees the first item of
    # an INS/OUTS; the exit carries as many items as fit, read from guest memory
    # for OUTS, and the next run completes them all in Python -- memory for
    # INS, RSI/RDI, RCX and RIP -- rather than by re-execution.
    def _plan_batch(self, access: _PortAccess) -> _Batch | None:
        bits = self._bits()
        code = self.engine.read_virtual(self._linear_pc(), self.max_instruction) or b""
        op = _string_io.decode(code, bits)
        if op is None:
            return None
        _, _, rcx, rsi, rdi = access.before
        df = bool(self._read(self.c.UC_X86_REG_RFLAGS) & RFLAGS_DF)
        offset = (rsi if op.is_write else rdi) & op.address_mask
        linear = self._segment_base(op.segment, bits) + offset
        if bits != 64:
            linear &= 0xFFFFFFFF
        count = _string_io.batch_count(
            op, rcx=rcx, offset=offset, linear=linear, size=access.size, df=df, limit=self.string_batch
        )
        if count < 1:
            return None
        prot = self.u.UC_PROT_READ if op.is_write else self.u.UC_PROT_WRITE
        gpa = _uc.vmem_translate(self.uc, linear, prot)
        if gpa is None:
            return None  # the item by item path lets the CPU raise the page fault
        low = gpa - (count - 1) * access.size if df else gpa
        if not self.engine.is_ram(low, count * access.size, write=not op.is_write):
            return None
        return _Batch(op, access.port, access.size, count, df, linear, gpa, low, access.rip)

    def _segment_base(self, name: str, bits: int) -> int:
        if bits == 64:  # only FS and GS have a base in 64-bit mode
            if name == "fs":
                return self._read(self.c.UC_X86_REG_FS_BASE)
            if name == "gs":
                return self._read(self.c.UC_X86_REG_GS_BASE)
            return 0
        return self._segment(name, self._read(self.c.UC_X86_REG_CR0)).base

    def _batch_exit(self, batch: _Batch) -> StringIoExit:
        exit_ = self._string_io
        exit_.port = batch.port
        exit_.size = batch.size
        exit_.count = batch.count
        exit_.is_write = batch.op.is_write
        exit_.df = batch.df
        exit_.gva = batch.gva
        exit_.gpa = batch.gpa
        exit_.instruction = b""
        length = batch.count * batch.size
        data = memoryview(self._batch_buffer)[:length]
        if batch.op.is_write:
            data[:] = _transfer_order(self.engine.read_physical(batch.low_gpa, length) or bytes(length), batch)
        else:
            data[:] = bytes(length)
        exit_.data = data
        self._batch = batch
        return exit_

    def _complete_batch(self, exit_: StringIoExit, batch: _Batch) -> None:
        c = self.c
        op = batch.op
        length = batch.count * batch.size
        if not op.is_write:
            # Memory order from transfer order (the same reversal, for DF=1).
            self.engine.write_ram(batch.low_gpa, _transfer_order(bytes(exit_.data[:length]), batch))
        index = c.UC_X86_REG_RSI if op.is_write else c.UC_X86_REG_RDI
        self.regs.write(index, _string_io.advance(op, self._read(index), -length if batch.df else length))
        done = True
        if op.rep:
            rcx = _string_io.advance(op, self._read(c.UC_X86_REG_RCX), -batch.count)
            self.regs.write(c.UC_X86_REG_RCX, rcx)
            done = rcx & op.address_mask == 0
        if done:
            self.regs.write(self.rip_id, batch.rip + op.length)

    def port_exit(self) -> VcpuExit:
        access, self._current = self._current, None
        if access is None:
            raise AssertionError("port exit without a recorded access")
        c = self.c
        ids = (c.UC_X86_REG_RIP, c.UC_X86_REG_RAX, c.UC_X86_REG_RCX, c.UC_X86_REG_RSI, c.UC_X86_REG_RDI)
        for reg, value in zip(ids, access.before, strict=True):
            self.regs.write(reg, value)
        batch, self._planned = self._planned, None
        if batch is not None:
            return self._batch_exit(batch)
        exit_ = self._io
        if self.exits_before:
            # Nothing is re-executed: the VMM completes the instruction.
            exit_.instruction = self._port_instruction()
        else:
            access.ready = access.is_write
            self._pending = access
        exit_.port = access.port
        exit_.size = access.size
        exit_.count = 1
        exit_.is_write = access.is_write
        data = self._views[access.size]
        data[:] = access.value.to_bytes(access.size, "little") if access.is_write else bytes(access.size)
        exit_.data = data
        return exit_

    def _port_instruction(self) -> bytes:
        """The bytes of the IN/OUT/INS/OUTS at RIP: prefixes, opcode, imm8."""
        code = self.engine.read_virtual(self._linear_pc(), self.max_instruction) or b""
        at = 0
        while at < len(code) and (code[at] in (0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF2, 0xF3)):
            at += 1
        if at < len(code) and 0x40 <= code[at] <= 0x4F and self._efer() & EFER_LMA:
            at += 1
        if at >= len(code):
            return code
        length = at + (2 if 0xE4 <= code[at] <= 0xE7 else 1)
        return code[:length]

    def _bits(self) -> int:
        """The code size the CPU decodes now: 64, 32 or 16."""
        cr0 = self._read(self.c.UC_X86_REG_CR0)
        if not cr0 & CR0_PE:
            return 16
        cs = self._segment("cs", cr0)
        if self._efer() & EFER_LMA and cs.l:
            return 64
        return 32 if cs.db else 16

    def describe_access(self, gpa: int) -> tuple[bytes, int | None]:
        pc = self._linear_pc()
        length = self.engine.instruction_length(self.pc())
        code = self.engine.read_virtual(pc, length or self.max_instruction) or b""
        bits = self._bits()
        try:
            insn = x86_emulate.decode(code, bits=bits)
        except x86_emulate.NotEmulated:
            return code, None
        if not length:
            code = code[: insn.length]
        bases = {
            "fs": self._read(self.c.UC_X86_REG_FS_BASE),
            "gs": self._read(self.c.UC_X86_REG_GS_BASE),
        }
        if bits != 64:
            bases.update({name: self._segment(name, self._read(self.c.UC_X86_REG_CR0)).base for name in SEG_INDEX})
        gva = x86_emulate.effective_address(insn, self.get_regs(), bases)
        # Trust the decoded address only where the MMU agrees with the exit.
        translated = _uc.vmem_translate(self.uc, gva, self.u.UC_PROT_READ)
        if translated is not None and translated != gpa:
            return code, None
        return code, gva

    def complete(self, last: VcpuExit) -> bool:
        if self._complete_isa(last):
            return True
        if last is self._string_io:
            batch, self._batch = self._batch, None
            if batch is not None:
                self._complete_batch(self._string_io, batch)
            return True
        pending = self._pending
        if last is self._io and pending is not None and not pending.is_write:
            pending.value = int.from_bytes(last.data[: pending.size], "little")
            pending.ready = True
        return last is self._io

    def instruction_in_flight(self) -> bool:
        return self._pending is not None

    def forget_pending(self) -> None:
        # An injected exception is not an access: it stays for the next run.
        self._pending = None
        self._current = None
        self._planned = None
        self._batch = None
        self._awaiting = None

    # --- hidden state in unicorn's saved context -----------------------------------
    def _need_layout(self, what: str) -> None:
        if not self._layout.ok:
            raise ConfigError(f"softcpu: {what} needs unicorn's hidden CPU state, which this unicorn does not expose")

    def _blob(self) -> tuple[Any, bytearray]:
        ctx = self.uc.context_save()
        return ctx, bytearray(bytes(ctx))

    def _commit(self, ctx: Any, blob: bytearray) -> None:
        ctypes.memmove(ctx.context, bytes(blob), len(blob))
        self.uc.context_restore(ctx)
        self.engine.flush_code()
        self._code_base = None

    def _hflags(self) -> int:
        if not self._layout.ok:
            return 0
        return self._hflags_of(bytes(self.uc.context_save()))

    def _hflags_of(self, blob: bytes | bytearray) -> int:
        return int.from_bytes(blob[self._layout.hflags : self._layout.hflags + 4], "little")

    def _seg_cache(self, blob: bytes | bytearray, name: str) -> tuple[int, int, int, int]:
        """(selector, base, limit, flags) of a segment register's hidden cache."""
        offset = self._layout.segs + SEG_INDEX[name] * SEG_SIZE
        selector, base, limit, flags = struct.unpack_from("<I4xQII", blob, offset)
        return selector & 0xFFFF, base, limit, flags

    def _put_seg_cache(self, blob: bytearray, name: str, cache: tuple[int, int, int, int]) -> None:
        """Write (selector, base, limit, flags) as a segment register's hidden cache."""
        struct.pack_into("<I4xQII", blob, self._layout.segs + SEG_INDEX[name] * SEG_SIZE, *cache)

    def _linear_pc(self) -> int:
        """CS base + RIP (the base is 0 in 64-bit code, and in the flat segments
        most protected-mode guests use)."""
        rip = self.pc()
        if not self._layout.ok:
            return rip
        # Reading the cache costs a context save (~6 us), and every HLT exit
        # asks: it is kept per CS selector.  A guest changes CS's base only by
        # loading CS (a new selector, or an event the software CPU delivers and
        # commits) -- except by reloading the same selector after rewriting its
        # descriptor, which this would miss.
        selector = self._read(self.c.UC_X86_REG_CS) & 0xFFFF
        code = self._code_base
        if code is None or code[0] != selector:
            blob = bytes(self.uc.context_save())
            code = (selector, -1 if self._hflags_of(blob) & HF_CS64 else self._seg_cache(blob, "cs")[1])
            self._code_base = code
        return rip if code[1] < 0 else (code[1] + rip) & 0xFFFFFFFF

    def write_virtual(self, address: int, data: bytes) -> bool:
        for i, byte in enumerate(data):  # a frame is a few bytes: page crossings handled per byte
            gpa = _uc.vmem_translate(self.uc, address + i, self.u.UC_PROT_WRITE)
            if gpa is None:
                return False
            try:
                self.uc.mem_write(gpa, bytes((byte,)))
            except self.u.UcError:
                return False
        return True

    # --- events: external interrupts, NMIs, the interrupt window ---------------------
    def _interruptible(self) -> bool:
        """IF set and no interrupt shadow (STI, MOV SS) at the current instruction."""
        if not self._read(self.c.UC_X86_REG_RFLAGS) & RFLAGS_IF:
            return False
        return not self._hflags() & HF_INHIBIT_IRQ

    def ready_for_interrupt(self) -> bool:
        return self._ran and self._irq is None and self._interruptible()

    def inject_interrupt(self, vector: int) -> None:
        if not 0 <= vector <= 255:
            raise ConfigError(f"softcpu: interrupt vector {vector} is not 0-255")
        self._irq = vector

    def inject_nmi(self) -> None:
        self._nmi_pending = True

    def request_interrupt_window(self, requested: bool) -> None:
        self._window = bool(requested)

    @property
    def nmi_masked(self) -> bool:
        return self._nmi_masked

    def _watching(self) -> bool:
        """An event waits for the guest to become interruptible."""
        return (
            self._window
            or self._irq is not None
            or (self._nmi_pending and not self._nmi_masked)
            or self._exception is not None
        )

    def before_run(self) -> VcpuExit | None:
        self._ran = True
        if self._isa_exit is not None:  # completing the last exit raised one (#GP without a gate)
            raised, self._isa_exit = self._isa_exit, None
            return raised
        exit_: VcpuExit | None
        if self._pending is not None:
            return None  # the port instruction completes first (slice_budget: one instruction)
        # An injected exception goes first: it needs no window (VM entry
        # delivers it before anything else), then NMIs, then interrupts.
        exit_ = self._deliver_exception()
        if exit_ is not None:
            return exit_
        if self._nmi_pending and not self._nmi_masked:
            self._nmi_pending = False
            exit_ = self._deliver(_NMI, nmi=True)
            if exit_ is not None:
                return exit_
            self._nmi_masked = True
            if self._iret_hook is None:
                self._iret_hook = self.uc.hook_add(self.u.UC_HOOK_CODE, self._on_code_nmi)
                self.engine.flush_code()
        if self._irq is not None and self._interruptible():
            vector, self._irq = self._irq, None
            exit_ = self._deliver(vector)
            if exit_ is not None:
                return exit_
            return None
        if self._window and self._irq is None and self._interruptible():
            return self._window_exit
        return None

    def slice_budget(self, count: int) -> int:
        if self._watching() and (self._pending is not None or not self._interruptible()):
            return 1  # step until the guest can take it (sti, the shadow, a port access to finish)
        return count

    def after_quiet_slice(self, start_pc: int) -> VcpuExit | None:
        if self._window and self._irq is None and self._interruptible():
            return self._window_exit
        return None

    def _on_code_nmi(self, uc: Any, address: int, size: int, _data: Any) -> None:
        # NMIs stay blocked until the handler's IRET (CF, with an operand-size
        # or REX.W prefix).
        if not self._nmi_masked:
            return
        code = bytes(uc.mem_read(address, min(size, 3))) if size else b""
        if code[-1:] == b"\xcf" and all(b in (0x48, 0x66) for b in code[:-1]):
            self._nmi_masked = False

    def before_slice(self) -> None:
        # An access recorded by a slice that then faulted never became an exit.
        self._current = None
        self._cpuid_before = None
        if self._iret_hook is not None and not self._nmi_masked:
            self.uc.hook_del(self._iret_hook)
            self._iret_hook = None

    def _deliver(self, vector: int, *, nmi: bool = False, error_code: int | None = None) -> VcpuExit | None:
        """Enter the guest's handler for ``vector`` as the CPU does: through the
        real-mode vector table, or an interrupt/trap gate of the IDT (32-bit
        protected or long mode, same privilege level).  None when delivered,
        else the exit (a shutdown without a usable gate)."""
        c = self.c
        cr0 = self._read(c.UC_X86_REG_CR0)
        rflags = self._read(c.UC_X86_REG_RFLAGS)
        rip = self.pc()
        rsp = self._read(c.UC_X86_REG_RSP)
        _, idt_base, idt_limit, _ = self.uc.reg_read(c.UC_X86_REG_IDTR)
        if not cr0 & CR0_PE:
            self._need_layout("real-mode interrupt delivery")
            raw = self.engine.read_virtual(idt_base + 4 * vector, 4) if 4 * vector + 3 <= idt_limit else None
            if raw is None:
                return ShutdownExit(ShutdownReason.TRIPLE_FAULT, raw_error_code=vector)
            ip, cs = struct.unpack("<HH", raw)
            ctx, blob = self._blob()
            old_cs = self._seg_cache(blob, "cs")
            ss_base = self._seg_cache(blob, "ss")[1]
            sp = (rsp - 6) & 0xFFFF
            frame = struct.pack("<HHH", rip & 0xFFFF, old_cs[0], rflags & 0xFFFF)
            if not self.write_virtual(ss_base + sp, frame):
                return ShutdownExit(ShutdownReason.TRIPLE_FAULT, raw_error_code=vector)
            self._put_seg_cache(blob, "cs", (cs, cs << 4, old_cs[2], old_cs[3]))
            self._commit(ctx, blob)
            self.regs.write(c.UC_X86_REG_RSP, (rsp & ~0xFFFF) | sp)
            self.regs.write(c.UC_X86_REG_RFLAGS, rflags & ~(RFLAGS_IF | RFLAGS_TF | RFLAGS_AC | RFLAGS_RF))
            self.regs.write(self.rip_id, ip)
            return None
        long_mode = bool(self._efer() & EFER_LMA)
        entry = 16 if long_mode else 8
        in_idt = vector * entry + entry - 1 <= idt_limit
        raw = self.engine.read_virtual(idt_base + vector * entry, entry) if in_idt else None
        if raw is None or not raw[5] & 0x80 or raw[5] & 0xF not in (0xE, 0xF):
            return ShutdownExit(ShutdownReason.TRIPLE_FAULT, raw_error_code=vector)
        low, selector, ist, kind, mid = struct.unpack_from("<HHBBH", raw)
        offset = low | mid << 16
        if long_mode:
            offset |= struct.unpack_from("<I", raw, 8)[0] << 32
        gate = _Gate(vector, selector, offset, ist & 7 if long_mode else 0, trap=kind & 0xF == 0xF)
        return self._deliver_through_gate(gate, long_mode, error_code)

    def _deliver_through_gate(self, gate: _Gate, long_mode: bool, error_code: int | None) -> VcpuExit | None:
        """Protected/long-mode delivery: the gate's code segment (a privilege
        change when its DPL is below CPL), the stack (the TSS's for the new
        privilege level, or the IST's), the frame, then CS/SS and the mode
        flags.  What the architecture would fault on is an internal error
        naming it, not a guess."""
        c = self.c
        rflags = self._read(c.UC_X86_REG_RFLAGS)
        rip = self.pc()
        rsp = self._read(c.UC_X86_REG_RSP)
        cs = self._read(c.UC_X86_REG_CS) & 0xFFFF
        ss = self._read(c.UC_X86_REG_SS) & 0xFFFF
        cpl = self._hflags() & HF_CPL if self._layout.ok else cs & 3
        if gate.selector & ~3 == cs & ~3 and not gate.ist and cpl == 0:
            code: Segment | None = None  # the common case: same segment, same stack
            new_cpl = 0
        else:
            target = self._code_segment(gate, long_mode)
            if isinstance(target, str):
                return self._delivery_gap(gate, target)
            code = target
            new_cpl = cpl if code.type & 4 else code.dpl  # conforming code keeps CPL
            if new_cpl > cpl:
                return self._delivery_gap(gate, f"its code segment's DPL {code.dpl} is above CPL {cpl} (#GP)")
        if (code is not None or gate.ist) and not self._layout.ok:
            return self._delivery_gap(gate, "a segment or stack switch needs unicorn's hidden CPU state")
        frame_words = [rflags, cs, rip] + ([error_code] if error_code is not None else [])
        new_ss: Segment | None = None
        if long_mode:
            if gate.ist:
                stack = self._tss_word(0x24 + 8 * (gate.ist - 1), 8)
            elif new_cpl < cpl:
                stack = self._tss_word(4 + 8 * new_cpl, 8)
            else:
                stack = rsp
            if stack is None:
                return self._delivery_gap(gate, "the TSS holding its stack cannot be read")
            if new_cpl < cpl:  # 64-bit mode loads a null SS with the new privilege level
                new_ss = Segment(selector=new_cpl, base=0, limit=0, type=0, present=0, dpl=new_cpl, s=0, unusable=1)
            words = [ss, rsp, *frame_words]
            new_rsp = (stack & ~0xF) - 8 * len(words)
            frame = b"".join(struct.pack("<Q", w & ((1 << 64) - 1)) for w in reversed(words))
            linear = new_rsp
        else:
            ss_seg = self._segment("ss", self._read(c.UC_X86_REG_CR0))
            if new_cpl < cpl:
                switched = self._inner_stack(new_cpl)
                if isinstance(switched, str):
                    return self._delivery_gap(gate, switched)
                new_ss, stack = switched
                words = [ss, rsp, *frame_words]
                base, big = new_ss.base, new_ss.db
            else:
                words = frame_words
                stack, base, big = rsp, ss_seg.base, ss_seg.db
            mask = 0xFFFFFFFF if big else 0xFFFF
            sp = (stack - 4 * len(words)) & mask
            new_rsp = (stack & ~mask) | sp
            frame = b"".join(struct.pack("<I", w & 0xFFFFFFFF) for w in reversed(words))
            linear = (base + sp) & 0xFFFFFFFF
        if not self.write_virtual(linear, frame):
            return ShutdownExit(ShutdownReason.TRIPLE_FAULT, raw_error_code=gate.vector)
        if code is not None:
            code.selector = (gate.selector & ~3) | new_cpl
            self._load_hidden({"cs": code} if new_ss is None else {"cs": code, "ss": new_ss})
        self.regs.write(c.UC_X86_REG_RSP, new_rsp)
        cleared = RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM
        if not gate.trap:  # an interrupt gate; a trap gate leaves IF
            cleared |= RFLAGS_IF
        self.regs.write(c.UC_X86_REG_RFLAGS, rflags & ~cleared)
        self.regs.write(self.rip_id, gate.offset)
        return None

    def _delivery_gap(self, gate: _Gate, why: str) -> InternalErrorExit:
        pc = self._linear_pc()
        return self.engine.internal_error(
            f"vector {gate.vector} at {pc:#x} through selector {gate.selector:#x}"
            f"{f', IST {gate.ist}' if gate.ist else ''}: {why}; the software CPU does not model this",
            pc,
            (gate.vector,),
        )

    def _code_segment(self, gate: _Gate, long_mode: bool) -> Segment | str:
        """The descriptor a gate's selector names, or why it cannot be entered."""
        raw = self._table_entry(gate.selector) if gate.selector & ~3 else None
        if raw is None:
            return "its code segment is outside the GDT/LDT (#GP)"
        code = decode_descriptor(raw, gate.selector)
        if not code.s or not code.type & 8:
            return "its selector does not name a code segment (#GP)"
        if not code.present:
            return "its code segment is not present (#NP)"
        if long_mode and not code.l:
            return "its code segment is not 64-bit code (#GP)"
        return code

    def _tss_word(self, offset: int, size: int) -> int | None:
        _, base, limit, _ = self.uc.reg_read(self.c.UC_X86_REG_TR)
        if offset + size - 1 > limit:
            return None
        raw = self.engine.read_virtual(base + offset, size)
        return None if raw is None else int.from_bytes(raw, "little")

    def _inner_stack(self, cpl: int) -> tuple[Segment, int] | str:
        """32-bit protected mode: SS and ESP for privilege level ``cpl`` from the
        32-bit TSS, with SS's descriptor checked as the CPU checks it."""
        _, _, _, flags = self.uc.reg_read(self.c.UC_X86_REG_TR)
        if (flags >> 8) & 0xF not in (0x9, 0xB):
            return "a privilege change needs a 32-bit TSS (a 16-bit TSS is not modelled)"
        esp = self._tss_word(4 + 8 * cpl, 4)
        selector = self._tss_word(8 + 8 * cpl, 2)
        if esp is None or selector is None:
            return "the TSS holding its stack cannot be read (#TS)"
        raw = self._table_entry(selector) if selector & ~3 else None
        if raw is None:
            return f"the TSS's SS {selector:#x} is outside the GDT/LDT (#TS)"
        ss = decode_descriptor(raw, selector)
        if not ss.s or ss.type & 0xA != 0x2 or ss.dpl != cpl or selector & 3 != cpl:
            return f"the TSS's SS {selector:#x} is not a writable data segment at privilege {cpl} (#TS)"
        if not ss.present:
            return f"the TSS's SS {selector:#x} is not present (#SS)"
        return ss, esp

    def _load_hidden(self, segments: dict[str, Segment]) -> None:
        """Load segment registers as the CPU does on an event: their caches and
        the mode flags that follow from them (CPL, code and stack size)."""
        sregs = self.get_sregs()
        for name, seg in segments.items():
            setattr(sregs, name, seg)
        ctx, blob = self._blob()
        offset = self._layout.hflags
        hflags = self._mode_hflags(sregs, int.from_bytes(blob[offset : offset + 4], "little"))
        blob[offset : offset + 4] = hflags.to_bytes(4, "little")
        for name, seg in segments.items():
            self._put_seg_cache(blob, name, cache_of(seg))
            self._shadow[name] = dataclasses.replace(seg)
        self._commit(ctx, blob)

    def get_events(self) -> tuple[int | None, bool, bool, bool]:
        """(injected vector not yet taken, NMI pending, NMI blocked, interrupt shadow)."""
        return self._irq, self._nmi_pending, self._nmi_masked, bool(self._hflags() & HF_INHIBIT_IRQ)

    def set_nmi(self, *, pending: bool | None = None, masked: bool | None = None) -> None:
        if pending is not None:
            self._nmi_pending = pending
        if masked is not None:
            self._nmi_masked = masked
            if masked and self._iret_hook is None:
                self._iret_hook = self.uc.hook_add(self.u.UC_HOOK_CODE, self._on_code_nmi)
                self.engine.flush_code()

    def get_vcpu_events(self) -> VcpuEvents:
        """The pending-event state as KVM reports it (``KVM_GET_VCPU_EVENTS``
        without the exception-payload capability: an injected exception reads
        as injected, pending unknown)."""
        exception = ExceptionEvent()
        if self._exception is not None:
            vector, error_code, cr2 = self._exception.vector, self._exception.error_code, self._exception.cr2
            exception = ExceptionEvent(
                injected=True,
                vector=vector,
                has_error_code=error_code is not None,
                error_code=error_code or 0,
                payload=cr2,
            )
        return VcpuEvents(
            exception=exception,
            interrupt=InterruptEvent(
                injected=self._irq is not None, vector=self._irq or 0, soft=False, shadow=self._shadow_kind()
            ),
            nmi=NmiEvent(injected=False, pending=self._nmi_pending, masked=self._nmi_masked),
            smi=SmiEvent(smm=False),
        )

    def _shadow_kind(self) -> InterruptShadow:
        """QEMU keeps one "inhibit interrupts" flag for both shadows; the byte
        before RIP tells STI (0xFB) from MOV SS/POP SS."""
        if not self._hflags() & HF_INHIBIT_IRQ:
            return InterruptShadow.NONE
        before = self.engine.read_virtual(self._linear_pc() - 1, 1)
        return InterruptShadow.STI if before == b"\xfb" else InterruptShadow.MOV_SS

    def set_vcpu_events(self, events: VcpuEvents) -> None:
        """Replace the pending-event state; fields that are None keep theirs.
        What the software CPU has no state for (SMM, SIPI, a pending triple
        fault, a software interrupt being delivered) is refused, not dropped."""
        unmodelled = [
            name
            for name, wanted in (
                ("smi.smm", events.smi.smm),
                ("smi.pending", events.smi.pending),
                ("smi.inside_nmi", events.smi.inside_nmi),
                ("smi.latched_init", events.smi.latched_init),
                ("sipi_vector", events.sipi_vector is not None),
                ("triple_fault_pending", events.triple_fault_pending),
                ("interrupt.soft", events.interrupt.injected and events.interrupt.soft),
            )
            if wanted
        ]
        if unmodelled:
            raise ConfigError(f"softcpu: no state for {', '.join(unmodelled)} (no SMM, SIPI or soft-interrupt events)")
        if events.interrupt.shadow is not None:
            self._need_layout("the interrupt shadow")
        exception = events.exception
        if exception.injected or exception.pending:
            self.inject_exception(
                exception.vector,
                exception.error_code if exception.has_error_code else None,
                exception.payload if exception.vector == _PF else None,
            )
        else:
            self._exception = None
        interrupt = events.interrupt
        self._irq = interrupt.vector if interrupt.injected else None
        if interrupt.shadow is not None:
            self._set_shadow(interrupt.shadow is not InterruptShadow.NONE)
        nmi = events.nmi
        self.set_nmi(pending=True if nmi.injected else nmi.pending, masked=nmi.masked)

    def _set_shadow(self, on: bool) -> None:
        self._need_layout("the interrupt shadow")
        ctx, blob = self._blob()
        offset = self._layout.hflags
        hflags = int.from_bytes(blob[offset : offset + 4], "little")
        hflags = hflags | HF_INHIBIT_IRQ if on else hflags & ~HF_INHIBIT_IRQ
        blob[offset : offset + 4] = hflags.to_bytes(4, "little")
        self._commit(ctx, blob)

    # --- CPUID, RDMSR, WRMSR as exits ---------------------------------------------------
    def _isa_stop(self, exit_: VcpuExit) -> None:
        self._isa_exit = exit_
        self.engine.stop_slice(Stop.ISA)

    def _on_cpuid(self, uc: Any, _data: Any) -> int:
        if "cpuid" not in self.intercept:
            return 0  # unicorn's own CPU model answers
        exit_ = self._cpuid
        exit_.function = self._read(self.c.UC_X86_REG_RAX) & 0xFFFFFFFF
        exit_.index = self._read(self.c.UC_X86_REG_RCX) & 0xFFFFFFFF
        exit_.eax = exit_.ebx = exit_.ecx = exit_.edx = 0
        self._isa_stop(exit_)
        if self.intercepts_before:
            # The exit carries the CPU model's own answer (WHPX's DefaultResult*),
            # which only executing the instruction computes: it runs, and
            # isa_exit() takes the answer and puts the registers and RIP back.
            ids = self._cpuid_ids()
            self._cpuid_before = tuple(self._read(reg) for reg in ids)
            return 0
        return 1  # skipped: the VMM's answer goes in on the next run

    def _cpuid_ids(self) -> tuple[int, ...]:
        c = self.c
        return (c.UC_X86_REG_RIP, c.UC_X86_REG_RAX, c.UC_X86_REG_RBX, c.UC_X86_REG_RCX, c.UC_X86_REG_RDX)

    def _on_rdtsc(self, *, rdtscp: bool) -> bool:
        exit_ = self._rdtsc
        exit_.rdtscp = rdtscp
        exit_.tsc = 0
        exit_.aux = int(self.uc.reg_read(self.c.UC_X86_REG_MSR, _MSR_TSC_AUX)) & 0xFFFFFFFF if rdtscp else 0
        self._isa_stop(exit_)
        return True  # skipped: the VMM's answer goes in on the next run

    def _on_code_msr(self, uc: Any, address: int, size: int, _data: Any) -> None:
        if size != 2:
            return
        code = self.engine.read_virtual(address, 2)
        if code not in (b"\x0f\x32", b"\x0f\x30"):
            return
        c = self.c
        index = self._read(c.UC_X86_REG_RCX) & 0xFFFFFFFF
        if index in _CPU_MSRS:
            return
        exit_ = self._msr
        exit_.index = index
        exit_.is_write = code == b"\x0f\x30"
        high, low = self._read(c.UC_X86_REG_RDX) & 0xFFFFFFFF, self._read(c.UC_X86_REG_RAX) & 0xFFFFFFFF
        exit_.value = high << 32 | low if exit_.is_write else 0
        exit_.error = False
        # A PC written in a hook restarts there.  After: skip the instruction,
        # the access is complete, as the VMM answers it, on the next run.
        # Before: restart on it, so the stop lands before it executes.
        self.regs.write(self.rip_id, self.pc() + (0 if self.intercepts_before else 2))
        self._isa_stop(exit_)

    def isa_exit(self) -> VcpuExit | None:
        exit_, self._isa_exit = self._isa_exit, None
        before, self._cpuid_before = self._cpuid_before, None
        if before is not None and exit_ is self._cpuid:
            ids = self._cpuid_ids()
            exit_.eax, exit_.ebx, exit_.ecx, exit_.edx = (self._read(reg) & 0xFFFFFFFF for reg in ids[1:])
            for reg, value in zip(ids, before, strict=True):
                self.regs.write(reg, value)
        self._awaiting = exit_
        return exit_

    def _complete_isa(self, last: VcpuExit) -> bool:
        if last is not self._awaiting:
            return False
        self._awaiting = None
        c = self.c
        if self.intercepts_before and last in (self._cpuid, self._msr):
            return True  # the VMM wrote the registers and moved RIP itself
        if last is self._cpuid:
            for reg, value in (
                (c.UC_X86_REG_RAX, last.eax),
                (c.UC_X86_REG_RBX, last.ebx),
                (c.UC_X86_REG_RCX, last.ecx),
                (c.UC_X86_REG_RDX, last.edx),
            ):
                self.regs.write(reg, value & 0xFFFFFFFF)
        elif last is self._rdtsc:
            self.regs.write(c.UC_X86_REG_RAX, last.tsc & 0xFFFFFFFF)
            self.regs.write(c.UC_X86_REG_RDX, (last.tsc >> 32) & 0xFFFFFFFF)
            if last.rdtscp:
                self.regs.write(c.UC_X86_REG_RCX, last.aux & 0xFFFFFFFF)
        elif last is self._msr and last.error:
            exit_ = self._deliver(13, error_code=0)  # #GP(0) for an MSR the VMM refused
            if exit_ is not None:
                self._isa_exit = exit_
        elif last is self._msr and not last.is_write:
            self.regs.write(c.UC_X86_REG_RAX, last.value & 0xFFFFFFFF)
            self.regs.write(c.UC_X86_REG_RDX, (last.value >> 32) & 0xFFFFFFFF)
        return True

    # --- exceptions ---------------------------------------------------------------------
    def interrupt_exit(self, intno: int) -> VcpuExit | None:
        self._end_exception()
        return self.exception_exit(intno, self.pc())

    def invalid_instruction_exit(self, pc: int) -> VcpuExit | None:
        return self.exception_exit(_UD, pc)

    def exception_exit(self, vector: int, pc: int) -> VcpuExit | None:
        """unicorn raises x86 exceptions to its caller instead of delivering them
        through the guest's IDT: deliver them as the CPU would -- a fault
        returns to the instruction (RIP is still on it), INT n and INT3 after
        it -- with the error code QEMU recorded for the exceptions that push
        one.  Without a present gate the CPU would escalate to a triple fault,
        so that is a shutdown."""
        _, base, limit, _ = self.uc.reg_read(self.c.UC_X86_REG_IDTR)
        if not self._read(self.c.UC_X86_REG_CR0) & CR0_PE:
            return self._deliver(vector)
        entry = 16 if self._efer() & EFER_LMA else 8
        gate = self.engine.read_virtual(base + vector * entry, 8) if limit >= vector * entry + entry - 1 else None
        if gate is None or not gate[5] & 0x80:
            return ShutdownExit(ShutdownReason.TRIPLE_FAULT, raw_error_code=vector)
        if vector not in _ERROR_CODE_VECTORS:
            return self._deliver(vector)
        fields = exception_fields()
        if fields is None:
            name = _VECTOR_NAMES.get(vector, f"vector {vector}")
            return InternalErrorExit(
                INTERNAL_ERROR_EMULATION,
                self.engine.read_virtual(pc, self.max_instruction) or b"",
                (vector,),
                f"{name} at {pc:#x}: the guest has a handler, but this unicorn does not show the error code "
                "this exception pushes, so the software CPU does not deliver it",
            )
        error_code, soft = self._raised
        if soft:
            return self._deliver(vector)  # INT n: no error code, whatever the vector
        return self._deliver(vector, error_code=error_code)

    def at_interrupt(self, intno: int) -> None:
        # The error code is gone once emu_start returns, so it is read here.
        fields = exception_fields()
        if fields is not None:
            error_code, soft = struct.unpack_from("<II", bytes(self.uc.context_save()), fields.error_code)
            self._raised = (error_code, bool(soft))

    def _end_exception(self) -> None:
        """QEMU's own delivery would end the exception "in flight"; unicorn's
        hook skips that delivery, so it is ended here -- else the next
        contributory fault would be escalated to a double fault."""
        fields = exception_fields()
        if fields is None:
            return
        ctx, blob = self._blob()
        blob[fields.in_flight : fields.in_flight + 4] = (0xFFFFFFFF).to_bytes(4, "little")
        ctypes.memmove(ctx.context, bytes(blob), len(blob))
        self.uc.context_restore(ctx)  # no translation depends on it: nothing to flush

    # --- exceptions from the VMM --------------------------------------------------------
    def inject_exception(self, vector: int, error_code: int | None, cr2: int | None) -> None:
        if not 0 <= vector <= 31 or vector == _NMI:
            raise ConfigError(f"softcpu: exception vector {vector} is not 0-31 (an NMI is inject_nmi)")
        if error_code is not None and not 0 <= error_code <= 0xFFFFFFFF:
            raise ConfigError(f"softcpu: error code {error_code:#x} is not 32-bit")
        if cr2 is not None and (vector != _PF or not 0 <= cr2 < 1 << 64):
            raise ConfigError("softcpu: a CR2 payload is for a #PF (vector 14) only, and 64-bit")
        self._exception = _Exception(vector, error_code, cr2)

    def _deliver_exception(self) -> VcpuExit | None:
        pending, self._exception = self._exception, None
        if pending is None:
            return None
        if pending.cr2 is not None:
            self.regs.write(self.c.UC_X86_REG_CR2, pending.cr2)
        # Real mode pushes no error code (the vector table has no room for one).
        protected = bool(self._read(self.c.UC_X86_REG_CR0) & CR0_PE)
        return self._deliver(pending.vector, error_code=pending.error_code if protected else None)

    # --- registers -------------------------------------------------------------------------
    def get_regs(self) -> Regs:
        return Regs(*[self.regs.read(reg) for reg in self.gpr_ids])

    def set_regs(self, regs: Regs) -> None:
        if regs.rip != self.pc():
            self.engine.forget_pending()
        for reg, value in zip(self.gpr_ids, dataclasses.astuple(regs), strict=True):
            self.regs.write(reg, value)

    def _efer(self) -> int:
        return int(self.uc.reg_read(self.c.UC_X86_REG_MSR, MSR_EFER))

    def _table_entry(self, selector: int) -> int | None:
        if selector & 4:
            _, base, limit, _ = self.uc.reg_read(self.c.UC_X86_REG_LDTR)
        else:
            _, base, limit, _ = self.uc.reg_read(self.c.UC_X86_REG_GDTR)
        offset = selector & ~7
        if offset + 7 > limit:
            return None
        raw = self.engine.read_virtual(base + offset, 8)
        return None if raw is None else int.from_bytes(raw, "little")

    def _segment(self, name: str, cr0: int, blob: bytes | None = None) -> Segment:
        selector = self._read(self._segment_ids[name]) & 0xFFFF
        shadow = self._shadow.get(name)
        if self._layout.ok:
            # The hidden cache itself: what the CPU holds, however it was loaded.
            cache = self._seg_cache(bytes(self.uc.context_save()) if blob is None else blob, name)
            if shadow is not None and cache_of(shadow) == cache:
                return dataclasses.replace(shadow)  # as set, with what QEMU does not keep (unusable)
            return segment_from_cache(*cache)
        if shadow is not None and shadow.selector == selector:
            seg = dataclasses.replace(shadow)
        elif not cr0 & CR0_PE:
            seg = Segment(base=selector << 4, limit=0xFFFF, selector=selector, type=0xB if name == "cs" else 0x3)
        elif selector & ~3 == 0:
            seg = Segment(base=0, limit=0, selector=selector, type=0, present=0, s=0, unusable=1)
        else:
            raw = self._table_entry(selector)
            seg = decode_descriptor(raw, selector) if raw is not None else Segment(selector=selector, unusable=1)
        if name == "fs":
            seg.base = self._read(self.c.UC_X86_REG_FS_BASE)
        elif name == "gs":
            seg.base = self._read(self.c.UC_X86_REG_GS_BASE)
        return seg

    def get_sregs(self) -> Sregs:
        c = self.c
        cr0 = self._read(c.UC_X86_REG_CR0)
        tr = self.uc.reg_read(c.UC_X86_REG_TR)
        ldt = self.uc.reg_read(c.UC_X86_REG_LDTR)
        gdt = self.uc.reg_read(c.UC_X86_REG_GDTR)
        idt = self.uc.reg_read(c.UC_X86_REG_IDTR)
        blob = bytes(self.uc.context_save()) if self._layout.ok else None
        return Sregs(
            cs=self._segment("cs", cr0, blob),
            ds=self._segment("ds", cr0, blob),
            es=self._segment("es", cr0, blob),
            fs=self._segment("fs", cr0, blob),
            gs=self._segment("gs", cr0, blob),
            ss=self._segment("ss", cr0, blob),
            tr=segment_from_cache(*tr),
            ldt=segment_from_cache(*ldt),
            gdt=DescriptorTable(base=int(gdt[1]), limit=int(gdt[2])),
            idt=DescriptorTable(base=int(idt[1]), limit=int(idt[2])),
            cr0=cr0,
            cr2=self._read(c.UC_X86_REG_CR2),
            cr3=self._read(c.UC_X86_REG_CR3),
            cr4=self._read(c.UC_X86_REG_CR4),
            cr8=self._read(c.UC_X86_REG_CR8),
            efer=self._efer(),
            apic_base=self._apic_base,
        )

    def _check_modelled(self, s: Sregs) -> bool:
        """Refuse states the CPU cannot be put in; True for long mode."""
        if not s.cr0 & CR0_PE:
            self._need_layout("real mode")
            if s.cr0 & CR0_PG or s.efer & EFER_LMA:
                raise ConfigError("softcpu: real mode with CR0.PG or EFER.LMA set is not a CPU state")
            return False
        long_mode = bool(s.efer & EFER_LME) and bool(s.cr0 & CR0_PG)
        if long_mode and not s.cr4 & CR4_PAE:
            raise ConfigError("softcpu: long mode needs CR4.PAE")
        if self._layout.ok:
            return long_mode  # every segment's hidden state is written as given
        # Without the hidden state only selectors can be set, over the flat
        # 32-bit (or 64-bit) caches of unicorn's fresh CPU.
        code64 = long_mode and bool(s.cs.l)
        if not code64 and not s.cs.db:
            raise ConfigError("softcpu: 16-bit protected-mode code segments are not modelled (set cs.db=1)")
        if not code64:
            for name in ("cs", "ds", "es", "ss"):
                if getattr(s, name).base:
                    raise ConfigError(f"softcpu: {name}.base must be 0 outside 64-bit mode (only flat segments)")
        return long_mode

    def _mode_hflags(self, s: Sregs, hflags: int) -> int:
        """QEMU's mode flags for the state ``s`` (its control registers already
        written): what decides how code is decoded and how the stack is
        addressed.  The rules are the architecture's: CPL is SS.DPL, 64-bit code
        needs LMA and CS.L, operand and stack size follow CS.D and SS.B, and
        segment bases are added unless every base that matters is 0."""
        hflags &= ~(HF_CPL | HF_CS32 | HF_SS32 | HF_ADDSEG | HF_PE | HF_LMA | HF_CS64 | HF_INHIBIT_IRQ)
        protected = bool(s.cr0 & CR0_PE)
        long_mode = bool(self._efer() & EFER_LMA)
        if protected:
            hflags |= HF_PE | (s.ss.dpl & HF_CPL)
        if long_mode:
            hflags |= HF_LMA
        if long_mode and s.cs.l:
            return hflags | HF_CS32 | HF_SS32 | HF_CS64
        if s.cs.db:
            hflags |= HF_CS32
        if s.ss.db:
            hflags |= HF_SS32
        vm86 = bool(self._read(self.c.UC_X86_REG_RFLAGS) & RFLAGS_VM)
        if not protected or vm86 or not s.cs.db or s.ds.base or s.es.base or s.ss.base:
            hflags |= HF_ADDSEG
        return hflags

    def set_sregs(self, s: Sregs) -> None:
        """Move the CPU into the state ``s``: control registers written from
        unicorn's fresh state, then -- where the engine's saved context can be
        edited -- every segment's hidden descriptor cache and QEMU's mode flags
        as ``s`` gives them.  The register interface alone sets only selectors
        (unicorn's x86_64 engine does not load a descriptor behind CS, DS, ES or
        SS), which left the caches of the fresh CPU -- a 16-bit stack segment
        among them -- under a protected-mode guest."""
        long_mode = self._check_modelled(s)
        c = self.c
        regs = self.get_regs()
        kept_msrs = [(msr, int(self.uc.reg_read(c.UC_X86_REG_MSR, msr))) for msr in _KEPT_MSRS]
        fpu, debug = self.get_fpu(), self.get_debug_regs()  # not part of the mode: kept as they are
        self.uc.context_restore(self._fresh)
        # From the fresh state (LMA set, 64-bit code): entering and leaving
        # paging is the only register-level way to clear LMA, which real,
        # protected and compatibility mode need.
        if not (long_mode and s.cs.l):
            self.uc.reg_write(c.UC_X86_REG_CR4, CR4_PAE)
            self.uc.reg_write(c.UC_X86_REG_CR0, CR0_PE | CR0_PG)
            self.uc.reg_write(c.UC_X86_REG_CR0, CR0_PE)
        self.uc.reg_write(c.UC_X86_REG_CR3, s.cr3)
        self.uc.reg_write(c.UC_X86_REG_CR4, s.cr4)
        self.uc.reg_write(c.UC_X86_REG_MSR, (MSR_EFER, s.efer & ~EFER_LMA))
        self.uc.reg_write(c.UC_X86_REG_CR0, s.cr0)  # enters long mode when PG and LME are set
        self.uc.reg_write(c.UC_X86_REG_CR2, s.cr2)
        self.uc.reg_write(c.UC_X86_REG_CR8, s.cr8)
        self.uc.reg_write(c.UC_X86_REG_GDTR, (0, s.gdt.base, s.gdt.limit, 0))
        self.uc.reg_write(c.UC_X86_REG_IDTR, (0, s.idt.base, s.idt.limit, 0))
        if not self._layout.ok:
            for name in ("cs", "ds", "es", "ss"):
                self.uc.reg_write(self._segment_ids[name], getattr(s, name).selector)
            for name, base_id in (("fs", c.UC_X86_REG_FS_BASE), ("gs", c.UC_X86_REG_GS_BASE)):
                seg: Segment = getattr(s, name)
                # Without a loadable descriptor behind the selector the base is what counts.
                with contextlib.suppress(self.u.UcError):
                    self.uc.reg_write(self._segment_ids[name], seg.selector)
                self.uc.reg_write(base_id, seg.base)
        self.uc.reg_write(c.UC_X86_REG_TR, (s.tr.selector, s.tr.base, s.tr.limit, cache_flags(s.tr)))
        self.uc.reg_write(c.UC_X86_REG_LDTR, (s.ldt.selector, s.ldt.base, s.ldt.limit, cache_flags(s.ldt)))
        for msr, value in kept_msrs:
            self.uc.reg_write(c.UC_X86_REG_MSR, (msr, value))
        self.set_fpu(fpu)
        self.set_debug_regs(debug)
        for reg, value in zip(self.gpr_ids, dataclasses.astuple(regs), strict=True):
            self.regs.write(reg, value)
        if self._layout.ok:
            ctx, blob = self._blob()
            offset = self._layout.hflags
            hflags = self._mode_hflags(s, int.from_bytes(blob[offset : offset + 4], "little"))
            blob[offset : offset + 4] = hflags.to_bytes(4, "little")
            for name in SEG_INDEX:
                self._put_seg_cache(blob, name, cache_of(getattr(s, name)))
            self._commit(ctx, blob)
        if bool(self._efer() & EFER_LMA) != long_mode:
            raise ConfigError(f"softcpu: the CPU did not reach the requested mode (EFER {self._efer():#x})")
        self._shadow = {name: dataclasses.replace(getattr(s, name)) for name in self._segment_ids}
        self._apic_base = s.apic_base
        self.uc.ctl_flush_tb()

    # --- FPU/SSE and debug registers (a snapshot's and a reset's sets) ---------------
    # Fpu holds the x87 registers as FXSAVE does, in stack order (ST0 first, 16
    # bytes each: the 64-bit significand, then sign and exponent) with the
    # abridged tag byte (a bit set: the physical register is in use); unicorn
    # indexes FP0-FP7 physically and reports the full 2-bit tag word, empty
    # being 3 (it writes only the empty/in-use distinction back).
    def _x87_top(self) -> int:
        return (int(self.uc.reg_read(self.c.UC_X86_REG_FPSW)) >> 11) & 7

    def get_fpu(self) -> Fpu:
        c = self.c
        top = self._x87_top()
        fpr = []
        for stack in range(8):
            significand, exponent = self.uc.reg_read(c.UC_X86_REG_FP0 + (top + stack) % 8)
            fpr.append(struct.pack("<QH6x", significand, exponent & 0xFFFF))
        tags = self.uc.reg_read(c.UC_X86_REG_FPTAG)
        in_use = sum(1 << phys for phys in range(8) if (tags >> (2 * phys)) & 3 != 3)
        return Fpu(
            fpr=fpr,
            fcw=self.uc.reg_read(c.UC_X86_REG_FPCW),
            fsw=self.uc.reg_read(c.UC_X86_REG_FPSW),
            ftwx=in_use,
            last_opcode=self.uc.reg_read(c.UC_X86_REG_FOP),
            last_ip=self.uc.reg_read(c.UC_X86_REG_FIP),
            last_dp=self.uc.reg_read(c.UC_X86_REG_FDP),
            xmm=[self.uc.reg_read(c.UC_X86_REG_XMM0 + n).to_bytes(16, "little") for n in range(16)],
            mxcsr=self.uc.reg_read(c.UC_X86_REG_MXCSR),
        )

    def set_fpu(self, fpu: Fpu) -> None:
        fpu.check()
        c = self.c
        self.uc.reg_write(c.UC_X86_REG_FPCW, fpu.fcw)
        self.uc.reg_write(c.UC_X86_REG_FPSW, fpu.fsw)  # TOP first: it maps ST(i) to FP0-FP7
        top = self._x87_top()
        for stack, raw in enumerate(fpu.fpr):
            significand, exponent = struct.unpack_from("<QH", raw)
            self.uc.reg_write(c.UC_X86_REG_FP0 + (top + stack) % 8, (significand, exponent))
        empty = sum(3 << (2 * phys) for phys in range(8) if not (fpu.ftwx >> phys) & 1)
        self.uc.reg_write(c.UC_X86_REG_FPTAG, empty)
        self.uc.reg_write(c.UC_X86_REG_FOP, fpu.last_opcode)
        self.uc.reg_write(c.UC_X86_REG_FIP, fpu.last_ip)
        self.uc.reg_write(c.UC_X86_REG_FDP, fpu.last_dp)
        for n, raw in enumerate(fpu.xmm):
            self.uc.reg_write(c.UC_X86_REG_XMM0 + n, int.from_bytes(raw, "little"))
        self.uc.reg_write(c.UC_X86_REG_MXCSR, fpu.mxcsr)

    def get_debug_regs(self) -> DebugRegs:
        c = self.c
        db = tuple(self.uc.reg_read(c.UC_X86_REG_DR0 + n) for n in range(4))
        return DebugRegs(db, self.uc.reg_read(c.UC_X86_REG_DR6), self.uc.reg_read(c.UC_X86_REG_DR7))

    def set_debug_regs(self, debug: DebugRegs) -> None:
        """Kept for the guest to read back; the software CPU takes no hardware
        breakpoints from them (``set_guest_debug`` is the VMM's way)."""
        debug.check()
        for n, address in enumerate(debug.db):
            self.uc.reg_write(self.c.UC_X86_REG_DR0 + n, address)
        self.uc.reg_write(self.c.UC_X86_REG_DR6, debug.dr6)
        self.uc.reg_write(self.c.UC_X86_REG_DR7, debug.dr7)

    def init(self, boot: X86VcpuInit) -> None:
        self.set_sregs(boot.sregs)
        self.set_regs(boot.regs)
        for entry in boot.msrs:
            self.uc.reg_write(self.c.UC_X86_REG_MSR, (entry.index, entry.data))
        if boot.fpu is not None:
            self.set_fpu(boot.fpu)
