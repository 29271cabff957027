"""The boot-context rule: who sets the boot vCPU's registers.

Where the hypervisor initialises the boot context (Gunyah), core must never call
``pyvmm_init_vcpu``; the BootSpec goes to ``pyvmm_set_boot_context``.  Everywhere
else (KVM-style) core builds the registers and calls ``pyvmm_init_vcpu`` per vCPU.
"""

from __future__ import annotations

import dataclasses
import struct
import threading
from typing import Any

import pytest
from coretests_support import MakeBackend, RecordingBackend

from pyvmm.arch.aarch64 import PC_ID, PSTATE_ID, SP_EL1_ID, SP_ID, x_reg_id
from pyvmm.arch.x86_64 import Regs, Sregs
from pyvmm.boot import Aarch64VcpuInit, BootSpec, X86Mode, X86VcpuInit
from pyvmm.capabilities import Capability
from pyvmm.config import Arch
from pyvmm.errors import ConfigError, UnsupportedCapability, VmStateError
from pyvmm.memory import GuestMemory
from pyvmm.testing.contract_backend import InitVcpuCalled
from pyvmm.vm import Backend, Vm

GUNYAH_CAPS = (
    Capability.HYPERVISOR_INITIALIZED_BOOT_CONTEXT,
    Capability.VM_START,
    Capability.MULTI_VCPU,
)

AARCH64_SPEC = BootSpec(
    arch=Arch.AARCH64, entry=0x4008_0000, fdt_address=0x4800_0000, fdt_size=0x1_0000, registers={"x1": 0}
)


def _with_init_tripwire(backend: Backend) -> list[tuple[Any, ...]]:
    """Arm the backend so that a call of pyvmm_init_vcpu fails loudly.

    Registration refuses an init hook next to the boot-context capability, so the
    tripwire is planted after it, straight into the resolved implementations: if
    core ever looked the init hook up and called it, the test would blow up here
    instead of passing quietly."""
    tripped: list[tuple[Any, ...]] = []

    def init_tripwire(vcpu: Any, boot: Any) -> None:
        tripped.append((vcpu, boot))
        raise InitVcpuCalled("pyvmm_init_vcpu called although the hypervisor owns the boot context")

    backend.plugin.impls["pyvmm_init_vcpu"] = init_tripwire
    backend.hooks.init_vcpu = init_tripwire
    return tripped


@pytest.fixture
def gunyah(make_backend: MakeBackend) -> tuple[RecordingBackend, Backend, list[tuple[Any, ...]]]:
    test_backend, backend = make_backend(GUNYAH_CAPS, name="gunyah-like", arches=(Arch.AARCH64,))
    assert "pyvmm_init_vcpu" not in backend.plugin.impls  # registration gave it none
    return test_backend, backend, _with_init_tripwire(backend)


def _gunyah_vm(backend: Backend) -> Vm:
    vm = backend.create_vm({"arch": "aarch64", "vcpus": 2})
    vm.add_memory(0x4000_0000, "16M")
    vm.create_vcpu()
    vm.create_vcpu()
    return vm


# --- the hypervisor owns the boot context ------------------------------------------


def test_boot_goes_to_the_vm_and_never_to_init_vcpu(
    gunyah: tuple[RecordingBackend, Backend, list[tuple[Any, ...]]],
) -> None:
    test_backend, backend, tripped = gunyah
    with _gunyah_vm(backend) as vm:
        mark = len(test_backend.calls)
        vm.boot(AARCH64_SPEC)
        assert test_backend.hooks_since(mark) == ["pyvmm_set_boot_context", "pyvmm_start_vm"]
        assert test_backend.calls_of("pyvmm_set_boot_context") == [("pyvmm_set_boot_context", AARCH64_SPEC)]
        assert test_backend.vms[-1].boot == AARCH64_SPEC
        assert test_backend.vms[-1].started
        assert vm.started
        assert vm.boot_state_for(0) is None
        assert vm.boot_state_for(1) is None
    assert tripped == []
    assert "pyvmm_init_vcpu" not in test_backend.hook_names()


