"""What a PC BIOS leaves behind for a kernel, without running a BIOS: pyvmm's
"legacy firmware" for Multiboot kernels.

Under QEMU a Multiboot kernel starts after SeaBIOS has set up the PC, and
kvm-unit-tests relies on some of that: realmode.flat sleeps in ``hlt`` with the
8259s as the BIOS programmed them and is woken by the BIOS's timer tick; s3.flat
finds the ACPI tables, suspends to RAM and expects the firmware to resume it at
the waking vector.  This module provides the same state, written by pyvmm:

* **the interrupt controllers and the timer**, programmed by a boot stub
  (:data:`BOOT_STUB_SOURCE`) the vCPU runs before the kernel's entry point:
  8259 vector bases 0x08 and 0x70, the masks SeaBIOS leaves (master 0xb8,
  slave 0x8e), and PIT channel 0 ticking at 18.2 Hz (mode 3, count 65536).
  Port writes are the only backend-neutral way to reach the hypervisor's
  in-kernel PIC and PIT, and the stub is what a BIOS does at POST.  It clobbers
  nothing: AL, the only register it uses, is reloaded with the boot value, and
  neither ``mov`` nor ``out`` touches the flags.  The same bytes run in 32-bit
  protected mode and in long mode; a real-mode entry gets no stub.
* **the real-mode interrupt vector table** at 0: every vector points at an
  ``iret`` in the F segment, the 8259 vectors (0x08-0x0f, 0x70-0x77) at
  handlers that acknowledge the interrupt (:data:`HANDLERS_SOURCE`), as a
  BIOS's default handlers do.
* **ACPI tables** (ACPI 1.0: RSDP, RSDT, FADT, FACS and a DSDT that holds only
  the ``\\_S3`` and ``\\_S5`` sleep types) in the F segment, describing the
  PM registers of :mod:`pyvmm.devices.acpi_pm` and the RTC's century byte; on a
  machine with the hypervisor's interrupt controllers also a MADT: one local APIC
  per vCPU and the IOAPIC, which is how an SMP Linux finds its CPUs (Debian's
  kernels have no MP-table parser, ``CONFIG_X86_MPPARSE`` is off).
* **S3 resume**: when the guest suspends to RAM (PM1_CNT), the vCPU that wrote
  it sleeps until the RTC alarm (if PM1_EN.RTC_EN and RTC B.AIE allow it to
  wake the machine) and then starts in real mode at the FACS waking vector,
  CS:IP = ``vector >> 4 : vector & 0xf``, as the BIOS's resume path jumps there.
  Nothing else is reset: the other vCPUs, the devices and the interrupt
  controllers keep their state (an OS parks its other CPUs before S3 and
  restarts them with INIT/SIPI after).  A zero waking vector means "no resume
  code": the machine then resets, which ends the run.

The machine applies it to Multiboot kernels by default (``legacy_bios`` unset):
they are written for a BIOS-initialised PC and QEMU always has one; and to Linux
bzImages where the hypervisor's interrupt controllers run, for the MADT (with
pyvmm's userspace 8259s there is no local APIC or IOAPIC to describe, and Linux
does without ACPI).  Other images get it only when asked.

Memory used: the vector table (0-0x3ff) and 0xf0000-0xfffff, both inside what
the E820 map marks as not RAM or what a kernel expects a BIOS to own; loading
refuses an image that put bytes there.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable

from pyvmm.arch.x86_64 import CR0_ET, Regs, Segment, Sregs
from pyvmm.boot import BootSpec, X86Mode, X86VcpuInit
from pyvmm.devices import acpi_pm
from pyvmm.devices.acpi_pm import AcpiPm, SleepEvents
from pyvmm.devices.rtc import REG_CENTURY, Rtc
from pyvmm.errors import ConfigError
from pyvmm.lazy_logging import LazyLogger
from pyvmm.machine.bus import PortBus
from pyvmm.machine.layout import IOAPIC_BASE, LAPIC_BASE
from pyvmm.memory import GuestMemory
from pyvmm.vm import Vcpu

# Loads logging only when a record goes out (start-up time).
log = LazyLogger("pyvmm.machine")

IVT_BASE = 0
IVT_VECTORS = 256
FIRMWARE_SEGMENT = 0xF000
FIRMWARE_BASE = FIRMWARE_SEGMENT << 4
FIRMWARE_SIZE = 0x10000

# ACPI tables, at the start of the segment the OS scans for the RSDP.
RSDP_ADDRESS = 0xF0000
FACS_ADDRESS = 0xF0040  # the FACS must be 64-byte aligned
RSDT_ADDRESS = 0xF0080
FADT_ADDRESS = 0xF00C0
DSDT_ADDRESS = 0xF0140
MADT_ADDRESS = 0xF0200  # after the DSDT; 8 bytes a vCPU fit below the handlers
FACS_WAKING_VECTOR = FACS_ADDRESS + 12

BOOT_STUB_ADDRESS = 0xFF000
#: The vCPUs a MADT at MADT_ADDRESS can list before it reaches the boot stub
#: (8-bit xAPIC IDs stop at 255 anyway).
MAX_MADT_CPUS = 255
HANDLERS_OFFSET = 0xFE00  # in the F segment
MASTER_HANDLER = HANDLERS_OFFSET
SLAVE_HANDLER = HANDLERS_OFFSET + 0x10
IRET_HANDLER = HANDLERS_OFFSET + 0x20

PIC_MASTER_VECTORS = range(0x08, 0x10)
PIC_SLAVE_VECTORS = range(0x70, 0x78)
#: The masks SeaBIOS leaves: IRQs 0-2, 6, 8, 12-14 open.
PIC_MASTER_MASK = 0xB8
PIC_SLAVE_MASK = 0x8E

#: 32-bit or 64-bit code: program the 8259s and the PIT, then enter the kernel.
#: The last two instructions are patched: AL's boot value and the jump to the entry.
BOOT_STUB_SOURCE = """
    mov al, 0x11            # ICW1: edge-triggered, cascaded, ICW4 follows
    out 0x20, al
    out 0xa0, al
    mov al, 0x08            # ICW2: vector bases
    out 0x21, al
    mov al, 0x70
    out 0xa1, al
    mov al, 0x04            # ICW3: the slave hangs off IRQ 2
    out 0x21, al
    mov al, 0x02
    out 0xa1, al
    mov al, 0x01            # ICW4: 8086 mode
    out 0x21, al
    out 0xa1, al
    mov al, 0xb8            # OCW1: masks
    out 0x21, al
    mov al, 0x8e
    out 0xa1, al
    mov al, 0x36            # PIT channel 0: low then high byte, mode 3, binary
    out 0x43, al
    mov al, 0x00            # count 0 = 65536: 18.2 Hz
    out 0x40, al
    out 0x40, al
    mov al, 0x00            # patched: the boot value of AL
    .byte 0xe9              # jmp rel32, patched: the kernel's entry
    .long 0
