"""The HAXM model's run protocol, request by request, on each host's front end:
the reset state, the I/O exit with RIP already advanced and its completion on
the next RUN, string I/O batched through the I/O buffer, fast and legacy MMIO,
the tunnel's PAUSED and user-event requests, the kicks, HLT, a panicked vCPU,
real mode without unrestricted guest, the MSR batches' ``done``
(``docs/backends/haxm.md`` §7)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from conftest import make_model
from haxm_raw import PAGE, HostBuffer, RawVcpu, RawVm, ffi

from pyvmm_haxm import bindings as b

CODE = 0x1000
MSR_EFER, MSR_LSTAR = 0xC0000080, 0xC0000082


@pytest.fixture
def vm(model: Any) -> Any:
    raw = RawVm()
    raw.mem = raw.map_ram(0, 0x4000)  # type: ignore[attr-defined]
    yield raw
    raw.close()


def guest(vm: RawVm, code_hex: str, **gprs: int) -> RawVcpu:
    vm.mem.write(CODE, bytes.fromhex(code_hex))  # type: ignore[attr-defined]
    vcpu = vm.vcpu()
    vcpu.real_mode_at(CODE, **gprs)
    return vcpu


def run_within(model: Any, vcpu: RawVcpu, seconds: float = 10.0, before: Callable[[], None] | None = None) -> int:
    """RUN on another thread; fail (and stop the guest) if it has not returned in
    ``seconds`` -- so a model that never stops the guest fails instead of hanging."""
    result: list[int] = []
    errors: list[BaseException] = []

    def body() -> None:
        try:
            result.append(vcpu.run())
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            errors.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    if before is not None:
        before()
    thread.join(seconds)
    if thread.is_alive():
        for vm_model in model.driver.vms.values():
            for hax_vcpu in vm_model.vcpus.values():
                hax_vcpu.cpu.kick()
        thread.join()
        pytest.fail("RUN did not return")
    if errors:
        raise errors[0]
    del model.rejections[:]  # the other thread's RUN is advised (one thread per vCPU)
    return result[0]


def test_reset_state_is_real_mode(model: Any, vm: RawVm) -> None:
    state = vm.vcpu().get_state()
    cs = state._cs
    assert (cs.selector, cs.base, cs.limit, cs.ar & 0xFF) == (0xF000, 0xFFFF0000, 0xFFFF, 0x93)
    assert (state._rip, state._rflags, state._cr0) == (0xFFF0, 2, 0x60000010)
    assert (state._ds.selector, state._ds.base, state._ds.limit) == (0, 0, 0xFFFF)


def test_in_exit_has_rip_advanced_and_next_run_loads_al(model: Any, vm: RawVm) -> None:
    vcpu = guest(vm, "e410e611f4", rax=0x1234_5678_9ABC_DE00)
    assert vcpu.run() == b.HAX_EXIT_IO
    io = vcpu.tunnel.io
    assert (io._direction, io._port, io._size, io._count, io._flags) == (b.HAX_IO_IN, 0x10, 1, 1, 0)
    assert vcpu.get_state()._rip == CODE + 2, "HAXM has already advanced RIP"
    vcpu.set_io_bytes(b"\x5a")
    assert vcpu.run() == b.HAX_EXIT_IO
    assert (vcpu.tunnel.io._direction, vcpu.tunnel.io._port) == (b.HAX_IO_OUT, 0x11)
    assert vcpu.io_bytes(1) == b"\x5a"
    # _al was written: the other 56 bits stay (handle_io_post).
    assert vcpu.get_state()._regs[0] == 0x1234_5678_9ABC_DE5A
    assert vcpu.run() == b.HAX_EXIT_HLT


def test_string_out_is_batched_64_bytes_at_a_time(model: Any, vm: RawVm) -> None:
    vm.mem.write(0x100, bytes(range(100)))  # type: ignore[attr-defined]
    vcpu = guest(vm, "f36ef4", rcx=100, rsi=0x100, rdx=0x10)
    assert vcpu.run() == b.HAX_EXIT_IO
    io = vcpu.tunnel.io
    assert (io._direction, io._size, io._count, io._flags, io._df, io._vaddr) == (0, 1, 64, 1, 0, 0x100)
    assert vcpu.io_bytes(64) == bytes(range(64))
    state = vcpu.get_state()
    assert (state._regs[1], state._regs[6], state._rip) == (36, 0x140, CODE), "RCX/RSI stepped, RIP kept"
    assert vcpu.run() == b.HAX_EXIT_IO
    assert (vcpu.tunnel.io._count, vcpu.tunnel.io._vaddr) == (36, 0x140)
    assert vcpu.io_bytes(36) == bytes(range(64, 100))
    state = vcpu.get_state()
    assert (state._regs[1], state._rip) == (0, CODE + 2), "the last batch retires the instruction"
    assert vcpu.run() == b.HAX_EXIT_HLT


def test_string_out_with_direction_flag(model: Any, vm: RawVm) -> None:
    vm.mem.write(0x100, b"abc")  # type: ignore[attr-defined]
    vcpu = guest(vm, "fdf36efcf4", rcx=3, rsi=0x102, rdx=0x10)
    assert vcpu.run() == b.HAX_EXIT_IO
    io = vcpu.tunnel.io
    assert (io._count, io._df, io._vaddr) == (3, 1, 0x100), "the lowest address first"
    assert vcpu.io_bytes(3) == b"abc"
    assert vcpu.get_state()._regs[6] == 0x102 - 3


def test_single_outs_still_steps_rcx(model: Any, vm: RawVm) -> None:
    """``handle_string_io`` decrements RCX even without REP (a HAXM quirk the model keeps)."""
    vm.mem.write(0x100, b"z")  # type: ignore[attr-defined]
    vcpu = guest(vm, "6ef4", rcx=7, rsi=0x100, rdx=0x10)
    assert vcpu.run() == b.HAX_EXIT_IO
    assert vcpu.io_bytes(1) == b"z"
    state = vcpu.get_state()
    assert (state._regs[1], state._regs[6], state._rip) == (6, 0x101, CODE + 1)


def test_string_in_writes_guest_memory_on_the_next_run(model: Any, vm: RawVm) -> None:
    vcpu = guest(vm, "f36cf4", rcx=4, rdi=0x200, rdx=0x10)
    assert vcpu.run() == b.HAX_EXIT_IO
    io = vcpu.tunnel.io
    assert (io._direction, io._count, io._flags, io._vaddr) == (b.HAX_IO_IN, 4, 1, 0x200)
    assert vcpu.get_state()._regs[7] == 0x204, "RDI is stepped at the exit"
    vcpu.set_io_bytes(b"WXYZ")
    assert vm.mem.read(0x200, 4) == bytes(4)  # type: ignore[attr-defined]
    assert vcpu.run() == b.HAX_EXIT_HLT
    assert vm.mem.read(0x200, 4) == b"WXYZ"  # type: ignore[attr-defined]


def test_fast_mmio_read_is_completed_by_the_next_run(model: Any, vm: RawVm) -> None:
    vcpu = guest(vm, "a00050e610f4")  # mov al, [0x5000]: no RAM there
    assert vcpu.run() == b.HAX_EXIT_FAST_MMIO
    mmio = vcpu.fastmmio
    assert (mmio.gpa, mmio.size, mmio.direction) == (0x5000, 1, 0)
    mmio.value = 0x77
    assert vcpu.run() == b.HAX_EXIT_IO
    assert vcpu.io_bytes(1) == b"\x77"


def test_rom_write_is_mmio(model: Any) -> None:
    raw = RawVm()
    try:
        ram = raw.map_ram(0, 0x2000)
        buffer = HostBuffer(PAGE)
        buffer.write(0, b"\x11")
        raw.add_ramblock(buffer.address, PAGE)
        raw.set_ram2(0x3000, PAGE, buffer.address, b.HAX_RAM_INFO_ROM)
        # mov byte [0x3000], 0x22 ; hlt
        ram.write(CODE, bytes.fromhex("c6060030" + "22" + "f4"))
        vcpu = raw.vcpu()
        vcpu.real_mode_at(CODE)
        assert vcpu.run() == b.HAX_EXIT_FAST_MMIO
        assert (vcpu.fastmmio.gpa, vcpu.fastmmio.direction, vcpu.fastmmio.value & 0xFF) == (0x3000, 1, 0x22)
        assert vcpu.run() == b.HAX_EXIT_HLT
        assert buffer.read(0, 1) == b"\x11", "ROM keeps its contents (core/ept2.c)"
    finally:
        raw.close()


def test_mmio_is_fast_without_notify_qemu_version(model: Any) -> None:
    """HAXM 7.8 never gives the legacy HAX_EXIT_MMIO: hax_vm_set_qemuversion's
    feature bits are read by nothing, every MMIO access is emulate.c's fast exit."""
    raw = RawVm(notify=None)
    try:
        ram = raw.map_ram(0, 0x2000)
        ram.write(CODE, bytes.fromhex("a00030e610f4"))  # mov al, [0x3000]; out 0x10, al; hlt
        vcpu = raw.vcpu()
        vcpu.real_mode_at(CODE)
        assert vcpu.run() == b.HAX_EXIT_FAST_MMIO
        assert (vcpu.fastmmio.gpa, vcpu.fastmmio.size, vcpu.fastmmio.direction) == (0x3000, 1, 0)
        vcpu.fastmmio.value = 0x5C
        assert vcpu.run() == b.HAX_EXIT_IO
        assert vcpu.io_bytes(1) == b"\x5c"
    finally:
        raw.close()