def test_set_boot_then_apply_boot_per_vcpu_thread(
    gunyah: tuple[RecordingBackend, Backend, list[tuple[Any, ...]]],
) -> None:
    """The multi-threaded path: set_boot on the VM, apply_boot on each vCPU's own
    thread, then start (twice: it is idempotent)."""
    test_backend, backend, tripped = gunyah
    vm = backend.create_vm({"arch": "aarch64", "vcpus": 2})
    vm.add_memory(0x4000_0000, "16M")
    errors: list[BaseException] = []
    created = threading.Barrier(2)
    booted = threading.Event()

    def vcpu_thread() -> None:
        try:
            vcpu = vm.create_vcpu(1)
            created.wait()
            booted.wait(10)
            vcpu.apply_boot()
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread
            errors.append(exc)

    thread = threading.Thread(target=vcpu_thread)
    thread.start()
    boot_vcpu = vm.create_vcpu(0)
    created.wait()
    vm.set_boot(dataclasses.asdict(AARCH64_SPEC))  # a plain dict is validated into a BootSpec
    booted.set()
    boot_vcpu.apply_boot()
    thread.join()
    assert errors == []
    vm.start()
    vm.start()
    assert test_backend.calls_of("pyvmm_set_boot_context") == [("pyvmm_set_boot_context", AARCH64_SPEC)]
    assert len(test_backend.calls_of("pyvmm_start_vm")) == 1
    assert tripped == []
    assert "pyvmm_init_vcpu" not in test_backend.hook_names()
    vm.close()


def test_vcpu_init_is_refused(gunyah: tuple[RecordingBackend, Backend, list[tuple[Any, ...]]]) -> None:
    _, backend, tripped = gunyah
    with _gunyah_vm(backend) as vm:
        with pytest.raises(UnsupportedCapability) as info:
            vm.vcpus[0].init(Aarch64VcpuInit(regs={PC_ID: 0x4008_0000}))
        assert "'gunyah-like'" in str(info.value)
        assert "hypervisor initialises the boot context" in str(info.value)
    assert tripped == []


def test_boot_context_cannot_change_after_start(
    gunyah: tuple[RecordingBackend, Backend, list[tuple[Any, ...]]],
) -> None:
    test_backend, backend, _ = gunyah
    with _gunyah_vm(backend) as vm:
        vm.boot(AARCH64_SPEC)
        with pytest.raises(VmStateError, match="already started"):
            vm.set_boot(AARCH64_SPEC)
        with pytest.raises(UnsupportedCapability, match="LATE_MEMORY"):
            vm.add_memory(0x8000_0000, 0x1000)
    assert len(test_backend.calls_of("pyvmm_set_boot_context")) == 1


def test_apply_boot_before_set_boot_is_a_state_error(
    gunyah: tuple[RecordingBackend, Backend, list[tuple[Any, ...]]],
) -> None:
    _, backend, _ = gunyah
    with _gunyah_vm(backend) as vm, pytest.raises(VmStateError, match="set_boot"):
        vm.vcpus[0].apply_boot()


# --- KVM-style: core sets the registers -------------------------------------------

BOOT_TABLES = 0x1_0000
ENTRY = 0x10_0000


def _kvm_vm(make_backend: MakeBackend, arch: Arch = Arch.X86_64) -> tuple[RecordingBackend, Vm]:
    test_backend, backend = make_backend([Capability.MULTI_VCPU], name="kvm-like")
    vm = backend.create_vm({"arch": arch, "vcpus": 2})
    return test_backend, vm


def _inits(test_backend: RecordingBackend) -> dict[int, Any]:
    return {call[1]: call[2] for call in test_backend.calls_of("pyvmm_init_vcpu")}


