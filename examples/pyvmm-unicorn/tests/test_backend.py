"""The unicorn backend through pyvmm's public API: what the conformance suite
does not cover -- its manifest, options, state kinds, debugging and threads."""

from __future__ import annotations

import struct
import threading
import time
from importlib import metadata

import pytest
from pyvmm_unicorn import __version__
from pyvmm_unicorn.plugin import manifest as unicorn_manifest
from pyvmm_unicorn.plugin import plugin

from pyvmm.arch.aarch64 import CoreRegs
from pyvmm.boot import BootSpec
from pyvmm.capabilities import Capability
from pyvmm.config import Arch
from pyvmm.contract import hooks_by_capability
from pyvmm.errors import ConfigError, UnsupportedCapability
from pyvmm.exits import DebugExit, ExitKind, InterruptedExit, IoExit, MmioExit
from pyvmm.plugins import ENTRY_POINT_GROUP
from pyvmm.softcpu import RdtscExit, StringIoExit
from pyvmm.testing.conformance import programs as p
from pyvmm.vcpu_state import StateKind
from pyvmm.vm import Backend, Vcpu, Vm

CODE = 0x100000
# mov ebx, 0xd0000000 / mov eax, [rbx] / add eax, 1 / mov [rbx + 8], eax / hlt
MMIO_X86 = bytes.fromhex("bb000000d08b0383c001894308f4")
SPIN_X86 = bytes.fromhex("ebfe")  # 1: jmp 1b
NOPS_X86 = bytes.fromhex("909090f4")  # nop; nop; nop; hlt


def boot_x86(backend: Backend, code: bytes, **options: object) -> tuple[Vm, Vcpu]:
    vm = backend.create_vm({"arch": "x86_64", "backend_options": options})
    vm.add_memory(0, 0x200000)
    vm.memory.write(CODE, code)
    vcpu = vm.create_vcpu()
    vm.boot(BootSpec(arch=Arch.X86_64, entry=CODE, stack=0x80000))
    return vm, vcpu


def test_manifest() -> None:
    manifest = unicorn_manifest()
    assert (manifest.name, manifest.version) == ("unicorn", __version__)
    assert set(manifest.guest_arches) == {Arch.X86_64, Arch.AARCH64}
    assert manifest.priority < 100, "a hardware backend (KVM: 100) must win auto-selection"
    assert manifest.auto_select


def test_every_declared_capability_has_its_hooks() -> None:
    caps = unicorn_manifest().capability_set
    for cap, names in hooks_by_capability().items():
        for name in names:
            assert hasattr(plugin, name) == (cap in caps), f"{name} vs {cap.name}"
    for cap in (Capability.IRQCHIP, Capability.MULTI_VCPU, Capability.PVCLOCK, Capability.MSRS):
        assert cap not in caps, f"the software CPU cannot honour {cap.name}"


def test_installed_entry_point() -> None:
    points = [ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == "unicorn"]
    if not points:
        pytest.skip("pyvmm-unicorn is not installed in this environment")
    assert points[0].value == "pyvmm_unicorn.manifest:manifest"
    assert points[0].dist is not None and points[0].dist.metadata["Name"] == "pyvmm-unicorn"


def test_backend_options_are_checked(backend: Backend) -> None:
    with pytest.raises(ConfigError, match="frobnicate"):
        backend.create_vm({"backend_options": {"frobnicate": 1}})
    with pytest.raises(ConfigError, match="coherent_code"):
        backend.create_vm({"backend_options": {"coherent_code": "yes"}})
    with pytest.raises(ConfigError, match="string_batch"):
        backend.create_vm({"backend_options": {"string_batch": "all"}})
    with pytest.raises(ConfigError, match="string_batch: needs exit_timing 'after'"):
        backend.create_vm({"backend_options": {"string_batch": 64, "exit_timing": "before"}})


