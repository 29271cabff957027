"""The legacy firmware: the boot stub and handlers (bytes against their source),
the vector table and ACPI tables as a guest finds them, when the machine boots
through it, and S3 suspend/resume (with fakes, then on the contract backend)."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from coretests_support import MakeBackend
from machinetests_support import IRQCHIP_CAPS, MACHINE_CAPS, TINY_IMAGE, io_exit, machine_config, value_of

from pyvmm.arch.x86_64 import CR0_ET
from pyvmm.boot import BootSpec, X86Mode, X86VcpuInit, is_multiboot
from pyvmm.capabilities import Capability
from pyvmm.config import Arch, MemoryRegionSpec
from pyvmm.devices import acpi_pm, rtc
from pyvmm.devices.rtc import Rtc
from pyvmm.errors import ConfigError
from pyvmm.exits import IoExit
from pyvmm.machine import GuestImage, Machine, StopReason
from pyvmm.machine import legacy_firmware as fw
from pyvmm.machine.bus import PortBus
from pyvmm.memory import GuestMemory
from pyvmm.testing.conformance.programs import assemble_x86
from pyvmm.vm import Backend, Vcpu

ENTRY = 0x100000
MBI = 0x9000
MULTIBOOT = GuestImage(
    "multiboot-like", ((ENTRY, b"\xf4"),), ENTRY, X86Mode.PROTECTED, registers={"rax": 0x2BADB002, "rbx": MBI}
)
PROTECTED = GuestImage("protected", ((ENTRY, b"\xf4"),), ENTRY, X86Mode.PROTECTED, registers={"rax": 0x1234})


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    ram = GuestMemory()
    ram.insert(ram.allocate(MemoryRegionSpec(guest_phys_addr=0, size=2 << 20)))
    yield ram
    ram.close()


def spec(mode: X86Mode = X86Mode.PROTECTED, entry: int = ENTRY, **registers: int) -> BootSpec:
    return BootSpec(arch=Arch.X86_64, entry=entry, x86_mode=mode, registers=registers)


# --- code ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("source", "code", "directive"),
    [
        (fw.BOOT_STUB_SOURCE, fw.BOOT_STUB, ".code32"),
        (fw.BOOT_STUB_SOURCE, fw.BOOT_STUB, ".code64"),  # the same bytes run in long mode
        (fw.HANDLERS_SOURCE, fw.HANDLERS, ".code16"),
    ],
    ids=["stub-32", "stub-64", "handlers"],
)
def test_bytes_match_their_source(source: str, code: bytes, directive: str) -> None:
    assembled = assemble_x86(source, directive)
    if assembled is None:
        pytest.skip("no GNU as/objcopy on this machine")
    assert assembled == code


def test_the_stub_restores_al_and_jumps_to_the_entry() -> None:
    stub = fw.boot_stub(spec(rax=0x2BADB002))
    assert stub[-7:-5] == bytes([0xB0, 0x02])  # mov al, 0x02: EAX's low byte
    (rel,) = struct.unpack("<i", stub[-4:])
    assert fw.BOOT_STUB_ADDRESS + len(stub) + rel == ENTRY
    below = fw.boot_stub(spec(entry=0x8018))
    (rel,) = struct.unpack("<i", below[-4:])
    assert fw.BOOT_STUB_ADDRESS + len(below) + rel == 0x8018
    assert below[-5] == 0xE9 and below[-6] == 0  # no EAX given: AL is 0


def test_the_stub_takes_long_mode_in_reach_but_not_real_mode() -> None:
    stub = fw.boot_stub(spec(X86Mode.LONG, entry=0x7000_0000))
    (rel,) = struct.unpack("<i", stub[-4:])
    assert fw.BOOT_STUB_ADDRESS + len(stub) + rel == 0x7000_0000
    with pytest.raises(ConfigError, match="jump range"):
        fw.boot_stub(spec(X86Mode.LONG, entry=0xC000_0000))
    with pytest.raises(ConfigError, match="real-mode"):
        fw.boot_stub(spec(X86Mode.REAL, entry=0x7C00))


def test_multiboot_is_recognised_by_its_magic() -> None:
    assert is_multiboot(spec(rax=0x2BADB002, rbx=MBI))
    assert is_multiboot(spec(EAX=0x2BADB002))
    assert not is_multiboot(spec(rax=0x2BADB003))
    assert not is_multiboot(spec(X86Mode.LONG, rax=0x2BADB002))


# --- what the guest finds in memory -------------------------------------------------------
def install(memory: GuestMemory, boot: BootSpec | None = None) -> tuple[fw.LegacyFirmware, PortBus, BootSpec]:
    firmware = fw.LegacyFirmware(
        Rtc(), current_vcpu=_no_vcpu, wait=lambda seconds: True, poweroff=lambda: None, reset=lambda: None
    )
    pio = PortBus()
    return firmware, pio, firmware.install(memory, pio, boot or spec(rax=0x2BADB002))


def _no_vcpu() -> Vcpu:
    raise AssertionError("no vCPU expected")


def test_install_enters_through_the_stub_and_claims_the_pm_ports(memory: GuestMemory) -> None:
    firmware, pio, boot = install(memory)
    assert boot.entry == fw.BOOT_STUB_ADDRESS
    assert boot.registers == {"rax": 0x2BADB002}
    assert memory.read(fw.BOOT_STUB_ADDRESS, len(fw.BOOT_STUB)) == fw.boot_stub(spec(rax=0x2BADB002))
    assert pio.find(acpi_pm.PM_BASE) is firmware.pm
    assert pio.find(acpi_pm.PM_BASE + acpi_pm.PORT_COUNT) is None


def test_the_vector_table_points_at_the_handlers(memory: GuestMemory) -> None:
    install(memory)

    def handler(vector: int) -> int:
        offset, segment = struct.unpack("<HH", memory.read(vector * 4, 4))
        return (int(segment) << 4) + int(offset)

    master, slave, other = handler(0x08), handler(0x70), handler(0x21)
    assert all(handler(v) == master for v in range(0x08, 0x10))
    assert all(handler(v) == slave for v in range(0x70, 0x78))
    assert handler(0x00) == handler(0xFF) == other
    assert memory.read(master, 7) == bytes.fromhex("50b020e62058cf")  # EOI to the master
    assert memory.read(slave, 9) == bytes.fromhex("50b020e6a0e62058cf")  # EOI to both
    assert memory.read_u8(other) == 0xCF  # iret


def _table(memory: GuestMemory, address: int, signature: bytes) -> bytes:
    length = memory.read_u32(address + 4)
    data = memory.read(address, length)
    assert data[:4] == signature
    assert sum(data) % 256 == 0, f"{signature!r} checksum"
    return data


def test_acpi_tables_are_where_and_what_an_os_looks_for(memory: GuestMemory) -> None:
    install(memory)
    found = [a for a in range(0xE0000, 0x100000, 16) if memory.read(a, 8) == b"RSD PTR "]
    assert len(found) == 1
    rsdp = memory.read(found[0], 20)
    assert sum(rsdp) % 256 == 0 and rsdp[15] == 0  # revision 0: RSDT only
    rsdt = _table(memory, struct.unpack_from("<I", rsdp, 16)[0], b"RSDT")
    (fadt_address,) = struct.unpack_from("<I", rsdt, 36)
    fadt = _table(memory, fadt_address, b"FACP")
    facs_address, dsdt_address = struct.unpack_from("<II", fadt, 36)
    assert struct.unpack_from("<H", fadt, 46)[0] == fw.SCI_IRQ
    evt, _, cnt, _, _, tmr = struct.unpack_from("<6I", fadt, 56)
    assert (evt, cnt, tmr) == (0x600, 0x604, 0x608)
    assert tuple(fadt[88:92]) == (4, 2, 0, 4)  # PM1 event, PM1 control, PM2, timer lengths
    assert fadt[108] == rtc.REG_CENTURY
    assert facs_address % 64 == 0
    assert memory.read(facs_address, 4) == b"FACS" and memory.read_u32(facs_address + 4) == 64
    assert memory.read_u32(facs_address + 12) == 0  # no waking vector yet
    dsdt = _table(memory, dsdt_address, b"DSDT")
    for name, sleep_type in ((b"_S3_", acpi_pm.SLP_TYP_S3), (b"_S5_", acpi_pm.SLP_TYP_S5)):
        at = dsdt.index(b"\x08" + name) + 5  # after NameOp and the name
        assert dsdt[at] == 0x12 and dsdt[at + 2] == 4  # PackageOp, PkgLength, 4 elements
        assert dsdt[at + 3] == sleep_type  # ZeroOp / OneOp: SLP_TYPa


def _madt_entries(madt: bytes) -> list[tuple[int, bytes]]:
    entries, at = [], 44
    while at < len(madt):
        kind, length = madt[at], madt[at + 1]
        entries.append((kind, madt[at : at + length]))
        at += length
    return entries


def test_the_madt_lists_each_vcpu_and_the_ioapic(memory: GuestMemory) -> None:
    firmware = fw.LegacyFirmware(
        Rtc(), current_vcpu=_no_vcpu, wait=lambda s: True, poweroff=lambda: None, reset=lambda: None, apic_cpus=3
    )
    firmware.install(memory, PortBus(), spec(rax=0x2BADB002))
    rsdt = _table(memory, fw.RSDT_ADDRESS, b"RSDT")
    fadt_address, madt_address = struct.unpack_from("<II", rsdt, 36)
    assert len(rsdt) == 44 and memory.read(fadt_address, 4) == b"FACP"
    madt = _table(memory, madt_address, b"APIC")
    assert struct.unpack_from("<II", madt, 36) == (0xFEE00000, 1)  # local APIC address, PCAT_COMPAT
    entries = _madt_entries(madt)
    lapics = [struct.unpack("<BBBBI", e) for kind, e in entries if kind == 0]
    assert [(uid, apic_id, flags) for _, _, uid, apic_id, flags in lapics] == [(0, 0, 1), (1, 1, 1), (2, 2, 1)]
    ioapics = [struct.unpack("<BBBBII", e) for kind, e in entries if kind == 1]
    assert [(ident, address, gsi_base) for _, _, ident, _, address, gsi_base in ioapics] == [(0, 0xFEC00000, 0)]
    overrides = [struct.unpack("<BBBBIH", e) for kind, e in entries if kind == 2]
    assert [(bus, irq, gsi, flags) for _, _, bus, irq, gsi, flags in overrides] == [(0, 9, 9, 0b1101)]  # SCI
    assert fw.MADT_ADDRESS + len(madt) <= fw.FIRMWARE_BASE + fw.HANDLERS_OFFSET


def test_no_madt_without_the_hypervisors_apics(memory: GuestMemory) -> None:
    install(memory)
    rsdt = _table(memory, fw.RSDT_ADDRESS, b"RSDT")
    assert len(rsdt) == 40  # the FADT only
    assert memory.read(fw.MADT_ADDRESS, 4) == bytes(4)


@pytest.mark.parametrize("cpus", [0, fw.MAX_MADT_CPUS + 1])
def test_a_madt_beyond_its_room_is_refused(cpus: int) -> None:
    with pytest.raises(ConfigError, match=f"1 to {fw.MAX_MADT_CPUS} vCPUs, not {cpus}"):
        fw.LegacyFirmware(
            Rtc(), current_vcpu=_no_vcpu, wait=lambda s: True, poweroff=lambda: None, reset=lambda: None, apic_cpus=cpus
        )
    assert len(fw.madt(fw.MAX_MADT_CPUS)) + fw.MADT_ADDRESS <= fw.FIRMWARE_BASE + fw.HANDLERS_OFFSET


def test_an_image_in_the_bios_area_is_refused(memory: GuestMemory) -> None:
    memory.write(0xFFFF0, b"\xea")
    with pytest.raises(ConfigError, match=r"0xf0000\.\.0xfffff"):
        install(memory)
    assert memory.read(fw.RSDP_ADDRESS, 8) == bytes(8)  # nothing written


# --- S3 with fakes ----------------------------------------------------------------------
class FakeVcpu:
    def __init__(self) -> None:
        self.inits: list[X86VcpuInit] = []

    def init(self, boot: X86VcpuInit) -> None:
        self.inits.append(boot)


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.25

    def __call__(self) -> float:
        return self.now


def suspend_rig(memory: GuestMemory, *, wakes: bool = True) -> tuple[fw.LegacyFirmware, FakeVcpu, list[object]]:
    vcpu, log = FakeVcpu(), cast(list[object], [])
    clock = Clock()

    def wait(seconds: float | None) -> bool:
        log.append(seconds)
        if seconds is not None:
            clock.now += seconds
        return wakes

    firmware = fw.LegacyFirmware(
        Rtc(clock),
        current_vcpu=lambda: cast(Vcpu, vcpu),
        wait=wait,
        poweroff=lambda: log.append("poweroff"),
        reset=lambda: log.append("reset"),
    )
    firmware.install(memory, PortBus(), spec(rax=0x2BADB002))
    return firmware, vcpu, log


def arm_rtc_alarm(firmware: fw.LegacyFirmware) -> None:
    for index in (rtc.REG_SECONDS_ALARM, rtc.REG_MINUTES_ALARM, rtc.REG_HOURS_ALARM):
        firmware.rtc.cmos[index] = rtc.ALARM_DONT_CARE
    firmware.rtc.cmos[rtc.REG_B] |= rtc.B_AIE
    firmware.pm.write(2, 2, acpi_pm.EN_RTC)


def test_s3_sleeps_until_the_alarm_and_resumes_at_the_waking_vector(memory: GuestMemory) -> None:
    firmware, vcpu, log = suspend_rig(memory)
    arm_rtc_alarm(firmware)
    memory.write_u32(fw.FACS_WAKING_VECTOR, 0x12345)
    firmware.pm.write(4, 2, 0x2400)
    assert log == [pytest.approx(0.75)]  # to the next second
    (state,) = vcpu.inits
    assert (state.sregs.cs.selector, state.sregs.cs.base, state.regs.rip) == (0x1234, 0x12340, 5)
    assert state.sregs.cr0 == CR0_ET and state.sregs.efer == 0 and state.regs.rflags == 0x2
    assert state.sregs.ds.base == 0 and state.sregs.ds.selector == 0
    assert firmware.pm.read(0, 2) == acpi_pm.STS_WAK | acpi_pm.STS_RTC
    firmware.rtc.index = rtc.REG_C
    assert firmware.rtc.read(1, 1) & rtc.C_AF


def test_s3_without_a_wake_source_sleeps_until_the_run_stops(memory: GuestMemory) -> None:
    firmware, vcpu, log = suspend_rig(memory, wakes=False)
    arm_rtc_alarm(firmware)
    firmware.pm.write(2, 2, 0)  # RTC_EN off: the alarm cannot wake it
    firmware.pm.write(4, 2, 0x2400)
    assert log == [None] and vcpu.inits == []
    assert firmware.pm.read(0, 2) == 0


def test_s3_interrupted_by_a_stop_does_not_resume(memory: GuestMemory) -> None:
    firmware, vcpu, log = suspend_rig(memory, wakes=False)
    arm_rtc_alarm(firmware)
    memory.write_u32(fw.FACS_WAKING_VECTOR, 0x1000)
    firmware.pm.write(4, 2, 0x2400)
    assert len(log) == 1 and vcpu.inits == []


def test_resume_without_a_waking_vector_resets_and_s5_powers_off(memory: GuestMemory) -> None:
    firmware, vcpu, log = suspend_rig(memory)
    arm_rtc_alarm(firmware)
    firmware.pm.write(4, 2, 0x2400)
    assert log[1:] == ["reset"] and vcpu.inits == []
    firmware.pm.write(4, 2, 0x2000)
    assert log[1:] == ["reset", "poweroff"]


# --- the machine ------------------------------------------------------------------------
def build(backend: Backend, image: GuestImage = MULTIBOOT, **settings: object) -> Machine:
    return Machine(machine_config(**settings), backend=backend, image=image)


def boot_rip(backend_calls: list[tuple[object, ...]]) -> int:
    state = cast(X86VcpuInit, backend_calls[0][2])
    return state.regs.rip


def test_multiboot_kernels_boot_through_it_by_default(make_backend: MakeBackend) -> None:
    test_backend, backend = make_backend(IRQCHIP_CAPS)
    test_backend.script_exits(io_exit(0xF4, 1, write=True))  # with an irqchip, a halt never ends the run
    with build(backend) as machine:
        machine.run()
        assert machine.firmware is not None
        assert machine.pio.find(acpi_pm.PM_BASE) is machine.firmware.pm
        assert machine.vm.memory.read(fw.RSDP_ADDRESS, 8) == b"RSD PTR "
    inits = test_backend.calls_of("pyvmm_init_vcpu")
    assert boot_rip(inits) == fw.BOOT_STUB_ADDRESS
    state = cast(X86VcpuInit, inits[0][2])
    assert (state.regs.rax, state.regs.rbx) == (0x2BADB002, MBI)  # the kernel's, untouched


@pytest.mark.parametrize(
    ("image", "setting", "through_firmware"),
    [
        (MULTIBOOT, False, False),
        (PROTECTED, None, False),
        (PROTECTED, True, True),
        (TINY_IMAGE, None, False),
        (TINY_IMAGE, True, True),
    ],
    ids=["multiboot-off", "protected-default", "protected-on", "long-default", "long-on"],
)
def test_the_option_decides_otherwise(
    make_backend: MakeBackend, image: GuestImage, setting: bool | None, through_firmware: bool
) -> None:
    test_backend, backend = make_backend(IRQCHIP_CAPS)
    test_backend.script_exits(io_exit(0xF4, 1, write=True))
    with build(backend, image, legacy_bios=setting) as machine:
        machine.run()
        assert (machine.firmware is not None) is through_firmware
        assert (machine.pio.find(acpi_pm.PM_BASE) is not None) is through_firmware
        assert any(machine.vm.memory.read(fw.FIRMWARE_BASE, fw.FIRMWARE_SIZE)) is through_firmware
    expected = fw.BOOT_STUB_ADDRESS if through_firmware else image.entry
    assert boot_rip(test_backend.calls_of("pyvmm_init_vcpu")) == expected


def _tiny_bzimage(path: Path) -> Path:
    """The smallest file pyvmm loads as a Linux bzImage (boot protocol 2.15, 64-bit entry)."""
    kernel = b"\xf4" * 0x2000
    setup = bytearray(5 * 512)
    setup[0x1F1] = 4  # setup sectors
    struct.pack_into("<I", setup, 0x1F4, len(kernel) // 16)
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200:0x202] = bytes([0xEB, 0x6A])
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x020F)
    setup[0x211] = 0x01  # LOADED_HIGH
    struct.pack_into("<III", setup, 0x22C, 0x7FFFFFFF, 0x200000, 0)
    setup[0x234] = 1  # relocatable
    struct.pack_into("<HI", setup, 0x236, 1, 2047)  # XLF_KERNEL_64, cmdline size
    struct.pack_into("<QI", setup, 0x258, 0x1000000, 0x400000)  # pref_address, init_size
    path.write_bytes(bytes(setup) + kernel)
    return path


@pytest.mark.parametrize(
    ("caps", "cpus", "apic_cpus"), [(IRQCHIP_CAPS, 2, 2), (IRQCHIP_CAPS, 1, 1), (MACHINE_CAPS, 1, None)]
)
def test_linux_boots_through_it_for_the_madt_where_the_hypervisor_has_the_apics(
    make_backend: MakeBackend, tmp_path: Path, caps: tuple[Capability, ...], cpus: int, apic_cpus: int | None
) -> None:
    test_backend, backend = make_backend(caps)
    test_backend.script_exits(io_exit(0xF4, 1, write=True))
    config = machine_config(kernel=_tiny_bzimage(tmp_path / "bzImage"), memory="64M", cpus=cpus)
    with Machine(config, backend=backend) as machine:
        machine.run()
        firmware = machine.firmware
        assert (firmware.apic_cpus if firmware is not None else None) == apic_cpus
        rsdp = machine.vm.memory.read(fw.RSDP_ADDRESS, 8)
        assert rsdp == (b"RSD PTR " if apic_cpus else bytes(8))
        if apic_cpus:
            madt = _table(machine.vm.memory, fw.MADT_ADDRESS, b"APIC")
            assert sum(kind == 0 for kind, _ in _madt_entries(madt)) == cpus


def test_a_real_mode_image_cannot_have_it(make_backend: MakeBackend) -> None:
    _, backend = make_backend(IRQCHIP_CAPS)
    real = GuestImage("real", ((0x7C00, b"\xf4"),), 0x7C00, X86Mode.REAL)
    with pytest.raises(ConfigError, match="real-mode"):
        build(backend, real, legacy_bios=True)


def _rtc_write(index: int, value: int) -> list[IoExit]:
    return [io_exit(0x70, 1, write=True, value=index), io_exit(0x71, 1, write=True, value=value)]


def test_s3_on_the_machine_resumes_the_vcpu_after_the_rtc_alarm(make_backend: MakeBackend) -> None:
    test_backend, backend = make_backend(IRQCHIP_CAPS)
    status_after = io_exit(acpi_pm.PM_BASE, 2)
    arm = [*_rtc_write(1, 0xC0), *_rtc_write(3, 0xC0), *_rtc_write(5, 0xC0), *_rtc_write(0x0B, 0x22)]
    test_backend.script_exits(
        io_exit(acpi_pm.PM_BASE + 2, 2, write=True, value=acpi_pm.EN_RTC),
        *arm,
        io_exit(acpi_pm.PM_BASE + 4, 2, write=True, value=0x2400),
        status_after,
        io_exit(0xF4, 4, write=True, value=0),
    )
    with build(backend) as machine:
        machine.vm.memory.write_u32(fw.FACS_WAKING_VECTOR, 0x1000)  # as s3.flat does
        started = time.monotonic()
        result = machine.run()
        slept = time.monotonic() - started
    assert result.reason is StopReason.DEBUG_EXIT and result.status == 1
    assert slept <= 1.5  # the alarm fires on the next second
    inits = test_backend.calls_of("pyvmm_init_vcpu")
    assert [boot_rip(inits[i:]) for i in range(len(inits))] == [fw.BOOT_STUB_ADDRESS, 0]
    resumed = cast(X86VcpuInit, inits[1][2])
    assert resumed.sregs.cs.selector == 0x100
    assert value_of(status_after) == acpi_pm.STS_WAK | acpi_pm.STS_RTC


def test_a_suspended_guest_still_stops_on_timeout(make_backend: MakeBackend) -> None:
    test_backend, backend = make_backend(IRQCHIP_CAPS)
    test_backend.script_exits(io_exit(acpi_pm.PM_BASE + 4, 2, write=True, value=0x2400))  # no wake-up armed
    with build(backend, timeout=0.3) as machine:
        result = machine.run()
    assert result.reason is StopReason.TIMEOUT
    assert len(test_backend.calls_of("pyvmm_init_vcpu")) == 1