def test_fast_mmio_writes_only_gpa_size_direction_and_a_written_value(model: Any, vm: RawVm) -> None:
    """vcpu_read_memory/vcpu_write_memory fill gpa, size, direction (and value for
    a write); reg_index and the _cr0.._cr4 fields keep what the I/O buffer held."""
    vcpu = guest(vm, "a00050a20060f4", rax=0x99)  # mov al, [0x5000]; mov [0x6000], al; hlt
    vcpu.set_io_bytes(b"\xee" * 56)
    assert vcpu.run() == b.HAX_EXIT_FAST_MMIO
    mmio = vcpu.fastmmio
    assert (mmio.gpa, mmio.size, mmio.direction) == (0x5000, 1, 0)
    assert mmio.value == 0xEEEE_EEEE_EEEE_EEEE, "a read leaves value for the VMM"
    assert (mmio.reg_index, mmio._cr0, mmio._cr3) == (0xEEEE, 0xEEEE_EEEE_EEEE_EEEE, 0xEEEE_EEEE_EEEE_EEEE)
    mmio.value = 0x42
    assert vcpu.run() == b.HAX_EXIT_FAST_MMIO
    assert (mmio.gpa, mmio.size, mmio.direction, mmio.value & 0xFF) == (0x6000, 1, 1, 0x42)
    assert mmio._cr0 == 0xEEEE_EEEE_EEEE_EEEE
    assert vcpu.run() == b.HAX_EXIT_HLT


