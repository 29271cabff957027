"""pyvmm-haxm on the driver model of each host OS: the capability checks, the RAM
calls the capabilities choose, registers, MSR batches, string I/O with the
direction flag, the fast-MMIO copy, the kick, interrupts after HLT, and nothing
left behind on close (``docs/backends/haxm.md`` §4-§7)."""

from __future__ import annotations

import os
import struct
import threading
import time
from typing import Any

import pytest
from conftest import make_backend, make_model

from pyvmm.arch.x86_64 import Fpu, MsrEntry
from pyvmm.config import PAGE_SIZE
from pyvmm.errors import ConfigError, MsrAccessError
from pyvmm.exits import ExitKind, InterruptedExit, IoExit, MmioExit
from pyvmm.testing.conformance import programs as p
from pyvmm.testing.conformance.harness import booted, expect_io, run_to
from pyvmm.vm import Backend
from pyvmm_haxm import bindings as b
from pyvmm_haxm import model as m
from pyvmm_haxm.system import UnsupportedDriver

MSR_STAR, MSR_LSTAR, MSR_EFER = 0xC0000081, 0xC0000082, 0xC0000080

DF_OUTSB = p.GuestProgram(
    "df_outsb",
    p.Arch.X86_64,
    """
    lea rsi, [rip + message + 4]
    mov ecx, 5
    mov dx, 0x10
    std
    rep outsb
    cld
    hlt
message:
    .ascii "hello"
""",
    bytes.fromhex("488d3512000000b90500000066ba1000fdf36efcf468656c6c6f"),
)
DF_INSB = p.GuestProgram(
    "df_insb",
    p.Arch.X86_64,
    """
    lea rdi, [rip + buffer + 3]
    mov ecx, 4
    mov dx, 0x10
    std
    rep insb
    cld
    lea rsi, [rip + buffer]
    mov ecx, 4
    mov dx, 0x11
    rep outsb
    hlt
buffer:
    .byte 0, 0, 0, 0
""",
    bytes.fromhex("488d3d23000000b90400000066ba1000fdf36cfc488d350c000000b90400000066ba1100f36ef400000000"),
)
LONG_OUTSW = p.GuestProgram(
    "long_outsw",
    p.Arch.X86_64,
    """
    mov esi, 0x150000
    mov ecx, 100
    mov dx, 0x10
    rep outsw
    hlt
""",
    bytes.fromhex("be00001500b96400000066ba100066f36ff4"),
)
CLI_HLT = p.GuestProgram("cli_hlt", p.Arch.X86_64, "cli\nhlt\n", bytes.fromhex("faf4"))
STI_HLT = p.GuestProgram("sti_hlt", p.Arch.X86_64, "sti\nhlt\n", bytes.fromhex("fbf4"))


@pytest.mark.parametrize("program", [DF_OUTSB, DF_INSB, LONG_OUTSW, CLI_HLT, STI_HLT], ids=lambda g: g.name)
def test_guest_sources(program: p.GuestProgram) -> None:
    assembled = program.assembled()
    if assembled is None:
        pytest.skip("no GNU as here")
    assert assembled == program.code


# --- the driver checks --------------------------------------------------------------


def _unavailable(host_os: str, **options: Any) -> str:
    model = make_model(host_os, **options)
    with model.installed():
        availability = make_backend().availability()
    model.close_all()
    assert not availability.available
    return availability.reason


def test_needs_unrestricted_guest(host_os: str) -> None:
    assert "unrestricted guest" in _unavailable(host_os, ug=False)


def test_needs_fast_mmio(host_os: str) -> None:
    assert "HAX_CAP_FASTMMIO" in _unavailable(host_os, caps=m.CAP_EPT | m.CAP_64BIT_SETRAM)


