"""The standard device set of the pyvmm PC, and where each device sits.

=================  ==================  ========================================
where              device              notes
=================  ==================  ========================================
port 0x3f8-0x3ff   16550 UART (COM1)   IRQ 4 when the hypervisor has an irqchip
port 0xf4-0xf7     isa-debug-exit      status ``(code << 1) | 1``
port 0x510-0x511   fw_cfg              signature, CPU count, RAM size
port 0xcf8-0xcff   PCI conf1 + RCR     no PCI devices: reads all ones
port 0x60, 0x64    i8042               0xfe to 0x64 resets
port 0x8900        Bochs power-off     "Shutdown" powers off (status 0)
port 0x80          POST code sink
port 0x70-0x71     MC146818 RTC/CMOS   read when polled; no IRQ 8
port 0x20, 0xa0    8259 sinks          only without any interrupt controller
port 0x40-0x43     8254 PIT sink       only without any interrupt controller
MMIO 0xfeb00000    demo device         ID + scratch register (one page)
=================  ==================  ========================================

With an in-kernel irqchip the hypervisor answers the PIC, PIT, IOAPIC and local
APIC itself; pyvmm then registers nothing there.  With the userspace interrupt
controller (``irqchip = "userspace"``, or ``auto`` on a backend that injects
interrupts but has no irqchip) the board puts its own 8259 pair (0x20, 0xa0,
ELCR 0x4d0), 8254 (0x40-0x43) and port B (0x61) there
(:mod:`pyvmm.machine.userspace_irqchip`): COM1 interrupts on IRQ 4 and the PIT
on IRQ 0, delivered to the one vCPU through the interrupt-window protocol.

Optional: QEMU's pc-testdev (:func:`install_testdev`, ``testdev``), and the ACPI
PM block of the legacy firmware (:mod:`pyvmm.machine.legacy_firmware`).

:class:`PcBoard` is the x86_64 :class:`~pyvmm.machine.board.Board`: RAM around
the MMIO hole (:mod:`pyvmm.machine.layout`), these devices, the image through the
legacy firmware where it wants a BIOS, and each vCPU's CPUID table.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, BinaryIO, cast

from pyvmm.arch.x86_64 import CpuidEntry
from pyvmm.boot import BootSpec, is_multiboot
from pyvmm.capabilities import Capability
from pyvmm.config import Arch
from pyvmm.devices import debug_exit, fw_cfg, i8042, pci, poweroff, rtc, sinks, uart
from pyvmm.devices.base import IrqLine
from pyvmm.devices.debug_exit import DebugExit
from pyvmm.devices.fw_cfg import FwCfg
from pyvmm.devices.i8042 import I8042
from pyvmm.devices.pci import PciHost
from pyvmm.devices.poweroff import BochsPoweroff
from pyvmm.devices.rtc import Rtc
from pyvmm.devices.scratch import DEMO_DEVICE_BASE, DEMO_DEVICE_SIZE, ScratchDevice
from pyvmm.devices.sinks import PortSink
from pyvmm.devices.uart import COM1_IRQ, IER_RDA, Uart16550
from pyvmm.errors import ConfigError
from pyvmm.exits import CpuidExit, HypercallExit, MsrAccessExit, VcpuExit
from pyvmm.lazy_logging import LazyLogger
from pyvmm.lean_dataclass import lean_dataclass
from pyvmm.machine import cpuid
from pyvmm.machine.board import Board, BoardParts, MachineEvents
from pyvmm.machine.bus import MmioBus, PortBus
from pyvmm.machine.config import MachineConfig
from pyvmm.machine.images import Aarch64BootSource, BootSource, KernelFile
from pyvmm.machine.layout import ram_ranges
from pyvmm.vm import Backend, Vcpu

if TYPE_CHECKING:
    # The board's own interrupt controllers and QEMU's pc-testdev are imported
    # where they are installed: a machine on an in-kernel irqchip without
    # ``testdev`` (the usual one) never loads them (a start-up cost).
    from pyvmm.devices.i8254 import Pit8254
    from pyvmm.devices.i8259 import PicPair
    from pyvmm.devices.testdev import PcTestDev, SetIrqLine
    from pyvmm.machine.legacy_firmware import LegacyFirmware
    from pyvmm.machine.userspace_irqchip import UserspaceIrqchip

# Loads logging only when a record goes out (start-up time).
log = LazyLogger("pyvmm.machine")

#: -ENOSYS as a 64-bit register: the answer to a hypercall nobody handles.
ENOSYS_U64 = (1 << 64) - errno.ENOSYS


def _is_linux(source: BootSource) -> bool:
    """Whether ``source`` is a Linux bzImage file (read after it loaded: it exists)."""
    if not isinstance(source, KernelFile):
        return False
    from pyvmm.machine.loaders.bzimage import HDRS_MAGIC, HDRS_OFFSET, is_bzimage  # loaded with the kernel

    with open(source.path, "rb") as file:
        return is_bzimage(file.read(HDRS_OFFSET + len(HDRS_MAGIC)))


@lean_dataclass(frozen=True)
class PcDevices:
    uart: Uart16550
    debug_exit: DebugExit
    fw_cfg: FwCfg
    pci: PciHost
    i8042: I8042
    poweroff: BochsPoweroff
    demo: ScratchDevice
    rtc: Rtc


def install_pc_devices(
    pio: PortBus,
    mmio: MmioBus,
    events: MachineEvents,
    *,
    serial: BinaryIO | None,
    serial_irq: IrqLine | None,
    ram_size: int,
    cpus: int,
    irqchip: bool,
) -> PcDevices:
    devices = PcDevices(
        uart=Uart16550(serial, irq=serial_irq),
        debug_exit=DebugExit(events.debug_exit),
        fw_cfg=FwCfg(ram_size=ram_size, cpus=cpus),
        pci=PciHost(on_reset=events.reset),
        i8042=I8042(events.reset),
        poweroff=BochsPoweroff(events.poweroff),
        demo=ScratchDevice(),
        rtc=Rtc(),
    )
    pio.register(uart.COM1_BASE, uart.PORT_COUNT, devices.uart)
    pio.register(debug_exit.DEBUG_EXIT_PORT, debug_exit.PORT_COUNT, devices.debug_exit)
    pio.register(fw_cfg.SELECTOR_PORT, fw_cfg.PORT_COUNT, devices.fw_cfg)
    pio.register(pci.CONFIG_ADDRESS_PORT, 8, devices.pci)
    pio.register(i8042.DATA_PORT, 1, devices.i8042.data_port())
    pio.register(i8042.COMMAND_PORT, 1, devices.i8042.command_port())
    pio.register(poweroff.POWEROFF_PORT, 1, devices.poweroff)
    pio.register(sinks.POST_PORT, 1, PortSink("post", initial=0))
    pio.register(rtc.INDEX_PORT, rtc.PORT_COUNT, devices.rtc)
    if not irqchip:
        pio.register(sinks.PIC_MASTER_PORT, sinks.PIC_PORT_COUNT, PortSink("pic-master", sinks.PIC_PORT_COUNT))
        pio.register(sinks.PIC_SLAVE_PORT, sinks.PIC_PORT_COUNT, PortSink("pic-slave", sinks.PIC_PORT_COUNT))
        pio.register(sinks.PIT_PORT, sinks.PIT_PORT_COUNT, PortSink("pit", sinks.PIT_PORT_COUNT))
    mmio.register(DEMO_DEVICE_BASE, DEMO_DEVICE_SIZE, devices.demo)
    return devices


def install_testdev(pio: PortBus, mmio: MmioBus, set_irq_line: SetIrqLine | None) -> PcTestDev:
    """Add QEMU's pc-testdev: ports 0xe0-0xeb and 0x2000-0x2017, MMIO 0xff000000."""
    from pyvmm.devices import testdev  # only machines that ask for it (see TYPE_CHECKING above)

    dev = testdev.PcTestDev(set_irq_line)
    pio.register(testdev.LATCH_PORT, testdev.LATCH_PORT_COUNT, dev.ports)
    pio.register(testdev.IRQ_PORT, testdev.IRQ_PORT_COUNT, dev.irq_ports)
    mmio.register(testdev.IOMEM_BASE, testdev.IOMEM_SIZE, dev.iomem)
    return dev


