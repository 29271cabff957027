// The pyvmm aarch64 echo guest: type a line on the serial console, get it back.
//
// A flat, position-independent A64 binary for the virt board, loaded and
// entered at the start of RAM (`pyvmm run --arch aarch64 --kernel echo.bin
// --load-address 0x80000000`, or pyvmm.guests.echo_aarch64_image()).  It polls
// the PL011's flag register for received data (FR.RXFE clear) and reads it from
// DR, so it needs no interrupt controller and runs on any aarch64 backend:
//
//   - prints a banner and the prompt "pyvmm> ";
//   - echoes printable keys; Backspace (DEL or BS) rubs out; Enter prints
//     "you typed: <the line>";
//   - Ctrl-D powers off (PSCI SYSTEM_OFF through HVC #0): pyvmm exits 0.
//
// Build (the test suite checks echo.bin is exactly this):
//   aarch64-linux-gnu-as echo.S -o echo.o
//   aarch64-linux-gnu-objcopy -O binary -j .text echo.o echo.bin

    .text

    .set UART, 0x09000000
    .set UART_FR, 0x18
    .set FR_RXFE, 4                     // bit number
    .set FR_TXFF, 5                     // bit number
    .set PSCI_SYSTEM_OFF, 0x84000008
    .set LINE_MAX, 120

start:
    adr x0, banner
    bl puts
    mov x20, #0                         // the line's length
    adr x21, line
prompt:
    adr x0, prompt_text
    bl puts
key:
    mov x1, UART
1:  ldr w2, [x1, #UART_FR]
    tbnz w2, #FR_RXFE, 1b
    ldr w0, [x1]                        // DR: the byte, and error bits above it
    and w0, w0, #0xff
    cmp w0, #0x0d
    b.eq enter
    cmp w0, #0x0a
    b.eq enter
    cmp w0, #0x7f
    b.eq rubout
    cmp w0, #0x08
    b.eq rubout
    cmp w0, #0x04
    b.eq poweroff
    cmp w0, #0x20
    b.lo key
    cmp w0, #0x7e
    b.hi key
    cmp x20, #LINE_MAX
    b.hs key
    strb w0, [x21, x20]
    add x20, x20, #1
    bl putc
    b key

rubout:
    cbz x20, key
    sub x20, x20, #1
    adr x0, rub
    bl puts
    b key

enter:
    adr x0, newline
    bl puts
    cbz x20, prompt
    adr x0, typed
    bl puts
    mov x22, #0
2:  ldrb w0, [x21, x22]
    bl putc
    add x22, x22, #1
    cmp x22, x20
    b.lo 2b
    adr x0, newline
    bl puts
    mov x20, #0
    b prompt

poweroff:
    adr x0, bye
    bl puts
    ldr x0, =PSCI_SYSTEM_OFF
    hvc #0
3:  wfi                                 // still running: the machine ignored it
    b 3b

// putc: send w0 once the transmit FIFO has room.  Clobbers x1, x2.
putc:
    mov x1, UART
1:  ldr w2, [x1, #UART_FR]
    tbnz w2, #FR_TXFF, 1b
    strb w0, [x1]
    ret

// puts: send the NUL-terminated string at x0.  Clobbers x0-x3, x9.
puts:
    mov x9, x30
    mov x3, x0
1:  ldrb w0, [x3], #1
    cbz w0, 2f
    bl putc
    b 1b
2:  mov x30, x9
    ret

    .ltorg
banner:       .asciz "pyvmm aarch64 echo guest: type a line and press Enter; Ctrl-D powers off\n"
prompt_text:  .asciz "pyvmm> "
typed:        .asciz "you typed: "
rub:          .asciz "\b \b"
newline:      .asciz "\n"
bye:          .asciz "powering off\n"
    .balign 8
line:         .skip LINE_MAX
