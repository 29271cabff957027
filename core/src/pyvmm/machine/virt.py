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
0x0a00_2000        snapshot request       a write asks for a snapshot (``--snapshot-to``)
0x8000_0000        RAM                    up to the 40-bit IPA limit
=================  =====================  ======================================

The demo device and debug-exit are the x86 PC's (same registers, on MMIO), so
test programs end the same way on both.  The addresses are QEMU's ``virt`` machine's for the GIC and the UART, and RAM
starts at 2 GiB as on crosvm's board: MMIO below RAM, so RAM can grow upwards.
Inside RAM the loader puts the kernel at the bottom and the device tree in the
last 2 MiB (:mod:`pyvmm.machine.loaders.arm64`).

The interrupt controller belongs to the hypervisor (an in-kernel vGIC, or one
the hypervisor emulates on its own); pyvmm only describes it.  The UART's
interrupt reaches the guest through an edge-triggered irqfd where the backend has
them; otherwise the guest polls.  PSCI (CPU_ON, SYSTEM_OFF, SYSTEM_RESET) is the
hypervisor's too; the machine sees only the resulting system events.

Nodes a hypervisor needs in the tree for itself are the backend's to write: a
backend with ``Capability.DEVICE_TREE_NODES`` gets the tree once the board has
written its nodes and registered its irqfds (:meth:`pyvmm.vm.Vm.add_device_tree_nodes`).
The board knows no backend.

:class:`VirtBoard` is the aarch64 :class:`~pyvmm.machine.board.Board`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import BinaryIO, cast

from pyvmm.capabilities import Capability
from pyvmm.config import Arch
from pyvmm.devices.base import IrqLine
from pyvmm.devices.debug_exit import DebugExit
from pyvmm.devices.pl011 import PL011_CLOCK_HZ, PL011_SIZE, Pl011
from pyvmm.devices.scratch import DEMO_DEVICE_SIZE, ScratchDevice
from pyvmm.errors import ConfigError
from pyvmm.exits import HypercallExit, VcpuExit
from pyvmm.host import Event
from pyvmm.machine.board import Board, BoardParts
from pyvmm.machine.bus import MmioBus
from pyvmm.machine.config import MachineConfig
from pyvmm.machine.devicetree import BoardTree, MmioNode, NodeWriter, build_fdt
from pyvmm.machine.images import Aarch64BootSource, BootSource, KernelFile
from pyvmm.machine.layout import RamRange
from pyvmm.vm import Backend, Vcpu

GIC_DISTRIBUTOR_BASE = 0x0800_0000
GIC_DISTRIBUTOR_SIZE = 0x1_0000
GIC_REDISTRIBUTOR_BASE = 0x080A_0000
GIC_REDISTRIBUTOR_SIZE = 0x2_0000  # per vCPU: RD_base + SGI_base frames
UART_BASE = 0x0900_0000
UART_SPI = 1
VIRT_DEMO_DEVICE_BASE = 0x0A00_0000
VIRT_DEBUG_EXIT_BASE = 0x0A00_1000
VIRT_DEBUG_EXIT_SIZE = 0x1000
#: Where a guest asks for a snapshot (any write; :mod:`pyvmm.machine.snapshots`),
#: the MMIO twin of the PC's port 0x5f0.
VIRT_SNAPSHOT_REQUEST_BASE = 0x0A00_2000
VIRT_SNAPSHOT_REQUEST_SIZE = 0x1000
RAM_BASE = 0x8000_0000
#: The guest-physical space every aarch64 hypervisor gives a VM by default (40 bits).
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


def board_tree(cpus: int, memory: int, *, uart_edge: bool = False, nodes: Sequence[NodeWriter] = ()) -> BoardTree:
    """The tree of a board with ``cpus`` vCPUs and ``memory`` bytes of RAM, plus
    the backend's ``nodes``.  ``uart_edge``: the UART's interrupt arrives through
    an edge-triggered irqfd, so the guest must program the GIC for an edge."""
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
        backend_nodes=tuple(nodes),
    )


class VirtBoard(Board):
    """The aarch64 board: ``virt``."""

    arch = Arch.AARCH64

    @classmethod
    def check(cls, config: MachineConfig, backend: Backend, irqchip: bool) -> None:
        # Secondary vCPUs start powered off and the hypervisor's PSCI CPU_ON
        # starts them: unlike the PC's, they need no irqchip to come up.
        check_config(config.cpus, config.memory)
        x86_only = [name for name in ("cpuid_overrides", "testdev", "legacy_bios") if getattr(config, name, None)]
        if x86_only:
            raise ConfigError(f"{', '.join(x86_only)}: x86_64 settings; this machine is aarch64")

    def __init__(self, parts: BoardParts) -> None:
        super().__init__(parts)
        self.devices: VirtDevices
        self.image: Aarch64BootSource
        #: The irqfds' events, closed only after the VM (see :meth:`close`).
        self._events: list[Event] = []

    def build(self, image: BootSource | Aarch64BootSource | None, serial: BinaryIO | None) -> None:
        cfg = self.config
        for ram in ram_ranges(cfg.memory):
            self.vm.add_memory(ram.start, ram.size)
        if self.irqchip:
            self.vm.create_irqchip()
        uart_irq = self._irqfd(UART_SPI)
        self.devices = install_virt_devices(
            self.mmio, serial=serial, serial_irq=uart_irq, debug_exit=self.events.debug_exit
        )
        if image is not None and not callable(getattr(image, "load_aarch64", None)):
            raise ConfigError(f"{image.description}: not an aarch64 image")
        source = cast(Aarch64BootSource, image) if image is not None else self._default_image()
        self.image = source
        # Every irqfd is registered by now, so a backend that lists them in its
        # own nodes sees them all.
        tree = board_tree(cfg.cpus, cfg.memory, uart_edge=uart_irq is not None, nodes=self._backend_nodes())
        boot = source.load_aarch64(self.vm.memory, ram_size=cfg.memory, device_tree=partial(build_fdt, tree))
        self.vm.set_boot(boot)

    def _backend_nodes(self) -> tuple[NodeWriter, ...]:
        """The backend's own nodes, where it declares it has some: only the backend
        knows what its hypervisor reads from the tree."""
        if self.backend.supports(Capability.DEVICE_TREE_NODES):
            return (self.vm.add_device_tree_nodes,)
        return ()

    def _irqfd(self, line: int) -> IrqLine | None:
        """An interrupt line as an irqfd (edge-triggered: each rise signals the
        event), or None where the backend has none and the guest must poll."""
        if not self.backend.supports(Capability.IRQFD):
            return None
        event = Event()
        self._events.append(event)
        self.vm.register_irqfd(event, line, level=False)
        signal = event.signal

        def irq(level: bool) -> None:
            if level:
                signal()

        return irq

    def _default_image(self) -> Aarch64BootSource:
        cfg = self.config
        if cfg.kernel is not None:
            return KernelFile(cfg.kernel, cfg.append, cfg.initrd, cfg.load_address)
        from pyvmm.guests import demo_aarch64_image

        return demo_aarch64_image()

    def answer_exit(self, vcpu: Vcpu, exit_: VcpuExit) -> bool:
        if isinstance(exit_, HypercallExit):
            exit_.result = SMCCC_NOT_SUPPORTED
            return True
        return False

    def close(self) -> None:
        # The machine calls this only once the VM is closed and no vCPU thread is
        # left in the guest: until then a device may still signal them.
        for event in self._events:
            event.close()
        self._events.clear()
