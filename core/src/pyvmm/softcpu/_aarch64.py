"""The aarch64 half of the software CPU: HVC/SMC and PSCI, WFI, exceptions,
and the registers by KVM one-reg id (:mod:`pyvmm.arch.aarch64`).

One-reg ids mean what they mean to KVM: core offset 2*31 is ``user_pt_regs.sp``,
i.e. SP_EL0, and SP_EL1 sits after PSTATE (``struct kvm_regs``).  unicorn keeps
the *current* stack pointer apart from the banked copies, so each of the two is
read from whichever of the two places holds it in the current mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pyvmm.arch.aarch64 import ELR_EL1_ID, PC_ID, PSTATE_ID, SP_EL1_ID, SP_ID, CoreRegs, x_reg_id
from pyvmm.boot import Aarch64VcpuInit
from pyvmm.errors import ConfigError
from pyvmm.exits import HypercallExit, SystemEvent, SystemEventExit, VcpuExit
from pyvmm.softcpu._isa import Conduit, Engine, Hypercall, Isa

if TYPE_CHECKING:
    from pyvmm.softcpu.gic import GicCpu

WFI = 0xD503207F
#: SPSR_EL1 as unicorn's coprocessor-register interface names it (crn, crm, op0, op1, op2).
_SPSR_EL1 = (4, 0, 3, 0, 0)
_PSTATE_I = 1 << 7
_PSTATE_EL1H_DAIF = 0x3C5
#: Instructions a slice runs while the virtual timer is armed, between looks at it.
_TIMER_SLICE = 20_000
_HVC_MASK, _HVC, _SMC = 0xFFE0001F, 0xD4000002, 0xD4000003

# QEMU's aarch64 exception numbers, as unicorn hands them to its interrupt hook.
EXCP_UDEF = 1
EXCP_SWI = 2
EXCP_PREFETCH_ABORT = 3
EXCP_DATA_ABORT = 4
EXCP_BKPT = 7
EXCP_HVC = 11
EXCP_SMC = 13
_EXCEPTION_NAMES = {
    EXCP_UDEF: "undefined instruction",
    EXCP_SWI: "SVC",
    EXCP_PREFETCH_ABORT: "prefetch abort",
    EXCP_DATA_ABORT: "data abort",
    EXCP_BKPT: "breakpoint (BRK)",
}

# PSCI 1.0 function ids (SMC32 and SMC64 calling conventions).
PSCI_VERSION = 0x84000000
PSCI_SYSTEM_OFF = 0x84000008
PSCI_SYSTEM_RESET = 0x84000009
PSCI_FEATURES = 0x8400000A
PSCI_VERSION_1_0 = 0x00010000
PSCI_NOT_SUPPORTED = (1 << 64) - 1  # -1
_PSCI_ANSWERED = (PSCI_VERSION, PSCI_FEATURES, PSCI_SYSTEM_OFF, PSCI_SYSTEM_RESET)


def is_psci(function: int) -> bool:
    return (function & 0xBFFFFFE0) == 0x84000000


class Aarch64Isa(Isa):
    max_instruction = 4

    def __init__(self, engine: Engine, u: Any, uc: Any) -> None:
        super().__init__(engine, u, uc)
        self.hypercall_exit = HypercallExit()
        c = self.u.arm64_const
        self.c: Any = c
        x_ids = [getattr(c, f"UC_ARM64_REG_X{n}") for n in range(31)]
        self.x_ids: tuple[int, ...] = tuple(x_ids)
        self.pc_id: int = c.UC_ARM64_REG_PC
        self.pstate_id: int = c.UC_ARM64_REG_PSTATE
        self.sp_id: int = c.UC_ARM64_REG_SP
        self.pending_hypercall = False
        self.system_event = SystemEventExit()
        self.gic: GicCpu | None = None

    # --- the GIC's CPU interface and the virtual timer --------------------------------
    def attach_gic(self, cpu: GicCpu) -> None:
        from pyvmm.softcpu.gic import SYSTEM_REGISTERS

        if self.gic is not None:
            raise ConfigError("softcpu: this vCPU has a GIC already")
        self.gic = cpu
        self._sysregs = SYSTEM_REGISTERS
        u, c = self.u, self.c
        self.uc.hook_add(u.UC_HOOK_INSN, self._on_mrs, None, 1, 0, c.UC_ARM64_INS_MRS)
        self.uc.hook_add(u.UC_HOOK_INSN, self._on_msr, None, 1, 0, c.UC_ARM64_INS_MSR)
        self.engine.flush_code()

    @staticmethod
    def _encoding(cp: Any) -> tuple[int, int, int, int, int]:
        return (int(cp.op0), int(cp.op1), int(cp.crn), int(cp.crm), int(cp.op2))

    def _on_mrs(self, uc: Any, reg: int, cp: Any, _data: Any) -> bool:
        enc = self._encoding(cp)
        if self.gic is None or enc not in self._sysregs:
            return False
        self.regs.write(reg, self.gic.read_sysreg(enc))
        self.regs.write(self.pc_id, self.pc() + 4)  # skipped: the PC is the hook's to move
        return True

    def _on_msr(self, uc: Any, _reg: int, cp: Any, _data: Any) -> bool:
        enc = self._encoding(cp)
        if self.gic is None or enc not in self._sysregs:
            return False
        self.gic.write_sysreg(enc, int(cp.val))
        self.regs.write(self.pc_id, self.pc() + 4)
        return True

    def irq_signalled(self) -> bool:
        return self.gic is not None and self.gic.irq_signalled()

    def _take_irq(self) -> None:
        """Enter the guest's IRQ vector when the GIC signals one and PSTATE.I is clear."""
        if self.gic is None:
            return
        pstate = self.regs.read(self.pstate_id)
        if pstate & _PSTATE_I or not self.gic.irq_signalled():
            return
        el, spsel = (pstate >> 2) & 3, pstate & 1
        if el > 1:
            return
        offset = 0x480 if el == 0 else 0x280 if spsel else 0x080
        vbar = self.regs.read(self.c.UC_ARM64_REG_VBAR_EL1)
        self.uc.reg_write(self.c.UC_ARM64_REG_CP_REG, (*_SPSR_EL1, pstate))
        self.regs.write(self.c.UC_ARM64_REG_ELR_EL1, self.pc())
        self.regs.write(self.pstate_id, _PSTATE_EL1H_DAIF)
        self.regs.write(self.pc_id, vbar + offset)

    def before_run(self) -> VcpuExit | None:
        self._take_irq()
        return None

    def slice_budget(self, count: int) -> int:
        self.budget_limited = self.gic is not None and self.gic.timer_deadline() is not None
        return min(count, _TIMER_SLICE) if self.budget_limited else count

    def pc(self) -> int:
        return self.regs.read(self.pc_id)

    def _word(self, address: int) -> int | None:
        raw = self.engine.read_virtual(address, 4)
        return None if raw is None else int.from_bytes(raw, "little")

    def halted(self, step_start: int | None) -> bool:
        # WFI with nothing to wake it (the software CPU has no interrupt
        # controller) is the halt: unicorn stops after it, PC past it.  WFE is a
        # hint unicorn executes as a no-op.
        pc = self.pc()
        if step_start is not None:
            wfi = pc == step_start + 4 and self._word(step_start) == WFI
        else:
            wfi = self._word(pc - 4) == WFI
        # An interrupt the GIC signals wakes WFI at once (taken if PSTATE.I allows).
        return wfi and not self.irq_signalled()

    # --- registers --------------------------------------------------------------------
    def _el_and_spsel(self) -> tuple[int, int]:
        pstate = self.regs.read(self.pstate_id)
        return (pstate >> 2) & 3, pstate & 1

    def _sp_register(self, el: int) -> int:
        """The unicorn register holding SP_ELn now: the live SP when it is the one
        in use, the banked copy otherwise."""
        current_el, spsel = self._el_and_spsel()
        in_use = current_el if spsel else 0
        if el == in_use:
            return self.sp_id
        return int(self.c.UC_ARM64_REG_SP_EL0 if el == 0 else self.c.UC_ARM64_REG_SP_EL1)

    def _unicorn_id(self, reg_id: int) -> int:
        for n in range(31):
            if reg_id == x_reg_id(n):
                return self.x_ids[n]
        if reg_id == SP_ID:
            return self._sp_register(0)
        if reg_id == SP_EL1_ID:
            return self._sp_register(1)
        if reg_id == PC_ID:
            return self.pc_id
        if reg_id == PSTATE_ID:
            return self.pstate_id
        if reg_id == ELR_EL1_ID:
            return int(self.c.UC_ARM64_REG_ELR_EL1)
        raise ConfigError(f"softcpu: register id {reg_id:#x} is not modelled (core registers, SP_EL1, ELR_EL1)")

    def get_one_reg(self, reg_id: int) -> int:
        return self.regs.read(self._unicorn_id(reg_id))

    def set_one_reg(self, reg_id: int, value: int) -> None:
        if reg_id == PC_ID and value != self.pc():
            self.engine.forget_pending()
        self.regs.write(self._unicorn_id(reg_id), value)

    def get_core_regs(self) -> CoreRegs:
        values = [self.regs.read(reg) for reg in (*self.x_ids, self.sp_id, self.pc_id, self.pstate_id)]
        return CoreRegs(x=values[:31], sp=values[31], pc=values[32], pstate=values[33])

    def set_core_regs(self, regs: CoreRegs) -> None:
        if len(regs.x) != 31:
            raise ConfigError(f"softcpu: CoreRegs.x has {len(regs.x)} registers, not 31")
        if regs.pc != self.pc():
            self.engine.forget_pending()
        self.regs.write(self.pstate_id, regs.pstate)
        pairs = [*zip(self.x_ids, regs.x, strict=True), (self.sp_id, regs.sp), (self.pc_id, regs.pc)]
        for reg, value in pairs:
            self.regs.write(reg, value)

    def init(self, boot: Aarch64VcpuInit) -> None:
        # PSTATE first: it decides where SP_EL0 and SP_EL1 live.
        if PSTATE_ID in boot.regs:
            self.set_one_reg(PSTATE_ID, boot.regs[PSTATE_ID])
        for reg_id, value in boot.regs.items():
            if reg_id != PSTATE_ID:
                self.set_one_reg(reg_id, value)

    # --- exceptions and calls ------------------------------------------------------------
    def interrupt_exit(self, intno: int) -> VcpuExit | None:
        pc = self.pc()
        # unicorn reports an HVC as undefined when the CPU model has no EL2, and
        # leaves the PC on it; a real HVC/SMC exception leaves it after.
        address = pc if intno == EXCP_UDEF else pc - 4
        word = self._word(address) if intno in (EXCP_UDEF, EXCP_HVC, EXCP_SMC) else None
        if word is not None and word & _HVC_MASK in (_HVC, _SMC):
            conduit = Conduit.HVC if word & _HVC_MASK == _HVC else Conduit.SMC
            self.regs.write(self.pc_id, address + 4)
            return self._hypercall(conduit, (word >> 5) & 0xFFFF, address)
        # Calls leave the PC after the instruction (their preferred return address).
        at = pc - 4 if intno in (EXCP_SWI, EXCP_HVC, EXCP_SMC) else pc
        name = _EXCEPTION_NAMES.get(intno, f"exception {intno}")
        return self.engine.internal_error(
            f"{name} at {at:#x}: the software CPU does not deliver aarch64 exceptions to the guest's vectors",
            at,
            (intno,),
        )

    def _hypercall(self, conduit: Conduit, imm: int, pc: int) -> VcpuExit | None:
        regs = [self.regs.read(reg) for reg in self.x_ids[:8]]
        call = Hypercall(conduit, imm, regs[0], tuple(regs[1:8]), pc)
        answer = self.engine.hypercall(call)
        if isinstance(answer, VcpuExit):
            return answer
        if answer is True:
            return None
        function = call.function & 0xFFFFFFFF
        if is_psci(function):
            return self._psci(function, call)
        exit_ = self.hypercall_exit
        exit_.number = call.function
        exit_.args = call.args
        exit_.result = PSCI_NOT_SUPPORTED  # SMCCC's answer if the VMM does not set one
        self.pending_hypercall = True
        return exit_

    def _psci(self, function: int, call: Hypercall) -> VcpuExit | None:
        if function == PSCI_SYSTEM_OFF:
            return self._event(SystemEvent.SHUTDOWN)
        if function == PSCI_SYSTEM_RESET:
            return self._event(SystemEvent.RESET)
        if function == PSCI_VERSION:
            result = PSCI_VERSION_1_0
        elif function == PSCI_FEATURES:
            result = 0 if call.args[0] & 0xFFFFFFFF in _PSCI_ANSWERED else PSCI_NOT_SUPPORTED
        else:
            result = PSCI_NOT_SUPPORTED
        self.regs.write(self.x_ids[0], result)
        return None

    def _event(self, event: SystemEvent) -> SystemEventExit:
        self.system_event.event = event
        self.system_event.data = ()
        return self.system_event

    def complete(self, last: VcpuExit) -> bool:
        if last is self.hypercall_exit and self.pending_hypercall:
            self.pending_hypercall = False
            self.regs.write(self.x_ids[0], last.result)
        return last is self.hypercall_exit

    def forget_pending(self) -> None:
        self.pending_hypercall = False
