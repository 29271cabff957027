"""The per-vCPU run loop: run, dispatch the exit to a device, complete it, repeat.

This is the per-exit path, so it is written for speed: everything it touches is
bound to a local before the loop; a port is one dict lookup (the table already
holds each port's offset into its device) and an MMIO address one
:func:`bisect.bisect_right`; a one-byte access moves its value without building
a bytes object; exits other than port and MMIO I/O go to the machine's (slower)
handler.  The loop never checks for statistics: with ``--stats`` it is handed a
timing wrapper as its run function instead.

A device that raises stops the machine: the exception is re-raised as a
:class:`DeviceError` that names the vCPU, the device, the access and the guest
instruction pointer, chained to the original.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Protocol

from pyvmm.capabilities import Capability
from pyvmm.config import Arch
from pyvmm.errors import PyvmmError
from pyvmm.exits import ExitKind, IoExit, MmioExit, VcpuExit
from pyvmm.machine.bus import Entry, MmioBus, PortBus, PortEntry
from pyvmm.vcpu_state import StateKind
from pyvmm.vm import Vcpu

#: MASKS[n]: the low n bytes.
MASKS = tuple((1 << (8 * n)) - 1 for n in range(9))


class DeviceError(PyvmmError):
    """A device raised while handling a guest access; ``__cause__`` is what it raised."""


class StopFlag:
    """Set once, read on every exit by every vCPU loop."""

    __slots__ = ("stopping",)

    def __init__(self) -> None:
        self.stopping = False


class OtherExitHandler(Protocol):
    def __call__(self, vcpu: Vcpu, exit_: VcpuExit) -> bool:
        """Handle an exit that is neither port nor MMIO I/O; True ends this vCPU's loop."""
        ...


def run_loop(
    vcpu: Vcpu,
    run: Callable[[], VcpuExit],
    *,
    flag: StopFlag,
    pio: PortBus,
    mmio: MmioBus,
    other_exit: OtherExitHandler,
) -> None:
    """Run ``vcpu`` until ``flag.stopping`` or ``other_exit`` says to stop."""
    io_kind = ExitKind.IO
    mmio_kind = ExitKind.MMIO
    pio_get = pio.table.get
    pio_unhandled = pio.port_entry
    starts, ends, entries = mmio.starts, mmio.ends, mmio.entries
    mmio_unhandled = mmio.unhandled_entry
    find = bisect.bisect_right
    from_bytes = int.from_bytes
    masks = MASKS
    while not flag.stopping:
        exit_ = run()
        kind = exit_.kind
        if kind is io_kind:
            io: IoExit = exit_  # type: ignore[assignment]  # the kind says so; isinstance costs more
            port = io.port
            entry = pio_get(port)
            if entry is None:
                entry = pio_unhandled(port)
            try:
                if io.count == 1:
                    size = io.size
                    data = io.data
                    if io.is_write:
                        entry[1](entry[2], size, data[0] if size == 1 else from_bytes(data, "little"))
                    elif size == 1:
                        data[0] = entry[0](entry[2], 1) & 0xFF
                    else:
                        data[:] = (entry[0](entry[2], size) & masks[size]).to_bytes(size, "little")
                else:
                    _string_io(entry, io)
            except Exception as exc:
                raise _device_error(vcpu, io, entry, exc) from exc
        elif kind is mmio_kind:
            mm: MmioExit = exit_  # type: ignore[assignment]
            address = mm.address
            index = find(starts, address) - 1
            entry = entries[index] if index >= 0 and address < ends[index] else mmio_unhandled
            try:
                size = mm.size
                data = mm.data
                if mm.is_write:
                    entry[1](address - entry[2], size, data[0] if size == 1 else from_bytes(data, "little"))
                elif size == 1:
                    data[0] = entry[0](address - entry[2], 1) & 0xFF
                else:
                    data[:] = (entry[0](address - entry[2], size) & masks[size]).to_bytes(size, "little")
            except Exception as exc:
                raise _device_error(vcpu, mm, entry, exc) from exc
        elif other_exit(vcpu, exit_):
            return


def _string_io(entry: PortEntry, exit_: IoExit) -> None:
    """``rep ins``/``rep outs``: ``count`` accesses of ``size`` bytes in one exit."""
    read, write, offset, _ = entry
    size, data = exit_.size, exit_.data
    end = size * exit_.count
    if exit_.is_write:
        for start in range(0, end, size):
            write(offset, size, int.from_bytes(data[start : start + size], "little"))
    else:
        mask = MASKS[size]
        for start in range(0, end, size):
            data[start : start + size] = (read(offset, size) & mask).to_bytes(size, "little")


def describe_access(exit_: VcpuExit) -> str:
    """``a 2-byte port read at 0x511`` / ``a 4-byte MMIO write of 0x1 at 0xfeb00008``."""
    if isinstance(exit_, IoExit):
        space, address, size = "port", exit_.port, exit_.size
        count = f" x{exit_.count}" if exit_.count != 1 else ""
    elif isinstance(exit_, MmioExit):
        space, address, size, count = "MMIO", exit_.address, exit_.size, ""
    else:
        return repr(exit_)
    if exit_.is_write:
        value = int.from_bytes(exit_.data[:size], "little")
        return f"a {size}-byte{count} {space} write of {value:#x} at {address:#x}"
    return f"a {size}-byte{count} {space} read at {address:#x}"


def guest_pc(vcpu: Vcpu) -> str:
    """``rip 0x...`` (x86_64) or ``pc 0x...`` (aarch64) of a vCPU stopped in an
    exit, or "" where the backend cannot read registers."""
    if not vcpu.vm.backend.supports(Capability.VCPU_REGISTERS):
        return ""
    try:
        if vcpu.vm.arch is Arch.AARCH64:
            return f"pc {vcpu.get_state(StateKind.CORE_REGS).pc:#x}"
        return f"rip {vcpu.get_regs().rip:#x}"
    except Exception:  # noqa: BLE001 - a report of a failure must not fail itself
        return ""


def _device_error(vcpu: Vcpu, exit_: VcpuExit, entry: Entry, exc: Exception) -> DeviceError:
    pc = guest_pc(vcpu)
    where = f" (guest {pc})" if pc else ""
    device = entry[3].name
    return DeviceError(
        f"vCPU {vcpu.index}: device {device!r} failed on {describe_access(exit_)}{where}: {type(exc).__name__}: {exc}"
    )
