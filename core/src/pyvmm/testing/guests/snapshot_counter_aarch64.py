"""An aarch64 guest that counts virtual-timer ticks across a snapshot point,
through the GICv3: the guest of the arm64 KVM snapshot tests, on the VM API and
on the ``virt`` machine.

It routes the virtual timer's PPI (INTID 27) through the GIC (at the ``virt``
board's addresses), keeps values in a callee-saved register pair (x19, x20), an
FP/SIMD register (d8) and a system register (TPIDR_EL1), and re-arms the timer
from its IRQ handler, which counts each tick in the page after its code
(:data:`DATA_OFFSET`) and writes the square of the count into the count's word.
After :data:`TICKS_BEFORE_SNAPSHOT` ticks it writes the count to
:data:`SNAPSHOT_REQUEST` (the ``virt`` machine's snapshot request register;
on the VM API an MMIO exit where the test saves); after :data:`TICKS` it stops
the timer, checksums its own code and the first :data:`DATA_WORDS` words of the
data page, adds the four kept registers, and writes the sum to :data:`RESULT`
(the ``virt`` board's debug-exit) as a 32-bit word, then powers off.  A restore
that lost the GIC's enables or priority mask, the CPU interface, the timer or
any of those registers either never wakes or reports another sum.
:func:`expected_result` computes the sum from the program alone.  It runs
wherever it is loaded (position-independent, 2 KiB-aligned for VBAR_EL1).

The bytes are checked against the source wherever an aarch64 GNU assembler
exists (``plugins/pyvmm-kvm/tests/test_kvm_arm64_snapshot.py``).
"""

from __future__ import annotations

from pyvmm.machine.virt import VIRT_DEBUG_EXIT_BASE, VIRT_SNAPSHOT_REQUEST_BASE
from pyvmm.testing.conformance.programs_aarch64 import aarch64_program

#: Where the guest writes its result, and where it asks for the snapshot.
RESULT = VIRT_DEBUG_EXIT_BASE
SNAPSHOT_REQUEST = VIRT_SNAPSHOT_REQUEST_BASE
#: The tick count and the squares: this far past the program's start.
DATA_OFFSET = 0x1000
#: Ticks counted before the snapshot request, and in all.
TICKS_BEFORE_SNAPSHOT = 5
TICKS = 10
#: What the guest keeps in x19, x20 (and TPIDR_EL1, d8) across the snapshot point.
X19, X20 = 0x600D, 0x5EED

SNAPSHOT_COUNTER_AARCH64 = aarch64_program(
    "snapshot_counter_aarch64",
    """
vectors:
    b main
    .org vectors + 0x280
    mrs x0, S3_0_C12_C12_0
    cmp x0, #27
    b.ne 2f
    ldr w1, [x6]
    add w1, w1, #1
    str w1, [x6]
    mul w2, w1, w1
    str w2, [x6, x1, lsl #2]
    cmp w1, #10
    b.hs 3f
    mov x2, #0x4000
    msr CNTV_TVAL_EL0, x2
    b 2f
3:  mov x2, #2
    msr CNTV_CTL_EL0, x2
2:  msr S3_0_C12_C12_1, x0
    eret
main:
    adr x0, vectors
    msr VBAR_EL1, x0
    isb
    movz x7, #0x0a00, lsl #16
    movk x7, #0x1000
    add x8, x7, #0x1000
    add x6, x0, #0x1000
    movz x1, #0x0800, lsl #16
    mov w2, #0x13
    str w2, [x1]
    movz x1, #0x080a, lsl #16
    str wzr, [x1, #0x14]
    add x1, x1, #0x10000
    mov w2, #(1 << 27)
    str w2, [x1, #0x80]
    str w2, [x1, #0x100]
    mov x2, #0xf0
    msr S3_0_C4_C6_0, x2
    mov x2, #1
    msr S3_0_C12_C12_7, x2
    isb
    mov x2, #(3 << 20)
    msr CPACR_EL1, x2
    isb
    movz x19, #0x600d
    movz x20, #0x5eed
    fmov d8, x20
    msr TPIDR_EL1, x19
    mov x2, #0x4000
    msr CNTV_TVAL_EL0, x2
    mov x2, #1
    msr CNTV_CTL_EL0, x2
    isb
    msr DAIFClr, #2
1:  wfi
    ldr w1, [x6]
    cmp w1, #5
    b.lo 1b
    str w1, [x8]
4:  wfi
    ldr w1, [x6]
    cmp w1, #10
    b.lo 4b
    msr DAIFSet, #2
    adr x3, vectors
    adr x4, end
    mov w0, #0
5:  ror w0, w0, #27
    ldr w1, [x3], #4
    eor w0, w0, w1
    cmp x3, x4
    b.lo 5b
    mov x3, x6
    add x4, x6, #64
6:  ror w0, w0, #27
    ldr w1, [x3], #4
    eor w0, w0, w1
    cmp x3, x4
    b.lo 6b
    add w0, w0, w19
    add w0, w0, w20
    fmov x1, d8
    add w0, w0, w1
    mrs x1, TPIDR_EL1
    add w0, w0, w1
    str w0, [x7]
    movz x0, #0x0008
    movk x0, #0x8400, lsl #16
    hvc #0
end:
""",
    # b main; zeros up to the IRQ vector at +0x280; the handler and the main part.
    "b1000014"
    + "00" * (0x280 - 4)
    + (
        "00cc38d51f6c00f1a1010054c10040b921040011c10000b9227c011bc27821b83f28007182000054020088d202e31bd503000014"
        "420080d222e31bd520cc18d5e0039fd6e0e9ff1000c018d5df3f03d50740a1d2070082f2e8044091060440910100a1d262028052"
        "220000b94101a1d23f1400b9214040910200a152228000b9220001b9021e80d2024618d5220080d2e2cc18d5df3f03d50206a0d2"
        "421018d5df3f03d5b3018cd2b4dd8bd28802679e93d018d5020088d202e31bd5220080d222e31bd5df3f03d5ff4203d57f2003d5"
        "c10040b93f140071a3ffff54010100b97f2003d5c10040b93f280071a3ffff54df4203d563e4ff100403001000008052006c8013"
        "614440b80000014a7f0004eb83ffff54e30306aac4000191006c8013614440b80000014a7f0004eb83ffff540000130b0000140b"
        "0101669e0000010b81d038d50000010be00000b9000180d20080b0f2020000d4"
    ),
)
#: The data words the checksum reads.
DATA_WORDS = 16


def expected_result() -> int:
    """The sum the guest writes, from its code and the counts it must have made."""
    data = [0] * DATA_WORDS
    data[0] = TICKS
    for count in range(1, TICKS + 1):
        data[count] = count * count
    code = SNAPSHOT_COUNTER_AARCH64.code
    words = [int.from_bytes(code[i : i + 4], "little") for i in range(0, len(code), 4)] + data
    checksum = 0
    for word in words:
        checksum = ((checksum << 5 | checksum >> 27) & 0xFFFF_FFFF) ^ word
    return (checksum + X19 + X20 + X20 + X19) & 0xFFFF_FFFF
