"""pyvmm's x86_64 machine on real KVM: the demo guest end to end (CLI in-process
and ``python -m pyvmm run``), every way a run ends, unhandled accesses, device
errors, two vCPUs brought up by the guest's INIT/SIPI, and statistics."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pyvmm import cli
from pyvmm.boot import X86Mode
from pyvmm.config import Arch
from pyvmm.devices.base import Device
from pyvmm.machine import DeviceError, GuestImage, Machine, MachineConfig, RunResult, StopReason
from pyvmm.testing.conformance.programs import GuestProgram
from pyvmm.vm import Backend

LOAD = 0x100000
#: This machine's KVM is kvm_pvm, a software one (plugins/pyvmm-kvm/tests/test_kvm_interrupts.py says how it differs).
SOFTWARE_KVM = Path("/sys/module/kvm_pvm").is_dir()
STACK = 0x90000
#: Where the SMP test's AP starts: SIPI vector 8.
AP_START = 0x8000


def program(name: str, source: str, code: str, directive: str = ".code64") -> GuestProgram:
    return GuestProgram(name, Arch.X86_64, source, bytes.fromhex(code), directive)


DEBUG_EXIT_0X21 = program(
    "debug_exit_0x21",
    """
    mov eax, 0x21
    out 0xf4, eax
1:  hlt
    jmp 1b
""",
    "b821000000e7f4f4ebfd",
)

#: realmode.flat's form: an 8-bit OUT.
DEBUG_EXIT_BYTE = program(
    "debug_exit_byte",
    """
    mov al, 0x10
    out 0xf4, al
1:  hlt
    jmp 1b
""",
    "b010e6f4f4ebfd",
)

I8042_RESET = program(
    "i8042_reset",
    """
    mov al, 0xfe
    out 0x64, al
1:  hlt
    jmp 1b
""",
    "b0fee664f4ebfd",
)

#: An exception with an empty IDT: #UD -> #DF -> triple fault.
TRIPLE_FAULT = program(
    "triple_fault",
    """
    lidt [rip + idt]
    ud2
idt:
    .word 0
    .quad 0
""",
    "0f011d020000000f0b00000000000000000000",
)

SPIN = program(
    "spin",
    """
1:  jmp 1b
""",
    "ebfe",
)

#: Says it is about to spin (port 0x10), then spins: for the Ctrl-C test.
ANNOUNCE_AND_SPIN = program(
    "announce_and_spin",
    """
    mov al, 1
    out 0x10, al
1:  jmp 1b
""",
    "b001e610ebfe",
)

#: Reads a port and an MMIO address nobody handles; stores what it got at 0x5000.
UNHANDLED = program(
    "unhandled",
    """
    mov dx, 0x1234
    in eax, dx
    mov [0x5000], eax
    in ax, dx
    mov [0x5004], ax
    mov rbx, 0xfeb10000
    mov eax, [rbx]
    mov [0x5008], eax
    xor eax, eax
    out 0xf4, eax
""",
    "66ba3412ed8904250050000066ed668904250450000048bb0000b1fe000000008b038904250850000031c0e7f4",
)

OUT_0X10 = program(
    "out_0x10",
    """
    mov dx, 0x10
    mov al, 0x5a
    out dx, al
    xor eax, eax
    out 0xf4, eax
""",
    "66ba1000b05aee31c0e7f4",
)

#: XGETBV in kernel mode: kvm_pvm cannot emulate it.  Hardware KVM runs it, and
#: with CR4.OSXSAVE clear it raises #UD, which with no IDT is a triple fault.
XGETBV = program(
    "xgetbv",
    """
    xor ecx, ecx
    xgetbv
    xor eax, eax
    out 0xf4, eax
""",
    "31c90f01d031c0e7f4",
)

#: vCPU 0: enable the local APIC, INIT and SIPI (vector 8) to all others, wait
#: for the AP's flag at 0x9000, say 0 on port 0x10, exit with code 0.
SMP_BSP = program(
    "smp_bsp",
    """
    mov rbx, 0xfee00000
    mov dword ptr [rbx + 0xf0], 0x1ff
    mov dword ptr [rbx + 0x310], 0
    mov dword ptr [rbx + 0x300], 0xc4500
1:  test dword ptr [rbx + 0x300], 0x1000
    jnz 1b
    mov dword ptr [rbx + 0x300], 0xc4608
2:  test dword ptr [rbx + 0x300], 0x1000
    jnz 2b
3:  cmp byte ptr [0x9000], 1
    jne 3b
    mov al, 0
    out 0x10, al
    xor eax, eax
    out 0xf4, eax
