"""A minimal GICv3 for aarch64 guests on the software CPU.

What a guest kernel's GICv3 driver and a VMM's doorbells need, and no more:

* a **distributor** (``GICD_*``, 64 KiB at ``distributor_base``): ``CTLR``,
  ``TYPER``, ``IIDR``, ``PIDR2``, the per-SPI enable / pending / active set and
  clear registers, ``IPRIORITYR``, ``IGROUPR`` (all group 1, read-as-one) and
  ``IROUTER`` (affinity 0 names the vCPU);
* one **redistributor** per vCPU (two 64 KiB frames each from
  ``redistributor_base``): ``CTLR``, ``TYPER`` (with ``Last``), ``WAKER``,
  ``PIDR2``, and in the SGI frame the SGI/PPI enable / pending / active
  registers and their priorities;
* the **CPU interface** through the system registers (``ICC_PMR_EL1``,
  ``ICC_IAR1_EL1``, ``ICC_EOIR1_EL1``, ``ICC_HPPIR1_EL1``, ``ICC_RPR_EL1``,
  ``ICC_IGRPEN1_EL1``, ``ICC_SRE_EL1``, ``ICC_CTLR_EL1``, ``ICC_BPR1_EL1``,
  ``ICC_DIR_EL1``): unicorn's CPU has no GIC CPU interface, so the software
  CPU hooks MRS/MSR to them (``UC_HOOK_INSN``) and answers from here;
* the **virtual timer**: ``CNTV_CTL_EL0``/``CNTV_CVAL_EL0``/``CNTV_TVAL_EL0``
  and ``CNTVCT_EL0``/``CNTFRQ_EL0`` are the model's (a counter at
  :data:`COUNTER_HZ` from the host's monotonic clock); its output is PPI 27,
  level-sensitive.

Priorities: an interrupt is signalled when it is enabled, pending, not active,
group 1 is enabled in the distributor and the CPU interface, and its priority
is below (numerically) both ``ICC_PMR_EL1`` and the running priority.  SPIs
are edge-triggered, the timer PPI level-triggered.  Not modelled: SGIs sent
by ``ICC_SGI1R_EL1``, group 0, binary-point preemption (every active interrupt
blocks equal and lower priorities), LPIs/ITS, security states, 1-of-N routing.
"""

from __future__ import annotations

import threading
import time

from pyvmm.errors import ConfigError

#: The virtual timer's PPI (the architecture's recommendation; what DT/ACPI say).
VTIMER_PPI = 27
#: The generic timer's frequency the model reports in CNTFRQ_EL0.
COUNTER_HZ = 62_500_000
SPURIOUS = 1023
GICD_SIZE = 0x10000
GICR_STRIDE = 0x20000

# System-register encodings (op0, op1, crn, crm, op2).
ICC_PMR = (3, 0, 4, 6, 0)
ICC_IAR1 = (3, 0, 12, 12, 0)
ICC_EOIR1 = (3, 0, 12, 12, 1)
ICC_HPPIR1 = (3, 0, 12, 12, 2)
ICC_BPR1 = (3, 0, 12, 12, 3)
ICC_CTLR = (3, 0, 12, 12, 4)
ICC_SRE = (3, 0, 12, 12, 5)
ICC_IGRPEN1 = (3, 0, 12, 12, 7)
ICC_DIR = (3, 0, 12, 11, 1)
ICC_RPR = (3, 0, 12, 11, 3)
CNTFRQ = (3, 3, 14, 0, 0)
CNTVCT = (3, 3, 14, 0, 2)
CNTV_TVAL = (3, 3, 14, 3, 0)
CNTV_CTL = (3, 3, 14, 3, 1)
CNTV_CVAL = (3, 3, 14, 3, 2)
#: Everything the CPU interface and timer answer.
SYSTEM_REGISTERS = frozenset(
    (ICC_PMR, ICC_IAR1, ICC_EOIR1, ICC_HPPIR1, ICC_BPR1, ICC_CTLR, ICC_SRE, ICC_IGRPEN1, ICC_DIR, ICC_RPR,
     CNTFRQ, CNTVCT, CNTV_TVAL, CNTV_CTL, CNTV_CVAL)
)  # fmt: skip
_MASK64 = (1 << 64) - 1