def test_movs_between_mmio_is_a_read_then_a_write(model: Any, vm: RawVm) -> None:
    """em_emulate_insn reads MOVS's source, then writes its destination: two fast
    exits, RSI/RDI stepped and RIP moved once both are done."""
    vcpu = guest(vm, "a4f4", rsi=0x5000, rdi=0x6000)  # movsb; hlt
    assert vcpu.run() == b.HAX_EXIT_FAST_MMIO
    mmio = vcpu.fastmmio
    assert (mmio.gpa, mmio.direction) == (0x5000, 0)
    assert vcpu.get_state()._rip == CODE, "the instruction is not done yet"
    mmio.value = 0x3C
    assert vcpu.run() == b.HAX_EXIT_FAST_MMIO
    assert (mmio.gpa, mmio.direction, mmio.value & 0xFF) == (0x6000, 1, 0x3C)
    assert vcpu.run() == b.HAX_EXIT_HLT
    state = vcpu.get_state()
    assert (state._regs[6], state._regs[7], state._rip) == (0x5001, 0x6001, CODE + 2)


def test_movs_into_rom_is_a_model_gap(model: Any) -> None:
    """MOVS translates its addresses (emulate.c is_translation_required) and a ROM
    memslot is no MMIO to is_mmio_address: HAXM writes the ROM's pages itself."""
    from pyvmm.testing.driver_model import ModelGap

    raw = RawVm()
    try:
        ram = raw.map_ram(0, 0x2000)
        rom = HostBuffer(PAGE)
        raw.add_ramblock(rom.address, PAGE)
        raw.set_ram2(0x3000, PAGE, rom.address, b.HAX_RAM_INFO_ROM)
        ram.write(CODE, bytes.fromhex("a4f4"))
        vcpu = raw.vcpu()
        vcpu.real_mode_at(CODE, rsi=0x100, rdi=0x3000)
        with pytest.raises(ModelGap, match="ROM"):
            vcpu.run()
    finally:
        raw.close()


