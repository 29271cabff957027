// The pyvmm aarch64 demo guest: what `pyvmm run --arch aarch64` boots when no
// kernel is given.
//
// A flat, position-independent A64 binary.  pyvmm loads it at the start of RAM
// (0x80000000) and enters it the way the arm64 boot protocol enters a kernel:
// EL1, MMU and caches off, interrupts masked, X0 = the device tree's address.
// Every device access is an MMIO exit handled in Python:
//
//   - prints over the PL011 UART at 0x09000000, polling FR for "transmit FIFO
//     full" clear, as Linux's earlycon does;
//   - checks the device tree magic (0xd00dfeed, big-endian) at X0 and prints
//     the address;
//   - MMIO round trips: the PL011's PrimeCell id register, the demo device's ID
//     register and 64-bit scratch register at 0x0a000000;
//   - success: PSCI SYSTEM_OFF through HVC #0; the hypervisor turns it into a
//     shutdown system event and `pyvmm run` exits with status 0;
//   - failure: writes code 1 to the debug-exit register at 0x0a001000:
//     `pyvmm run` exits with status (1 << 1) | 1 = 3, as on x86.
//
// Build (the test suite checks demo.bin is exactly this):
//   aarch64-linux-gnu-as demo.S -o demo.o
//   aarch64-linux-gnu-objcopy -O binary -j .text demo.o demo.bin

    .text

    .set UART, 0x09000000
    .set UART_FR, 0x18
    .set FR_TXFF, 5                     // bit number
    .set UART_PCELLID0, 0xff0
    .set DEMO_DEVICE, 0x0a000000
    .set DEBUG_EXIT, 0x0a001000
    .set PSCI_SYSTEM_OFF, 0x84000008

start:
    mov x19, x0                         // the device tree

    adr x1, hello
    bl puts

    // The device tree: 8-byte aligned, big-endian magic 0xd00dfeed.
    tst x19, #7
    b.ne fail
    ldr w2, [x19]
    rev w2, w2
    movz w3, #0xfeed
    movk w3, #0xd00d, lsl #16
    cmp w2, w3
    b.ne fail
    adr x1, fdt_at
    bl puts
    mov x2, x19
    bl puthex
    adr x1, fdt_ok
    bl puts

    // MMIO: the PL011 says it is a PrimeCell (cell id byte 0 is 0x0d).
    movz x20, #(UART >> 16), lsl #16
    ldr w2, [x20, #UART_PCELLID0]
    cmp w2, #0x0d
    b.ne fail

    // MMIO: the demo device's ID, then an 8-byte scratch write and read back.
    movz x20, #(DEMO_DEVICE >> 16), lsl #16
    ldr w2, [x20]
    movz w3, #0x5650                    // "PVMM", little-endian
    movk w3, #0x4d4d, lsl #16
    cmp w2, w3
    b.ne fail
    movz x4, #0xcdef
    movk x4, #0x89ab, lsl #16
    movk x4, #0x4567, lsl #32
    movk x4, #0x0123, lsl #48
    str x4, [x20, #8]
    ldr x5, [x20, #8]
    cmp x4, x5
    b.ne fail
    adr x1, mmio_ok
    bl puts

    adr x1, bye
    bl puts
    movz w0, #(PSCI_SYSTEM_OFF & 0xffff)
    movk w0, #(PSCI_SYSTEM_OFF >> 16), lsl #16
    hvc #0
    // Still running: the hypervisor ignored SYSTEM_OFF.
    mov w2, #2
    b exit_with

fail:
    adr x1, failed
    bl puts
    mov w2, #1
exit_with:
    movz x20, #(DEBUG_EXIT >> 16), lsl #16
    movk x20, #(DEBUG_EXIT & 0xffff)
    str w2, [x20]
halt:
    wfi
    b halt

// putc: send w2 once the transmit FIFO has room.  Clobbers x9, w10.
putc:
    movz x9, #(UART >> 16), lsl #16
1:  ldr w10, [x9, #UART_FR]
    tbnz w10, #FR_TXFF, 1b
    str w2, [x9]
    ret

// puts: send the NUL-terminated string at x1.  Clobbers x1, w2, x9, w10, x11.
puts:
    mov x11, x30
1:  ldrb w2, [x1], #1
    cbz w2, 2f
    bl putc
    b 1b
2:  mov x30, x11
    ret

// puthex: send x2 as 0x and 16 hex digits.  Clobbers x2, x9, w10, x11, x12, x13.
puthex:
    mov x11, x30
    mov x12, x2
    mov w2, #'0'
    bl putc
    mov w2, #'x'
    bl putc
    mov w13, #60
1:  lsr x2, x12, x13
    and w2, w2, #0xf
    cmp w2, #10
    add w10, w2, #'0'
    add w2, w2, #('a' - 10)
    csel w2, w10, w2, lo
    bl putc
    subs w13, w13, #4
    b.pl 1b
    mov x30, x11
    ret

hello:
    .asciz "pyvmm aarch64 demo guest: hello from EL1\n"
fdt_at:
    .asciz "device tree at "
fdt_ok:
    .asciz " (magic 0xd00dfeed)\n"
mmio_ok:
    .asciz "MMIO round trips ok: PL011 PrimeCell id, demo device ID and scratch\n"
bye:
    .asciz "powering off through PSCI SYSTEM_OFF\n"
failed:
    .asciz "FAILED\n"
