"""The x86_64 half of the software CPU: port I/O, exceptions, HLT, and the
register sets (:class:`~pyvmm.arch.x86_64.Regs` / :class:`~pyvmm.arch.x86_64.Sregs`).

unicorn runs x86 guests in a ``UC_MODE_64`` engine whose register interface can
set a segment *selector* but not the hidden descriptor cache behind it (only FS
and GS load a descriptor), and whose fresh state is a pseudo long mode (LMA and
64-bit code, no paging).  :meth:`X86Isa.set_sregs` therefore starts from that
fresh state and moves the CPU into the requested mode with control-register
writes, which is what makes 64-bit, compatibility and flat 32-bit protected
mode reachable -- and real mode, 16-bit code and non-flat segments not.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyvmm.arch.x86_64 import (
    CR0_PE,
    CR0_PG,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    GPR_NAMES,
    DescriptorTable,
    Regs,
    Segment,
    Sregs,
)
from pyvmm.boot import X86VcpuInit
from pyvmm.errors import ConfigError
from pyvmm.exits import InternalErrorExit, IoExit, ShutdownExit, ShutdownReason, VcpuExit
from pyvmm.softcpu._isa import Isa
from pyvmm.softcpu.engine import INTERNAL_ERROR_EMULATION, _Stop

if TYPE_CHECKING:
    from pyvmm.softcpu.engine import SoftCpu

MSR_EFER = 0xC0000080
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
_DB = 1


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


def _decode_descriptor(raw: int, selector: int) -> Segment:
    """A segment register's hidden state as loading this GDT/LDT entry sets it."""
    limit = (raw & 0xFFFF) | ((raw >> 48) & 0xF) << 16
    base = ((raw >> 16) & 0xFFFFFF) | ((raw >> 56) & 0xFF) << 24
    access = (raw >> 40) & 0xFF
    flags = (raw >> 52) & 0xF
    granular = flags >> 3 & 1
    if granular:
        limit = (limit << 12) | 0xFFF
    return Segment(
        base=base,
        limit=limit,
        selector=selector,
        type=access & 0xF,
        present=access >> 7 & 1,
        dpl=access >> 5 & 3,
        db=flags >> 2 & 1,
        s=access >> 4 & 1,
        l=flags >> 1 & 1,
        g=granular,
        avl=flags & 1,
        unusable=0,
    )


def _segment_from_cache(selector: int, base: int, limit: int, flags: int) -> Segment:
    """Decode the attribute word unicorn uses for TR/LDTR (the descriptor's high
    dword: type at bit 8, S 12, DPL 13, P 15, AVL 20, L 21, D/B 22, G 23)."""
    return Segment(
        base=base,
        limit=limit,
        selector=selector,
        type=flags >> 8 & 0xF,
        present=flags >> 15 & 1,
        dpl=flags >> 13 & 3,
        db=flags >> 22 & 1,
        s=flags >> 12 & 1,
        l=flags >> 21 & 1,
        g=flags >> 23 & 1,
        avl=flags >> 20 & 1,
        unusable=0 if flags >> 15 & 1 else 1,
    )


def _cache_flags(seg: Segment) -> int:
    return (
        (seg.type & 0xF) << 8
        | (seg.s & 1) << 12
        | (seg.dpl & 3) << 13
        | (seg.present & 1) << 15
        | (seg.avl & 1) << 20
        | (seg.l & 1) << 21
        | (seg.db & 1) << 22
        | (seg.g & 1) << 23
    )