""",
    "48bb0000e0fe00000000c783f0000000ff010000c7831003000000000000c7830003000000450c00f783000300000010000075f4"
    "c7830003000008460c00f783000300000010000075f4803c25009000000175f6b000e61031c0e7f4",
)

#: The AP, in real mode at 0x8000 after the SIPI: say 1 on port 0x10, set the flag, halt.
SMP_AP = program(
    "smp_ap",
    """
    mov al, 1
    out 0x10, al
    xor ax, ax
    mov ds, ax
    mov byte ptr [0x9000], 1
1:  hlt
    jmp 1b
""",
    "b001e61031c08ed8c606009001f4ebfd",
    ".code16",
)

PROGRAMS = (
    DEBUG_EXIT_0X21,
    DEBUG_EXIT_BYTE,
    I8042_RESET,
    TRIPLE_FAULT,
    SPIN,
    ANNOUNCE_AND_SPIN,
    UNHANDLED,
    OUT_0X10,
    XGETBV,
    SMP_BSP,
    SMP_AP,
)

GREETING = b"pyvmm demo guest: hello from 64-bit long mode!"


def image(prog: GuestProgram, *extra: tuple[int, bytes]) -> GuestImage:
    return GuestImage(prog.name, ((LOAD, prog.code), *extra), LOAD, X86Mode.LONG, stack=STACK)


def run(kvm: Backend, prog: GuestProgram, *extra: tuple[int, bytes], **settings: object) -> RunResult:
    config = MachineConfig.from_mapping({"serial": "none", **settings})
    with Machine(config, backend=kvm, image=image(prog, *extra)) as machine:
        return machine.run()


class Recorder(Device):
    """Port 0x10: remembers each byte written and the thread that wrote it."""

    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[tuple[int, str]] = []

    def write(self, offset: int, size: int, value: int) -> None:
        self.seen.append((value, threading.current_thread().name))


@pytest.mark.parametrize("prog", PROGRAMS, ids=lambda p: p.name)
def test_program_bytes_match_their_source(prog: GuestProgram) -> None:
    assembled = prog.assembled()
    if assembled is None:
        pytest.skip("no GNU as/objcopy on this machine")
    assert assembled == prog.code


# --- the demo guest ---------------------------------------------------------------


def test_demo_through_cli_main(kvm: Backend, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    serial = tmp_path / "serial.log"
    assert cli.main(["run", "--backend", "kvm", "--serial", str(serial)]) == 0
    output = serial.read_bytes()
    assert output.startswith(GREETING)
    assert b'fw_cfg signature "QEMU" ok, 1 vCPU(s)' in output
    assert b'mmio: demo device id "PVMM" ok, 64-bit scratch round trip ok' in output
    assert b"FAILED" not in output
    assert capsys.readouterr().err == "pyvmm: backend kvm (--backend), x86_64 guest\n"  # the one line on stderr


def test_demo_as_a_subprocess(kvm: Backend) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pyvmm", "run"],
        capture_output=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYVMM_BACKEND": "kvm"},
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.startswith(GREETING)
    assert b"powering off through port 0x8900" in result.stdout
    assert result.stderr == b"pyvmm: backend kvm ($PYVMM_BACKEND), x86_64 guest\n"


def test_demo_on_two_vcpus(kvm: Backend, tmp_path: Path) -> None:
    serial = tmp_path / "serial.log"
    assert cli.main(["run", "--backend", "kvm", "--cpus", "2", "--serial", str(serial)]) == 0
    assert b"1 vCPU" not in serial.read_bytes()
    assert b'"QEMU" ok, 2 vCPU(s)' in serial.read_bytes()


def test_demo_stats(kvm: Backend, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--backend", "kvm", "--serial", "none", "--stats"]) == 0
    err = capsys.readouterr().err
    assert "pyvmm: stats: backend kvm," in err
    assert "io " in err and "mmio 3" in err  # the ID read, the scratch write and its read back
    assert "in guest" in err and "in Python" in err


# --- how a run ends -----------------------------------------------------------------


@pytest.mark.parametrize(("prog", "status"), [(DEBUG_EXIT_0X21, 0x43), (DEBUG_EXIT_BYTE, 0x21)])
def test_debug_exit_status(kvm: Backend, prog: GuestProgram, status: int) -> None:
    result = run(kvm, prog)
    assert (result.reason, result.status) == (StopReason.DEBUG_EXIT, status)


def test_debug_exit_status_through_the_cli(kvm: Backend, tmp_path: Path) -> None:
    kernel = tmp_path / "exit.bin"
    kernel.write_bytes(DEBUG_EXIT_0X21.code)
    status = cli.main(["run", "--backend", "kvm", "--kernel", str(kernel), "--load-address", "0x100000"])
    assert status == 0x43


def test_reset_through_the_i8042(kvm: Backend) -> None:
    result = run(kvm, I8042_RESET)
    assert (result.reason, result.status) == (StopReason.RESET, 0)


def test_triple_fault_stops_the_machine(kvm: Backend) -> None:
    result = run(kvm, TRIPLE_FAULT)
    assert (result.reason, result.status) == (StopReason.TRIPLE_FAULT, 4)
    assert "vCPU 0: triple fault at rip" in result.detail


def test_timeout(kvm: Backend) -> None:
    start = time.monotonic()
    result = run(kvm, SPIN, timeout=0.5)
    elapsed = time.monotonic() - start
    assert (result.reason, result.status) == (StopReason.TIMEOUT, 124)
    assert 0.5 <= elapsed < 10


def test_timeout_through_the_cli(kvm: Backend, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kernel = tmp_path / "spin.bin"
    kernel.write_bytes(SPIN.code)
    argv = ["run", "--backend", "kvm", "--kernel", str(kernel), "--load-address", "0x100000", "--timeout", "0.3"]
    assert cli.main(argv) == 124
    assert "pyvmm: timeout: timeout after 0.3 s" in capsys.readouterr().err


def test_emulation_failure_shows_the_instruction(kvm: Backend) -> None:
    result = run(kvm, XGETBV)
    if not SOFTWARE_KVM:
        assert result.reason is StopReason.TRIPLE_FAULT, result  # the #UD, unhandled
        pytest.skip("this KVM executes XGETBV in hardware: no emulation failure to observe")
    assert (result.reason, result.status) == (StopReason.EMULATION_ERROR, 4)
    assert "instruction bytes: 0f 01 d0" in result.detail


def test_ctrl_c_stops_a_spinning_guest(kvm: Backend) -> None:
    script = f"""