"""
BOOT_STUB = bytes.fromhex(
    "b011e620e6a0b008e621b070e6a1b004e621b002e6a1b001e621e6a1b0b8e621b08ee6a1b036e643b000e640e640b000e900000000"
)
_STUB_AL_OFFSET = len(BOOT_STUB) - 6
_STUB_REL32_OFFSET = len(BOOT_STUB) - 4

#: 16-bit code at F000:FE00: acknowledge a master IRQ, a slave IRQ, or nothing.
HANDLERS_SOURCE = """
    push ax                 # F000:FE00, vectors 0x08-0x0f
    mov al, 0x20            # non-specific EOI
    out 0x20, al
    pop ax
    iret
    .balign 16, 0
    push ax                 # F000:FE10, vectors 0x70-0x77
    mov al, 0x20
    out 0xa0, al
    out 0x20, al
    pop ax
    iret
    .balign 16, 0
    iret                    # F000:FE20, every other vector
"""
HANDLERS = bytes.fromhex("50b020e62058cf00000000000000000050b020e6a0e62058cf00000000000000cf")

OEM_ID = b"PYVMM "
OEM_TABLE_ID = b"PYVMMPC "
CREATOR_ID = b"PYVM"
_HEADER = struct.Struct("<4sIBB6s8sI4sI")

SCI_IRQ = 9
#: FADT flags: WBINVD works, C1 supported, no fixed power or sleep button.
FADT_FLAGS = (1 << 0) | (1 << 2) | (1 << 4) | (1 << 5)
#: MADT flags: PCAT_COMPAT, the PC's 8259s are there too (masked by an OS that uses the IOAPIC).
MADT_PCAT_COMPAT = 1
MADT_LOCAL_APIC, MADT_IO_APIC, MADT_INTERRUPT_OVERRIDE = 0, 1, 2
MADT_ENABLED = 1
#: The ID an in-kernel IOAPIC has after reset, and the one QEMU's MADT gives it too.
IOAPIC_ID = 0
#: The SCI as ACPI defines it: active high, level-triggered (MPS INTI flags 01, 11).
SCI_INTI_FLAGS = 0b1101
#: C2/C3 latencies over 100/1000 us: "not supported".
_NO_C2, _NO_C3 = 101, 1001


# --- the boot stub and the vector table ---------------------------------------------
def boot_stub(spec: BootSpec) -> bytes:
    """The stub for ``spec``: patched with AL's boot value and the jump to its entry.

    :raises ConfigError: a real-mode entry, or a long-mode entry out of a rel32's reach.
    """
    if spec.x86_mode is X86Mode.REAL:
        raise ConfigError("legacy_bios: a real-mode image gets no boot stub (it runs where a BIOS would)")
    registers = {name.lower(): value for name, value in spec.registers.items()}
    al = registers.get("rax", registers.get("eax", 0)) & 0xFF
    rel = spec.entry - (BOOT_STUB_ADDRESS + len(BOOT_STUB))
    if spec.x86_mode is X86Mode.LONG and not -(1 << 31) <= rel < 1 << 31:
        raise ConfigError(f"legacy_bios: entry {spec.entry:#x} is out of the boot stub's jump range")
    stub = bytearray(BOOT_STUB)
    stub[_STUB_AL_OFFSET] = al
    struct.pack_into("<I", stub, _STUB_REL32_OFFSET, rel & 0xFFFF_FFFF)
    return bytes(stub)


def vector_table() -> bytes:
    table = bytearray()
    for vector in range(IVT_VECTORS):
        if vector in PIC_MASTER_VECTORS:
            offset = MASTER_HANDLER
        elif vector in PIC_SLAVE_VECTORS:
            offset = SLAVE_HANDLER
        else:
            offset = IRET_HANDLER
        table += struct.pack("<HH", offset, FIRMWARE_SEGMENT)
    return bytes(table)


# --- ACPI -----------------------------------------------------------------------------
def checksum(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` sum to 0 mod 256."""
    return -sum(data) & 0xFF


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    table = bytearray(
        _HEADER.pack(signature, _HEADER.size + len(body), revision, 0, OEM_ID, OEM_TABLE_ID, 1, CREATOR_ID, 1)
    )
    table += body
    table[9] = checksum(table)
    return bytes(table)


