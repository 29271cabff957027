"""``pyvmm run --gdb`` on KVM: a real gdb (Debian's ``gdb``) in batch mode drives
the demo guest -- it connects while the guest waits before its first
instruction, breaks at the entry, steps, reads registers and memory, and
continues to the power-off -- and a protocol-level client checks what gdb's
batch mode cannot: Ctrl-C, the breakpoint limit, detach and kill.

Breakpoints are hardware breakpoints on KVM (``int3`` fails to emulate in ring
0 on this project's software KVM), so gdb's ``break`` works unchanged.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.gdbstub.packets import PacketReader, frame
from pyvmm.guests import DEMO_LOAD_ADDRESS, echo_path
from pyvmm.vm import Backend

WAIT = 60.0


class Pyvmm:
    """``pyvmm run --gdb tcp:127.0.0.1:0 ...`` and the port it listens on."""

    def __init__(self, *args: str) -> None:
        command = [sys.executable, "-m", "pyvmm", "run", "--backend", "kvm", "--timeout", "120"]
        command += ["--gdb", "tcp:127.0.0.1:0", *args]
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert self.process.stderr is not None
        self.stderr = b""
        while True:
            line = self.process.stderr.readline()
            assert line, f"pyvmm did not wait for gdb: {self.stderr!r}"
            self.stderr += line
            found = re.search(rb"waiting for gdb on 127\.0\.0\.1:(\d+)", line)
            if found:
                self.port = int(found.group(1))
                return

    def finish(self) -> tuple[int, bytes, bytes]:
        out, err = self.process.communicate(timeout=WAIT)
        return self.process.returncode, out, self.stderr + err

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()


class Client:
    """The remote protocol, by hand."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.reader = PacketReader()
        self.pending: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(frame(data))

    def receive(self) -> bytes:
        while not self.pending:
            data = self.sock.recv(65536)
            assert data, "the stub closed the connection"
            for kind, body in self.reader.feed(data):
                if kind == "packet":
                    self.sock.sendall(b"+")
                    self.pending.append(body)
        return self.pending.pop(0)

    def ask(self, data: bytes) -> bytes:
        self.send(data)
        return self.receive()


@pytest.fixture
def demo(kvm: Backend) -> Iterator[Pyvmm]:
    run = Pyvmm()
    try:
        yield run
    finally:
        run.close()


def _gdb() -> str:
    gdb = shutil.which("gdb")
    if gdb is None:
        pytest.skip("no gdb here (apt-get install gdb)")
    return gdb


def test_gdb_breaks_at_the_entry_steps_reads_registers_and_continues_to_power_off(demo: Pyvmm, tmp_path: Path) -> None:
    script = tmp_path / "session.gdb"
    script.write_text(
        f"""set pagination off
target remote 127.0.0.1:{demo.port}
print/x $pc
break *{DEMO_LOAD_ADDRESS:#x}
info registers rip rsp cs eflags cr0
x/3xb $pc
stepi
print/x $pc
print/x $rsi
break *{DEMO_LOAD_ADDRESS + 0x10:#x}
continue
print/x $pc
print $rip == {DEMO_LOAD_ADDRESS + 0x10}
set $rax = 0x1234
print/x $rax
delete
continue
"""
    )
    gdb = subprocess.run(
        [_gdb(), "-nx", "-batch", "-x", str(script)], capture_output=True, text=True, timeout=WAIT, check=False
    )
    status, out, err = demo.finish()
    text = gdb.stdout + gdb.stderr
    assert f"$1 = {DEMO_LOAD_ADDRESS:#x}" in text  # the guest waited at its first instruction
    assert re.search(rf"rip\s+{DEMO_LOAD_ADDRESS:#x}", text)
    assert re.search(r"rsp\s+0x90000", text)
    assert re.search(r"cr0\s+0x8\w+", text)  # paging on: long mode
    assert f"{DEMO_LOAD_ADDRESS:#x}:\t0x48\t0x8d\t0x35" in text  # lea rsi, [rip + hello]
    assert f"$2 = {DEMO_LOAD_ADDRESS + 7:#x}" in text  # one instruction later
    assert re.search(r"\$3 = 0x10\w+", text)  # rsi now points at the greeting
    assert f"Breakpoint 2, {DEMO_LOAD_ADDRESS + 0x10:#018x}" in text
    assert "$5 = 1" in text and "$6 = 0x1234" in text
    assert "exited normally" in text  # the guest powered off; gdb saw the process exit
    assert status == 0, err
    assert b"pyvmm demo guest: hello" in out