class _Irq:
    __slots__ = ("active", "enabled", "pending", "priority", "target")

    def __init__(self) -> None:
        self.enabled = False
        self.pending = False
        self.active = False
        self.priority = 0
        self.target = 0


class GicCpu:
    """One vCPU's redistributor, CPU interface and virtual timer."""

    def __init__(self, gic: Gic, index: int) -> None:
        self.gic = gic
        self.index = index
        self.private = [_Irq() for _ in range(32)]  # SGIs and PPIs
        self.pmr = 0
        self.igrpen1 = 0
        self.bpr1 = 0
        self.ctlr = 0
        self.waker = 0x6  # ProcessorSleep, ChildrenAsleep
        self.active_stack: list[int] = []
        self.timer_ctl = 0
        self.timer_cval = 0

    # --- timer --------------------------------------------------------------------
    def counter(self) -> int:
        return self.gic.counter()

    def _timer_firing(self) -> bool:
        return self.timer_ctl & 3 == 1 and self.counter() >= self.timer_cval

    def timer_deadline(self) -> float | None:
        """Seconds until the timer fires (0 if it does), None when it cannot."""
        if self.timer_ctl & 3 != 1:
            return None
        return max(0.0, (self.timer_cval - self.counter()) / COUNTER_HZ)

    def _irq(self, intid: int) -> _Irq:
        return self.private[intid] if intid < 32 else self.gic.spis[intid - 32]

    def _mine(self) -> list[tuple[int, _Irq]]:
        irqs = list(enumerate(self.private))
        irqs += [(32 + n, irq) for n, irq in enumerate(self.gic.spis) if irq.target == self.index]
        return irqs

    def _sync_levels(self) -> None:
        self.private[VTIMER_PPI].pending = self._timer_firing()

    def running_priority(self) -> int:
        if not self.active_stack:
            return 0x100  # idle
        return min(self._irq(i).priority for i in self.active_stack)

    def highest_pending(self) -> int:
        """The interrupt the CPU interface would signal now, or :data:`SPURIOUS`."""
        with self.gic.lock:
            self._sync_levels()
            if not (self.igrpen1 & 1 and self.gic.ctlr & 3):
                return SPURIOUS
            limit = min(self.pmr, self.running_priority())
            best, best_priority = SPURIOUS, 0x100
            for intid, irq in self._mine():
                deliverable = irq.enabled and irq.pending and not irq.active and irq.priority < limit
                if deliverable and irq.priority < best_priority:
                    best, best_priority = intid, irq.priority
            return best

    def irq_signalled(self) -> bool:
        """The IRQ line to the CPU (before PSTATE.I)."""
        return self.highest_pending() != SPURIOUS

    def acknowledge(self) -> int:
        intid = self.highest_pending()
        if intid == SPURIOUS:
            return intid
        with self.gic.lock:
            irq = self._irq(intid)
            irq.active = True
            if intid != VTIMER_PPI:
                irq.pending = False  # edge: taken; the timer stays pending while its level holds
            self.active_stack.append(intid)
        return intid

    def end_of_interrupt(self, intid: int) -> None:
        with self.gic.lock:
            if intid in self.active_stack:
                self.active_stack.remove(intid)
                self._irq(intid).active = False

    # --- system registers --------------------------------------------------------------
    def read_sysreg(self, enc: tuple[int, int, int, int, int]) -> int:
        if enc == ICC_IAR1:
            return self.acknowledge()
        if enc == ICC_HPPIR1:
            return self.highest_pending()
        if enc == ICC_PMR:
            return self.pmr
        if enc == ICC_RPR:
            return self.running_priority() & 0xFF
        if enc == ICC_IGRPEN1:
            return self.igrpen1
        if enc == ICC_SRE:
            return 0x7  # system-register interface only
        if enc == ICC_CTLR:
            return self.ctlr | (4 << 8)  # PRIbits: 5 bits of priority
        if enc == ICC_BPR1:
            return self.bpr1
        if enc == CNTFRQ:
            return COUNTER_HZ
        if enc == CNTVCT:
            return self.counter()
        if enc == CNTV_CTL:
            return self.timer_ctl & 3 | (4 if self.counter() >= self.timer_cval and self.timer_ctl & 1 else 0)
        if enc == CNTV_CVAL:
            return self.timer_cval
        if enc == CNTV_TVAL:
            return (self.timer_cval - self.counter()) & 0xFFFFFFFF
        return 0

    def write_sysreg(self, enc: tuple[int, int, int, int, int], value: int) -> None:
        if enc == ICC_PMR:
            self.pmr = value & 0xF8
        elif enc == ICC_EOIR1:
            self.end_of_interrupt(value & 0xFFFFFF)
        elif enc == ICC_IGRPEN1:
            self.igrpen1 = value & 1
        elif enc == ICC_CTLR:
            self.ctlr = value & 3
        elif enc == ICC_BPR1:
            self.bpr1 = value & 7
        elif enc == CNTV_CTL:
            self.timer_ctl = value & 3
        elif enc == CNTV_CVAL:
            self.timer_cval = value & _MASK64
        elif enc == CNTV_TVAL:
            tval = value & 0xFFFFFFFF
            tval -= (tval & 0x80000000) << 1  # signed 32-bit
            self.timer_cval = (self.counter() + tval) & _MASK64
        # ICC_SRE, ICC_DIR (EOImode 0): nothing to do.


