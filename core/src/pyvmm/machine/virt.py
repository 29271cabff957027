"""The aarch64 board, ``virt``: where RAM and each device sit, the devices pyvmm
emulates, and the device tree that describes them.

=================  =====================  ======================================
where              what                   notes
=================  =====================  ======================================
0x0800_0000        GICv3 distributor      64 KiB; described, never emulated
0x080a_0000        GICv3 redistributors   128 KiB per vCPU (room for 123)
0x0900_0000        PL011 UART             4 KiB, SPI 1; the console
0x0a00_0000        demo device            ID + scratch register (one page)
0x0a00_1000        debug-exit             a write of ``code``: status (code << 1) | 1
0x8000_0000        RAM                    up to the 40-bit IPA limit
=================  =====================  ======================================

The demo device and debug-exit are the x86 PC's (same registers, on MMIO), so
test programs end the same way on both.  The addresses are QEMU's ``virt`` machine's for the GIC and the UART, and RAM
starts at 2 GiB as on crosvm's board: MMIO below RAM, so RAM can grow upwards.
Inside RAM the loader puts the kernel at the bottom and the device tree in the
last 2 MiB (:mod:`pyvmm.machine.loaders.arm64`).

The interrupt controller belongs to the hypervisor (KVM's vGIC, Gunyah's own);
pyvmm only describes it, as crosvm does for Gunyah.  The UART's interrupt reaches
the guest through an irqfd where the backend has them (each one listed as a
:class:`~pyvmm.machine.devicetree.Doorbell`); otherwise the guest polls.  PSCI
(CPU_ON, SYSTEM_OFF, SYSTEM_RESET) is the hypervisor's too; the machine sees only
the resulting system events.

Nodes a hypervisor needs in the tree for itself are chosen by capability
(:func:`hypervisor_nodes`), never by backend name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from pyvmm.capabilities import Capability
from pyvmm.devices.base import IrqLine
from pyvmm.devices.debug_exit import DebugExit
from pyvmm.devices.pl011 import PL011_CLOCK_HZ, PL011_SIZE, Pl011
from pyvmm.devices.scratch import DEMO_DEVICE_SIZE, ScratchDevice
from pyvmm.errors import ConfigError
from pyvmm.machine.bus import MmioBus
from pyvmm.machine.devicetree import BoardTree, Doorbell, MmioNode, NodeWriter, gunyah_vm_config
from pyvmm.machine.layout import RamRange
from pyvmm.vm import Backend

GIC_DISTRIBUTOR_BASE = 0x0800_0000
GIC_DISTRIBUTOR_SIZE = 0x1_0000
GIC_REDISTRIBUTOR_BASE = 0x080A_0000
GIC_REDISTRIBUTOR_SIZE = 0x2_0000  # per vCPU: RD_base + SGI_base frames
UART_BASE = 0x0900_0000
UART_SPI = 1
VIRT_DEMO_DEVICE_BASE = 0x0A00_0000
VIRT_DEBUG_EXIT_BASE = 0x0A00_1000
VIRT_DEBUG_EXIT_SIZE = 0x1000
RAM_BASE = 0x8000_0000
#: KVM's default IPA size on arm64, and Gunyah's (crosvm: 40 bits).
IPA_LIMIT = 1 << 40
#: The redistributors must end below the UART.
MAX_CPUS = (UART_BASE - GIC_REDISTRIBUTOR_BASE) // GIC_REDISTRIBUTOR_SIZE
#: The kernel below and the 2 MiB device-tree window above need at least this.
MIN_RAM = 4 << 20
#: Function id of PSCI SYSTEM_OFF (SMC32): what the demo guest calls to stop.
PSCI_SYSTEM_OFF = 0x8400_0008
#: SMCCC's answer to a call nobody implements.
SMCCC_NOT_SUPPORTED = (1 << 64) - 1


@dataclass(frozen=True)
class VirtDevices:
    uart: Pl011
    demo: ScratchDevice
    debug_exit: DebugExit


def check_config(cpus: int, memory: int) -> None:
    """:raises ConfigError: a vCPU count or RAM size the board cannot lay out."""
    if cpus > MAX_CPUS:
        raise ConfigError(f"cpus: the aarch64 machine has GIC redistributors for {MAX_CPUS} vCPUs, not {cpus}")
    if memory < MIN_RAM:
        raise ConfigError(f"memory: the aarch64 machine needs at least {MIN_RAM >> 20} MiB, not {memory:#x} bytes")
    if RAM_BASE + memory > IPA_LIMIT:
        raise ConfigError(
            f"memory: {memory:#x} bytes from {RAM_BASE:#x} end beyond the 40-bit guest-physical space; "
            f"at most {IPA_LIMIT - RAM_BASE:#x}"
        )


def ram_ranges(memory: int) -> list[RamRange]:
    return [RamRange(RAM_BASE, memory)]


def install_virt_devices(
    mmio: MmioBus,
    *,
    serial: BinaryIO | None,
    serial_irq: IrqLine | None,
    debug_exit: Callable[[int, int], None],
) -> VirtDevices:
    """Put the board's devices on ``mmio``; ``debug_exit(code, status)`` ends the run."""
    devices = VirtDevices(uart=Pl011(serial, irq=serial_irq), demo=ScratchDevice(), debug_exit=DebugExit(debug_exit))
    mmio.register(UART_BASE, PL011_SIZE, devices.uart)
    mmio.register(VIRT_DEMO_DEVICE_BASE, DEMO_DEVICE_SIZE, devices.demo)
    mmio.register(VIRT_DEBUG_EXIT_BASE, VIRT_DEBUG_EXIT_SIZE, devices.debug_exit)
    return devices


