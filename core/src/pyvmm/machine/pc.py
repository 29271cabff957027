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
port 0x20, 0xa0    8259 sinks          only without the in-kernel irqchip
port 0x40-0x43     8254 PIT sink       only without the in-kernel irqchip
MMIO 0xfeb00000    demo device         ID + scratch register (one page)
=================  ==================  ========================================

With an in-kernel irqchip the hypervisor answers the PIC, PIT, IOAPIC and local
APIC itself; pyvmm then registers nothing there.

Optional: QEMU's pc-testdev (:func:`install_testdev`, ``testdev``), and the ACPI
PM block of the legacy firmware (:mod:`pyvmm.machine.legacy_firmware`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from pyvmm.devices import debug_exit, fw_cfg, i8042, pci, poweroff, rtc, sinks, testdev, uart
from pyvmm.devices.base import IrqLine
from pyvmm.devices.debug_exit import DebugExit
from pyvmm.devices.fw_cfg import FwCfg
from pyvmm.devices.i8042 import I8042
from pyvmm.devices.pci import PciHost
from pyvmm.devices.poweroff import BochsPoweroff
from pyvmm.devices.rtc import Rtc
from pyvmm.devices.scratch import DEMO_DEVICE_BASE, DEMO_DEVICE_SIZE, ScratchDevice
from pyvmm.devices.sinks import PortSink
from pyvmm.devices.testdev import PcTestDev, SetIrqLine
from pyvmm.devices.uart import Uart16550
from pyvmm.machine.bus import MmioBus, PortBus


@dataclass(frozen=True)
class PcDevices:
    uart: Uart16550
    debug_exit: DebugExit
    fw_cfg: FwCfg
    pci: PciHost
    i8042: I8042
    poweroff: BochsPoweroff
    demo: ScratchDevice
    rtc: Rtc


@dataclass(frozen=True)
class PcEvents:
    """What the devices ask of the machine."""

    debug_exit: Callable[[int, int], None]
    poweroff: Callable[[], None]
    reset: Callable[[], None]


def install_pc_devices(
    pio: PortBus,
    mmio: MmioBus,
    events: PcEvents,
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
    dev = PcTestDev(set_irq_line)
    pio.register(testdev.LATCH_PORT, testdev.LATCH_PORT_COUNT, dev.ports)
    pio.register(testdev.IRQ_PORT, testdev.IRQ_PORT_COUNT, dev.irq_ports)
    mmio.register(testdev.IOMEM_BASE, testdev.IOMEM_SIZE, dev.iomem)
    return dev
