"""aarch64 guest programs of the conformance suite, with their assembly.

Each program is A64 code (GNU as syntax) that the suite loads at
:data:`CODE_ADDRESS` and enters the way the Linux arm64 boot protocol says: at
EL1 with the MMU off, X0 = the device-tree address, X1..X3 = 0 (pyvmm's
:func:`~pyvmm.arch.aarch64_boot.build_aarch64_boot_state`).  Programs end by
asking PSCI for SYSTEM_OFF through ``HVC``, the portable way for an aarch64
guest to stop: every hypervisor that offers PSCI turns it into a
:class:`~pyvmm.exits.SystemEventExit`.

``core/tests/test_softcpu_aarch64_programs.py`` checks the bytes against the
source wherever an aarch64 GNU assembler (``aarch64-linux-gnu-as``, or ``as`` on
an aarch64 host) exists, so the two cannot drift apart.
"""

from __future__ import annotations

import platform
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pyvmm.config import Arch

if TYPE_CHECKING:
    from pyvmm.vm import Vm

#: Guest RAM, where the ``virt`` machines of QEMU and crosvm put it.
RAM_BASE = 0x4000_0000
RAM_SIZE = 0x20_0000
#: Where programs are loaded (the arm64 kernel's traditional text offset).
CODE_ADDRESS = RAM_BASE + 0x8_0000
#: The device tree handed over in X0.
FDT_ADDRESS = RAM_BASE + 0x10_0000
FDT_SIZE = 0x1000
#: A RAM address the programs read and write.
DATA_ADDRESS = RAM_BASE + 0x18_0000
#: Right after RAM: where the read-only and removal scenarios map their page.
READ_ONLY_ADDRESS = RAM_BASE + RAM_SIZE
#: An address no RAM backs, for MMIO (the PL011's address on QEMU's virt).
MMIO_BASE = 0x0900_0000

PSCI_SYSTEM_OFF = 0x8400_0008
PSCI_SYSTEM_RESET = 0x8400_0009


@dataclass(frozen=True)
class Aarch64Program:
    name: str
    source: str
    code: bytes
    arch: Arch = Arch.AARCH64

    def assembled(self) -> bytes | None:
        """The source assembled now (None without an aarch64 assembler), to compare with ``code``."""
        return assemble_aarch64(self.source)


def aarch64_assembler() -> tuple[str, str] | None:
    """(as, objcopy) for aarch64 on this host, or None."""
    cross = (shutil.which("aarch64-linux-gnu-as"), shutil.which("aarch64-linux-gnu-objcopy"))
    if cross[0] and cross[1]:
        return cross[0], cross[1]
    native = (shutil.which("as"), shutil.which("objcopy"))
    if platform.machine() in ("aarch64", "arm64") and native[0] and native[1]:
        return native[0], native[1]
    return None


def assemble_aarch64(source: str) -> bytes | None:
    """Assemble ``source`` with GNU as for aarch64; None where there is none."""
    tools = aarch64_assembler()
    if tools is None:
        return None
    assembler, objcopy = tools
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "p.S").write_text(source)
        subprocess.run([assembler, "p.S", "-o", "p.o"], cwd=work, check=True, capture_output=True)
        subprocess.run([objcopy, "-O", "binary", "-j", ".text", "p.o", "p.bin"], cwd=work, check=True)
        return (work / "p.bin").read_bytes()


def minimal_fdt() -> bytes:
    """A valid flattened device tree with an empty root node: enough for a
    hypervisor that inspects the blob it is told about."""
    begin_node, end_node, end = 1, 2, 9
    structure = struct.pack(">II", begin_node, 0) + struct.pack(">II", end_node, end)
    reserve_map = bytes(16)
    header_size = 40
    off_rsvmap = header_size
    off_struct = off_rsvmap + len(reserve_map)
    off_strings = off_struct + len(structure)
    total = off_strings
    header = struct.pack(">10I", 0xD00DFEED, total, off_struct, off_strings, off_rsvmap, 17, 16, 0, 0, len(structure))
    return header + reserve_map + structure


def backend_device_tree(vm: Vm) -> bytes:
    """The device tree for a backend with nodes of its own (``DEVICE_TREE_NODES``:
    its hypervisor builds the VM from the tree, as Gunyah's resource manager
    does): the VM's vCPUs under ``/cpus`` and the backend's nodes.  Those describe
    the memory mapped so far: write the tree after mapping."""
    from pyvmm.machine.devicetree import DeviceTree, cpu_reg

    tree = DeviceTree()
    tree.u32("/cpus", "#address-cells", 1)
    tree.u32("/cpus", "#size-cells", 0)
    for index in range(vm.config.vcpus):
        cpu = f"/cpus/cpu@{cpu_reg(index):x}"
        tree.string(cpu, "device_type", "cpu")
        tree.string(cpu, "enable-method", "psci")
        tree.u32(cpu, "reg", cpu_reg(index))
    vm.add_device_tree_nodes(tree)
    blob = tree.to_dtb()
    if len(blob) > FDT_SIZE:
        raise ValueError(f"the device tree is {len(blob)} bytes, more than FDT_SIZE ({FDT_SIZE})")
    return blob


