# The pyvmm echo guest: a tiny interactive shell on the serial console.
#
# A flat 64-bit binary, loaded and entered at 1 MiB in long mode
# (`pyvmm run --kernel echo.bin --load-address 0x100000`, or
# pyvmm.guests.echo_image()).  It needs an 8259 interrupt controller (the
# hypervisor's, as KVM's, or pyvmm's own: `irqchip`): input arrives through the
# 16550's received-data interrupt, IRQ 4, and the guest sleeps in `hlt`
# between keys.
#
#   - prints a banner and the prompt "pyvmm> ";
#   - echoes what is typed; Backspace (DEL or BS) rubs out, Ctrl-C drops the
#     line, Enter runs it:
#       help        lists the commands
#       poweroff    powers off (port 0x8900 "Shutdown"): pyvmm exits 0
#       exit N      writes N (0-9) to the debug-exit port 0xf4: status (N<<1)|1
#       anything else is echoed back as "you typed: ..."
#   - Ctrl-D on an empty line powers off too.
#
# Build (the test suite checks echo.bin is exactly this):
#   as --64 echo.S -o echo.o && objcopy -O binary -j .text echo.o echo.bin

    .code64
    .intel_syntax noprefix
    .text

    .set COM1, 0x3f8
    .set COM1_IER, COM1 + 1
    .set COM1_FCR, COM1 + 2
    .set COM1_LCR, COM1 + 3
    .set COM1_MCR, COM1 + 4
    .set COM1_LSR, COM1 + 5
    .set LSR_DR, 0x01
    .set LSR_THRE, 0x20
    .set PIC1, 0x20
    .set PIC1_DATA, 0x21
    .set PIC2, 0xa0
    .set PIC2_DATA, 0xa1
    .set IRQ_BASE, 0x20
    .set VECTORS, 0x30
    .set DEBUG_EXIT, 0xf4
    .set POWEROFF, 0x8900
    .set LINE_MAX, 120

start:
    lea rsp, [rip + stack_top]

    # The IDT: exceptions (0-0x1f) report and stop, the 8259's IRQs
    # (0x20-0x2f) are acknowledged, IRQ 4 (COM1) is the console.
    lea rdi, [rip + idt]
    xor ecx, ecx
1:  lea rax, [rip + exception]
    cmp ecx, IRQ_BASE
    jb 2f
    lea rax, [rip + irq_other]
    cmp ecx, IRQ_BASE + 4
    jne 2f
    lea rax, [rip + irq_com1]
2:  mov word ptr [rdi], ax          # offset 15:0
    mov dx, cs
    mov word ptr [rdi + 2], dx      # selector
    mov word ptr [rdi + 4], 0x8e00  # present, DPL 0, 64-bit interrupt gate
    shr rax, 16
    mov word ptr [rdi + 6], ax      # offset 31:16
    shr rax, 16
    mov dword ptr [rdi + 8], eax    # offset 63:32
    mov dword ptr [rdi + 12], 0
    add rdi, 16
    inc ecx
    cmp ecx, VECTORS
    jb 1b
    lea rax, [rip + idt]
    mov [rip + idtr_base], rax
    lidt [rip + idtr]

    # The 8259s: vectors from 0x20, cascade on IRQ 2, only IRQ 4 unmasked.
    mov al, 0x11
    out PIC1, al
    out PIC2, al
    mov al, IRQ_BASE
    out PIC1_DATA, al
    mov al, IRQ_BASE + 8
    out PIC2_DATA, al
    mov al, 4
    out PIC1_DATA, al
    mov al, 2
    out PIC2_DATA, al
    mov al, 1
    out PIC1_DATA, al
    out PIC2_DATA, al
    mov al, 0xef
    out PIC1_DATA, al
    mov al, 0xff
    out PIC2_DATA, al

    # COM1: 8N1, FIFO on (trigger at 1 byte), OUT2 (the PC's IRQ gate), and
    # the received-data interrupt.
    mov dx, COM1_LCR
    mov al, 0x03
    out dx, al
    mov dx, COM1_FCR
    mov al, 0x07
    out dx, al
    mov dx, COM1_MCR
    mov al, 0x0b
    out dx, al
    mov dx, COM1_IER
    mov al, 0x01
    out dx, al

    lea rsi, [rip + banner]
    call puts
    call prompt
idle:
    sti
    hlt
    jmp idle

# --- interrupts ---------------------------------------------------------------
irq_com1:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
1:  mov dx, COM1_LSR
    in al, dx
    test al, LSR_DR
    jz 2f
    mov dx, COM1
    in al, dx
    call key
    jmp 1b
2:  mov al, 0x20                    # EOI
    out PIC1, al
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    iretq

irq_other:
    push rax
    mov al, 0x20
    out PIC2, al
    out PIC1, al
    pop rax
    iretq

exception:
    lea rsi, [rip + crashed]
    call puts
    mov eax, 3
    out DEBUG_EXIT, eax