def test_paused_request_returns_without_running(model: Any, vm: RawVm) -> None:
    vcpu = guest(vm, "e410e611f4")
    vcpu.tunnel._exit_reason = b.HAX_EXIT_PAUSED
    assert vcpu.run() == b.HAX_EXIT_PAUSED
    assert vcpu.get_state()._rip == CODE, "the guest did not run"
    assert vcpu.tunnel._exit_reason == b.HAX_EXIT_PAUSED, "the request stays until userspace clears it"
    assert vcpu.run() == b.HAX_EXIT_PAUSED
    vcpu.tunnel._exit_reason = 0
    assert vcpu.run() == b.HAX_EXIT_IO


def test_user_event_ends_a_run_with_an_interrupt_exit(model: Any, vm: RawVm) -> None:
    vcpu = guest(vm, "ebfe")
    vcpu.tunnel.user_event_pending = 1
    assert run_within(model, vcpu) == b.HAX_EXIT_INTERRUPT
    assert vcpu.tunnel.user_event_pending == 0, "the driver consumed the event"


def test_the_kick_ends_a_spinning_guest(model: Any, vm: RawVm) -> None:
    """POSIX: a signal to the vCPU thread; Windows: HAX_VCPU_IOCTL_KICKOFF from any thread."""
    vcpu = guest(vm, "ebfe")
    running = threading.Event()
    hax_vcpu = next(iter(model.driver.vms[vm.vm_id].vcpus.values()))

    def kick() -> None:
        while hax_vcpu.running_thread is None:
            running.wait(0.001)
        if model.host_os == "win32":
            vcpu.control("KICKOFF")
            assert model.calls_named("HAX_KICKOFF")[-1].rule is None, "KICKOFF is for any thread"
        else:
            model.signal_thread(hax_vcpu.running_thread, 0)

    assert run_within(model, vcpu, before=kick) == b.HAX_EXIT_INTERRUPT


def test_interrupt_and_triple_fault_exits_leave_exit_reason(model: Any, vm: RawVm) -> None:
    """``exit_interrupt`` and ``exit_triple_fault`` (core/vcpu.c) never write
    ``_exit_reason``: it keeps the last handler's (here exit_io_access's 30)."""
    vcpu = guest(vm, "e610ebfe")  # out 0x10, al; jmp $
    assert vcpu.run() == b.HAX_EXIT_IO
    assert vcpu.tunnel._exit_reason == 30
    hax_vcpu = next(iter(model.driver.vms[vm.vm_id].vcpus.values()))
    hax_vcpu.cpu.kick()  # what the signal's or KICKOFF's IPI does: an external-interrupt exit
    assert run_within(model, vcpu) == b.HAX_EXIT_INTERRUPT
    assert vcpu.tunnel._exit_reason == 30, "exit_interrupt writes only _exit_status"
    vm.mem.write(CODE + 0x10, bytes.fromhex("e6100f0b"))  # type: ignore[attr-defined]
    vcpu.real_mode_at(CODE + 0x10)
    state = vcpu.get_state()
    state._idt.limit = 0  # #UD has nowhere to go: a triple fault
    vcpu.set_state(state)
    assert vcpu.run() == b.HAX_EXIT_IO
    assert vcpu.run() == b.HAX_EXIT_STATECHANGE
    assert vcpu.tunnel._exit_reason == 30, "exit_triple_fault writes no _exit_reason"


def test_plain_io_keeps_the_last_string_vaddr(model: Any, vm: RawVm) -> None:
    """``exit_io_access`` clears direction, df, port, size and count and
    ``handle_io`` sets count and flags; ``_vaddr`` keeps the last string exit's."""
    vm.mem.write(0x100, b"ab")  # type: ignore[attr-defined]
    vcpu = guest(vm, "f36ee410f4", rcx=2, rsi=0x100, rdx=0x10)
    assert vcpu.run() == b.HAX_EXIT_IO
    assert (vcpu.tunnel.io._flags, vcpu.tunnel.io._vaddr) == (1, 0x100)
    assert vcpu.run() == b.HAX_EXIT_IO
    io = vcpu.tunnel.io
    assert (io._direction, io._port, io._count, io._flags, io._df) == (b.HAX_IO_IN, 0x10, 1, 0, 0)
    assert io._vaddr == 0x100, "handle_io does not touch _vaddr"