class Gic:
    """A GICv3 for ``vcpus`` vCPUs and ``spis`` SPIs (INTIDs 32..32+spis-1)."""

    def __init__(
        self,
        vcpus: int = 1,
        *,
        spis: int = 64,
        distributor_base: int = 0x08000000,
        redistributor_base: int = 0x080A0000,
    ) -> None:
        if spis % 32 or not 0 < spis <= 988:
            raise ConfigError(f"gic: {spis} SPIs: a multiple of 32 up to 988")
        self.lock = threading.RLock()
        self.distributor_base = distributor_base
        self.redistributor_base = redistributor_base
        self.ctlr = 0
        self.spis = [_Irq() for _ in range(spis)]
        self.cpus = [GicCpu(self, n) for n in range(vcpus)]
        self._start = time.monotonic_ns()

    def counter(self) -> int:
        return (time.monotonic_ns() - self._start) * COUNTER_HZ // 1_000_000_000

    # --- lines from the VMM ------------------------------------------------------------
    def set_spi(self, intid: int, pending: bool = True) -> int:
        """Make SPI ``intid`` pending (an edge: a doorbell, an irqfd); returns the
        index of the vCPU it is routed to."""
        if not 32 <= intid < 32 + len(self.spis):
            raise ConfigError(f"gic: INTID {intid} is not an SPI of this GIC (32..{31 + len(self.spis)})")
        with self.lock:
            irq = self.spis[intid - 32]
            irq.pending = pending
            return irq.target

    def set_ppi(self, cpu: int, intid: int, pending: bool = True) -> None:
        if not 16 <= intid < 32:
            raise ConfigError(f"gic: INTID {intid} is not a PPI")
        with self.lock:
            self.cpus[cpu].private[intid].pending = pending

    # --- MMIO ------------------------------------------------------------------------------
    def contains(self, gpa: int) -> bool:
        return (
            self.distributor_base <= gpa < self.distributor_base + GICD_SIZE
            or self.redistributor_base <= gpa < self.redistributor_base + GICR_STRIDE * len(self.cpus)
        )

    def mmio_read(self, gpa: int, size: int) -> int:
        with self.lock:
            if self.distributor_base <= gpa < self.distributor_base + GICD_SIZE:
                return self._gicd_read(gpa - self.distributor_base, size)
            offset = gpa - self.redistributor_base
            return self._gicr_read(self.cpus[offset // GICR_STRIDE], offset % GICR_STRIDE, size)

    def mmio_write(self, gpa: int, size: int, value: int) -> None:
        with self.lock:
            if self.distributor_base <= gpa < self.distributor_base + GICD_SIZE:
                self._gicd_write(gpa - self.distributor_base, size, value)
            else:
                offset = gpa - self.redistributor_base
                self._gicr_write(self.cpus[offset // GICR_STRIDE], offset % GICR_STRIDE, size, value)

    @staticmethod
    def _bits_read(irqs: list[_Irq], first: int, attr: str) -> int:
        value = 0
        for bit in range(32):
            n = first + bit
            if 0 <= n < len(irqs) and getattr(irqs[n], attr):
                value |= 1 << bit
        return value

    @staticmethod
    def _bits_write(irqs: list[_Irq], first: int, attr: str, value: int, setting: bool) -> None:
        for bit in range(32):
            n = first + bit
            if value >> bit & 1 and 0 <= n < len(irqs):
                setattr(irqs[n], attr, setting)

    def _banked(self, irqs: list[_Irq], base: int, offset: int, size: int, value: int | None) -> int | None:
        """The enable/pending/active set/clear and priority registers, shared by
        the distributor (``base`` = first INTID of ``irqs``) and the SGI frame."""
        registers = {0x100: ("enabled", True), 0x180: ("enabled", False), 0x200: ("pending", True)}
        registers |= {0x280: ("pending", False), 0x300: ("active", True), 0x380: ("active", False)}
        block = offset & ~0x7F
        if block in registers and 0x100 <= offset < 0x400:
            first = (offset - block) * 8 - base
            attr, setting = registers[block]
            if value is None:
                return self._bits_read(irqs, first, attr)
            self._bits_write(irqs, first, attr, value, setting)
            return 0
        if 0x400 <= offset < 0x800:
            first = offset - 0x400 - base
            if value is None:
                return sum(irqs[first + i].priority << (8 * i) for i in range(size) if 0 <= first + i < len(irqs))
            for i in range(size):
                if 0 <= first + i < len(irqs):
                    irqs[first + i].priority = (value >> (8 * i)) & 0xF8
            return 0
        if 0x80 <= offset < 0x100:  # IGROUPR: group 1
            return 0xFFFFFFFF if value is None else 0
        return None

    def _gicd_read(self, offset: int, size: int) -> int:
        if offset == 0x0:
            return self.ctlr
        if offset == 0x4:  # TYPER: ITLinesNumber, IDbits 10
            return (len(self.spis) // 32) | (9 << 19)
        if offset == 0x8:
            return 0x43B  # IIDR: Arm
        if offset == 0xFFE8:
            return 0x3 << 4  # PIDR2.ArchRev: GICv3
        if 0x6100 <= offset < 0x6100 + 8 * len(self.spis):  # IROUTER<n>, n >= 32
            value = self.spis[(offset - 0x6100) // 8].target
            return value if offset % 8 == 0 else 0
        answer = self._banked(self.spis, 32, offset, size, None)
        return 0 if answer is None else answer

    def _gicd_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0x0:
            self.ctlr = value & 0x13  # EnableGrp1NS / EnableGrp1A, ARE
        elif 0x6100 <= offset < 0x6100 + 8 * len(self.spis):
            if offset % 8 == 0:
                target = value & 0xFF
                self.spis[(offset - 0x6100) // 8].target = target if target < len(self.cpus) else 0
        else:
            self._banked(self.spis, 32, offset, size, value)

    def _gicr_read(self, cpu: GicCpu, offset: int, size: int) -> int:
        if offset >= 0x10000:  # SGI frame
            answer = self._banked(cpu.private, 0, offset - 0x10000, size, None)
            return 0 if answer is None else answer
        if offset in (0x8, 0xC):  # TYPER: affinity, processor number, Last
            typer = cpu.index << 32 | cpu.index << 8 | (1 << 4 if cpu.index == len(self.cpus) - 1 else 0)
            return typer >> (32 if offset == 0xC else 0) & (_MASK64 if size == 8 else 0xFFFFFFFF)
        if offset == 0x14:
            return cpu.waker
        if offset == 0xFFE8:
            return 0x3 << 4
        return 0

    def _gicr_write(self, cpu: GicCpu, offset: int, size: int, value: int) -> None:
        if offset >= 0x10000:
            self._banked(cpu.private, 0, offset - 0x10000, size, value)
        elif offset == 0x14:
            asleep = value & 2
            cpu.waker = asleep | (4 if asleep else 0)


__all__ = ["COUNTER_HZ", "SPURIOUS", "SYSTEM_REGISTERS", "VTIMER_PPI", "Gic", "GicCpu"]