def test_string_io_batches_and_rdtsc_exits_through_the_public_api(backend: Backend) -> None:
    """``string_batch``: the conformance suite's REP INSB/OUTSB guest gets one
    exit per instruction; ``intercept: [rdtsc]``: RDTSC is an exit the VMM answers."""
    vm, vcpu = boot_x86(backend, p.REP_INSB.code, string_batch=4096)
    with vm:
        exit_ = vcpu.run()
        assert isinstance(exit_, StringIoExit) and (exit_.port, exit_.count, exit_.is_write) == (0x11, 4, False)
        exit_.data[:4] = b"pyvm"
        exit_ = vcpu.run()
        assert isinstance(exit_, StringIoExit) and (exit_.count, bytes(exit_.data)) == (4, b"pyvm")
        assert vcpu.run().kind is ExitKind.HLT
    # rdtsc / out 0x10, eax / hlt
    vm, vcpu = boot_x86(backend, bytes.fromhex("0f31e710f4"), intercept=["rdtsc"])
    with vm:
        rdtsc = vcpu.run()
        assert isinstance(rdtsc, RdtscExit)
        rdtsc.tsc = 0xABCDEF
        out = vcpu.run()
        assert isinstance(out, IoExit) and struct.unpack("<I", out.data[:4])[0] == 0xABCDEF


def test_one_vcpu_per_vm(backend: Backend) -> None:
    with pytest.raises(UnsupportedCapability, match="MULTI_VCPU"):
        backend.create_vm({"vcpus": 2})


def test_state_kinds_per_arch(backend: Backend) -> None:
    vm, vcpu = boot_x86(backend, NOPS_X86)
    with vm:
        assert vcpu.get_regs().rip == CODE
        with pytest.raises(ConfigError, match="core_regs"):
            vcpu.get_state(StateKind.CORE_REGS)
        with pytest.raises(ConfigError, match="xsave"):
            vcpu.get_state(StateKind.XSAVE)
        with pytest.raises(ConfigError, match="expected Regs"):
            vcpu.set_state(StateKind.REGS, CoreRegs())


def test_ram_mapped_over_a_pending_mmio_access(backend: Backend) -> None:
    """The software CPU re-executes the instruction against the new RAM (KVM would
    still hand it the VMM's data): documented in pyvmm.softcpu."""
    vm, vcpu = boot_x86(backend, MMIO_X86)
    with vm:
        read = vcpu.run()
        assert isinstance(read, MmioExit) and read.address == 0xD0000000
        read.data[:4] = struct.pack("<I", 41)
        late = vm.add_memory(0xD0000000, 0x1000)
        vm.memory.write_u32(0xD0000000, 6)
        assert vcpu.run().kind is ExitKind.HLT, "no more exits: both accesses hit RAM"
        assert vm.memory.read_u32(0xD0000008) == 7
        vm.remove_memory(late)


def test_dirty_log_before_any_vcpu(backend: Backend) -> None:
    with backend.create_vm({"arch": "x86_64"}) as vm:
        region = vm.add_memory(0, 0x10000, log_dirty=True)
        assert vm.dirty_pages(region) == []


def test_single_step_and_breakpoints(backend: Backend) -> None:
    vm, vcpu = boot_x86(backend, NOPS_X86)
    with vm:
        vcpu.set_guest_debug(single_step=True)
        step = vcpu.run()
        assert isinstance(step, DebugExit) and step.pc == CODE + 1
        vcpu.set_guest_debug(breakpoints=[CODE + 3])
        hit = vcpu.run()
        assert isinstance(hit, DebugExit) and hit.pc == CODE + 3
        vcpu.set_guest_debug()
        assert vcpu.run().kind is ExitKind.HLT


def test_kick_from_another_thread(backend: Backend) -> None:
    vm, vcpu = boot_x86(backend, SPIN_X86)
    with vm:
        timer = threading.Timer(0.1, vcpu.kick)
        started = time.monotonic()
        timer.start()
        try:
            exit_ = vcpu.run()
        finally:
            timer.cancel()
        assert isinstance(exit_, InterruptedExit)
        assert time.monotonic() - started < 10


def test_aarch64_guest(backend: Backend) -> None:
    ram = 0x40000000
    # movz x5, #0x0900, lsl #16 / str x0, [x5] / wfi
    code = bytes.fromhex("0520a1d2a00000f97f2003d5")
    with backend.create_vm({"arch": "aarch64"}) as vm:
        vm.add_memory(ram, 0x200000)
        vm.memory.write(ram + 0x80000, code)
        vcpu = vm.create_vcpu()
        vm.boot(BootSpec(arch=Arch.AARCH64, entry=ram + 0x80000, fdt_address=ram + 0x100000, fdt_size=0x1000))
        write = vcpu.run()
        assert isinstance(write, MmioExit) and write.is_write
        assert struct.unpack("<Q", write.data[:8])[0] == ram + 0x100000
        assert vcpu.run().kind is ExitKind.HLT
        regs = vcpu.get_state(StateKind.CORE_REGS)
        assert regs.pc == ram + 0x80000 + 12
