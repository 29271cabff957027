"""aarch64 guest programs for the Gunyah tests, with their assembly.

They exercise what Gunyah does differently from KVM -- doorbells waking WFI,
ioeventfds, PSCI handled by the hypervisor (CPU_ON, SYSTEM_RESET2), the boot
registers the hypervisor sets -- and so are not part of pyvmm's conformance
suite.  ``test_gunyah_guest_sources.py`` checks every ``code`` against its
``source`` wherever an aarch64 GNU assembler exists.

All programs write to :data:`MMIO_BASE` (no RAM there: MMIO exits) and end with
PSCI SYSTEM_OFF through ``hvc #0`` unless they are about something else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyvmm.machine.devicetree import PHANDLE_GIC, DeviceTree, cpu_reg
from pyvmm.machine.virt import (
    GIC_DISTRIBUTOR_BASE,
    GIC_DISTRIBUTOR_SIZE,
    GIC_REDISTRIBUTOR_BASE,
    GIC_REDISTRIBUTOR_SIZE,
)
from pyvmm.testing.conformance.programs_aarch64 import SYSTEM_OFF_SOURCE, aarch64_program, backend_device_tree
from pyvmm.testing.guests import gicv3

if TYPE_CHECKING:
    from pyvmm.vm import Vm

#: Guest RAM and where the tests put the program and the device tree in it.
RAM_BASE = 0x8000_0000
RAM_SIZE = 0x20_0000
CODE_ADDRESS = RAM_BASE + 0x1000
FDT_ADDRESS = RAM_BASE + 0x10_0000
FDT_SIZE = 0x1000
STACK_TOP = RAM_BASE + 0x8_0000
MMIO_BASE = 0x0900_0000
#: Where IOEVENT writes first (an ioeventfd's address in the tests).
IOEVENT_ADDRESS = MMIO_BASE + 0x100
#: Where FETCH_FAULT jumps: no RAM.
UNBACKED = 0x1000_0000
#: The vendor-specific reset type RESET2 passes.
RESET2_TYPE = 0x8000_0001
#: The context id SMP hands the secondary vCPU.
CONTEXT_ID = 0x77
#: Where LENT_TOUCH writes: a page of its RAM (RAM_BASE + 4 pages in the raw tests).
TOUCHED = 0x8000_4000


def write_device_tree(vm: Vm, address: int = FDT_ADDRESS, *, gic: bool = False) -> None:
    """Write the tree Gunyah's resource manager builds the VM from -- the VM's
    vCPUs and the plugin's own nodes (memory, doorbells) -- at ``address``, once
    the memory, vCPUs' count and irqfds are known; with ``gic``, also a GICv3
    node as the virt board writes it (its phandle is the one the plugin's
    ``interrupts { config }`` names)."""
    vm.memory.write(address, device_tree_with_gic(vm) if gic else backend_device_tree(vm))


def device_tree_with_gic(vm: Vm) -> bytes:
    tree = DeviceTree()
    tree.u32("/", "#address-cells", 2)
    tree.u32("/", "#size-cells", 2)
    tree.u32("/cpus", "#address-cells", 1)
    tree.u32("/cpus", "#size-cells", 0)
    for index in range(vm.config.vcpus):
        cpu = f"/cpus/cpu@{cpu_reg(index):x}"
        tree.string(cpu, "device_type", "cpu")
        tree.string(cpu, "enable-method", "psci")
        tree.u32(cpu, "reg", cpu_reg(index))
    intc = f"/intc@{GIC_DISTRIBUTOR_BASE:x}"
    tree.string(intc, "compatible", "arm,gic-v3")
    tree.u32(intc, "#interrupt-cells", 3)
    tree.flag(intc, "interrupt-controller")
    redistributors = GIC_REDISTRIBUTOR_SIZE * vm.config.vcpus
    tree.u64(intc, "reg", GIC_DISTRIBUTOR_BASE, GIC_DISTRIBUTOR_SIZE, GIC_REDISTRIBUTOR_BASE, redistributors)
    tree.u32(intc, "phandle", PHANDLE_GIC)
    vm.add_device_tree_nodes(tree)
    blob = tree.to_dtb()
    assert len(blob) <= FDT_SIZE
    return blob


REPORT_REGISTERS = aarch64_program(
    "report_registers",
    """
    movz x5, #0x0900, lsl #16
    str x0, [x5]
    str x1, [x5, #8]
    mov x2, sp
    str x2, [x5, #16]
"""
    + SYSTEM_OFF_SOURCE,
    "0520a1d2a00000f9a10400f9e2030091a20800f9000180d20080b0f2020000d4",
)

DOORBELL_WAKE = aarch64_program(
    "doorbell_wake",
    """
    movz x5, #0x0900, lsl #16
    wfi
    str w5, [x5]
"""
    + SYSTEM_OFF_SOURCE,
    "0520a1d27f2003d5a50000b9000180d20080b0f2020000d4",
)

# DOORBELL_WAKE with the doorbell's interrupt enabled: the GIC's distributor
# (affinity routing, group 1) with SPI 8 (INTID 40, the SPI of doorbell label 8)
# enabled, and the CPU interface (PMR, group 1) -- IRQs stay masked in PSTATE, so
# the pending SPI wakes WFI without being taken.
DOORBELL_ENABLED_WAKE = aarch64_program(
    "doorbell_enabled_wake",
    """
    movz x1, #0x0800, lsl #16
    mov w2, #0x12
    str w2, [x1]
    mov w2, #0x100
    str w2, [x1, #0x104]
    mov x2, #0xf0
    msr S3_0_C4_C6_0, x2
    mov x2, #1
    msr S3_0_C12_C12_7, x2
    movz x5, #0x0900, lsl #16
    wfi
    str w5, [x5]
"""
    + SYSTEM_OFF_SOURCE,
    "0100a1d242028052220000b902208052220401b9021e80d2024618d5220080d2e2cc18d50520a1d27f2003d5a50000b9000180d2"
    "0080b0f2020000d4",
)

IOEVENT = aarch64_program(
    "ioevent",
    """
    movz x5, #0x0900, lsl #16
    movz w6, #0x2a
    str w6, [x5, #0x100]
    str w6, [x5]
"""
    + SYSTEM_OFF_SOURCE,
    "0520a1d246058052a60001b9a60000b9000180d20080b0f2020000d4",
)

# A one-byte write where IOEVENT's ioeventfd (four bytes, no DATAMATCH) sits.
IOEVENT_BYTE = aarch64_program(
    "ioevent_byte",
    """
    movz x5, #0x0900, lsl #16
    movz w6, #0x2a
    strb w6, [x5, #0x100]
    str w6, [x5]
"""
    + SYSTEM_OFF_SOURCE,
    "0520a1d246058052a6000439a60000b9000180d20080b0f2020000d4",
)

# A write, then a read the VMM may complete without writing data: what the
# guest gets is whatever the run page's data held.
WRITE_THEN_READ = aarch64_program(
    "write_then_read",
    """
    movz x5, #0x0900, lsl #16
    movz w6, #0x2a
    str w6, [x5]
    ldr w2, [x5, #8]
    str w2, [x5, #16]
"""
    + SYSTEM_OFF_SOURCE,
    "0520a1d246058052a60000b9a20840b9a21000b9000180d20080b0f2020000d4",
)

# A read, then a write an ioeventfd absorbs (the hypervisor runs on without an
# exit), then the value read, written out.
READ_IOEVENT_WRITE = aarch64_program(
    "read_ioevent_write",
    """
    movz x5, #0x0900, lsl #16
    ldr w2, [x5]
    str w2, [x5, #0x100]
    str w2, [x5, #8]
"""
    + SYSTEM_OFF_SOURCE,
    "0520a1d2a20040b9a20001b9a20800b9000180d20080b0f2020000d4",
)

# Touches one page of its RAM (TOUCHED), then reports through MMIO.
LENT_TOUCH = aarch64_program(
    "lent_touch",
    """
    movz x1, #0x8000, lsl #16
    movk x1, #0x4000
    movz w6, #0x2a
    str w6, [x1]
    movz x5, #0x0900, lsl #16
    str w6, [x5]
"""
    + SYSTEM_OFF_SOURCE,
    "0100b0d2010088f246058052260000b90520a1d2a60000b9000180d20080b0f2020000d4",
)

# vCPU 0 asks PSCI CPU_ON for itself (already on), then for vCPU 1, reporting
# each result, and idles; vCPU 1 reports its context id and powers the VM off.
SMP = aarch64_program(
    "smp",
    """
    movz x5, #0x0900, lsl #16
    movz x0, #0x0003
    movk x0, #0xc400, lsl #16
    mov x1, #0
    adr x2, 2f
    mov x3, #0x77
    hvc #0
    str x0, [x5]
    movz x0, #0x0003
    movk x0, #0xc400, lsl #16
    mov x1, #1
    adr x2, 2f
    mov x3, #0x77
    hvc #0
    str x0, [x5]
1:  wfi
    b 1b
2:  movz x5, #0x0900, lsl #16
    str x0, [x5, #8]
"""
    + SYSTEM_OFF_SOURCE,
    "0520a1d2600080d20080b8f2010080d2a2010010e30e80d2020000d4a00000f9600080d20080b8f2210080d2c2000010e30e80d2"
    "020000d4a00000f97f2003d5ffffff170520a1d2a00400f9000180d20080b0f2020000d4",
)

UNDEFINED = aarch64_program("undefined", "    udf #0\n", "00000000")

FETCH_FAULT = aarch64_program(
    "fetch_fault",
    """
    movz x1, #0x1000, lsl #16
    br x1
""",
    "0100a2d220001fd6",
)

RESET2 = aarch64_program(
    "reset2",
    """
    movz x0, #0x0012
    movk x0, #0xc400, lsl #16
    movz x1, #0x0001
    movk x1, #0x8000, lsl #16
    mov x2, #0
    hvc #0
""",
    "400280d20080b8f2210080d20100b0f2020080d2020000d4",
)

LOOP = aarch64_program("loop", "1:  b 1b\n", "00000014")

READ_THEN_WRITE = aarch64_program(
    "read_then_write",
    """
    movz x5, #0x0900, lsl #16
    ldr w2, [x5]
    str w2, [x5, #8]
"""
    + SYSTEM_OFF_SOURCE,
    "0520a1d2a20040b9a20800b9000180d20080b0f2020000d4",
)

# PSCI_VERSION, PSCI_FEATURES(CPU_ON), and an SMCCC call Gunyah does not
# implement (through SMC): each answer is written out.
PSCI_QUERIES = aarch64_program(
    "psci_queries",
    """
    movz x5, #0x0900, lsl #16
    movz x0, #0x0000
    movk x0, #0x8400, lsl #16
    hvc #0
    str x0, [x5]
    movz x0, #0x000a
    movk x0, #0x8400, lsl #16
    movz x1, #0x0003
    movk x1, #0xc400, lsl #16
    hvc #0
    str x0, [x5, #8]
    movz x0, #0x0000
    movk x0, #0xc200, lsl #16
    smc #0
    str x0, [x5, #16]
"""
    + SYSTEM_OFF_SOURCE,
    "0520a1d2000080d20080b0f2020000d4a00000f9400180d20080b0f2610080d20180b8f2020000d4a00400f9000080d20040b8f2"
    "030000d4a00800f9000180d20080b0f2020000d4",
)

#: The SPI a doorbell of label N raises is N (its node's ``interrupts = <0 N type>``):
#: TIMER_AND_DOORBELL (shared with the software CPU's tests) enables SPI 8, INTID 40.
TIMER_AND_DOORBELL = gicv3.TIMER_AND_DOORBELL
DOORBELL_INTID = gicv3.SPI_INTID
DOORBELL_LABEL = DOORBELL_INTID - 32
VTIMER_INTID = gicv3.VTIMER_INTID

# Reads GICD_TYPER (32 bits) and vCPU 0's GICR_TYPER (64 bits) and writes them
# out: the hypervisor answers both reads itself.
GIC_READS = aarch64_program(
    "gic_reads",
    """
    movz x1, #0x0800, lsl #16
    ldr w2, [x1, #4]
    movz x3, #0x080a, lsl #16
    ldr x4, [x3, #8]
    movz x5, #0x0900, lsl #16
    str w2, [x5]
    str x4, [x5, #8]
"""
    + SYSTEM_OFF_SOURCE,
    "0100a1d2220440b94301a1d2640440f90520a1d2a20000b9a40400f9000180d20080b0f2020000d4",
)

# SMCCC_VERSION, PSCI_FEATURES(SYSTEM_OFF as SMC64), PSCI_FEATURES(AFFINITY_INFO),
# SMCCC_ARCH_FEATURES(SMCCC_VERSION) and PSCI_VERSION as an SMC64 id, each answer
# written out in turn.
SMCCC_QUERIES = aarch64_program(
    "smccc_queries",
    """
    movz x5, #0x0900, lsl #16
    movz x0, #0x0000
    movk x0, #0x8000, lsl #16
    hvc #0
    str x0, [x5]
    movz x0, #0x000a
    movk x0, #0x8400, lsl #16
    movz x1, #0x0008
    movk x1, #0xc400, lsl #16
    hvc #0
    str x0, [x5, #8]
    movz x0, #0x000a
    movk x0, #0x8400, lsl #16
    movz x1, #0x0004
    movk x1, #0x8400, lsl #16
    hvc #0
    str x0, [x5, #16]
    movz x0, #0x0001
    movk x0, #0x8000, lsl #16
    movz x1, #0x0000
    movk x1, #0x8000, lsl #16
    hvc #0
    str x0, [x5, #24]
    movz x0, #0x0000
    movk x0, #0xc400, lsl #16
    hvc #0
    str x0, [x5, #32]
"""
    + SYSTEM_OFF_SOURCE,
    "0520a1d2000080d20000b0f2020000d4a00000f9400180d20080b0f2010180d20180b8f2020000d4a00400f9400180d20080b0f2"
    "810080d20180b0f2020000d4a00800f9200080d20000b0f2010080d20100b0f2020000d4a00c00f9000080d20080b8f2020000d4"
    "a01000f9000180d20080b0f2020000d4",
)

# PSCI AFFINITY_INFO (SMC64), which Gunyah implements and the model does not.
AFFINITY_INFO = aarch64_program(
    "affinity_info",
    """
    movz x0, #0x0004
    movk x0, #0xc400, lsl #16
    movz x1, #0x0000
    hvc #0
"""
    + SYSTEM_OFF_SOURCE,
    "800080d20080b8f2010080d2020000d4000180d20080b0f2020000d4",
)

# The first of Gunyah's own vendor-hypervisor calls (owner 6, SMC64).
VENDOR_HYPERCALL = aarch64_program(
    "vendor_hypercall",
    """
    movz x0, #0x0000
    movk x0, #0xc600, lsl #16
    movz x1, #0x0000
    hvc #0
"""
    + SYSTEM_OFF_SOURCE,
    "000080d200c0b8f2010080d2020000d4000180d20080b0f2020000d4",
)

GUESTS = (
    REPORT_REGISTERS,
    DOORBELL_WAKE,
    DOORBELL_ENABLED_WAKE,
    IOEVENT,
    SMP,
    UNDEFINED,
    FETCH_FAULT,
    RESET2,
    LOOP,
    READ_THEN_WRITE,
    PSCI_QUERIES,
    IOEVENT_BYTE,
    WRITE_THEN_READ,
    LENT_TOUCH,
    READ_IOEVENT_WRITE,
    TIMER_AND_DOORBELL,
    GIC_READS,
    SMCCC_QUERIES,
    AFFINITY_INFO,
    VENDOR_HYPERCALL,
)