class PcBoard(Board):
    """The x86_64 board: the PC."""

    arch = Arch.X86_64

    @classmethod
    def check(cls, config: MachineConfig, backend: Backend, irqchip: bool) -> None:
        backend.require(Capability.PORT_IO, "the x86 PC machine")
        if config.cpus > 1 and not irqchip:
            why = f"irqchip is {config.irqchip}" if backend.supports(Capability.IRQCHIP) else "it has no IRQCHIP"
            raise ConfigError(
                f"cpus: {config.cpus} vCPUs need the hypervisor's interrupt controllers, which start the "
                f"secondary vCPUs on the guest's INIT/SIPI; backend {backend.name!r}: {why} (pyvmm's userspace "
                "interrupt controller, irqchip = userspace, drives one vCPU only: it has no local APICs or IOAPIC)"
            )

    def __init__(self, parts: BoardParts) -> None:
        super().__init__(parts)
        self.devices: PcDevices
        self.image: BootSource
        #: The BIOS stand-in, when the machine boots through it.
        self.firmware: LegacyFirmware | None = None
        #: The backend's supported CPUID, where the machine gives each vCPU its table.
        self._cpuid_base: list[CpuidEntry] | None = None
        #: Each vCPU's table, for backends that forward CPUID to the VMM.
        self._cpuid_tables: dict[int, list[CpuidEntry]] = {}
        self._seen_msrs: set[int] = set()
        #: The board's own 8259s and 8254 and their delivery, with ``irqchip = "userspace"``.
        self.pic: PicPair | None = None
        self.pit: Pit8254 | None = None
        self.userspace: UserspaceIrqchip | None = None
        self._ignored_lines: set[int] = set()

    # --- construction ---------------------------------------------------------
    def build(self, image: BootSource | Aarch64BootSource | None, serial: BinaryIO | None) -> None:
        cfg = self.config
        for ram in ram_ranges(cfg.memory):
            self.vm.add_memory(ram.start, ram.size)
        if self.irqchip:
            self.vm.create_irqchip()
        if self.userspace_irqchip:
            self._install_userspace_irqchip()
        self.devices = install_pc_devices(
            self.pio,
            self.mmio,
            self.events,
            serial=serial,
            serial_irq=self._com1_irq(),
            ram_size=cfg.memory,
            cpus=cfg.cpus,
            irqchip=self.irqchip or self.userspace is not None,
        )
        if cfg.testdev:
            install_testdev(self.pio, self.mmio, self._irq_lines())
        if image is not None and not callable(getattr(image, "load", None)):
            raise ConfigError(f"{image.description}: not an x86_64 image")
        source = cast(BootSource, image) if image is not None else self._default_image()
        self.image = source
        boot = source.load(self.vm.memory, ram_size=cfg.memory, cpus=cfg.cpus)
        self.vm.set_boot(self._legacy_firmware(boot, linux=_is_linux(source)))
        self._cpuid_base = self._supported_cpuid()

    def _install_userspace_irqchip(self) -> None:
        """The board's own 8259 pair, 8254 and port B, their interrupts delivered to
        vCPU 0 by :class:`UserspaceIrqchip`."""
        # Only for irqchip = userspace (see TYPE_CHECKING above).
        from pyvmm.devices import i8254, i8259
        from pyvmm.devices.i8254 import Pit8254
        from pyvmm.devices.i8259 import PicPair
        from pyvmm.machine.userspace_irqchip import UserspaceIrqchip

        pic = PicPair()
        pit = Pit8254(irq0=lambda level: pic.set_irq(0, level))
        chip = UserspaceIrqchip(self.backend, self.events, pic, can_wake=self._interrupt_may_come)
        pic.on_change = chip.output_changed
        pit.on_reprogram = chip.timer_changed
        chip.add_timer(pit.next_irq_deadline, pit.expire)
        master, slave, elcr = pic.devices()
        pit_ports, port_b = pit.devices()
        pit_ports.on_close = chip.close  # the machine closes its devices when the run ends: the timer stops
        self.pio.register(i8259.MASTER_PORT, i8259.PORT_COUNT, master)
        self.pio.register(i8259.SLAVE_PORT, i8259.PORT_COUNT, slave)
        self.pio.register(i8259.ELCR_PORT, i8259.ELCR_PORT_COUNT, elcr)
        self.pio.register(i8254.COUNTER_PORT, i8254.PORT_COUNT, pit_ports)
        self.pio.register(i8254.PORT_B, 1, port_b)
        self.pic, self.pit = pic, pit
        self.interrupts = self.userspace = chip

    def _interrupt_may_come(self) -> bool:
        """With the board's own 8259s, whether a halted vCPU (interrupts on) can
        still be interrupted by something it does not do itself: the PIT running
        on an open IRQ 0, or COM1's received-data interrupt enabled on an open IRQ 4
        (input comes from the console's thread)."""
        pic, pit = self.pic, self.pit
        assert pic is not None and pit is not None
        if pit.counting() and not pic.line_masked(0):
            return True
        devices: PcDevices | None = getattr(self, "devices", None)  # set by build, after the 8259s
        return bool(devices is not None and devices.uart.ier & IER_RDA and not pic.line_masked(COM1_IRQ))

    def _irq_lines(self) -> SetIrqLine | None:
        """What drives the machine's interrupt lines: the hypervisor's interrupt
        controllers, the board's own, or nothing (None: the guest must poll)."""
        if self.pic is not None:
            return self._pic_line
        if self.irqchip and self.backend.supports(Capability.IRQ_LINE):
            return self.vm.set_irq_line
        return None

    def _pic_line(self, line: int, level: bool) -> None:
        """Drive a line of the board's 8259 pair.  Lines above 15 are IOAPIC inputs,
        which this machine does not have: ignored, and logged once."""
        assert self.pic is not None
        from pyvmm.devices.i8259 import LINES  # loaded with the 8259 pair (see TYPE_CHECKING above)

        if 0 <= line < LINES:
            self.pic.set_irq(line, level)
        elif line not in self._ignored_lines:
            self._ignored_lines.add(line)
            log.warning("interrupt line %d needs an IOAPIC, which irqchip = userspace has not: ignored", line)

    def _com1_irq(self) -> IrqLine | None:
        """COM1's IRQ 4, or None where the guest must poll."""
        set_line = self._irq_lines()
        if set_line is None:
            return None

        def irq(level: bool) -> None:
            set_line(COM1_IRQ, level)

        return irq

    def _default_image(self) -> BootSource:
        cfg = self.config
        if cfg.kernel is not None:
            return KernelFile(cfg.kernel, cfg.append, cfg.initrd, cfg.load_address)
        from pyvmm.guests import demo_image

        return demo_image()

    def _legacy_firmware(self, boot: BootSpec, *, linux: bool) -> BootSpec:
        """``boot`` through the legacy firmware, where the config or the kernel wants
        it: a Multiboot kernel, or a Linux one that needs the MADT to find its CPUs
        and IOAPIC (:mod:`pyvmm.machine.legacy_firmware`)."""
        wanted = self.config.legacy_bios
        by_default = is_multiboot(boot) or (linux and self.irqchip)
        if wanted is False or (wanted is None and not by_default):
            return boot
        # Imported here: a boot without the firmware (the demo's) never loads it
        # nor its ACPI PM block (start-up time).
        from pyvmm.machine.legacy_firmware import LegacyFirmware

        events = self.events
        self.firmware = LegacyFirmware(
            self.devices.rtc,
            current_vcpu=events.current_vcpu,
            wait=events.wait,
            poweroff=events.poweroff,
            reset=events.reset,
            apic_cpus=self.config.cpus if self.irqchip else None,
        )
        return self.firmware.install(self.vm.memory, self.pio, boot)

    def _supported_cpuid(self) -> list[CpuidEntry] | None:
        overrides = self.config.cpuid_overrides
        if not self.backend.supports(Capability.CPUID):
            if overrides:
                raise ConfigError(f"cpuid_overrides: backend {self.backend.name!r} cannot set the guest's CPUID")
            return None
        if self.backend.supports(Capability.EARLY_INIT_CPUID):
            if overrides:
                raise ConfigError(f"cpuid_overrides: backend {self.backend.name!r} fixes CPUID when the VM is created")
            return None
        return self.vm.supported_cpuid()

    # --- running ----------------------------------------------------------------
    def prepare_vcpu(self, vcpu: Vcpu) -> None:
        if self.userspace is not None:
            self.userspace.attach(vcpu)
        if self._cpuid_base is not None:
            table = cpuid.vcpu_cpuid(self._cpuid_base, vcpu.index, self.config.cpuid_overrides)
            vcpu.set_cpuid(table)
            self._cpuid_tables[vcpu.index] = table

    def answer_exit(self, vcpu: Vcpu, exit_: VcpuExit) -> bool:
        if isinstance(exit_, CpuidExit):
            entry = cpuid.lookup(self._cpuid_tables.get(vcpu.index, []), exit_.function, exit_.index)
            if entry is None:
                exit_.eax = exit_.ebx = exit_.ecx = exit_.edx = 0
            else:
                exit_.eax, exit_.ebx, exit_.ecx, exit_.edx = entry.eax, entry.ebx, entry.ecx, entry.edx
            return True
        if isinstance(exit_, MsrAccessExit):
            exit_.error = True  # the guest gets #GP, as for an MSR the CPU lacks
            if exit_.index not in self._seen_msrs:
                self._seen_msrs.add(exit_.index)
                what = "write" if exit_.is_write else "read"
                log.warning(
                    "vCPU %d: unhandled MSR %s of %#x: #GP (logged once per MSR)", vcpu.index, what, exit_.index
                )
            return True
        if isinstance(exit_, HypercallExit):
            exit_.result = ENOSYS_U64
            return True
        return False

    def close(self) -> None:
        if self.userspace is not None:
            self.userspace.close()