def _translate(memory: GuestMemory, cr3: int, va: int) -> int | None:
    """Walk 4-level x86 page tables (2 MiB leaves allowed); None if not mapped."""
    frame_mask = 0x000F_FFFF_FFFF_F000
    table = cr3 & frame_mask
    for level, shift in enumerate((39, 30, 21, 12)):
        entry = memory.read_u64(table + ((va >> shift) & 0x1FF) * 8)
        if not entry & 1:
            return None
        if level in (1, 2) and entry & 0x80:  # 1 GiB / 2 MiB page
            page = 1 << shift
            return (entry & frame_mask & ~(page - 1)) | (va & (page - 1))
        table = entry & frame_mask
    return table | (va & 0xFFF)


def _descriptor(memory: GuestMemory, gdt_base: int, selector: int) -> dict[str, int]:
    raw = memory.read_u64(gdt_base + (selector & ~7))
    return {
        "base": ((raw >> 16) & 0xFF_FFFF) | ((raw >> 56) & 0xFF) << 24,
        "limit": (raw & 0xFFFF) | ((raw >> 48) & 0xF) << 16,
        "type": (raw >> 40) & 0xF,
        "s": (raw >> 44) & 1,
        "present": (raw >> 47) & 1,
        "l": (raw >> 53) & 1,
        "db": (raw >> 54) & 1,
        "g": (raw >> 55) & 1,
    }


def test_x86_long_mode(make_backend: MakeBackend) -> None:
    test_backend, vm = _kvm_vm(make_backend)
    with vm:
        vm.add_memory(0, "2M")
        vm.create_vcpu()
        vm.create_vcpu()
        vm.boot(
            BootSpec(
                arch=Arch.X86_64,
                entry=ENTRY,
                stack=0x8_0000,
                boot_tables=BOOT_TABLES,
                registers={"rsi": 0x7000, "EBX": 5},
            )
        )
        hooks = test_backend.hook_names()
        assert "pyvmm_set_boot_context" not in hooks
        assert "pyvmm_start_vm" not in hooks  # no VM_START: start only marks the VM
        assert vm.started
        inits = _inits(test_backend)
        assert sorted(inits) == [0, 1]
        boot = inits[0]
        assert isinstance(boot, X86VcpuInit)
        assert boot.boot_cpu
        regs, sregs = boot.regs, boot.sregs
        assert (regs.rip, regs.rsp, regs.rsi, regs.rbx, regs.rflags) == (ENTRY, 0x8_0000, 0x7000, 5, 0x2)
        assert sregs.cr0 & (1 << 0) and sregs.cr0 & (1 << 31)  # PE, PG
        assert sregs.cr4 & (1 << 5)  # PAE
        assert sregs.efer & (1 << 8) and sregs.efer & (1 << 10)  # LME, LMA
        assert sregs.cr3 == BOOT_TABLES + 0x1000
        assert (sregs.cs.l, sregs.cs.db, sregs.cs.selector) == (1, 0, 0x08)
        assert (sregs.gdt.base, sregs.gdt.limit) == (BOOT_TABLES, 31)

        memory = vm.memory
        # The GDT as the CPU would load it: null, code64, data, code32.
        assert memory.read_u64(BOOT_TABLES) == 0
        assert memory.read_u64(BOOT_TABLES + 0x08) == 0x00AF_9B00_0000_FFFF
        assert memory.read_u64(BOOT_TABLES + 0x10) == 0x00CF_9300_0000_FFFF
        assert memory.read_u64(BOOT_TABLES + 0x18) == 0x00CF_9B00_0000_FFFF
        # ... and it agrees with the hidden segment state handed to the backend.
        for seg in (sregs.cs, sregs.ds, sregs.ss):
            desc = _descriptor(memory, sregs.gdt.base, seg.selector)
            assert (desc["type"], desc["l"], desc["db"], desc["g"]) == (seg.type, seg.l, seg.db, seg.g)
            assert desc["present"] == 1
        # The page tables identity-map the low 4 GiB with 2 MiB pages, and no more.
        for va in (0, 0x1234, ENTRY, 0x20_0000 - 1, 0x7FFF_FFFF, 0xC000_0005, 0xFFFF_FFFF):
            assert _translate(memory, sregs.cr3, va) == va
        assert _translate(memory, sregs.cr3, 1 << 32) is None

        secondary = inits[1]
        assert isinstance(secondary, X86VcpuInit)
        assert not secondary.boot_cpu
        assert secondary.regs == Regs()
        assert secondary.sregs == Sregs()


