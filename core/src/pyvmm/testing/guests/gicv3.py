"""An aarch64 guest that takes the virtual timer's PPI and an SPI through its
own exception vectors on a GICv3: the guest of the software CPU's GIC tests
and of the Gunyah model's interrupt tests (where the SPI is a doorbell's).

The bytes are checked against the source wherever an aarch64 GNU assembler
exists (``core/tests/test_softcpu_shared_guests.py``).
"""

from __future__ import annotations

from pyvmm.testing.conformance.programs_aarch64 import aarch64_program

#: Where the IRQ handler writes each INTID it acknowledged (no RAM there: an MMIO write).
LOG_ADDRESS = 0x0900_0000
#: The SPI the guest enables (SPI 8).
SPI_INTID = 40
#: The virtual timer's PPI.
VTIMER_INTID = 27
#: Where the IRQ handler sits in the program (VBAR_EL1 + 0x280: current EL, SPx).
HANDLER_OFFSET = 0x280

#: With the GIC at the virt board's addresses (distributor 0x0800_0000, vCPU
#: 0's SGI frame 0x080b_0000), position-independent, loaded 2 KiB-aligned (the
#: program's start is its vector table, VBAR_EL1's alignment).  The IRQ handler
#: acknowledges, writes the INTID to LOG_ADDRESS, masks the timer once it
#: fired, EOIs and counts in x9.  The main part enables group 1, SPI 40 and
#: PPI 27, sets PMR, arms the virtual timer 50 us ahead, unmasks IRQs and waits
#: in WFI until two interrupts were taken, then powers off (PSCI SYSTEM_OFF).
TIMER_AND_DOORBELL = aarch64_program(
    "timer_and_doorbell",
    """
vectors:
    b 4f
    .org vectors + 0x280
    mrs x5, S3_0_C12_C12_0
    str w5, [x7]
    cmp x5, #27
    b.ne 2f
    mov x2, #2
    msr CNTV_CTL_EL0, x2
2:  msr S3_0_C12_C12_1, x5
    add x9, x9, #1
    eret
4:  adr x0, vectors
    msr VBAR_EL1, x0
    isb
    movz x7, #0x0900, lsl #16
    movz x1, #0x0800, lsl #16
    mov w2, #0x12
    str w2, [x1]
    mov w2, #0x100
    str w2, [x1, #0x104]
    movz x3, #0x0100
    movk x3, #0x080b, lsl #16
    mov w2, #0x08000000
    str w2, [x3]
    mov x2, #0xf0
    msr S3_0_C4_C6_0, x2
    mov x2, #1
    msr S3_0_C12_C12_7, x2
    mov x9, #0
    mrs x2, CNTVCT_EL0
    add x2, x2, #3125
    msr CNTV_CVAL_EL0, x2
    mov x2, #1
    msr CNTV_CTL_EL0, x2
    msr DAIFClr, #2
1:  wfi
    cmp x9, #2
    b.ne 1b
    movz x0, #0x0008
    movk x0, #0x8400, lsl #16
    hvc #0
""",
    # b 4f; zeros up to the handler at +0x280; the handler; the main part.
    "a9000014"
    + "00" * (0x280 - 4)
    + "05cc38d5e50000b9bf6c00f161000054420080d222e31bd525cc18d529050091e0039fd6"
    + "e0eaff1000c018d5df3f03d50720a1d20100a1d242028052220000b902208052220401b9032080d26301a1f20200a152620000b9"
    + "021e80d2024618d5220080d2e2cc18d5090080d242e03bd542d4309142e31bd5220080d222e31bd5ff4203d57f2003d53f0900f1"
    + "c1ffff54000180d20080b0f2020000d4",
)