def aarch64_program(name: str, source: str, code_hex: str) -> Aarch64Program:
    """A program record from its source and the hex of its assembled bytes."""
    return Aarch64Program(name, source, bytes.fromhex(code_hex))


#: PSCI SYSTEM_OFF through ``hvc #0``: how every program here (and a backend's
#: own test guests) ends.
SYSTEM_OFF_SOURCE = """
    movz x0, #0x0008
    movk x0, #0x8400, lsl #16
    hvc #0
"""

MMIO_ROUND_TRIP = aarch64_program(
    "mmio_round_trip",
    """
    movz x5, #0x0900, lsl #16
    ldr w2, [x5]
    add w2, w2, #1
    str w2, [x5, #8]
    movz x3, #0x7788
    movk x3, #0x5566, lsl #16
    movk x3, #0x3344, lsl #32
    movk x3, #0x1122, lsl #48
    str x3, [x5, #16]
    ldr x4, [x5, #24]
    add x4, x4, #1
    str x4, [x5, #32]
"""
    + SYSTEM_OFF_SOURCE,
    "0520a1d2a20040b942040011a20800b903f18ed2c3acaaf28368c6f24324e2f2a30800f9a40c40f984040091a41000f9"
    "000180d20080b0f2020000d4",
)

COUNTER = aarch64_program(
    "counter",
    """
    movz x1, #0x4018, lsl #16
    movz x5, #0x0900, lsl #16
1:  ldr w0, [x1]
    add w0, w0, #1
    str w0, [x1]
    add w2, w2, w0
    strb w2, [x5]
    b 1b
""",
    "0103a8d20520a1d2200040b900040011200000b94200000ba2000039fbffff17",
)
"""Each MMIO write reports the running sum of a counter kept at DATA_ADDRESS:
what comes out next depends on guest memory and on a register both."""

PSCI_OFF = aarch64_program("psci_system_off", SYSTEM_OFF_SOURCE, "000180d20080b0f2020000d4")

PSCI_RESET = aarch64_program(
    "psci_system_reset",
    """
    movz x0, #0x0009
    movk x0, #0x8400, lsl #16
    hvc #0
""",
    "200180d20080b0f2020000d4",
)

WFI = aarch64_program(
    "wfi",
    """
1:  wfi
    b 1b
""",
    "7f2003d5ffffff17",
)

BOOT_REGISTERS = aarch64_program(
    "boot_registers",
    """
    movz x5, #0x0900, lsl #16
    str x0, [x5]
    str x1, [x5, #8]
    str x2, [x5, #16]
    str x3, [x5, #24]
"""
    + SYSTEM_OFF_SOURCE,
    "0520a1d2a00000f9a10400f9a20800f9a30c00f9000180d20080b0f2020000d4",
)

ADD_REGISTERS = aarch64_program(
    "add_registers",
    """
    add x6, x6, x7
    movz x5, #0x0900, lsl #16
    str x6, [x5]
"""
    + SYSTEM_OFF_SOURCE,
    "c600078b0520a1d2a60000f9000180d20080b0f2020000d4",
)

MEMORY = aarch64_program(
    "memory",
    """
    movz x1, #0x4018, lsl #16
    ldr x2, [x1]
    movz x5, #0x0900, lsl #16
    str x2, [x5]
    movz x3, #0xbeef
    movk x3, #0xdead, lsl #16
    str w3, [x1, #8]
"""
    + SYSTEM_OFF_SOURCE,
    "0103a8d2220040f90520a1d2a20000f9e3dd97d2a3d5bbf2230800b9000180d20080b0f2020000d4",
)

READ_ONLY_WRITE = aarch64_program(
    "read_only_write",
    """
    movz x1, #0x4020, lsl #16
    movz w2, #0x77
    strb w2, [x1]
    ldrb w3, [x1]
    movz x5, #0x0900, lsl #16
    strb w3, [x5]
"""
    + SYSTEM_OFF_SOURCE,
    "0104a8d2e20e805222000039230040390520a1d2a3000039000180d20080b0f2020000d4",
)

READ_TWICE = aarch64_program(
    "read_twice",
    """
    movz x1, #0x4020, lsl #16
    movz x5, #0x0900, lsl #16
    ldrb w2, [x1]
    strb w2, [x5]
    ldrb w2, [x1]
    strb w2, [x5]
"""
    + SYSTEM_OFF_SOURCE,
    "0104a8d20520a1d222004039a200003922004039a2000039000180d20080b0f2020000d4",
)


AARCH64_PROGRAMS = (
    MMIO_ROUND_TRIP,
    PSCI_OFF,
    PSCI_RESET,
    WFI,
    BOOT_REGISTERS,
    ADD_REGISTERS,
    MEMORY,
    READ_ONLY_WRITE,
    READ_TWICE,
)