def rsdp() -> bytes:
    pointer = bytearray(struct.pack("<8sB6sBI", b"RSD PTR ", 0, OEM_ID, 0, RSDT_ADDRESS))
    pointer[8] = checksum(pointer)
    return bytes(pointer)


def rsdt(with_madt: bool = False) -> bytes:
    entries = (FADT_ADDRESS, MADT_ADDRESS) if with_madt else (FADT_ADDRESS,)
    return _table(b"RSDT", 1, struct.pack(f"<{len(entries)}I", *entries))


def madt(cpus: int) -> bytes:
    """The MADT of a machine whose hypervisor runs the local APICs and the IOAPIC:
    local APIC IDs 0..cpus-1 (the vCPU indexes, which the hypervisor uses as
    APIC IDs), the IOAPIC
    with GSIs from 0, and the SCI's override to level-triggered.  ISA IRQ n is
    GSI n otherwise: a hypervisor's default routing wires IRQ n to IOAPIC pin n."""
    body = bytearray(struct.pack("<II", LAPIC_BASE, MADT_PCAT_COMPAT))
    for cpu in range(cpus):
        body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, cpu, cpu, MADT_ENABLED)
    body += struct.pack("<BBBBII", MADT_IO_APIC, 12, IOAPIC_ID, 0, IOAPIC_BASE, 0)
    body += struct.pack("<BBBBIH", MADT_INTERRUPT_OVERRIDE, 10, 0, SCI_IRQ, SCI_IRQ, SCI_INTI_FLAGS)
    return _table(b"APIC", 1, bytes(body))