def test_needs_a_working_driver(host_os: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # VT-x off: wstatus 0, winfo FAILREASON_VT (core/hax.c hax_get_capability).
    monkeypatch.setattr(m.Driver, "capability", lambda self: struct.pack("<HHIQ", 0, 1, 0, 0))
    assert "VT-x is disabled" in _unavailable(host_os)


def test_needs_api_v4(host_os: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(m.Driver, "version", lambda self: struct.pack("<II", 1, 3))
    assert "API v4" in _unavailable(host_os)


def test_unsupported_driver_pickles() -> None:
    import pickle

    error = pickle.loads(pickle.dumps(UnsupportedDriver("why")))
    assert error.reason == "why"


def test_unavailable_here_says_legacy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a model, on this machine: no /dev/HAX, and the reason says why."""
    from pyvmm_haxm import system
    from pyvmm_haxm.host import HaxHostSwitch

    monkeypatch.setattr(system, "HOST", HaxHostSwitch())
    availability = system.probe()
    assert not availability.available
    assert "/dev/HAX does not exist" in availability.reason
    assert "archived it in 2023" in availability.reason


def test_memory_quota(host_os: str) -> None:
    model = make_model(host_os, mem_quota=0x300000)
    with model.installed():
        backend = make_backend()
        with backend.create_vm({"arch": "x86_64"}) as vm:
            vm.add_memory(0, 0x200000)
            with pytest.raises(ConfigError, match="quota"):
                vm.add_memory(0x400000, 0x200000)
            assert len(vm.memory) == 1
            assert len(model.driver.vms[0].slots) == 1
    model.close_all()
    model.assert_no_rejections()


def _names(model: Any) -> list[str]:
    return [c.name for c in model.calls if c.name.startswith("HAX_")]


def test_ram_calls_follow_the_capabilities(host_os: str) -> None:
    """Without the 64-bit RAM API: ALLOC_RAM and SET_RAM; without implicit RAM
    blocks: ADD_RAMBLOCK then SET_RAM2, and a block registered once."""
    legacy = make_model(host_os, caps=m.CAP_FASTMMIO)
    with legacy.installed(), booted(make_backend(), p.PIO_OUT) as (_, vcpu):
        assert expect_io(vcpu).data[0] == 0x5A
    names = _names(legacy)
    assert "HAX_ALLOC_RAM" in names and "HAX_SET_RAM" in names
    assert "HAX_SET_RAM2" not in names and "HAX_ADD_RAMBLOCK" not in names
    legacy.assert_no_rejections()
    legacy.close_all()

    classic = make_model(host_os, caps=m.CAP_FASTMMIO | m.CAP_64BIT_RAMBLOCK | m.CAP_64BIT_SETRAM)
    with classic.installed(), booted(make_backend(), p.READ_TWICE) as (vm, vcpu):
        region = vm.add_memory(0x300000, PAGE_SIZE)
        vm.memory.write_u8(0x300000, 0x99)
        assert expect_io(vcpu).data[0] == 0x99
        vm.remove_memory(region)
        read = run_to(vcpu, ExitKind.MMIO)
        assert isinstance(read, MmioExit)
        read.data[0] = 0x42
        assert expect_io(vcpu).data[0] == 0x42
    names = _names(classic)
    assert "HAX_ADD_RAMBLOCK" in names and "HAX_SET_RAM2" in names
    classic.assert_no_rejections()
    classic.close_all()


def test_standalone_mappings_by_default(haxm: Backend, model: Any) -> None:
    with booted(haxm, p.HLT):
        pass
    assert "HAX_ADD_RAMBLOCK" not in _names(model)
    assert "HAX_NOTIFY_QEMU_VERSION" in _names(model) or "HAX_CAPABILITY" in _names(model)


def test_bad_options_and_too_many_vcpus(haxm: Backend, model: Any) -> None:
    with pytest.raises(ConfigError, match="no options"):
        haxm.create_vm({"arch": "x86_64", "backend_options": {"x": 1}})
    with pytest.raises(ConfigError, match="16"):
        haxm.create_vm({"arch": "x86_64", "vcpus": 17})
    assert not model.driver.vms, "no VM left behind"


# --- registers and MSRs ---------------------------------------------------------------


def test_registers_round_trip(haxm: Backend, model: Any) -> None:
    with booted(haxm, p.SET_RAX) as (_, vcpu):
        sregs = vcpu.get_sregs()
        # EFER as the MSR has it (GET_REGS never writes _efer): LME | LMA, SCE as booted.
        assert sregs.cs.l == 1 and sregs.efer & ~0x1 == 0x500
        assert sregs.apic_base == 0xFEE00900
        sregs.cr2 = 0x1234000
        vcpu.set_sregs(sregs)
        assert vcpu.get_sregs().cr2 == 0x1234000
        regs = vcpu.get_regs()
        regs.r15, regs.rbp = 0xF00D, 0xBEEF
        vcpu.set_regs(regs)
        again = vcpu.get_regs()
        assert (again.r15, again.rbp) == (0xF00D, 0xBEEF)


def test_a_new_vcpu_has_the_power_up_fpu(haxm: Backend, model: Any) -> None:
    """HAXM's image is all zero (FCW 0: every exception unmasked); pyvmm-haxm
    loads FCW 0x37F and MXCSR 0x1F80 when it makes the vCPU."""
    with haxm.create_vm({"arch": "x86_64"}) as vm:
        fpu = vm.create_vcpu().get_fpu()
        assert (fpu.fcw, fpu.mxcsr) == (0x37F, 0x1F80)


def test_fpu_round_trip(haxm: Backend, model: Any) -> None:
    with booted(haxm, p.HLT) as (_, vcpu):
        fpu = vcpu.get_fpu()
        assert (fpu.fcw, fpu.mxcsr) == (0x37F, 0x1F80)
        wanted = Fpu(fcw=0x27F, mxcsr=0x1FA0, xmm=[bytes([i]) * 16 for i in range(16)], fpr=[b"\x01" * 16] * 8)
        vcpu.set_state(p_state("fpu"), wanted)
        got = vcpu.get_fpu()
        assert (got.fcw, got.mxcsr, got.xmm, got.fpr) == (0x27F, 0x1FA0, wanted.xmm, [b"\x01" * 16] * 8)
        vcpu.set_state(p_state("fpu"), fpu)  # back to what the software CPU has


def p_state(name: str) -> Any:
    from pyvmm.vcpu_state import StateKind

    return StateKind(name)


def test_msr_batches_of_31(haxm: Backend, model: Any) -> None:
    with booted(haxm, p.HLT) as (_, vcpu):
        entries = [MsrEntry(MSR_LSTAR, 0x1000 + i) for i in range(40)]
        vcpu.set_msrs(entries)
        assert [e.data for e in vcpu.get_msrs([MSR_LSTAR] * 40)] == [0x1027] * 40
        assert len(model.calls_named("HAX_SET_MSRS")) >= 2


def test_refused_msr_is_named(haxm: Backend, model: Any) -> None:
    with booted(haxm, p.HLT) as (_, vcpu):
        entries = [MsrEntry(MSR_STAR, 1)] * 33 + [MsrEntry(MSR_EFER, 0x2), MsrEntry(MSR_STAR, 2)]
        with pytest.raises(MsrAccessError) as info:
            vcpu.set_msrs(entries)
        assert (info.value.index, info.value.position, info.value.write) == (MSR_EFER, 33, True)
        with pytest.raises(MsrAccessError) as read:
            vcpu.get_msrs([MSR_STAR, 0xDEAD])
        assert (read.value.index, read.value.position, read.value.completed) == (0xDEAD, 1, ((MSR_STAR, 1),))


# --- the exit protocol ----------------------------------------------------------------


def test_string_out_with_direction_flag_in_transfer_order(haxm: Backend, model: Any) -> None:
    with booted(haxm, DF_OUTSB) as (_, vcpu):
        io = expect_io(vcpu)
        assert (io.count, io.size, io.is_write) == (5, 1, True)
        assert bytes(io.data) == b"olleh", "the device sees the items in the order the CPU moved them"
        run_to(vcpu, ExitKind.HLT)


def test_string_in_with_direction_flag(haxm: Backend, model: Any) -> None:
    with booted(haxm, DF_INSB) as (_, vcpu):
        read = expect_io(vcpu)
        assert (read.count, read.is_write) == (4, False)
        read.data[:4] = b"abcd"  # in transfer order: 'a' goes to buffer + 3
        write = expect_io(vcpu)
        assert (write.port, bytes(write.data)) == (0x11, b"dcba")
        run_to(vcpu, ExitKind.HLT)


def test_long_string_in_64_byte_batches(haxm: Backend, model: Any) -> None:
    with booted(haxm, LONG_OUTSW) as (vm, vcpu):
        words = b"".join(struct.pack("<H", i) for i in range(100))
        vm.memory.write(0x150000, words)
        seen = bytearray()
        counts = []
        while True:
            exit_ = vcpu.run()
            if exit_.kind is ExitKind.HLT:
                break
            assert isinstance(exit_, IoExit) and exit_.size == 2
            counts.append(exit_.count)
            seen += exit_.data
        assert counts == [32, 32, 32, 4]
        assert bytes(seen) == words


def test_fast_mmio_copy_is_a_read_then_a_write(haxm: Backend, model: Any) -> None:
    """Direction 2 (``hax_fastmmio.gpa2``, "since API v4" in hax_interface.h): copy
    ``gpa`` to ``gpa2``.  HAXM 7.8's emulator never produces it (MOVS between two
    MMIO addresses is a read exit, then a write exit: core/emulate.c), nor does
    the model, so the exit is written into the I/O buffer by hand."""
    with booted(haxm, p.HLT) as (_, vcpu):
        handle = vcpu.handle
        real_run = handle._run_request

        def copy_exit(fd: int) -> int:
            struct.pack_into("<QQBB", handle._io_view, 0, 0xD0000000, 0xD0001000, 4, b.HAX_FASTMMIO_COPY)
            handle._tunnel._exit_status = b.HAX_EXIT_FAST_MMIO
            return 0

        handle._run_request = copy_exit
        read = vcpu.run()
        assert isinstance(read, MmioExit)
        assert (read.address, read.size, read.is_write) == (0xD0000000, 4, False)
        read.data[:4] = b"\x01\x02\x03\x04"
        handle._run_request = real_run
        write = vcpu.run()
        assert isinstance(write, MmioExit)
        assert (write.address, write.size, write.is_write, bytes(write.data)) == (
            0xD0001000,
            4,
            True,
            b"\x01\x02\x03\x04",
        )
        run_to(vcpu, ExitKind.HLT)


def test_ready_after_hlt_follows_if(haxm: Backend, model: Any) -> None:
    """HAXM says "ready" at every HLT exit; with IF clear the interrupt could not
    be taken, and pyvmm-haxm says so."""
    with booted(haxm, CLI_HLT) as (_, vcpu):
        run_to(vcpu, ExitKind.HLT)
        assert not vcpu.ready_for_interrupt()
    with booted(haxm, STI_HLT) as (_, vcpu):
        run_to(vcpu, ExitKind.HLT)
        assert vcpu.ready_for_interrupt()


def test_kick_from_another_thread_and_no_stale_pause(haxm: Backend, model: Any) -> None:
    with booted(haxm, p.SPIN) as (_, vcpu):
        timer = threading.Timer(0.1, vcpu.kick)
        timer.start()
        started = time.monotonic()
        assert isinstance(vcpu.run(), InterruptedExit)
        assert time.monotonic() - started < 10
        timer.join()
        tunnel = vcpu.handle._tunnel
        assert tunnel._exit_reason != b.HAX_EXIT_PAUSED and tunnel.user_event_pending == 0, "the kick was cleared"


def test_close_leaves_nothing(haxm: Backend, model: Any) -> None:
    before = set(os.listdir("/proc/self/fd"))
    with booted(haxm, p.PIO_OUT) as (_, vcpu):
        expect_io(vcpu)
    assert not model.driver.vms
    # Only the system device stays open: every VM of the host shares it.
    left = model.handles.values() if model.host_os == "win32" else model.files.values()
    assert [type(obj).__name__ for obj in left] in (["SystemFile"], ["WinSystemHandle"])
    assert set(os.listdir("/proc/self/fd")) <= before | {str(fd) for fd in getattr(model, "files", {})}


def test_one_thread_per_vcpu(haxm: Backend, model: Any) -> None:
    """Two vCPUs of one VM, each created and run on a thread of its own, as HAXM
    wants (docs/api.md): each runs its guest, and no request came from a thread
    other than its vCPU's."""
    from pyvmm.boot import BootSpec, X86Mode

    with haxm.create_vm({"arch": "x86_64", "vcpus": 2}) as vm:
        vm.add_memory(0, p.RAM_SIZE)
        vm.memory.write(p.CODE_ADDRESS, p.PIO_OUT.code)
        vm.set_boot(BootSpec(arch="x86_64", entry=p.CODE_ADDRESS, stack=p.STACK_TOP, x86_mode=X86Mode.LONG))
        ready, started, booted_state = threading.Barrier(3), threading.Event(), threading.Event()
        results: dict[int, tuple[int, int]] = {}
        state: list[Any] = []
        errors: list[BaseException] = []

        def vcpu_thread(index: int) -> None:
            try:
                vcpu = vm.create_vcpu(index)
                vcpu.apply_boot()
                if index == 0:
                    state.extend((vcpu.get_sregs(), vcpu.get_regs()))
                    booted_state.set()
                else:
                    # No INIT/SIPI without an interrupt controller: the VMM starts
                    # the second vCPU where the first one starts.
                    booted_state.wait(10)
                    vcpu.set_sregs(state[0])
                    vcpu.set_regs(state[1])
                ready.wait(10)
                started.wait(10)
                io = vcpu.run()
                assert isinstance(io, IoExit)
                results[index] = (io.port, io.data[0])
                assert vcpu.run().kind is ExitKind.HLT
            except BaseException as exc:  # noqa: BLE001 - handed back to the test
                errors.append(exc)

        threads = [threading.Thread(target=vcpu_thread, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        ready.wait(10)
        vm.start()
        started.set()
        for thread in threads:
            thread.join(30)
        assert not errors, errors
        assert results == {0: (0x10, 0x5A), 1: (0x10, 0x5A)}
    assert model.rejections == [], [str(r.rule) for r in model.rejections]


def test_a_short_tunnel_is_refused_and_nothing_left(haxm: Backend, model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver reporting a tunnel smaller than ``struct hax_tunnel`` (QEMU's
    ``valid_hax_tunnel_size``) gets no vCPU made on it, and its device is closed."""
    from pyvmm.errors import HypervisorError

    packed = struct.Struct("<QQH6x")
    if model.host_os == "win32":
        original = m.WinVcpuHandle.setup_tunnel

        def short_win(self: Any, data: bytes, out_size: int) -> bytes:
            va, io_va, _ = packed.unpack(original(self, data, out_size))
            return packed.pack(va, io_va, 16)

        monkeypatch.setattr(m.WinVcpuHandle, "setup_tunnel", short_win)
    else:
        original_posix = m.VcpuFile.setup_tunnel

        def short_posix(self: Any, arg: int) -> int:
            original_posix(self, arg)
            va, io_va, _ = packed.unpack(self.model.copy_from_user(arg, packed.size))
            self.model.copy_to_user(arg, packed.pack(va, io_va, 16))
            return 0

        monkeypatch.setattr(m.VcpuFile, "setup_tunnel", short_posix)
    with haxm.create_vm({"arch": "x86_64"}) as vm:
        with pytest.raises(HypervisorError, match="16-byte tunnel"):
            vm.create_vcpu(0)
        open_vcpus = [o for o in (model.handles.values() if model.host_os == "win32" else model.files.values())]
        assert not [o for o in open_vcpus if "Vcpu" in type(o).__name__], "the vCPU device was closed"


def test_probe_without_the_system_device(host_os: str) -> None:
    """No ``/dev/HAX`` (ENOENT) or ``\\\\.\\HAX`` (ERROR_FILE_NOT_FOUND): unavailable,
    and the reason names the device and says HAXM is legacy."""
    model = make_model(host_os)
    system_path = next(iter(model.devices))
    del model.devices[system_path]
    reason = ""
    with model.installed():
        availability = make_backend().availability()
        reason = availability.reason
        assert not availability.available
    assert f"{system_path} does not exist" in reason
    assert "legacy backend" in reason


def test_debug_registers_round_trip(haxm: Backend, model: Any) -> None:
    from pyvmm.arch.x86_64 import DebugRegs

    with booted(haxm, p.HLT) as (_, vcpu):
        assert vcpu.get_debug_regs() == DebugRegs()  # vcpu_init: DR6 0xffff0ff0, DR7 0x400
        vcpu.set_state(p_state("debug_regs"), DebugRegs(db=(0x1000, 0x2000, 0, 0x4000), dr6=0x1, dr7=0x0))
        got = vcpu.get_debug_regs()
        assert got.db == (0x1000, 0x2000, 0, 0x4000)
        assert (got.dr6, got.dr7) == (0xFFFF0FF1, 0x400), "the driver forces the reserved bits (fix_dr6/7)"
        run_to(vcpu, ExitKind.HLT)
