"""The gdb stub: a GDB remote protocol server that holds and runs a machine's vCPUs.

Threads.  The server thread accepts gdb's connection and answers its packets.
vCPU calls (registers, guest debug) must come from the vCPU's own thread, so a
stopped vCPU *parks* in the stub -- inside the runner's exit handling, on its
own thread -- and runs the operations the server thread queues for it (read
the registers, translate and read memory) until gdb resumes it.

All-stop.  When one vCPU stops (a breakpoint, the end of a step) or gdb sends
Ctrl-C, the stub kicks every other vCPU out of the guest; each parks, and once
all are parked gdb gets the stop reply.  At the start every vCPU parks before
its first instruction, so the guest waits for the debugger.

Breakpoints.  Both ``Z0`` (software) and ``Z1`` (hardware) breakpoints become
the backend's hardware breakpoints (``GUEST_DEBUG``): an ``int3`` written into
guest code fails to emulate in ring 0 on some hypervisors (this project's
software KVM among them), and a hardware breakpoint leaves guest memory as it
is.  So there are at most four, of both kinds together (x86 DR0..DR3), and gdb
hears about a fifth as an error when it inserts it.  A vCPU continued from an
address that has a breakpoint first steps over it.

The run ends (power-off, debug-exit, timeout, Ctrl-C on pyvmm's terminal)
while gdb waits: gdb gets ``W<status>`` (the process exited with pyvmm's exit
status).  ``k`` stops the machine; ``D`` (and a connection that closes) removes
the breakpoints and lets the guest run on; gdb may connect again, which stops
it.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyvmm.config import Arch
from pyvmm.errors import ConfigError, PyvmmError
from pyvmm.exits import DebugExit, ExitKind, VcpuExit
from pyvmm.gdbstub.packets import PacketReader, ProtocolError, frame
from pyvmm.gdbstub.registers import RegisterError, RegisterFile, register_file
from pyvmm.gdbstub.translate import x86_translate
from pyvmm.lazy_logging import LazyLogger
from pyvmm.vm import Vcpu

if TYPE_CHECKING:
    from pyvmm.machine.machine import Machine

# Loads logging only when a record goes out (start-up time).
log = LazyLogger("pyvmm.gdbstub")

SIGINT = 2
SIGTRAP = 5
#: The most breakpoints at once (the backends' hardware breakpoint slots).
MAX_BREAKPOINTS = 4
#: How long the stub waits for every vCPU to park after a stop.
PARK_WAIT = 5.0
#: What pyvmm tells gdb in qSupported.
SUPPORTED = b"PacketSize=4000;qXfer:features:read+;swbreak+;hwbreak+;vContSupported+;QStartNoAckMode+"

EFAULT = b"E0e"
EINVAL = b"E16"
ENOSPC = b"E1c"


class GdbServer:
    """The listening socket, opened before the machine is built (so a port in
    use is a configuration error, not a failure after loading the kernel).

    :raises ConfigError: the address cannot be listened on.
    """

    def __init__(self, host: str, port: int, *, where: str = "--gdb") -> None:
        try:
            self.socket = socket.create_server((host, port), reuse_port=False)
        except OSError as exc:
            raise ConfigError(f"{where}: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.host = host
        self.port = int(self.socket.getsockname()[1])

    def attach(self, machine: Machine) -> GdbStub:
        """The stub for ``machine``, holding its vCPUs from their first instruction."""
        stub = GdbStub(self.socket, machine)
        machine.attach_debugger(stub)
        stub.start()
        return stub

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.socket.close()


class _Parked:
    """A vCPU in the stub: the operations queued for its thread."""

    def __init__(self, vcpu: Vcpu) -> None:
        self.vcpu = vcpu
        self.ops: deque[tuple[Callable[[Vcpu], Any], list[Any]]] = deque()


class GdbStub:
    """Serves one machine's debugger connections; see the module documentation."""

    def __init__(self, listener: socket.socket, machine: Machine) -> None:
        self.listener = listener
        self.machine = machine
        self.vm = machine.vm
        self.arch = machine.arch
        self.registers: RegisterFile = register_file(machine.arch.value)
        self._cond = threading.Condition()
        self._vcpus: dict[int, Vcpu] = {}
        self._parked: dict[int, _Parked] = {}
        self._generation = 0
        self._actions: dict[int, str] = {}
        self._running = False  # gdb resumed the guest and waits for a stop reply
        self._stopping_all = False  # kicks are out: every vCPU is to park
        self._stop_event: tuple[int, int, str] | None = None  # (vCPU, signal, "swbreak:;"/"hwbreak:;"/"")
        self._last_stop: tuple[int, int, str] = (0, SIGTRAP, "")
        self._ending = False
        self._exit_status: int | None = None
        self._breakpoints: dict[int, str] = {}  # address -> "sw" / "hw"
        self._applied: dict[int, tuple[bool, tuple[int, ...]]] = {}
        self._step_over: set[int] = set()
        self._connected = False
        self._ever_connected = False
        self._current = 0  # the vCPU for g/G/p/P/m/M (Hg)
        self._wake_r, self._wake_w = os.pipe()
        self._conn: socket.socket | None = None
        self._ack = True
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="pyvmm-gdbstub", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop serving: the connection and the listener close, parked vCPUs go."""
        own = threading.current_thread() is self._thread
        with self._cond:
            self._ending = True  # first: a gdb that waits hears how the run ended
            self._cond.notify_all()
        self._wake()
        if self._thread.is_alive() and not own:
            self._thread.join(2.0)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._wake()
        if self._thread.is_alive() and not own:
            self._thread.join(3.0)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    # --- the runner's side (vCPU threads) -------------------------------------------------
    def vcpu_started(self, vcpu: Vcpu) -> None:
        with self._cond:
            self._vcpus[vcpu.index] = vcpu
            self._applied[vcpu.index] = (False, ())
            # Held at the start (the guest waits for the debugger) and while gdb
            # has the others stopped; a vCPU that starts while they run joins them.
            waiting = not self._ever_connected or self._connected
            hold = not self._ending and waiting and (not self._running or self._stopping_all)
            if not hold and not self._ending:
                self._apply(vcpu, "c")
            self._cond.notify_all()
        if hold:
            self._park(vcpu)

    def vcpu_exit(self, vcpu: Vcpu, exit_: VcpuExit) -> bool:
        index = vcpu.index
        if exit_.kind is ExitKind.DEBUG:
            assert isinstance(exit_, DebugExit)
            with self._cond:
                if index in self._step_over:
                    self._step_over.discard(index)
                    if not self._stopping_all and not self._ending:
                        self._apply(vcpu, "c", skip_check=True)
                        return False
                if not self._connected or self._ending:
                    return False
                if self._stop_event is None and not self._stopping_all:
                    self._stop_event = (index, SIGTRAP, self._why(exit_.pc, self._actions.get(index)))
                    self._stop_all_locked()
        else:  # a kick: park if the stub asked for it, else it was someone else's (or stale)
            with self._cond:
                if not self._stopping_all or self._ending:
                    return False
        self._park(vcpu)
        return False

    def machine_stopping(self, status: int | None = None) -> None:
        # Any thread, a signal handler too: set flags, wake everyone, nothing blocking.
        with self._cond:
            self._ending = True
            if status is not None and self._exit_status is None:
                self._exit_status = status
            self._cond.notify_all()
        self._wake()

    def _why(self, pc: int, action: str | None) -> str:
        if action == "s":
            return ""
        kind = self._breakpoints.get(pc)
        return "swbreak:;" if kind == "sw" else "hwbreak:;" if kind == "hw" else ""

    def _stop_all_locked(self) -> None:
        self._stopping_all = True
        for index, vcpu in self._vcpus.items():
            if index not in self._parked:
                with contextlib.suppress(PyvmmError):
                    vcpu.kick()
        self._cond.notify_all()
        self._wake()

    def _park(self, vcpu: Vcpu) -> None:
        index = vcpu.index
        parked = _Parked(vcpu)
        with self._cond:
            seen = self._generation
            self._parked[index] = parked
            self._cond.notify_all()
            try:
                while not self._ending:
                    if parked.ops:
                        operation, box = parked.ops.popleft()
                        self._cond.release()
                        try:
                            box.append(("ok", operation(vcpu)))
                        except BaseException as exc:  # noqa: BLE001 - handed to the server thread
                            box.append(("error", exc))
                        finally:
                            self._cond.acquire()
                        self._cond.notify_all()
                        continue
                    if self._generation != seen and index in self._actions:
                        break
                    self._cond.wait()
            finally:
                del self._parked[index]
                for _, box in parked.ops:
                    box.append(("error", PyvmmError("the vCPU left the debugger")))
                self._cond.notify_all()
            if self._ending:
                return
            action = self._actions[index]
            self._apply(vcpu, action)

    def _apply(self, vcpu: Vcpu, action: str, *, skip_check: bool = False) -> None:
        """Set the vCPU's guest debug for ``action`` ("c" or "s"), on its thread,
        with the condition held."""
        index = vcpu.index
        points = tuple(sorted(self._breakpoints))
        if action == "s":
            want: tuple[bool, tuple[int, ...]] = (True, ())
        elif points and not skip_check and self.registers.pc(vcpu) in self._breakpoints:
            self._step_over.add(index)
            want = (True, ())
        else:
            want = (False, points)
        if self._applied.get(index) != want:
            vcpu.set_guest_debug(want[0], list(want[1]))
            self._applied[index] = want

    # --- the server thread ----------------------------------------------------------------
    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"!")

    def _drain_wake(self) -> None:
        with contextlib.suppress(OSError):
            os.read(self._wake_r, 512)

    def _serve(self) -> None:
        try:
            while not self._closed:
                conn = self._accept()
                if conn is None:
                    return
                try:
                    self._session(conn)
                except (OSError, ProtocolError) as exc:
                    log.warning("gdb connection failed: %s", exc)
                finally:
                    with contextlib.suppress(OSError):
                        conn.close()
                    self._conn = None
                with self._cond:
                    ending = self._ending
                if ending:
                    return
                self._detach()
        except Exception as exc:  # noqa: BLE001 - the stub must not take the run down silently
            log.error("the gdb stub failed: %s: %s", type(exc).__name__, exc)
            self._detach()

    def _accept(self) -> socket.socket | None:
        while True:
            with self._cond:
                if self._closed or (self._ending and self._ever_connected):
                    return None
            try:
                readable, _, _ = select.select([self.listener.fileno(), self._wake_r], [], [], 0.5)
            except (OSError, ValueError):
                return None
            if self._wake_r in readable:
                self._drain_wake()
            if self.listener.fileno() in readable:
                try:
                    conn, peer = self.listener.accept()
                except OSError:
                    continue
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                log.info("gdb connected from %s:%s", *peer[:2])
                return conn

    def _session(self, conn: socket.socket) -> None:
        self._conn = conn
        self._ack = True
        reader = PacketReader()
        self._hold_for_session()
        try:
            while True:
                with self._cond:
                    ending, closed = self._ending, self._closed
                if ending:
                    self._send_exit()
                    return
                if closed:
                    return
                if self._running and self._report_stop():
                    continue
                readable, _, _ = select.select([conn.fileno(), self._wake_r], [], [], 0.25)
                if self._wake_r in readable:
                    self._drain_wake()
                if conn.fileno() not in readable:
                    continue
                data = conn.recv(4096)
                if not data:
                    log.info("gdb closed the connection")
                    return
                for kind, body in reader.feed(data):
                    if kind == "interrupt":
                        self._interrupt()
                    elif kind == "bad":
                        conn.sendall(b"-")
                    elif kind == "packet":
                        if self._ack:
                            conn.sendall(b"+")
                        if not self._handle(body):
                            return
        finally:
            with self._cond:
                self._connected = False

    def _hold_for_session(self) -> None:
        """Have every vCPU parked before gdb's first request: at the start they
        park on their own; a guest that runs (gdb connects again) is stopped."""
        expected = self.machine.config.cpus
        with self._cond:
            self._connected = True
            first = not self._ever_connected
            self._ever_connected = True
            if first:
                self._cond.wait_for(lambda: self._ending or len(self._parked) >= expected, PARK_WAIT * 4)
                return
            if self._ending:
                return
            self._stopping_all = True
            self._stop_all_locked()
            self._cond.wait_for(lambda: self._ending or set(self._parked) >= set(self._vcpus), PARK_WAIT)
            self._stopping_all = False
            self._running = False
            self._last_stop = (self._current, SIGTRAP, "")

    def _send(self, data: bytes) -> None:
        if self._conn is not None:
            self._conn.sendall(frame(data))

    def _send_exit(self) -> None:
        """The run ended: tell a waiting gdb how (it then shows the exit code)."""
        if not self._running:
            return
        with self._cond:
            self._cond.wait_for(lambda: self._exit_status is not None or self._closed, 2.0)
            status = self._exit_status if self._exit_status is not None else 0
            self._running = False
        with contextlib.suppress(OSError):
            self._send(b"W%02x" % (status & 0xFF))

    def _interrupt(self) -> None:
        with self._cond:
            if not self._running or self._stopping_all:
                return
            self._stop_event = (self._current, SIGINT, "")
            self._stop_all_locked()

    def _report_stop(self) -> bool:
        """While running: once a stop is under way and every vCPU parked, send the
        stop reply.  True when it did."""
        with self._cond:
            if self._stop_event is None or self._ending:
                return False
            all_parked = self._cond.wait_for(lambda: self._ending or set(self._parked) >= set(self._vcpus), PARK_WAIT)
            if self._is_ending():
                return False
            if not all_parked:
                log.warning("vCPU(s) %s did not stop for the debugger", sorted(set(self._vcpus) - set(self._parked)))
            event = self._stop_event
            self._stop_event = None
            self._stopping_all = False
            self._running = False
            self._last_stop = event
            self._current = event[0]
        self._send(self._stop_reply(event))
        return True

    def _is_ending(self) -> bool:
        return self._ending

    def _stop_reply(self, event: tuple[int, int, str]) -> bytes:
        index, signal, why = event
        return b"T%02xthread:%x;%s" % (signal, index + 1, why.encode())

    # --- packets -------------------------------------------------------------------------------
    def _handle(self, packet: bytes) -> bool:
        """Answer one packet; False ends the session."""
        log.debug("gdb: %r", packet[:80])
        try:
            reply = self._answer(packet)
        except _Detach:
            self._send(b"OK")
            return False
        except _Kill:
            self.machine.request_stop(_interrupted(), 0, "stopped by the debugger (kill)")
            return False
        except (ValueError, IndexError, struct.error) as exc:
            # A malformed packet (missing field, bad hex) is the debugger's error,
            # answered as one; it must not end the stub for the rest of the run.
            log.debug("gdb: malformed packet %r: %s", packet[:80], exc)
            reply = b"E01"
        if reply is not None:
            self._send(reply)
        return True

    def _answer(self, packet: bytes) -> bytes | None:
        head = packet[:1]
        if packet.startswith(b"qSupported"):
            return SUPPORTED
        if packet == b"QStartNoAckMode":
            self._send(b"OK")
            self._ack = False
            return None
        if packet.startswith(b"qXfer:features:read:target.xml:"):
            return self._xfer(self.registers.xml.encode(), packet.rsplit(b":", 1)[1])
        if packet == b"?":
            return self._stop_reply(self._last_stop)
        if packet == b"qAttached" or packet.startswith(b"qAttached:"):
            return b"1"
        if packet == b"qC":
            return b"QC%x" % (self._current + 1)
        if packet == b"qfThreadInfo":
            with self._cond:
                ids = sorted(self._vcpus) or [0]
            return b"m" + b",".join(b"%x" % (i + 1) for i in ids)
        if packet == b"qsThreadInfo":
            return b"l"
        if packet.startswith(b"qThreadExtraInfo,"):
            index = int(packet.split(b",", 1)[1], 16) - 1
            return f"vCPU {index}".encode().hex().encode()
        if packet.startswith(b"qSymbol"):
            return b"OK"
        if head == b"H":
            return self._set_thread(packet[1:2], packet[2:])
        if head == b"T":
            return b"OK" if int(packet[1:], 16) - 1 in self._vcpus else b"E01"
        if head == b"g":
            return self._on_vcpu(lambda vcpu: self.registers.hex_all(vcpu).encode())
        if head == b"G":
            values = self.registers.split(bytes.fromhex(packet[1:].decode()))
            return self._on_vcpu(lambda vcpu: self._write_regs(vcpu, values))
        if head == b"p":
            number = int(packet[1:], 16)
            return self._on_vcpu(lambda vcpu: self.registers.hex_one(vcpu, number).encode())
        if head == b"P":
            number_text, _, value_text = packet[1:].partition(b"=")
            number = int(number_text, 16)
            value = bytes.fromhex(value_text.decode())
            if len(value) != self.registers.size(number):
                return EINVAL
            return self._on_vcpu(lambda vcpu: self._write_regs(vcpu, {number: value}))
        if head == b"m":
            address, length = (int(part, 16) for part in packet[1:].split(b","))
            return self._on_vcpu(lambda vcpu: self._read_memory(vcpu, address, min(length, 0x2000)).hex().encode())
        if head == b"M":
            where, _, data = packet[1:].partition(b":")
            address, length = (int(part, 16) for part in where.split(b","))
            raw = bytes.fromhex(data.decode())
            if len(raw) != length:
                return EINVAL
            return self._on_vcpu(lambda vcpu: self._write_memory(vcpu, address, raw))
        if head in (b"Z", b"z"):
            return self._breakpoint(packet)
        if packet == b"vCont?":
            return b"vCont;c;C;s;S"
        if packet.startswith(b"vCont;"):
            return self._resume(self._vcont(packet[6:]))
        if head in (b"c", b"C", b"s", b"S"):
            action = "s" if head in (b"s", b"S") else "c"
            if action == "s":
                return self._resume({self._current: "s"})
            return self._resume(dict.fromkeys(self._vcpus, "c"))
        if head == b"D":
            raise _Detach
        if head == b"k" or packet.startswith(b"vKill"):
            raise _Kill
        return b""  # not supported: gdb falls back or says so

    def _set_thread(self, op: bytes, thread: bytes) -> bytes:
        value = int(thread, 16) if thread not in (b"", b"-1") else -1
        if value > 0:
            if value - 1 not in self._vcpus:
                return b"E01"
            if op == b"g":
                self._current = value - 1
        return b"OK"

    def _xfer(self, document: bytes, span: bytes) -> bytes:
        offset, length = (int(part, 16) for part in span.split(b","))
        chunk = document[offset : offset + length]
        return (b"l" if offset + length >= len(document) else b"m") + chunk

    def _on_vcpu(self, operation: Callable[[Vcpu], Any]) -> bytes:
        """Run ``operation`` on the current vCPU's thread (it is parked); its
        bytes, or an error reply."""
        with self._cond:
            parked = self._parked.get(self._current) or next(iter(self._parked.values()), None)
            if parked is None or self._running:
                return b"E01"
            box: list[Any] = []
            parked.ops.append((operation, box))
            self._cond.notify_all()
            self._cond.wait_for(lambda: bool(box) or self._ending)
            if not box:
                return b"E01"
        status, value = box[0]
        if status == "ok":
            return value if isinstance(value, bytes) else b"OK"
        if isinstance(value, _MemoryError):
            return EFAULT
        if isinstance(value, (RegisterError, ConfigError, PyvmmError, ValueError)):
            log.info("debugger request failed: %s", value)
            return EINVAL
        raise value

    def _write_regs(self, vcpu: Vcpu, values: dict[int, bytes]) -> bytes:
        self.registers.write(vcpu, values)
        return b"OK"

    # --- memory ----------------------------------------------------------------------------
    def _pieces(self, vcpu: Vcpu, address: int, length: int) -> list[tuple[int, int]]:
        """(physical address, length) pieces of ``length`` bytes at guest-virtual ``address``."""
        pieces: list[tuple[int, int]] = []
        if self.arch is Arch.X86_64:
            sregs = vcpu.get_sregs()
            while length > 0:
                try:
                    physical, left = x86_translate(
                        self.vm.memory, address, cr0=sregs.cr0, cr3=sregs.cr3, cr4=sregs.cr4, efer=sregs.efer
                    )
                except PyvmmError as exc:
                    raise _MemoryError(str(exc)) from None
                size = min(length, left)
                pieces.append((physical, size))
                address += size
                length -= size
            return pieces
        return [(address, length)]

    def _read_memory(self, vcpu: Vcpu, address: int, length: int) -> bytes:
        out = bytearray()
        for physical, size in self._pieces(vcpu, address, length):
            try:
                out += self.vm.memory.read(physical, size)
            except PyvmmError as exc:
                if not out:
                    raise _MemoryError(str(exc)) from None
                break  # a partial read is a valid answer
        if not out and length:
            raise _MemoryError(f"{address:#x}")
        return bytes(out)

    def _write_memory(self, vcpu: Vcpu, address: int, data: bytes) -> bytes:
        offset = 0
        for physical, size in self._pieces(vcpu, address, len(data)):
            try:
                self.vm.memory.write(physical, data[offset : offset + size])
            except PyvmmError as exc:
                raise _MemoryError(str(exc)) from None
            offset += size
        return b"OK"

    # --- breakpoints and resuming ---------------------------------------------------------
    def _breakpoint(self, packet: bytes) -> bytes:
        insert = packet[:1] == b"Z"
        kind_text, address_text, *_ = packet[1:].split(b",")
        if kind_text not in (b"0", b"1"):
            return b""  # watchpoints: not supported
        address = int(address_text, 16)
        kind = "sw" if kind_text == b"0" else "hw"
        with self._cond:
            if insert:
                if address not in self._breakpoints and len(self._breakpoints) >= MAX_BREAKPOINTS:
                    log.warning(
                        "at most %d breakpoints (hardware breakpoints, for software ones too): %#x refused",
                        MAX_BREAKPOINTS,
                        address,
                    )
                    return ENOSPC
                self._breakpoints[address] = kind
            else:
                self._breakpoints.pop(address, None)
        return b"OK"

    def _vcont(self, actions: bytes) -> dict[int, str]:
        chosen: dict[int, str] = {}
        default: str | None = None
        for item in actions.split(b";"):
            if not item:
                continue
            action, _, thread = item.partition(b":")
            letter = action[:1].lower().decode()
            if letter not in ("c", "s"):
                continue  # "t" (stop) and the rest: the vCPU stays where it is
            if thread and thread != b"-1":
                index = int(thread, 16) - 1
                chosen.setdefault(index, letter)
            elif default is None:
                default = letter
        if default is not None:
            for index in self._vcpus:
                chosen.setdefault(index, default)
        return chosen

    def _resume(self, actions: dict[int, str]) -> bytes | None:
        with self._cond:
            actions = {index: action for index, action in actions.items() if index in self._vcpus}
            if not actions:
                return b"E01"
            self._actions = actions
            self._stop_event = None
            self._stopping_all = False
            self._running = True
            self._generation += 1
            self._cond.notify_all()
        return None  # the stop reply comes when the guest stops

    def _detach(self) -> None:
        """gdb left: no breakpoints, no stepping, every vCPU runs on."""
        with self._cond:
            self._breakpoints.clear()
            self._step_over.clear()
            self._connected = False
            self._running = False
            self._stop_event = None
            self._stopping_all = False
            self._actions = dict.fromkeys(self._vcpus, "c")
            self._generation += 1
            self._cond.notify_all()


class _Detach(Exception):
    pass


class _Kill(Exception):
    pass


class _MemoryError(PyvmmError):
    pass


def _interrupted() -> Any:
    from pyvmm.machine.outcome import StopReason

    return StopReason.INTERRUPTED