1:  cli
    hlt
    jmp 1b

# --- the line editor ------------------------------------------------------------
# key: handle the character in al.
key:
    cmp al, 0x0d
    je enter
    cmp al, 0x0a
    je enter
    cmp al, 0x7f
    je rubout
    cmp al, 0x08
    je rubout
    cmp al, 0x03
    je cancel
    cmp al, 0x04
    je eof
    cmp al, 0x20
    jb 1f
    cmp al, 0x7e
    ja 1f
    mov ecx, [rip + line_len]
    cmp ecx, LINE_MAX
    jae 1f
    lea rbx, [rip + line]
    mov [rbx + rcx], al
    inc ecx
    mov [rip + line_len], ecx
    call putc
1:  ret

rubout:
    mov ecx, [rip + line_len]
    test ecx, ecx
    jz 1f
    dec ecx
    mov [rip + line_len], ecx
    lea rsi, [rip + rub]
    call puts
1:  ret

cancel:
    lea rsi, [rip + caret_c]
    call puts
    mov dword ptr [rip + line_len], 0
    jmp prompt

eof:
    cmp dword ptr [rip + line_len], 0
    jne 1f
    lea rsi, [rip + newline]
    call puts
    jmp poweroff
1:  ret

enter:
    lea rsi, [rip + newline]
    call puts
    mov ecx, [rip + line_len]
    test ecx, ecx
    jz 9f
    lea rdi, [rip + cmd_help]
    call is_line
    je do_help
    lea rdi, [rip + cmd_poweroff]
    call is_line
    je poweroff
    # "exit N"
    cmp ecx, 6
    jne 8f
    lea rbx, [rip + line]
    cmp dword ptr [rbx], 0x74697865   # "exit"
    jne 8f
    cmp byte ptr [rbx + 4], ' '
    jne 8f
    movzx eax, byte ptr [rbx + 5]
    sub eax, '0'
    cmp eax, 9
    ja 8f
    out DEBUG_EXIT, eax
    jmp 9f
8:  lea rsi, [rip + typed]
    call puts
    mov ecx, [rip + line_len]
    lea rsi, [rip + line]
7:  lodsb
    call putc
    dec ecx
    jnz 7b
    lea rsi, [rip + newline]
    call puts
9:  mov dword ptr [rip + line_len], 0
    jmp prompt

do_help:
    lea rsi, [rip + help]
    call puts
    mov dword ptr [rip + line_len], 0
    jmp prompt

poweroff:
    lea rsi, [rip + bye]
    call puts
    lea rsi, [rip + shutdown]
    mov dx, POWEROFF
    mov ecx, 8
    rep outsb
    mov eax, 2                        # still running: the machine ignored it
    out DEBUG_EXIT, eax
1:  cli
    hlt
    jmp 1b

# is_line: ZF set when the line (line_len bytes) is the NUL-terminated string
# at rdi.  Keeps ecx.
is_line:
    push rcx
    lea rsi, [rip + line]
1:  mov al, [rdi]
    test al, al
    jz 2f
    test ecx, ecx
    jz 4f
    cmp al, [rsi]
    jne 3f
    inc rdi
    inc rsi
    dec ecx
    jmp 1b
2:  test ecx, ecx                     # the string ended: so must the line
    jmp 3f
4:  test al, al                       # the line ended first: not equal
3:  pop rcx
    ret

prompt:
    lea rsi, [rip + prompt_text]
    jmp puts

# putc: send al to COM1 once the transmitter is empty.  Keeps every register.
putc:
    push rdx
    push rax
    mov dx, COM1_LSR
1:  in al, dx
    test al, LSR_THRE
    jz 1b
    pop rax
    mov dx, COM1
    out dx, al
    pop rdx
    ret

# puts: send the NUL-terminated string at rsi.  Clobbers rax, rsi.
puts:
    lodsb
    test al, al
    jz 1f
    call putc
    jmp puts
1:  ret

banner:       .asciz "pyvmm echo guest: type a line and press Enter ('help' lists the commands)\n"
prompt_text:  .asciz "pyvmm> "
help:         .asciz "commands: help, poweroff, exit N (debug-exit with N); Ctrl-D on an empty line powers off\n"
typed:        .asciz "you typed: "
rub:          .asciz "\b \b"
caret_c:      .asciz "^C\n"
newline:      .asciz "\n"
bye:          .asciz "powering off\n"
crashed:      .asciz "\necho guest: unexpected exception\n"
cmd_help:     .asciz "help"
cmd_poweroff: .asciz "poweroff"
shutdown:     .ascii "Shutdown"

    .balign 8
idtr:         .word VECTORS * 16 - 1
idtr_base:    .quad 0
line_len:     .long 0
line:         .skip LINE_MAX
    .balign 16
idt:          .skip VECTORS * 16
stack:        .skip 2048
stack_top:
