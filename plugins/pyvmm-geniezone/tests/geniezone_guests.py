"""aarch64 guest programs for the GenieZone tests, with their assembly.

They exercise what the conformance suite does not: the vGIC a VMM creates with
``GZVM_CREATE_DEVICE`` (an irqfd's SPI and the virtual timer taken through the
guest's own vectors), ioeventfds, a hypercall the VMM answers, PSCI CPU_ON.
``test_geniezone_guest_sources.py`` reassembles every program where an aarch64
GNU assembler is installed and compares the bytes.

All programs report through :data:`REPORT` (no RAM there: MMIO exits) and end
with PSCI SYSTEM_OFF through ``hvc #0`` unless they are about something else.
The GIC is where pyvmm's aarch64 board puts it (the plugin's default):
distributor 0x0800_0000, vCPU 0's redistributor 0x080a_0000 (its SGI frame
0x080b_0000).
"""

from __future__ import annotations

from pyvmm.testing.conformance.programs_aarch64 import SYSTEM_OFF_SOURCE, Aarch64Program, aarch64_program

#: Where the programs report: 0x0a00_0000 (below RAM, no device).
REPORT = 0x0A00_0000
#: The irqfd's SPI index in :data:`IRQFD_AND_TIMER` (INTID 32 + 5).
IRQFD_SPI = 5
IRQFD_INTID = 32 + IRQFD_SPI
VTIMER_INTID = 27
#: The address IOEVENT writes to twice (0x2a, then 0x2b).
IOEVENT_ADDRESS = REPORT + 0x100
#: The SMCCC function id HYPERCALL makes (a vendor-specific hypervisor call).
HYPERCALL_FUNCTION = 0xC200_0001
#: The context id SMP hands the secondary vCPU.
CONTEXT_ID = 0x55

# The vector table is the program's start (VBAR_EL1 needs 2 KiB alignment, the
# code address has it).  The IRQ handler (current EL with SPx, +0x280) reads the
# INTID (ICC_IAR1_EL1), reports it at REPORT+0x10, turns the timer off when it was
# the timer (a level interrupt), ends it (ICC_EOIR1_EL1) and counts in x21.  The
# main part enables the distributor, SPI 37 and PPI 27, opens the priority mask
# and group 1, unmasks IRQs, reports "ready" at REPORT, sleeps in WFI until the
# irqfd's interrupt came, arms the virtual timer 50 us ahead and sleeps again
# until it fired, then powers off.
IRQFD_AND_TIMER = aarch64_program(
    "irqfd_and_timer",
    """
vectors:
    b start
    .org vectors + 0x280
    mrs x10, S3_0_C12_C12_0
    str w10, [x20, #0x10]
    cmp x10, #27
    b.ne 1f
    msr CNTV_CTL_EL0, xzr
1:  msr S3_0_C12_C12_1, x10
    add x21, x21, #1
    eret
start:
    adr x0, vectors
    msr VBAR_EL1, x0
    isb
    movz x20, #0x0a00, lsl #16
    movz x1, #0x0800, lsl #16
    mov w2, #0x12
    str w2, [x1]
    mov w2, #0x20
    str w2, [x1, #0x104]
    movz x3, #0x080b, lsl #16
    mov w2, #0x08000000
    str w2, [x3, #0x100]
    mov x2, #0xf0
    msr S3_0_C4_C6_0, x2
    mov x2, #1
    msr S3_0_C12_C12_7, x2
    mov x21, #0
    msr DAIFClr, #2
    str wzr, [x20]
2:  wfi
    cmp x21, #1
    b.lt 2b
    mrs x2, CNTVCT_EL0
    add x2, x2, #3125
    msr CNTV_CVAL_EL0, x2
    mov x2, #1
    msr CNTV_CTL_EL0, x2
3:  wfi
    cmp x21, #2
    b.lt 3b
"""
    + SYSTEM_OFF_SOURCE,
    "a8000014"
    + "00" * (0x280 - 4)
    + "0acc38d58a1200b95f6d00f1410000543fe31bd52acc18d5b5060091e0039fd600ebff1000c018d5df3f03d51440a1d2"
    + "0100a1d242028052220000b902048052220401b96301a1d20200a152620001b9021e80d2024618d5220080d2e2cc18d5"
    + "150080d2ff4203d59f0200b97f2003d5bf0600f1cbffff5442e03bd542d4309142e31bd5220080d222e31bd57f2003d5"
    + "bf0a00f1cbffff54000180d20080b0f2020000d4",
)

IOEVENT = aarch64_program(
    "ioevent",
    """
    movz x20, #0x0a00, lsl #16
    mov w2, #0x2a
    str w2, [x20, #0x100]
    mov w2, #0x2b
    str w2, [x20, #0x100]
"""
    + SYSTEM_OFF_SOURCE,
    "1440a1d242058052820201b962058052820201b9000180d20080b0f2020000d4",
)

# A vendor hypervisor call with X1 = 5, X2 = 6; reports X0 and X1 afterwards.
HYPERCALL = aarch64_program(
    "hypercall",
    """
    movz x20, #0x0a00, lsl #16
    movz x0, #0x0001
    movk x0, #0xc200, lsl #16
    mov x1, #5
    mov x2, #6
    hvc #0
    str x0, [x20]
    str x1, [x20, #8]
"""
    + SYSTEM_OFF_SOURCE,
    "1440a1d2200080d20040b8f2a10080d2c20080d2020000d4800200f9810600f9000180d20080b0f2020000d4",
)

# vCPU 0 starts vCPU 1 at `secondary` with context id 0x55 (CPU_ON, SMC64 id) and
# reports the result, tries again (ALREADY_ON) and reports that, then powers off.
# vCPU 1 reports X0 (the context id) at REPORT+0x20 and sleeps for good.
SMP = aarch64_program(
    "smp",
    """
main:
    movz x20, #0x0a00, lsl #16
    movz x0, #0x0003
    movk x0, #0xc400, lsl #16
    mov x1, #1
    adr x2, secondary
    mov x3, #0x55
    hvc #0
    str x0, [x20]
    movz x0, #0x0003
    movk x0, #0xc400, lsl #16
    mov x1, #1
    adr x2, secondary
    mov x3, #0x55
    hvc #0
    str x0, [x20, #8]
    movz x0, #0x0008
    movk x0, #0x8400, lsl #16
    hvc #0
secondary:
    movz x20, #0x0a00, lsl #16
    str x0, [x20, #0x20]
1:  wfi
    b 1b
""",
    "1440a1d2600080d20080b8f2210080d2c2010010a30a80d2020000d4800200f9600080d20080b8f2210080d2e2000010"
    "a30a80d2020000d4800600f9000180d20080b0f2020000d41440a1d2801200f97f2003d5ffffff17",
)

READ_THEN_WRITE = aarch64_program(
    "read_then_write",
    """
    movz x20, #0x0a00, lsl #16
    ldr w2, [x20]
    str w2, [x20, #8]
"""
    + SYSTEM_OFF_SOURCE,
    "1440a1d2820240b9820a00b9000180d20080b0f2020000d4",
)

# WFI with every interrupt masked in the GIC; then one report and WFI for good.
WFI_THEN_WRITE = aarch64_program(
    "wfi_then_write",
    """
    movz x20, #0x0a00, lsl #16
    wfi
    str wzr, [x20]
1:  wfi
    b 1b
""",
    "1440a1d27f2003d59f0200b97f2003d5ffffff17",
)

GUESTS: tuple[Aarch64Program, ...] = (IRQFD_AND_TIMER, IOEVENT, HYPERCALL, SMP, READ_THEN_WRITE, WFI_THEN_WRITE)