def test_protocol_basics_and_memory(demo: Pyvmm) -> None:
    gdb = Client(demo.port)
    assert b"hwbreak+" in gdb.ask(b"qSupported:multiprocess+;swbreak+;hwbreak+")
    assert gdb.ask(b"?") == b"T05thread:1;"
    assert gdb.ask(b"qAttached") == b"1"
    assert gdb.ask(b"qfThreadInfo") == b"m1"
    xml = gdb.ask(b"qXfer:features:read:target.xml:0,fff")
    assert xml.startswith(b"m<?xml") and b"i386:x86-64" in xml  # m: more to come
    rest = gdb.ask(b"qXfer:features:read:target.xml:fff,ffff")
    assert rest.startswith(b"l") and rest.endswith(b"</target>")
    registers = gdb.ask(b"g")
    assert int.from_bytes(bytes.fromhex(registers[16 * 16 : 16 * 16 + 16].decode()), "little") == DEMO_LOAD_ADDRESS
    assert gdb.ask(b"p10") == DEMO_LOAD_ADDRESS.to_bytes(8, "little").hex().encode()  # rip, by number
    assert gdb.ask(b"m%x,3" % DEMO_LOAD_ADDRESS) == b"488d35"
    assert gdb.ask(b"mfeb00000,4").startswith(b"E")  # MMIO: not read (a device access has effects)
    assert gdb.ask(b"m7fffffff000,4").startswith(b"E")  # not mapped by the guest's page tables
    for n in range(4):
        assert gdb.ask(b"Z0,%x,1" % (DEMO_LOAD_ADDRESS + 0x100 + n)) == b"OK"
    assert gdb.ask(b"Z1,%x,1" % (DEMO_LOAD_ADDRESS + 0x200)).startswith(b"E")  # four at most
    for n in range(4):
        assert gdb.ask(b"z0,%x,1" % (DEMO_LOAD_ADDRESS + 0x100 + n)) == b"OK"
    assert gdb.ask(b"Z2,1000,4") == b""  # watchpoints: not supported
    # Malformed packets are the debugger's error: answered as one, the session goes on.
    for bad in (b"m1000", b"pzz", b"M1000,2:0", b"qXfer:features:read:target.xml:0"):
        assert gdb.ask(bad) == b"E01", bad
    assert gdb.ask(b"?") == b"T05thread:1;"
    assert gdb.ask(b"vCont?") == b"vCont;c;C;s;S"
    assert gdb.ask(b"vCont;s:1") == b"T05thread:1;"
    assert gdb.ask(b"p10") == (DEMO_LOAD_ADDRESS + 7).to_bytes(8, "little").hex().encode()
    gdb.send(b"c")
    assert gdb.receive() == b"W00"  # the guest powered off: the "process" exited with 0
    status, _, _ = demo.finish()
    assert status == 0


def test_ctrl_c_stops_a_guest_that_waits_and_kill_ends_the_run(kvm: Backend) -> None:
    run = Pyvmm("--kernel", echo_path(), "--load-address", "0x100000")
    try:
        gdb = Client(run.port)
        gdb.ask(b"qSupported")
        assert gdb.ask(b"?") == b"T05thread:1;"
        gdb.send(b"c")
        time.sleep(1.0)  # the echo guest halts, waiting for a key
        gdb.sock.sendall(b"\x03")
        assert gdb.receive() == b"T02thread:1;"
        rip = int.from_bytes(bytes.fromhex(gdb.ask(b"p10").decode()), "little")
        assert DEMO_LOAD_ADDRESS <= rip < DEMO_LOAD_ADDRESS + 0x1000  # stopped inside the guest's code
        gdb.send(b"k")
        status, out, err = run.finish()
        assert status == 0
        assert b"stopped by the debugger (kill)" in err
        assert b"pyvmm echo guest" in out
    finally:
        run.close()


def test_detach_lets_the_guest_run_to_its_end(demo: Pyvmm) -> None:
    gdb = Client(demo.port)
    gdb.ask(b"qSupported")
    assert gdb.ask(b"Z1,%x,1" % (DEMO_LOAD_ADDRESS + 0x10)) == b"OK"  # removed by the detach
    assert gdb.ask(b"D") == b"OK"
    status, out, _ = demo.finish()
    assert status == 0
    assert b"all good: powering off" in out