def test_interrupts_queue_in_a_bitmap_highest_first(model: Any, vm: RawVm) -> None:
    """hax_set_pending_intr keeps every vector queued with INTERRUPT;
    vcpu_inject_intr enters the highest first and, while one is pending, the
    interrupt window does not reach userspace (cpu_vmexit_handler)."""
    from pyvmm_haxm.host import IN

    mem = vm.mem  # type: ignore[attr-defined]
    mem.write(0x80, bytes.fromhex("0011000000120000"))  # IVT: 0x20 -> 0:1100, 0x21 -> 0:1200
    mem.write(0x1100, bytes.fromhex("c6072043cf"))  # mov byte [bx], 0x20; inc bx; iret
    mem.write(0x1200, bytes.fromhex("c6072143cf"))  # mov byte [bx], 0x21; inc bx; iret
    vcpu = guest(vm, "bb0003fb9090e610f4", rsp=0x3000)  # mov bx, 0x300; sti; nop; nop; out 0x10, al; hlt
    for vector in (0x20, 0x21, 0x20):
        vcpu.control("INTERRUPT", ffi.new("uint32_t *", vector), IN)
    vcpu.tunnel.request_interrupt_window = 1
    assert vcpu.run() == b.HAX_EXIT_INTERRUPT, "the window reaches userspace once nothing is pending"
    assert mem.read(0x300, 3) == b"\x21\x20\x00", "0x21 first, 0x20 once (a bitmap)"
    assert vcpu.tunnel.ready_for_interrupt_injection == 1
    vcpu.tunnel.request_interrupt_window = 0
    assert vcpu.run() == b.HAX_EXIT_IO


def test_hlt_says_ready_whatever_if_is(model: Any, vm: RawVm) -> None:
    vcpu = guest(vm, "faf4")
    assert vcpu.run() == b.HAX_EXIT_HLT
    assert vcpu.tunnel.ready_for_interrupt_injection == 1, "exit_hlt sets it with IF clear too"
    assert not vcpu.get_state()._rflags & 0x200


def test_ready_follows_the_guest(model: Any, vm: RawVm) -> None:
    vcpu = guest(vm, "e610fb90e610f4")  # out 0x10, al (IF clear); sti; nop (its shadow); out 0x10, al
    assert vcpu.run() == b.HAX_EXIT_IO
    assert vcpu.tunnel.ready_for_interrupt_injection == 0
    assert vcpu.run() == b.HAX_EXIT_IO
    assert vcpu.tunnel.ready_for_interrupt_injection == 1


def test_a_panicked_vcpu_stays_dead(model: Any, vm: RawVm) -> None:
    vcpu = guest(vm, "0f0b")
    state = vcpu.get_state()
    state._idt.limit = 0  # no vector table: #UD has nowhere to go, a triple fault
    vcpu.set_state(state)
    assert vcpu.run() == b.HAX_EXIT_STATECHANGE
    vm.mem.write(CODE + 0x10, bytes.fromhex("e610f4"))  # type: ignore[attr-defined]
    vcpu.real_mode_at(CODE + 0x10)
    assert vcpu.run() == b.HAX_EXIT_STATECHANGE, "vcpu_is_panic: the guest does not run again"


def test_real_mode_without_unrestricted_guest(host_os: str) -> None:
    model = make_model(host_os, ug=False)
    with model.installed():
        raw = RawVm()
        try:
            vcpu = raw.vcpu()
            assert vcpu.run() == b.HAX_EXIT_REALMODE
        finally:
            raw.close()
    model.close_all()


def test_msr_batch_done(model: Any, vm: RawVm) -> None:
    vcpu = vm.vcpu()
    # LSTAR, then EFER with a reserved bit: the driver stops there.
    result = vcpu.msrs("SET_MSRS", [(MSR_LSTAR, 0x1234), (MSR_EFER, 0x2), (MSR_LSTAR, 0x5678)], done=0x77)
    read = vcpu.msrs("GET_MSRS", [(MSR_LSTAR, 0), (MSR_EFER, 0), (0xDEAD, 0)])
    assert (read.done, read.entries[0].value, read.entries[1].value) == (2, 0x1234, 0), "stopped at the refused MSR"
    if model.host_os == "linux":
        assert result.done == 0x77, "the Linux driver does not copy SET_MSRS back (components.c)"
    else:
        assert result.done == 1