def facs() -> bytes:
    # No hardware signature (nothing to detect across S4), no global lock, version 0
    # (ACPI 1.0): only the 32-bit real-mode waking vector is honoured.
    return struct.pack("<4sIIIII40x", b"FACS", 64, 0, 0, 0, 0)


def fadt() -> bytes:
    pm = acpi_pm.PM_BASE
    body = struct.pack(
        "<IIBBHIBBBBIIIIIIIIBBBBBBBBHHHHBBBBBHBI",
        FACS_ADDRESS,
        DSDT_ADDRESS,
        0,  # interrupt model: dual 8259
        0,
        SCI_IRQ,
        0,  # no SMI command port: always in ACPI mode
        0,
        0,
        0,
        0,
        pm + acpi_pm.PM1_EVT_OFFSET,
        0,
        pm + acpi_pm.PM1_CNT_OFFSET,
        0,
        0,
        pm + acpi_pm.PM_TMR_OFFSET,
        0,
        0,
        acpi_pm.PM1_EVT_LEN,
        acpi_pm.PM1_CNT_LEN,
        0,
        acpi_pm.PM_TMR_LEN,
        0,
        0,
        0,
        0,
        _NO_C2,
        _NO_C3,
        0,
        0,
        0,
        0,
        0,
        0,
        REG_CENTURY,
        0,
        0,
        FADT_FLAGS,
    )
    return _table(b"FACP", 1, body)


def _aml_integer(value: int) -> bytes:
    if value in (0, 1):
        return bytes([value])  # ZeroOp, OneOp
    return bytes([0x0A, value])  # BytePrefix


def _aml_sleep_package(name: bytes, sleep_type: int) -> bytes:
    """``Name(<name>, Package() {typ, typ, 0, 0})``: SLP_TYPa, SLP_TYPb, reserved."""
    elements = _aml_integer(sleep_type) * 2 + _aml_integer(0) * 2
    package = bytes([len(elements) + 2, 4]) + elements  # PkgLength (one byte), NumElements
    return b"\x08" + name + b"\x12" + package  # NameOp, PackageOp


def dsdt() -> bytes:
    aml = _aml_sleep_package(b"_S3_", acpi_pm.SLP_TYP_S3) + _aml_sleep_package(b"_S5_", acpi_pm.SLP_TYP_S5)
    return _table(b"DSDT", 1, aml)


def acpi_tables(apic_cpus: int | None = None) -> dict[int, bytes]:
    """Every table, by guest-physical address; with ``apic_cpus``, the MADT of a
    machine with that many vCPUs and the hypervisor's interrupt controllers."""
    tables = {
        RSDP_ADDRESS: rsdp(),
        FACS_ADDRESS: facs(),
        RSDT_ADDRESS: rsdt(with_madt=apic_cpus is not None),
        FADT_ADDRESS: fadt(),
        DSDT_ADDRESS: dsdt(),
    }
    if apic_cpus is not None:
        tables[MADT_ADDRESS] = madt(apic_cpus)
    return tables