class X86Isa(Isa):
    debug_exception = _DB
    max_instruction = 15

    def __init__(self, cpu: SoftCpu) -> None:
        super().__init__(cpu)
        c = self.u.x86_const
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
        self._apic_base = Sregs().apic_base
        # The fresh state set_sregs starts every mode change from.
        self._fresh: Any = self.uc.context_save()

    def install(self) -> None:
        self.uc.hook_add(self.u.UC_HOOK_INSN, self._on_in, None, 1, 0, self.c.UC_X86_INS_IN)
        self.uc.hook_add(self.u.UC_HOOK_INSN, self._on_out, None, 1, 0, self.c.UC_X86_INS_OUT)

    # --- run-loop interface -------------------------------------------------------
    def pc(self) -> int:
        return self.regs.read(self.rip_id)

    def _read(self, reg: int) -> int:
        return self.regs.read(reg)

    def before_slice(self) -> None:
        # An access recorded by a slice that then faulted never became an exit.
        self._current = None

    def halted(self, step_start: int | None) -> bool:
        rip = self.pc()
        if step_start is not None:
            return rip == step_start + 1 and self.cpu.read_virtual(step_start, 1) == b"\xf4"
        # HLT is the only way a slice ends with no hook having fired: unicorn
        # stops after it, with RIP past the one-byte instruction.
        return self.cpu.read_virtual(rip - 1, 1) == b"\xf4"

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
        self.cpu._stop = _Stop.PORT
        uc.emu_stop()

    def port_exit(self) -> VcpuExit:
        access, self._current = self._current, None
        if access is None:
            raise AssertionError("port exit without a recorded access")
        c = self.c
        ids = (c.UC_X86_REG_RIP, c.UC_X86_REG_RAX, c.UC_X86_REG_RCX, c.UC_X86_REG_RSI, c.UC_X86_REG_RDI)
        for reg, value in zip(ids, access.before, strict=True):
            self.regs.write(reg, value)
        access.ready = access.is_write
        self._pending = access
        exit_ = self.cpu._io
        exit_.port = access.port
        exit_.size = access.size
        exit_.count = 1
        exit_.is_write = access.is_write
        data = self.cpu._views[access.size]
        data[:] = access.value.to_bytes(access.size, "little") if access.is_write else bytes(access.size)
        exit_.data = data
        return exit_

    def complete(self, last: VcpuExit) -> None:
        pending = self._pending
        if isinstance(last, IoExit) and pending is not None and not pending.is_write:
            pending.value = int.from_bytes(last.data[: pending.size], "little")
            pending.ready = True

    def forget_pending(self) -> None:
        self._pending = None
        self._current = None

    # --- exceptions ---------------------------------------------------------------------
    def interrupt_exit(self, intno: int) -> VcpuExit | None:
        return self.exception_exit(intno, self.pc())

    def invalid_instruction_exit(self, pc: int) -> VcpuExit:
        return self.exception_exit(_UD, pc)

    def exception_exit(self, vector: int, pc: int) -> VcpuExit:
        """unicorn raises x86 exceptions to its caller instead of delivering them
        through the guest's IDT.  Without a present gate for the vector the CPU
        would escalate to a triple fault, so that is a shutdown; with one, the
        guest expected its handler to run, which the software CPU cannot do."""
        _, base, limit, _ = self.uc.reg_read(self.c.UC_X86_REG_IDTR)
        entry = 16 if self._efer() & EFER_LMA else 8
        gate = self.cpu.read_virtual(base + vector * entry, 8) if limit >= vector * entry + entry - 1 else None
        name = _VECTOR_NAMES.get(vector, f"vector {vector}")
        if gate is None or not gate[5] & 0x80:
            return ShutdownExit(ShutdownReason.TRIPLE_FAULT, raw_error_code=vector)
        return InternalErrorExit(
            INTERNAL_ERROR_EMULATION,
            self.cpu.read_virtual(pc, self.max_instruction) or b"",
            (vector,),
            f"{name} at {pc:#x}: the guest has a handler, but the software CPU does not deliver exceptions",
        )

    # --- registers -------------------------------------------------------------------------
    def get_regs(self) -> Regs:
        return Regs(*[self.regs.read(reg) for reg in self.gpr_ids])

    def set_regs(self, regs: Regs) -> None:
        if regs.rip != self.pc():
            self.cpu._forget_pending()
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
        raw = self.cpu.read_virtual(base + offset, 8)
        return None if raw is None else int.from_bytes(raw, "little")

    def _segment(self, name: str, cr0: int) -> Segment:
        selector = self._read(self._segment_ids[name]) & 0xFFFF
        shadow = self._shadow.get(name)
        if shadow is not None and shadow.selector == selector:
            seg = dataclasses.replace(shadow)
        elif not cr0 & CR0_PE:
            seg = Segment(base=selector << 4, limit=0xFFFF, selector=selector, type=0xB if name == "cs" else 0x3)
        elif selector & ~3 == 0:
            seg = Segment(base=0, limit=0, selector=selector, type=0, present=0, s=0, unusable=1)
        else:
            raw = self._table_entry(selector)
            seg = _decode_descriptor(raw, selector) if raw is not None else Segment(selector=selector, unusable=1)
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
        return Sregs(
            cs=self._segment("cs", cr0),
            ds=self._segment("ds", cr0),
            es=self._segment("es", cr0),
            fs=self._segment("fs", cr0),
            gs=self._segment("gs", cr0),
            ss=self._segment("ss", cr0),
            tr=_segment_from_cache(*tr),
            ldt=_segment_from_cache(*ldt),
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

    @staticmethod
    def _check_modelled(s: Sregs) -> tuple[bool, bool]:
        if not s.cr0 & CR0_PE:
            raise ConfigError(
                "softcpu: real mode is not modelled (unicorn's x86_64 engine cannot load a 16-bit code "
                "segment through its register interface); boot in protected or long mode"
            )
        long_mode = bool(s.efer & EFER_LME) and bool(s.cr0 & CR0_PG)
        if long_mode and not s.cr4 & CR4_PAE:
            raise ConfigError("softcpu: long mode needs CR4.PAE")
        code64 = long_mode and bool(s.cs.l)
        if not code64 and not s.cs.db:
            raise ConfigError("softcpu: 16-bit protected-mode code segments are not modelled (set cs.db=1)")
        if not code64:
            for name in ("cs", "ds", "es", "ss"):
                if getattr(s, name).base:
                    raise ConfigError(f"softcpu: {name}.base must be 0 outside 64-bit mode (only flat segments)")
        return long_mode, code64

    def set_sregs(self, s: Sregs) -> None:
        long_mode, code64 = self._check_modelled(s)
        c = self.c
        regs = self.get_regs()
        kept_msrs = [(msr, int(self.uc.reg_read(c.UC_X86_REG_MSR, msr))) for msr in _KEPT_MSRS]
        xmm = [(reg, self.uc.reg_read(reg)) for reg in range(c.UC_X86_REG_XMM0, c.UC_X86_REG_XMM0 + 16)]
        mxcsr = self._read(c.UC_X86_REG_MXCSR)
        # From the fresh state (LMA set, 64-bit code): entering and leaving paging
        # is the only register-level way to clear "64-bit code" and LMA, which
        # compatibility and protected mode need.
        self.uc.context_restore(self._fresh)
        if not code64:
            self.uc.reg_write(c.UC_X86_REG_CR4, CR4_PAE)
            self.uc.reg_write(c.UC_X86_REG_CR0, CR0_PE | CR0_PG)
            self.uc.reg_write(c.UC_X86_REG_CR0, CR0_PE)
        self.uc.reg_write(c.UC_X86_REG_GDTR, (0, s.gdt.base, s.gdt.limit, 0))
        self.uc.reg_write(c.UC_X86_REG_IDTR, (0, s.idt.base, s.idt.limit, 0))
        self.uc.reg_write(c.UC_X86_REG_CR3, s.cr3)
        self.uc.reg_write(c.UC_X86_REG_CR4, s.cr4)
        self.uc.reg_write(c.UC_X86_REG_MSR, (MSR_EFER, s.efer & ~EFER_LMA))
        self.uc.reg_write(c.UC_X86_REG_CR0, s.cr0)  # enters long mode when PG and LME are set
        self.uc.reg_write(c.UC_X86_REG_CR2, s.cr2)
        self.uc.reg_write(c.UC_X86_REG_CR8, s.cr8)
        for name in ("cs", "ds", "es", "ss"):
            self.uc.reg_write(self._segment_ids[name], getattr(s, name).selector)
        for name, base_id in (("fs", c.UC_X86_REG_FS_BASE), ("gs", c.UC_X86_REG_GS_BASE)):
            seg: Segment = getattr(s, name)
            # Without a loadable descriptor behind the selector the base is what counts.
            with contextlib.suppress(self.u.UcError):
                self.uc.reg_write(self._segment_ids[name], seg.selector)
            self.uc.reg_write(base_id, seg.base)
        self.uc.reg_write(c.UC_X86_REG_TR, (s.tr.selector, s.tr.base, s.tr.limit, _cache_flags(s.tr)))
        self.uc.reg_write(c.UC_X86_REG_LDTR, (s.ldt.selector, s.ldt.base, s.ldt.limit, _cache_flags(s.ldt)))
        for msr, value in kept_msrs:
            self.uc.reg_write(c.UC_X86_REG_MSR, (msr, value))
        for reg, value in xmm:
            self.uc.reg_write(reg, value)
        self.uc.reg_write(c.UC_X86_REG_MXCSR, mxcsr)
        for reg, value in zip(self.gpr_ids, dataclasses.astuple(regs), strict=True):
            self.regs.write(reg, value)
        if bool(self._efer() & EFER_LMA) != long_mode:
            raise ConfigError(f"softcpu: the CPU did not reach the requested mode (EFER {self._efer():#x})")
        self._shadow = {name: dataclasses.replace(getattr(s, name)) for name in self._segment_ids}
        self._apic_base = s.apic_base
        self.uc.ctl_flush_tb()

    def init(self, boot: X86VcpuInit) -> None:
        self.set_sregs(boot.sregs)
        self.set_regs(boot.regs)
        for entry in boot.msrs:
            self.uc.reg_write(self.c.UC_X86_REG_MSR, (entry.index, entry.data))
        if boot.fpu is not None:
            self.uc.reg_write(self.c.UC_X86_REG_MXCSR, boot.fpu.mxcsr)
            self.uc.reg_write(self.c.UC_X86_REG_FPCW, boot.fpu.fcw)