#: A hypervisor's own device-tree nodes: ``(backend, RAM size, doorbells)`` -> writer.
HypervisorNodes = Callable[[Backend, int, Sequence[Doorbell]], NodeWriter]


def _gunyah_nodes(backend: Backend, memory: int, doorbells: Sequence[Doorbell]) -> NodeWriter:
    return gunyah_vm_config(RAM_BASE, memory, doorbells)


#: Which capability asks for which nodes.  A hypervisor that sets the vCPUs' boot
#: context itself (Gunyah: crosvm's ``HypervisorInitializedBootContext``) also
#: configures the VM from ``/gunyah-vm-config``; crosvm's Gunyah ``create_fdt``
#: is the only ``VmAArch64::create_fdt`` that writes anything.
HYPERVISOR_NODES: dict[Capability, HypervisorNodes] = {
    Capability.HYPERVISOR_INITIALIZED_BOOT_CONTEXT: _gunyah_nodes,
}


def hypervisor_nodes(backend: Backend, memory: int, doorbells: Sequence[Doorbell]) -> tuple[NodeWriter, ...]:
    """The node writers the backend's capabilities call for.

    :raises ConfigError: the hypervisor cannot take this machine (e.g. too much RAM).
    """
    return tuple(make(backend, memory, doorbells) for cap, make in HYPERVISOR_NODES.items() if backend.supports(cap))


def board_tree(
    cpus: int, memory: int, doorbells: Sequence[Doorbell] = (), nodes: tuple[NodeWriter, ...] = ()
) -> BoardTree:
    """The tree of a board with ``cpus`` vCPUs and ``memory`` bytes of RAM, whose
    irqfds are ``doorbells``, plus the hypervisor's ``nodes``."""
    # The guest must program the GIC the way the interrupt arrives.
    uart_edge = any(bell.label == UART_SPI and not bell.level for bell in doorbells)
    return BoardTree(
        memory=(RAM_BASE, memory),
        cpus=cpus,
        gic_distributor=(GIC_DISTRIBUTOR_BASE, GIC_DISTRIBUTOR_SIZE),
        gic_redistributors=(GIC_REDISTRIBUTOR_BASE, GIC_REDISTRIBUTOR_SIZE * cpus),
        uart=(UART_BASE, PL011_SIZE),
        uart_spi=UART_SPI,
        uart_clock_hz=PL011_CLOCK_HZ,
        uart_edge=uart_edge,
        mmio_devices=(
            MmioNode("demo", "pyvmm,demo-device", VIRT_DEMO_DEVICE_BASE, DEMO_DEVICE_SIZE),
            MmioNode("debug-exit", "pyvmm,debug-exit", VIRT_DEBUG_EXIT_BASE, VIRT_DEBUG_EXIT_SIZE),
        ),
        hypervisor_nodes=nodes,
    )