def resume_state(vector: int) -> X86VcpuInit:
    """A vCPU entering ``vector`` in real mode, as after the BIOS's S3 resume path."""
    sregs = Sregs(cs=Segment(base=vector & ~0xF, selector=(vector >> 4) & 0xFFFF, type=0xB), cr0=CR0_ET)
    return X86VcpuInit(regs=Regs(rip=vector & 0xF, rflags=0x2), sregs=sregs)


# --- the machine's side ---------------------------------------------------------------
class LegacyFirmware:
    """The firmware of one machine: its ACPI PM device on the port bus, its memory
    contents (:meth:`install`), and the S3 sleep and resume.

    :param rtc: the machine's RTC, whose alarm wakes a suspended guest.
    :param current_vcpu: the vCPU whose thread calls it.
    :param wait: block the calling vCPU thread for that many seconds (None: for
        ever); returns False as soon as the run is stopping.
    :param poweroff: the guest entered S5.
    :param reset: the guest resumed with no waking vector.
    :param apic_cpus: the vCPU count of a machine whose hypervisor runs the local
        APICs and IOAPIC (its tables then include the MADT), else None.
    """

    def __init__(
        self,
        rtc: Rtc,
        *,
        current_vcpu: Callable[[], Vcpu],
        wait: Callable[[float | None], bool],
        poweroff: Callable[[], None],
        reset: Callable[[], None],
        apic_cpus: int | None = None,
    ) -> None:
        if apic_cpus is not None and not 1 <= apic_cpus <= MAX_MADT_CPUS:
            raise ConfigError(f"legacy_bios: a MADT describes 1 to {MAX_MADT_CPUS} vCPUs, not {apic_cpus}")
        self.apic_cpus = apic_cpus
        self.rtc = rtc
        self.pm = AcpiPm(SleepEvents(suspend=self._suspend, poweroff=poweroff))
        self._current_vcpu = current_vcpu
        self._wait = wait
        self._reset = reset
        self._memory: GuestMemory | None = None
        self.suspends = 0

    def install(self, memory: GuestMemory, pio: PortBus, spec: BootSpec) -> BootSpec:
        """Write the vector table, the handlers, the ACPI tables and the boot stub,
        put the PM registers on ``pio``; return ``spec`` entering through the stub.

        :raises ConfigError: the image put bytes where the firmware goes, or
            ``spec`` cannot take a stub.
        """
        stub = boot_stub(spec)
        for start, size in ((IVT_BASE, IVT_VECTORS * 4), (FIRMWARE_BASE, FIRMWARE_SIZE)):
            if not memory.contains(start, size):
                raise ConfigError(f"legacy_bios: {start:#x}+{size:#x} is not RAM")
            if any(memory.read(start, size)):
                raise ConfigError(f"legacy_bios: the image has bytes at {start:#x}..{start + size - 1:#x}, the BIOS's")
        memory.write(IVT_BASE, vector_table())
        memory.write(FIRMWARE_BASE + HANDLERS_OFFSET, HANDLERS)
        for address, table in acpi_tables(self.apic_cpus).items():
            memory.write(address, table)
        memory.write(BOOT_STUB_ADDRESS, stub)
        pio.register(acpi_pm.PM_BASE, acpi_pm.PORT_COUNT, self.pm)
        self._memory = memory
        return dataclasses.replace(spec, entry=BOOT_STUB_ADDRESS)

    def _suspend(self) -> None:
        """S3: sleep until the wake-up event, then resume at the waking vector."""
        self.suspends += 1
        alarm = self.rtc.next_alarm() if self.pm.rtc_wakes else None
        if alarm is None:
            log.warning("the guest suspended to RAM with no wake-up event (RTC alarm) armed: it stays asleep")
            self._wait(None)
            return
        if not self._wait(max(self.rtc.seconds_until(alarm), 0.0)):
            return
        self.pm.wake(by_rtc=True)
        self.rtc.set_alarm_flag()
        assert self._memory is not None, "install() runs before the guest"
        vector = self._memory.read_u32(FACS_WAKING_VECTOR)
        if vector == 0:
            self._reset()
            return
        self._current_vcpu().init(resume_state(vector))