def test_apic_base_bsp_and_vcpu_set_apic_base(model: Any, vm: RawVm) -> None:
    """vcpu_init gives APIC_BASE_BSP to vCPU 0 only (vm->bsp_vcpu_id stays 0);
    vcpu_set_apic_base refuses reserved bits, a relocation and BSP on an AP."""
    bsp, ap = vm.vcpu(0), vm.vcpu(1)
    assert bsp.msrs("GET_MSRS", [(0x1B, 0)]).entries[0].value == 0xFEE0_0900
    assert ap.msrs("GET_MSRS", [(0x1B, 0)]).entries[0].value == 0xFEE0_0800
    for vcpu, value in ((ap, 0xFEE0_0900), (bsp, 0xFED0_0900), (bsp, 0xFEE0_0901)):
        vcpu.msrs("SET_MSRS", [(0x1B, value)])
        assert vcpu.msrs("GET_MSRS", [(0x1B, 0)]).entries[0].value != value, f"{value:#x} refused"
    bsp.msrs("SET_MSRS", [(0x1B, 0xFEE0_0100)])  # the APIC disabled: allowed
    assert bsp.msrs("GET_MSRS", [(0x1B, 0)]).entries[0].value == 0xFEE0_0100


def test_fpu_image_is_all_zero_until_set_fpu(model: Any, vm: RawVm) -> None:
    """vcpu_create clears the guest FXSAVE page and vcpu_init_fx writes none of it:
    a RUN would FXRSTOR FCW 0 and MXCSR 0, which the software CPU cannot load."""
    from pyvmm.testing.driver_model import ModelGap
    from pyvmm_haxm.host import OUT

    vm.mem.write(CODE, bytes.fromhex("f4"))  # type: ignore[attr-defined]
    vcpu = vm.vcpu(power_up_fpu=False)
    fx = ffi.new("struct fx_layout *", {"fcw": 0x1234, "mxcsr": 0x5678})
    vcpu.control("GET_FPU", fx, OUT)
    assert bytes(ffi.buffer(fx)) == bytes(512)
    vcpu.real_mode_at(CODE)
    with pytest.raises(ModelGap, match="FPU"):
        vcpu.run()


def test_get_regs_leaves_the_fields_vcpu_get_regs_does_not_write(model: Any, vm: RawVm) -> None:
    """``vcpu_get_regs`` writes no ``_pde``, ``_efer``, SYSENTER MSRs, activity or
    interruptibility state: GET_REGS hands back what its buffer held -- Linux's
    stack ``vc_state`` (never the vCPU's values), macOS's copied-in argument,
    Windows' system buffer (the input bytes where there are any)."""
    from pyvmm_haxm.host import INOUT, OUT

    vcpu = vm.vcpu()
    vcpu.msrs("SET_MSRS", [(MSR_EFER, 0x100), (0x174, 0x10)])
    sent = (0x5A5A_0001, 0x5A5A_0002, 0x5A5A_0003)

    def get_regs(direction: Any) -> Any:
        state = ffi.new("struct vcpu_state_t *")
        state._pde, state._efer, state._sysenter_cs = sent
        vcpu.control("GET_REGS", state, direction)
        return state

    state = get_regs(OUT)
    assert state._rip == 0xFFF0, "the written fields are the vCPU's"
    unwritten = (state._pde, state._efer, state._sysenter_cs)
    if model.host_os == "darwin":
        assert unwritten == sent, "BSD ioctl copied the argument in and back"
    else:
        assert state._efer != 0x100 and state._sysenter_cs != 0x10, "not the vCPU's EFER or SYSENTER_CS"
        assert unwritten != sent, "not the caller's bytes either: the kernel's buffer"
    if model.host_os == "win32":
        state = get_regs(INOUT)
        assert (state._pde, state._efer, state._sysenter_cs) == sent, "METHOD_BUFFERED: the input stays"


def test_rep_string_touching_mmio_is_a_model_gap(model: Any, vm: RawVm) -> None:
    """em_emulate_insn runs a REP instruction's iterations itself, flushing
    RCX/RSI/RDI between accesses: the model does not guess that protocol."""
    from pyvmm.testing.driver_model import ModelGap

    vcpu = guest(vm, "f3a4f4", rcx=2, rsi=0x5000, rdi=0x100)  # rep movsb from no RAM to RAM
    with pytest.raises(ModelGap, match="REP"):
        vcpu.run()


def test_hardware_breakpoints_are_a_model_gap(model: Any, vm: RawVm) -> None:
    from pyvmm.testing.driver_model import ModelGap

    vcpu = guest(vm, "f4")
    state = vcpu.get_state()
    state._dr0, state._dr7 = CODE, 0x1  # L0: break at CODE
    vcpu.set_state(state)
    assert vcpu.get_state()._dr7 == 0x401
    with pytest.raises(ModelGap, match="hardware breakpoints"):
        vcpu.run()
