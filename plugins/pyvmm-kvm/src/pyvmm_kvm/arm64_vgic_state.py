"""The in-kernel GICv3's state for snapshots, through the vGIC device's attributes.

Sources: ``Documentation/virt/kvm/devices/arm-vgic-v3.rst`` (the attribute
groups and their ``attr`` layout), ``arch/arm64/kvm/vgic/vgic-kvm-device.c``
(``vgic_v3_attr_regs_access``: every group needs an initialised vGIC and takes
every vCPU's lock, so no vCPU may be running: EBUSY otherwise),
``vgic-mmio-v3.c`` (``vgic_v3_dist_registers``, ``vgic_v3_rd_registers``, and
the ``vgic_uaccess_*`` handlers userspace accesses take), ``vgic-mmio.c``
(``vgic_uaccess_write_spending``/``_cpending``, ``_sactive``/``_cactive``),
``vgic-sys-reg-v3.c`` (``vgic_v3_cpu_sysregs_uaccess`` and the ``ICC_*``
checks: ``set_gic_ctlr`` and ``set_gic_sre`` refuse values this host's GIC
cannot hold).  QEMU's ``hw/intc/arm_gicv3_kvm.c`` (``kvm_arm_gicv3_get/put``)
moves the same registers.

What is saved (:class:`pyvmm.gicv3_state.Gicv3State`):

* the distributor: ``GICD_CTLR`` and, for the SPIs only (the private lines'
  words of the distributor read as zero under affinity routing, which KVM's
  GICv3 always has), group, enable, pending, active, priority, configuration
  and ``GICD_IROUTER`` (as two 32-bit halves: the device group moves 32 bits);
* per vCPU, its redistributor's ``GICR_CTLR`` and SGI frame: group, enable,
  pending, active, priorities, configuration of SGIs and PPIs;
* per vCPU, its CPU interface's ``ICC_*_EL1`` registers, the active-priority
  registers only as many as its priority bits give it (:func:`absent_aprs`);
* the line level of every SPI and of each vCPU's private lines
  (``GRP_LEVEL_INFO``).

Not saved, because KVM keeps nothing behind them: ``GICR_WAKER`` (read as zero,
writes ignored), ``GICD_STATUSR``, ``GICD/GICR_IGRPMODR`` (KVM's GIC has one
security state).  ``GICR_PROPBASER``/``PENDBASER`` and the ITS: the boards
pyvmm builds have no ITS (``KVM_DEV_TYPE_ARM_VGIC_ITS`` is never created), so no
LPI exists to save.

The restore order (a fresh VM, vGIC initialised, no vCPU run yet): the
distributor, then each redistributor, then each CPU interface, then the line
levels.  Within a frame the configuration (group, ``ICFGR``, priority, routing)
comes before the state it qualifies, and each state register is written as its
clear half with all ones and then its set half with the saved bits, since a
fresh vGIC is not all-clear (``kvm_vgic_vcpu_init`` enables the SGIs).
Pending state and line level are separate for userspace, as arm-vgic-v3.rst
says: a userspace read of ``ISPENDR`` gives the pending latch alone, never the
level of a level-sensitive line (``__read_pending`` with ``is_user``), and a
write sets the latch (``vgic_uaccess_write_spending``); the level comes and
goes through ``GRP_LEVEL_INFO``.  So each is saved and set as it is, and a line
the guest latched pending while its level was also high keeps both.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from pyvmm.errors import ConfigError, VmStateError
from pyvmm.gicv3_state import Gicv3State
from pyvmm_kvm import arm64_uapi as a
from pyvmm_kvm.arm64_vgic import Vgic3

GICD_CTLR, GICD_TYPER = 0x0000, 0x0004
GICR_CTLR = 0x0000
#: The SGI frame follows a redistributor's RD_base frame.
SGI_FRAME = 0x10000
# The per-line register banks (the GIC architecture's offsets, the same in the
# distributor and in a redistributor's SGI frame).
IGROUPR, ISENABLER, ICENABLER = 0x0080, 0x0100, 0x0180
ISPENDR, ICPENDR, ISACTIVER, ICACTIVER = 0x0200, 0x0280, 0x0300, 0x0380
IPRIORITYR, ICFGR = 0x0400, 0x0C00
GICD_IROUTER = 0x6000
#: ``GRP_LEVEL_INFO``'s one kind of information, the line levels (arm-vgic-v3.rst;
#: ``VGIC_LEVEL_INFO_LINE_LEVEL`` in vgic.h, not in the uapi header).
LEVEL_INFO_LINE_LEVEL = 0
#: The set halves of the state registers, each with its clear half.
SET_AND_CLEAR = ((ISENABLER, ICENABLER), (ISPENDR, ICPENDR), (ISACTIVER, ICACTIVER))


def _icc(op1: int, crn: int, crm: int, op2: int) -> int:
    """A CPU interface register's ``GRP_CPU_SYSREGS`` attribute: its encoding
    laid out as in a one-reg id (op0 is 3 for all of them)."""
    return 3 << 14 | op1 << 11 | crn << 7 | crm << 3 | op2


ICC_SRE_EL1 = _icc(0, 12, 12, 5)
ICC_CTLR_EL1 = _icc(0, 12, 12, 4)
ICC_PMR_EL1 = _icc(0, 4, 6, 0)
ICC_BPR0_EL1 = _icc(0, 12, 8, 3)
ICC_BPR1_EL1 = _icc(0, 12, 12, 3)
ICC_AP0R_EL1 = tuple(_icc(0, 12, 8, 4 + n) for n in range(4))
ICC_AP1R_EL1 = tuple(_icc(0, 12, 9, n) for n in range(4))
ICC_IGRPEN0_EL1 = _icc(0, 12, 12, 6)
ICC_IGRPEN1_EL1 = _icc(0, 12, 12, 7)
#: In the order they are restored: SRE and CTLR first (CTLR's CBPR decides
#: what a BPR1 write does), the enables last, once the priorities are in place.
ICC_REGISTERS = (
    ICC_SRE_EL1,
    ICC_CTLR_EL1,
    ICC_PMR_EL1,
    ICC_BPR0_EL1,
    ICC_BPR1_EL1,
    *ICC_AP0R_EL1,
    *ICC_AP1R_EL1,
    ICC_IGRPEN0_EL1,
    ICC_IGRPEN1_EL1,
)


def absent_aprs(icc_ctlr: int) -> frozenset[int]:
    """The active-priority registers this CPU interface lacks.  With n priority
    bits (``ICC_CTLR_EL1.PRIbits`` + 1) a GIC has 2^(n-5) of each group's
    (ICC_AP0R<m>/AP1R<m>, m below that); KVM answers EINVAL for the others
    though ``KVM_HAS_DEVICE_ATTR`` finds them in its table (vgic-sys-reg-v3.c
    ``access_gic_aprn``: ``vgic_v3_max_apr_idx``)."""
    priority_bits = (icc_ctlr >> 8 & 7) + 1
    present = 1 << max(priority_bits - 5, 0)
    return frozenset(ICC_AP0R_EL1[present:] + ICC_AP1R_EL1[present:])


def mpidr_attr(mpidr: int) -> int:
    """The ``attr`` bits that name a vCPU: MPIDR_EL1's Aff3..Aff0 packed into
    bits 63..32 (``KVM_DEV_ARM_VGIC_V3_MPIDR_MASK``)."""
    affinity = (mpidr >> 32 & 0xFF) << 24 | (mpidr & 0xFF_FFFF)
    return affinity << a.KVM_DEV_ARM_VGIC_V3_MPIDR_SHIFT


def spi_count(vgic: Vgic3) -> int:
    """The SPIs this vGIC has: 32 per ``GICD_TYPER.ITLinesNumber`` step beyond the private lines."""
    typer = vgic.get_attr(a.KVM_DEV_ARM_VGIC_GRP_DIST_REGS, GICD_TYPER)
    return 32 * (typer & 0x1F)


def _distributor_layout(spis: int) -> tuple[list[int], list[int]]:
    """The distributor's configuration words and state words (set halves) for ``spis`` SPIs."""
    words = range(1, 1 + spis // 32)  # word 0 is the private lines'
    config = [IGROUPR + 4 * w for w in words]
    config += [IPRIORITYR + 4 * n for n in range(8, 8 + spis // 4)]
    config += [ICFGR + 4 * n for n in range(2, 2 + spis // 16)]
    for intid in range(32, 32 + spis):
        config += [GICD_IROUTER + 8 * intid, GICD_IROUTER + 8 * intid + 4]
    state = [bank + 4 * w for bank, _ in SET_AND_CLEAR for w in words]
    return config, state


#: A redistributor's configuration words and state words (set halves).
REDIST_CONFIG = [GICR_CTLR, SGI_FRAME + IGROUPR, SGI_FRAME + ICFGR, SGI_FRAME + ICFGR + 4] + [
    SGI_FRAME + IPRIORITYR + 4 * n for n in range(8)
]
REDIST_STATE = [SGI_FRAME + bank for bank, _ in SET_AND_CLEAR]


def save(vgic: Vgic3, mpidrs: Sequence[int]) -> Gicv3State:
    """The state of ``vgic``, whose vCPUs have ``mpidrs`` (in index order).

    :raises VmStateError: the vGIC is not initialised (nothing to save yet).
    """
    if not vgic.initialized:
        raise VmStateError("the vGIC's state exists once the VM has started (KVM_DEV_ARM_VGIC_CTRL_INIT)")
    spis = spi_count(vgic)
    config, state = _distributor_layout(spis)
    dist = a.KVM_DEV_ARM_VGIC_GRP_DIST_REGS
    distributor = {offset: vgic.get_attr(dist, offset) for offset in [GICD_CTLR, *config, *state]}
    redistributors, cpu_interfaces, private_levels = [], [], []
    for mpidr in mpidrs:
        who = mpidr_attr(mpidr)
        redist = a.KVM_DEV_ARM_VGIC_GRP_REDIST_REGS
        redistributors.append({offset: vgic.get_attr(redist, who | offset) for offset in REDIST_CONFIG + REDIST_STATE})
        sysregs = a.KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS
        ctlr = vgic.get_attr(sysregs, who | ICC_CTLR_EL1, 64)
        cpu_interfaces.append(
            {reg: vgic.get_attr(sysregs, who | reg, 64) for reg in ICC_REGISTERS if reg not in absent_aprs(ctlr)}
        )
        private_levels.append(_level(vgic, who, 0))
    first = mpidr_attr(mpidrs[0]) if mpidrs else 0
    spi_levels = [_level(vgic, first, intid) for intid in range(32, 32 + spis, 32)]
    return Gicv3State(spis, distributor, redistributors, cpu_interfaces, private_levels, spi_levels)


def restore(vgic: Vgic3, mpidrs: Sequence[int], image: Gicv3State) -> None:
    """Put ``image`` into ``vgic`` (initialised, its vCPUs created, none running).

    :raises ConfigError: the image is of another GIC: another vCPU count or SPI
        count (nothing written), or a register this vGIC lacks.
    """
    if not vgic.initialized:
        raise VmStateError("the vGIC's state can be set once the VM has started (KVM_DEV_ARM_VGIC_CTRL_INIT)")
    image.check()
    spis = spi_count(vgic)
    if image.vcpus != len(mpidrs) or image.spis != spis:
        raise ConfigError(
            f"the GICv3 image has {image.vcpus} redistributor(s) and {image.spis} SPIs; this vGIC has "
            f"{len(mpidrs)} and {spis}"
        )
    config, state = _distributor_layout(spis)
    _missing(image.distributor, [GICD_CTLR, *config, *state], "the distributor")
    for index, registers in enumerate(image.redistributors):
        _missing(registers, REDIST_CONFIG + REDIST_STATE, f"redistributor {index}")
    dist = a.KVM_DEV_ARM_VGIC_GRP_DIST_REGS
    put_dist = functools.partial(vgic.set_attr, dist)
    for offset in [GICD_CTLR, *config]:
        put_dist(offset, image.distributor[offset])
    _put_state(put_dist, image.distributor, state)
    for mpidr, registers in zip(mpidrs, image.redistributors, strict=True):
        put_redist = functools.partial(_put_redistributor, vgic, mpidr_attr(mpidr))
        for offset in REDIST_CONFIG:
            put_redist(offset, registers[offset])
        _put_state(put_redist, registers, REDIST_STATE)
    sysregs = a.KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS
    for mpidr, registers in zip(mpidrs, image.cpu_interfaces, strict=True):
        who = mpidr_attr(mpidr)
        for reg in ICC_REGISTERS:
            if reg in registers:
                vgic.set_attr(sysregs, who | reg, registers[reg], 64)
    for mpidr, level in zip(mpidrs, image.private_levels, strict=True):
        _set_level(vgic, mpidr_attr(mpidr), 0, level)
    first = mpidr_attr(mpidrs[0]) if mpidrs else 0
    for word, level in enumerate(image.spi_levels):
        _set_level(vgic, first, 32 + 32 * word, level)


def _put_redistributor(vgic: Vgic3, who: int, offset: int, value: int) -> None:
    vgic.set_attr(a.KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, who | offset, value)


def _missing(registers: dict[int, int], wanted: list[int], what: str) -> None:
    absent = [offset for offset in wanted if offset not in registers]
    if absent:
        raise ConfigError(f"the GICv3 image lacks {what}'s register(s) at {', '.join(hex(o) for o in absent[:4])}")


def _put_state(put: Callable[[int, int], None], registers: dict[int, int], state: list[int]) -> None:
    """Each state word: its clear half all ones, then its set half the saved bits."""
    clear_of = dict(SET_AND_CLEAR)
    for offset in state:
        bank = offset & 0xFFFF & ~0x7F
        put(offset - bank + clear_of[bank], 0xFFFF_FFFF)
        put(offset, registers[offset])


def _level_attr(who: int, intid: int) -> int:
    return who | LEVEL_INFO_LINE_LEVEL << a.KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT | intid


def _level(vgic: Vgic3, who: int, intid: int) -> int:
    """The levels of INTIDs ``intid``..+31 (private ones: of the vCPU ``who`` names)."""
    return vgic.get_attr(a.KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, _level_attr(who, intid))


def _set_level(vgic: Vgic3, who: int, intid: int, levels: int) -> None:
    vgic.set_attr(a.KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, _level_attr(who, intid), levels)
