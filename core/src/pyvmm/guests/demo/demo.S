# The pyvmm demo guest: what `pyvmm run` boots when no kernel is given.
#
# A flat, position-independent 64-bit binary.  pyvmm loads it at 1 MiB and
# enters it in long mode (identity-mapped, interrupts off, stack set).  It talks
# to the machine's devices the way a kernel does, each access a VM exit handled
# in Python:
#
#   - prints over the COM1 UART with its FIFOs on, polling LSR for
#     "transmitter empty" before each 16 bytes (the FIFO's depth, as Linux's
#     8250 driver does);
#   - port I/O round trips: the UART scratch register, fw_cfg's signature and
#     CPU count;
#   - MMIO round trips: the demo device's ID register and 64-bit scratch
#     register at 0xfeb00000;
#   - success: powers off by writing "Shutdown" to port 0x8900 in one string
#     I/O exit (`rep outsb`): `pyvmm run` exits with status 0;
#   - failure: writes code 1 to the isa-debug-exit port 0xf4: `pyvmm run` exits
#     with QEMU's status (1 << 1) | 1 = 3.
#
# Build (the test suite checks demo.bin is exactly this):
#   as --64 demo.S -o demo.o && objcopy -O binary -j .text demo.o demo.bin

    .code64
    .intel_syntax noprefix
    .text

    .set COM1, 0x3f8
    .set COM1_SCR, COM1 + 7
    .set COM1_FCR, COM1 + 2
    .set COM1_LSR, COM1 + 5
    .set FCR_FIFO_ON, 0x07               # enable, and clear both FIFOs
    .set TX_FIFO_DEPTH, 16
    .set LSR_THRE, 0x20
    .set FW_CFG_SELECTOR, 0x510
    .set FW_CFG_DATA, 0x511
    .set FW_CFG_NB_CPUS, 0x05
    .set DEMO_DEVICE, 0xfeb00000
    .set DEMO_DEVICE_ID, 0x4d4d5650      # "PVMM", little-endian
    .set DEBUG_EXIT, 0xf4
    .set POWEROFF, 0x8900

start:
    lea rsi, [rip + hello]
    call console_on_puts

    # Port I/O: the UART's scratch register keeps what it is given.
    mov dx, COM1_SCR
    mov al, 0xa5
    out dx, al
    xor eax, eax
    in al, dx
    cmp al, 0xa5
    jne fail
    lea rsi, [rip + pio_ok]
    call puts

    # Port I/O: fw_cfg item 0 is the signature "QEMU", read a byte at a time.
    mov dx, FW_CFG_SELECTOR
    xor eax, eax
    out dx, ax
    mov dx, FW_CFG_DATA
    lea rbx, [rip + qemu]
    mov ecx, 4
1:  in al, dx
    cmp al, [rbx]
    jne fail
    inc rbx
    dec ecx
    jnz 1b
    mov dx, FW_CFG_SELECTOR
    mov ax, FW_CFG_NB_CPUS
    out dx, ax
    mov dx, FW_CFG_DATA
    in al, dx
    movzx ebx, al
    in al, dx
    lea rsi, [rip + fw_cfg_ok]
    call puts
    mov eax, ebx
    call putdec
    lea rsi, [rip + fw_cfg_cpus]
    call puts

    # MMIO: the demo device's ID, then an 8-byte scratch write and read back.
    mov rbx, DEMO_DEVICE
    mov eax, [rbx]
    cmp eax, DEMO_DEVICE_ID
    jne fail
    mov rax, 0x0123456789abcdef
    mov [rbx + 8], rax
    mov rcx, [rbx + 8]
    cmp rcx, rax
    jne fail
    lea rsi, [rip + mmio_ok]
    call puts

    lea rsi, [rip + bye]
    call puts
    lea rsi, [rip + shutdown]
    mov dx, POWEROFF
    mov ecx, 8
    rep outsb
    # Still running: the machine ignored the power-off.
    mov eax, 2
    out DEBUG_EXIT, eax
    jmp halt

fail:
    lea rsi, [rip + failed]
    call puts
    mov eax, 1
    out DEBUG_EXIT, eax
halt:
    hlt
    jmp halt

# putc: send al to COM1.  "Transmitter empty" means the FIFO has room for 16
# bytes: r9d counts the room left since LSR last said so.  Clobbers dx, r9.
putc:
    test r9d, r9d
    jnz 2f
    push rax
    mov dx, COM1_LSR
1:  in al, dx
    test al, LSR_THRE
    jz 1b
    pop rax
    mov r9d, TX_FIFO_DEPTH
2:  dec r9d
    mov dx, COM1
    out dx, al
    ret

# console_on_puts: turn the UART's FIFOs on, then puts.
console_on_puts:
    mov dx, COM1_FCR
    mov al, FCR_FIFO_ON
    out dx, al
    xor r9d, r9d                         # putc: no room known in the FIFO yet
    jmp puts

# puts: send the NUL-terminated string at rsi.  Clobbers rax, rdx, rsi, r9.
puts:
    lodsb
    test al, al
    jz 1f
    call putc
    jmp puts
1:  ret

# putdec: send eax in decimal.  Clobbers rax, rcx, rdx, r8.
putdec:
    mov ecx, 10
    xor r8d, r8d
1:  xor edx, edx
    div ecx
    push rdx
    inc r8d
    test eax, eax
    jnz 1b
2:  pop rax
    add al, '0'
    call putc
    dec r8d
    jnz 2b
    ret

hello:       .asciz "pyvmm demo guest: hello from 64-bit long mode!\n"
pio_ok:      .asciz "  pio:  COM1 scratch register round trip ok\n"
fw_cfg_ok:   .asciz "  pio:  fw_cfg signature \"QEMU\" ok, "
fw_cfg_cpus: .asciz " vCPU(s)\n"
mmio_ok:     .asciz "  mmio: demo device id \"PVMM\" ok, 64-bit scratch round trip ok\n"
bye:         .asciz "  all good: powering off through port 0x8900\n"
failed:      .asciz "  FAILED: exiting through the debug port with code 1\n"
qemu:        .ascii "QEMU"
shutdown:    .ascii "Shutdown"
