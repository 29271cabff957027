"""Raw HAXM calls for the model's tests: the driver's requests one by one, through
the plugin's own channel (``ioctl`` on Linux/macOS, ``DeviceIoControl`` on
Windows), with nothing of the plugin's VM/vCPU logic in between.

A :class:`RawVm` maps guest RAM and runs a vCPU from a real-mode state of the
test's choosing, so each protocol step of the driver can be asserted on its own.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from typing import Any

import pytest

from pyvmm.errors import HypervisorError
from pyvmm.testing.driver_model import Rule
from pyvmm_haxm import bindings as b
from pyvmm_haxm.bindings import ffi
from pyvmm_haxm.host import HOST, IN, INOUT, OUT, HaxChannel
from pyvmm_haxm.model import POSIX_RULES, WINDOWS_RULES, RuleSet

PAGE = 4096


def rules_for(channel: HaxChannel) -> RuleSet:
    return WINDOWS_RULES if channel.host_os == "win32" else POSIX_RULES


def expect(model: Any, rule: Rule, call: Any, *args: Any) -> HypervisorError:
    """``call(*args)`` fails with ``rule``'s code, and the model names ``rule``."""
    with pytest.raises(HypervisorError) as info:
        call(*args)
    assert info.value.code == rule.errno, f"{info.value} is not {rule}"
    assert model.last_rejection is not None and model.last_rejection.rule is rule
    return info.value


class HostBuffer:
    """Page-aligned host memory for guest RAM."""

    def __init__(self, size: int) -> None:
        self.mapping = mmap.mmap(-1, size)
        anchor = ctypes.c_char.from_buffer(self.mapping)
        self.address = ctypes.addressof(anchor)
        del anchor
        self.size = size

    def write(self, offset: int, data: bytes) -> None:
        self.mapping[offset : offset + len(data)] = data

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.mapping[offset : offset + size])


class RawVm:
    """One VM made with raw requests."""

    def __init__(self, *, notify: int | None = 4) -> None:
        self.channel = HOST.current()
        self.rules = rules_for(self.channel)
        self.system = self.channel.open(self.channel.paths.system)
        vm_id = ffi.new("uint32_t *")
        self.channel.control(self.system, "CREATE_VM", vm_id, OUT)
        self.vm_id = int(vm_id[0])
        self.handle = self.channel.open(self.channel.paths.vm_path(self.vm_id))
        if notify is not None:
            version = ffi.new("struct hax_qemu_version *", {"cur_version": notify, "least_version": notify})
            self.channel.control(self.handle, "NOTIFY_QEMU_VERSION", version, IN)
        self.ram: list[HostBuffer] = []
        self.vcpus: list[RawVcpu] = []

    def control(self, op: str, arg: Any = None, direction: Any = IN) -> int:
        return self.channel.control(self.handle, op, arg, direction)

    def add_ramblock(self, start: int, size: int, reserved: int = 0) -> None:
        info = ffi.new("struct hax_ramblock_info *", {"start_va": start, "size": size, "reserved": reserved})
        self.control("ADD_RAMBLOCK", info)

    def set_ram2(self, gpa: int, size: int, va: int, flags: int = 0, reserved1: int = 0, reserved2: int = 0) -> None:
        info = ffi.new(
            "struct hax_set_ram_info2 *",
            {"pa_start": gpa, "size": size, "va": va, "flags": flags, "reserved1": reserved1, "reserved2": reserved2},
        )
        self.control("SET_RAM2", info)

    def map_ram(self, gpa: int, size: int) -> HostBuffer:
        buffer = HostBuffer(size)
        self.ram.append(buffer)
        self.add_ramblock(buffer.address, size)
        self.set_ram2(gpa, size, buffer.address)
        return buffer

    def vcpu(self, index: int = 0, *, power_up_fpu: bool = True) -> RawVcpu:
        vcpu = RawVcpu(self, index, power_up_fpu=power_up_fpu)
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.channel.close(self.handle)
        self.channel.close(self.system)


class RawVcpu:
    def __init__(self, vm: RawVm, index: int, *, power_up_fpu: bool = True) -> None:
        self.vm = vm
        self.channel = vm.channel
        vm.control("VCPU_CREATE", ffi.new("uint32_t *", index))
        self.handle = self.channel.open(self.channel.paths.vcpu_path(vm.vm_id, index))
        info = ffi.new("struct hax_tunnel_info *")
        self.control("SETUP_TUNNEL", info, OUT)
        self.info = (int(info.va), int(info.io_va), int(info.size))
        self.tunnel: Any = ffi.cast("struct hax_tunnel *", int(info.va))
        self.fastmmio: Any = ffi.cast("struct hax_fastmmio *", int(info.io_va))
        self.io_address = int(info.io_va)
        if power_up_fpu:
            # HAXM's image is all zero until SET_FPU: give it the power-up FCW/MXCSR.
            fx = ffi.new("struct fx_layout *", {"fcw": 0x37F, "mxcsr": 0x1F80})
            self.control("SET_FPU", fx, IN)

    def control(self, op: str, arg: Any = None, direction: Any = IN) -> int:
        return self.channel.control(self.handle, op, arg, direction)

    def io_bytes(self, size: int) -> bytes:
        return ctypes.string_at(self.io_address, size)

    def set_io_bytes(self, data: bytes) -> None:
        ctypes.memmove(self.io_address, data, len(data))

    def get_state(self) -> Any:
        state = ffi.new("struct vcpu_state_t *")
        self.control("GET_REGS", state, OUT)
        return state

    def set_state(self, state: Any) -> None:
        self.control("SET_REGS", state, IN)

    def real_mode_at(self, ip: int, **gprs: int) -> None:
        """Real mode with CS = DS = ES = SS = 0, IP = ``ip``."""
        state = self.get_state()
        for name in ("_cs", "_ds", "_es", "_ss"):
            seg = getattr(state, name)
            seg.selector, seg.base = 0, 0
        state._rip = ip
        order = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi")
        for name, value in gprs.items():
            state._regs[order.index(name)] = value
        self.set_state(state)

    def run(self) -> int:
        """RUN; the exit status."""
        code = self.channel.run(self.handle)
        assert code == 0, f"RUN failed with {code}"
        return int(self.tunnel._exit_status)

    def msrs(self, op: str, entries: list[tuple[int, int]], *, done: int = 0) -> Any:
        data = ffi.new("struct hax_msr_data *")
        data.nr_msr, data.done = len(entries), done
        for i, (index, value) in enumerate(entries):
            data.entries[i].entry, data.entries[i].value = index, value
        self.control(op, data, INOUT)
        return data

    def close(self) -> None:
        self.tunnel = self.fastmmio = None
        self.channel.close(self.handle)


def pack_u32(value: int) -> bytes:
    return struct.pack("<I", value)


__all__ = ["PAGE", "HostBuffer", "RawVcpu", "RawVm", "b", "expect", "ffi", "pack_u32", "rules_for"]