def test_x86_protected_mode(make_backend: MakeBackend) -> None:
    test_backend, vm = _kvm_vm(make_backend)
    with vm:
        vm.add_memory(0, "1M")
        vm.create_vcpu()
        vm.boot({"arch": "x86_64", "entry": ENTRY, "x86_mode": "protected", "boot_tables": BOOT_TABLES})
        boot = _inits(test_backend)[0]
        assert isinstance(boot, X86VcpuInit)
        sregs = boot.sregs
        assert boot.regs.rip == ENTRY
        assert sregs.cr0 & 1 and not sregs.cr0 & (1 << 31)  # PE without paging
        assert (sregs.cr4, sregs.efer) == (0, 0)
        assert (sregs.cs.selector, sregs.cs.l, sregs.cs.db, sregs.cs.g) == (0x18, 0, 1, 1)
        assert (sregs.cs.base, sregs.cs.limit) == (0, 0xFFFF_FFFF)
        assert vm.memory.read_u64(BOOT_TABLES + 0x18) == 0x00CF_9B00_0000_FFFF
        # Only the GDT page: protected mode writes no page tables.
        assert vm.memory.read(BOOT_TABLES + 0x1000, 6 * 0x1000) == bytes(6 * 0x1000)


def test_x86_real_mode(make_backend: MakeBackend) -> None:
    test_backend, vm = _kvm_vm(make_backend)
    with vm:
        vm.add_memory(0, "1M")
        vm.create_vcpu()
        vm.boot(BootSpec(arch=Arch.X86_64, entry=0x1_2345, x86_mode=X86Mode.REAL))
        boot = _inits(test_backend)[0]
        assert isinstance(boot, X86VcpuInit)
        cs = boot.sregs.cs
        assert (cs.base, cs.selector, boot.regs.rip) == (0x1_0000, 0x1000, 0x2345)
        assert cs.base + boot.regs.rip == 0x1_2345
        assert cs.selector << 4 == cs.base
        assert not boot.sregs.cr0 & 1  # PE clear
        assert boot.sregs.efer == 0
        assert vm.memory.read(0, 0x2_0000) == bytes(0x2_0000)  # no boot tables written


def test_x86_boot_tables_outside_ram(make_backend: MakeBackend) -> None:
    test_backend, vm = _kvm_vm(make_backend)
    with vm:
        vm.add_memory(0, 0x4000)  # 4 pages; long mode needs 7
        vm.create_vcpu()
        with pytest.raises(ConfigError, match="boot tables"):
            vm.boot(BootSpec(arch=Arch.X86_64, entry=ENTRY, boot_tables=0x1000))
        assert "pyvmm_init_vcpu" not in test_backend.hook_names()


def test_x86_unknown_boot_register(make_backend: MakeBackend) -> None:
    _, vm = _kvm_vm(make_backend)
    with vm:
        vm.add_memory(0, "1M")
        with pytest.raises(ConfigError, match="'xmm0'"):
            vm.set_boot(BootSpec(arch=Arch.X86_64, entry=ENTRY, registers={"xmm0": 1}))


