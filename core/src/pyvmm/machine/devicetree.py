"""The flattened device tree (DTB) the aarch64 machine hands its guest in X0.

The tree describes the ``virt`` board (:mod:`pyvmm.machine.virt`) the way the
Linux bindings and crosvm's ``aarch64/src/fdt.rs`` do: memory, CPUs with the
PSCI enable method, PSCI over HVC, the architected timer, a GICv3 (described even
when the hypervisor emulates it entirely: the guest still has to find it), the
PL011 console and its clock, and ``/chosen``.  Nodes a hypervisor needs for
itself are written by its backend, as :data:`NodeWriter` callables the board
runs after its own nodes.

Library choice: the PyPI package ``fdt`` (pure Python, Apache-2.0, no
dependencies) builds and parses the blob.  ``pylibfdt``, the bindings of dtc's
libfdt, ships only as a source distribution that needs SWIG and a C compiler to
install, which is too much to ask of every pyvmm user for a few hundred bytes of
tree.  ``fdt`` checks values with ``assert`` only, so :class:`DeviceTree` checks
them itself before handing them over.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from string import printable

import fdt

from pyvmm.errors import ConfigError
from pyvmm.machine.loaders.arm64 import FDT_MAX_SIZE, Chosen

FDT_MAGIC = 0xD00DFEED

PHANDLE_GIC = 1
PHANDLE_CLOCK = 2

# Interrupt specifiers of the GIC binding: <type number flags>.
GIC_SPI = 0
GIC_PPI = 1
IRQ_TYPE_EDGE_RISING = 1
IRQ_TYPE_LEVEL_HIGH = 4
#: The architected timer's PPIs: secure and non-secure physical, virtual, hypervisor.
TIMER_PPIS = (13, 14, 11, 10)

PSCI_COMPATIBLE = ("arm,psci-1.0", "arm,psci-0.2")

_U32 = struct.Struct(">I")


class DeviceTree:
    """A tree under construction: typed setters over :class:`fdt.FDT` that encode
    values as the bindings expect (cells are big-endian u32; a u64 is two cells)."""

    def __init__(self) -> None:
        # FDT's default ``entries`` list is shared by every instance: pass our own.
        self._tree = fdt.FDT(entries=[])

    def _add(self, path: str, prop: object) -> None:
        try:
            self._tree.add_item(prop, path, create=True)
        except Exception as exc:  # the library raises bare Exception on duplicates
            raise ConfigError(f"device tree: {path}: {exc}") from exc

    def node(self, path: str) -> None:
        """Create ``path`` (and its parents) even if it gets no property."""
        self._tree.get_node(path, create=True)

    def u32(self, path: str, name: str, *cells: int) -> None:
        for cell in cells:
            if not 0 <= cell < 1 << 32:
                raise ConfigError(f"device tree: {path}/{name}: {cell:#x} does not fit a 32-bit cell")
        self._add(path, fdt.PropWords(name, *cells))

    def u64(self, path: str, name: str, *values: int) -> None:
        cells: list[int] = []
        for value in values:
            if not 0 <= value < 1 << 64:
                raise ConfigError(f"device tree: {path}/{name}: {value:#x} does not fit 64 bits")
            cells += (value >> 32, value & 0xFFFF_FFFF)
        self._add(path, fdt.PropWords(name, *cells))

    def string(self, path: str, name: str, *strings: str) -> None:
        for text in strings:
            if not text or not all(c in printable for c in text):
                raise ConfigError(f"device tree: {path}/{name}: {text!r} is not a printable ASCII string")
        self._add(path, fdt.PropStrings(name, *strings))

    def flag(self, path: str, name: str) -> None:
        """An empty property (``interrupt-controller;``)."""
        self._add(path, fdt.Property(name))

    def raw(self, path: str, name: str, data: bytes) -> None:
        self._add(path, fdt.PropBytes(name, data=bytes(data)))

    def to_dtb(self) -> bytes:
        return bytes(self._tree.to_dtb(version=17))


#: Adds a backend's own nodes to the tree (``Vm.add_device_tree_nodes``).
NodeWriter = Callable[[DeviceTree], None]


@dataclass(frozen=True)
class MmioNode:
    """A pyvmm device with no Linux binding: ``/<name>@<base>`` with its
    ``compatible`` and ``reg``, so a guest can find it."""

    name: str
    compatible: str
    base: int
    size: int


@dataclass(frozen=True)
class BoardTree:
    """The board the tree describes: ``(base, size)`` of each device."""

    memory: tuple[int, int]
    cpus: int
    gic_distributor: tuple[int, int]
    gic_redistributors: tuple[int, int]
    uart: tuple[int, int]
    uart_spi: int
    uart_clock_hz: int
    #: How the UART's interrupt reaches the GIC: an edge-triggered doorbell, or
    #: the PL011's own active-high level.
    uart_edge: bool = False
    mmio_devices: tuple[MmioNode, ...] = ()
    psci_compatible: tuple[str, ...] = PSCI_COMPATIBLE
    #: Run on the tree once the board's nodes are in: the backend's own nodes.
    backend_nodes: tuple[NodeWriter, ...] = ()

    @property
    def uart_path(self) -> str:
        return f"/pl011@{self.uart[0]:x}"


def cpu_reg(index: int) -> int:
    """The ``reg`` of ``cpu@N``: its MPIDR affinity as the Linux arm64 hypervisor
    sets it at vCPU reset (``reset_mpidr``: Aff0 = index & 0xf, Aff1 = index >> 4),
    so PSCI CPU_ON finds the vCPU."""
    return (index >> 4 & 0xFF) << 8 | index & 0xF


def build_fdt(board: BoardTree, chosen: Chosen) -> bytes:
    """The DTB for ``board`` with ``chosen``."""
    tree = DeviceTree()
    tree.string("/", "compatible", "linux,dummy-virt")
    tree.string("/", "model", "pyvmm virt")
    tree.u32("/", "#address-cells", 2)
    tree.u32("/", "#size-cells", 2)
    tree.u32("/", "interrupt-parent", PHANDLE_GIC)

    # The command line is bytes, not an fdt string: it may hold any character.
    tree.raw("/chosen", "bootargs", chosen.bootargs.encode() + b"\0")
    tree.string("/chosen", "stdout-path", board.uart_path)
    if chosen.initrd is not None:
        tree.u64("/chosen", "linux,initrd-start", chosen.initrd[0])
        tree.u64("/chosen", "linux,initrd-end", chosen.initrd[1])

    memory = f"/memory@{board.memory[0]:x}"
    tree.string(memory, "device_type", "memory")
    tree.u64(memory, "reg", *board.memory)

    tree.u32("/cpus", "#address-cells", 1)
    tree.u32("/cpus", "#size-cells", 0)
    for index in range(board.cpus):
        cpu = f"/cpus/cpu@{cpu_reg(index):x}"
        tree.string(cpu, "device_type", "cpu")
        tree.string(cpu, "compatible", "arm,arm-v8")
        tree.string(cpu, "enable-method", "psci")
        tree.u32(cpu, "reg", cpu_reg(index))

    tree.string("/psci", "compatible", *board.psci_compatible)
    tree.string("/psci", "method", "hvc")

    tree.string("/timer", "compatible", "arm,armv8-timer")
    # GICv3 has no CPU mask in PPI specifiers (arm,gic-v3 binding).
    tree.u32("/timer", "interrupts", *(cell for ppi in TIMER_PPIS for cell in (GIC_PPI, ppi, IRQ_TYPE_LEVEL_HIGH)))
    tree.flag("/timer", "always-on")

    intc = f"/intc@{board.gic_distributor[0]:x}"
    tree.string(intc, "compatible", "arm,gic-v3")
    tree.u32(intc, "#interrupt-cells", 3)
    tree.flag(intc, "interrupt-controller")
    tree.u64(intc, "reg", *board.gic_distributor, *board.gic_redistributors)
    tree.u32(intc, "#address-cells", 2)
    tree.u32(intc, "#size-cells", 2)
    tree.flag(intc, "ranges")
    tree.u32(intc, "phandle", PHANDLE_GIC)

    tree.string("/apb-pclk", "compatible", "fixed-clock")
    tree.u32("/apb-pclk", "#clock-cells", 0)
    tree.u32("/apb-pclk", "clock-frequency", board.uart_clock_hz)
    tree.string("/apb-pclk", "clock-output-names", "clk24mhz")
    tree.u32("/apb-pclk", "phandle", PHANDLE_CLOCK)

    uart = board.uart_path
    tree.string(uart, "compatible", "arm,pl011", "arm,primecell")
    tree.u64(uart, "reg", *board.uart)
    uart_trigger = IRQ_TYPE_EDGE_RISING if board.uart_edge else IRQ_TYPE_LEVEL_HIGH
    tree.u32(uart, "interrupts", GIC_SPI, board.uart_spi, uart_trigger)
    tree.u32(uart, "clocks", PHANDLE_CLOCK, PHANDLE_CLOCK)
    tree.string(uart, "clock-names", "uartclk", "apb_pclk")

    for device in board.mmio_devices:
        node = f"/{device.name}@{device.base:x}"
        tree.string(node, "compatible", device.compatible)
        tree.u64(node, "reg", device.base, device.size)

    for write_nodes in board.backend_nodes:
        write_nodes(tree)
    blob = tree.to_dtb()
    if len(blob) > FDT_MAX_SIZE:
        raise ConfigError(f"device tree: {len(blob)} bytes; the arm64 boot protocol allows {FDT_MAX_SIZE}")
    return blob


def read_fdt(blob: bytes) -> dict[str, dict[str, bytes]]:
    """Every node of a DTB by path, with its properties' raw values: for tests and
    diagnostics, independent of how the library guesses property types.

    :raises ConfigError: ``blob`` is not a device tree.
    """
    if len(blob) < 4 or _U32.unpack_from(blob)[0] != FDT_MAGIC:
        raise ConfigError("not a flattened device tree (no 0xd00dfeed magic)")
    try:
        tree = fdt.parse_dtb(bytes(blob))
    except Exception as exc:  # the parser raises whatever it hits
        raise ConfigError(f"not a valid flattened device tree: {exc}") from exc
    nodes: dict[str, dict[str, bytes]] = {}
    for path, _, props in tree.walk():
        nodes[path] = {prop.name: _raw(prop) for prop in props}
    return nodes


def _raw(prop: object) -> bytes:
    if isinstance(prop, fdt.PropWords):
        return b"".join(_U32.pack(word) for word in prop.data)
    if isinstance(prop, fdt.PropStrings):
        return b"".join(text.encode() + b"\0" for text in prop.data)
    if isinstance(prop, fdt.PropBytes):
        return bytes(prop.data)
    return b""