import sys
from pyvmm.boot import X86Mode
from pyvmm.devices.base import Device
from pyvmm.machine import GuestImage, Machine, MachineConfig

class Announce(Device):
    def write(self, offset, size, value):
        print("spinning", flush=True)

code = bytes.fromhex({ANNOUNCE_AND_SPIN.code.hex()!r})
with Machine(MachineConfig(backend="kvm", serial="none", timeout=60),
             image=GuestImage("spin", ((0x100000, code),), 0x100000, X86Mode.LONG)) as machine:
    machine.pio.register(0x10, 1, Announce())
    result = machine.run()
print(result.reason.value, flush=True)
sys.exit(result.status)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "spinning"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert out.strip() == "interrupted"


# --- devices and the buses ------------------------------------------------------------


def test_unhandled_reads_return_all_ones_and_are_logged_once(kvm: Backend, caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="pyvmm.machine"),
        Machine(MachineConfig(serial="none"), backend=kvm, image=image(UNHANDLED)) as machine,
    ):
        result = machine.run()
        stored = machine.vm.memory.read(0x5000, 12)
    assert result.status == 1
    assert stored == bytes.fromhex("ffffffffffff0000ffffffff")
    messages = [r.getMessage() for r in caplog.records if "unhandled" in r.getMessage()]
    assert len(messages) == 2  # port 0x1234 was read twice, logged once
    assert "4-byte port read at 0x1234" in messages[0]
    assert "4-byte MMIO read at 0xfeb10000" in messages[1]


class Exploding(Device):
    name = "exploding"

    def write(self, offset: int, size: int, value: int) -> None:
        raise ValueError("device on fire")


def test_a_device_exception_propagates_with_the_address(kvm: Backend) -> None:
    with Machine(MachineConfig(serial="none"), backend=kvm, image=image(OUT_0X10)) as machine:
        machine.pio.register(0x10, 1, Exploding())
        with pytest.raises(DeviceError) as info:
            machine.run()
    message = str(info.value)
    assert "vCPU 0: device 'exploding' failed on a 1-byte port write of 0x5a at 0x10" in message
    after_out = LOAD + len(OUT_0X10.code) - 4
    # At a port exit upstream KVM's RIP is still the OUT's: it completes the write
    # (and advances RIP) when the vCPU runs again (x86.c, complete_fast_pio_out).
    # The software KVM (kvm_pvm) has advanced RIP before it exits.
    assert f"guest rip {after_out if SOFTWARE_KVM else after_out - 1:#x}" in message
    assert isinstance(info.value.__cause__, ValueError)


def test_two_vcpus_the_second_started_by_the_guest(kvm: Backend) -> None:
    recorder = Recorder()
    config = MachineConfig(serial="none", cpus=2, timeout=60)
    with Machine(config, backend=kvm, image=image(SMP_BSP, (AP_START, SMP_AP.code))) as machine:
        machine.pio.register(0x10, 1, recorder)
        result = machine.run()
    assert (result.reason, result.status) == (StopReason.DEBUG_EXIT, 1)
    assert recorder.seen == [(1, "pyvmm-vcpu-1"), (0, "pyvmm-vcpu-0")]