def test_aarch64(make_backend: MakeBackend) -> None:
    test_backend, vm = _kvm_vm(make_backend, Arch.AARCH64)
    with vm:
        vm.add_memory(0x4000_0000, "16M")
        vm.create_vcpu()
        vm.create_vcpu()
        vm.boot(dataclasses.replace(AARCH64_SPEC, stack=0x4100_0000))
        inits = _inits(test_backend)
        boot = inits[0]
        assert isinstance(boot, Aarch64VcpuInit)
        assert boot.boot_cpu and not boot.power_off
        # The KVM one-reg ids (arch/arm64/include/uapi/asm/kvm.h), spelled out.
        # The boot stack goes to SP_EL1 (after user_pt_regs): an EL1h kernel runs on it.
        pc, x0, x1, pstate, sp = (
            0x6030_0000_0010_0040,
            0x6030_0000_0010_0000,
            0x6030_0000_0010_0002,
            0x6030_0000_0010_0042,
            0x6030_0000_0010_0044,
        )
        assert (PC_ID, x_reg_id(0), x_reg_id(1), PSTATE_ID, SP_EL1_ID) == (pc, x0, x1, pstate, sp)
        assert SP_ID == 0x6030_0000_0010_003E  # SP_EL0
        assert boot.regs[pc] == 0x4008_0000
        assert boot.regs[x0] == 0x4800_0000  # the device tree
        assert boot.regs[pstate] == 0x3C5  # EL1h, DAIF masked
        assert boot.regs[sp] == 0x4100_0000
        assert boot.regs[x1] == boot.regs[x_reg_id(2)] == boot.regs[x_reg_id(3)] == 0
        secondary = inits[1]
        assert isinstance(secondary, Aarch64VcpuInit)
        assert not secondary.boot_cpu
        assert secondary.power_off
        assert secondary.regs == {}


def test_aarch64_bad_register(make_backend: MakeBackend) -> None:
    _, vm = _kvm_vm(make_backend, Arch.AARCH64)
    with vm, pytest.raises(ConfigError, match="'x31'"):
        vm.set_boot(BootSpec(arch=Arch.AARCH64, entry=0x4008_0000, registers={"x31": 1}))


def test_boot_spec_for_the_other_arch(make_backend: MakeBackend) -> None:
    _, vm = _kvm_vm(make_backend, Arch.AARCH64)
    with vm, pytest.raises(ConfigError, match="arch"):
        vm.set_boot(BootSpec(arch=Arch.X86_64, entry=0x1000, x86_mode=X86Mode.REAL))


def test_vcpu_init_directly_and_apply_boot_thread_rule(make_backend: MakeBackend) -> None:
    test_backend, vm = _kvm_vm(make_backend)
    with vm:
        vm.add_memory(0, "1M")
        vcpu = vm.create_vcpu()
        record = X86VcpuInit(regs=Regs(rip=0x7C00), sregs=Sregs())
        vcpu.init(record)
        assert test_backend.calls_of("pyvmm_init_vcpu") == [("pyvmm_init_vcpu", 0, record)]
        vm.set_boot(BootSpec(arch=Arch.X86_64, entry=0x7C00, x86_mode=X86Mode.REAL))
        errors: list[BaseException] = []

        def elsewhere() -> None:
            try:
                vcpu.apply_boot()
            except BaseException as exc:  # noqa: BLE001 - inspected below
                errors.append(exc)

        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
        assert len(errors) == 1
        assert isinstance(errors[0], VmStateError)
        assert len(test_backend.calls_of("pyvmm_init_vcpu")) == 1


def test_gdt_descriptor_helper_matches_known_encoding() -> None:
    """Self-check of the decoder used above, on a well-known descriptor."""
    memory = GuestMemory()
    from pyvmm.config import MemoryRegionSpec

    region = memory.allocate(MemoryRegionSpec(guest_phys_addr=0, size=0x1000))
    memory.insert(region)
    memory.write(8, struct.pack("<Q", 0x00CF_9A00_0000_FFFF))  # classic flat 32-bit code
    assert _descriptor(memory, 0, 8) == {
        "base": 0,
        "limit": 0xF_FFFF,
        "type": 0xA,
        "s": 1,
        "present": 1,
        "l": 0,
        "db": 1,
        "g": 1,
    }
    memory.close()
