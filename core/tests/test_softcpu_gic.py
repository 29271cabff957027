"""The software CPU's GICv3 (:mod:`pyvmm.softcpu.gic`): an aarch64 guest
programs the distributor and redistributor over MMIO, the CPU interface through
ICC_* system registers and the virtual timer through CNTV_*, and takes the timer
PPI and an SPI through its VBAR_EL1 vectors.  The guest's source (GNU as) is
kept next to its bytes; ``test_guest_matches_its_source`` re-assembles it."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("unicorn", reason="the software CPU needs unicorn (pip install 'pyvmm-core[softcpu]')")

from pyvmm.arch.aarch64_boot import build_aarch64_boot_state
from pyvmm.boot import BootSpec
from pyvmm.config import Arch, MemoryRegionSpec
from pyvmm.errors import ConfigError
from pyvmm.exits import ExitKind, MmioExit
from pyvmm.memory import GuestMemory
from pyvmm.softcpu import SoftCpu
from pyvmm.softcpu.gic import SPURIOUS, VTIMER_PPI, Gic

RAM = 0x4000_0000
CODE = RAM + 0x8_0000
LOG = 0x0900_0000  # the guest writes each acknowledged INTID here
SPI = 40

SOURCE = """
    adr x0, vectors
    msr VBAR_EL1, x0
    isb
    mov x7, #0x09000000
    mov x1, #0x08000000
    mov w2, #0x12
    str w2, [x1]
    mov w2, #0x100
    str w2, [x1, #0x104]
    movz x3, #0x0100
    movk x3, #0x080b, lsl #16
    mov w2, #0x08000000
    str w2, [x3]
    mov x2, #0xf0
    msr S3_0_C4_C6_0, x2
    mov x2, #1
    msr S3_0_C12_C12_7, x2
    mrs x2, CNTVCT_EL0
    add x2, x2, #3125
    msr CNTV_CVAL_EL0, x2
    mov x2, #1
    msr CNTV_CTL_EL0, x2
    msr DAIFClr, #2
1:  wfi
    b 1b
    .balign 0x800
vectors:
    .org vectors + 0x280
    mrs x5, S3_0_C12_C12_0
    str w5, [x7]
    cmp x5, #27
    b.ne 2f
    mov x2, #2
    msr CNTV_CTL_EL0, x2
2:  msr S3_0_C12_C12_1, x5
    eret
"""
#: The guest up to its idle loop, and its IRQ handler at VBAR_EL1 + 0x280.
MAIN = (
    "0040001000c018d5df3f03d50720a1d20100a1d242028052220000b902208052220401b9032080d26301a1f20200a1526200"
    "00b9021e80d2024618d5220080d2e2cc18d542e03bd542d4309142e31bd5220080d222e31bd5ff4203d57f2003d5ffffff17"
)
HANDLER_OFFSET = 0xA80
HANDLER = "05cc38d5e50000b9bf6c00f161000054420080d222e31bd525cc18d5e0039fd6"


def test_guest_matches_its_source() -> None:
    if shutil.which("aarch64-linux-gnu-as") is None or shutil.which("aarch64-linux-gnu-objcopy") is None:
        pytest.skip("no aarch64 GNU as here")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "g.S").write_text(SOURCE)
        subprocess.run(["aarch64-linux-gnu-as", "g.S", "-o", "g.o"], cwd=work, check=True)
        subprocess.run(
            ["aarch64-linux-gnu-objcopy", "-O", "binary", "-j", ".text", "g.o", "g.bin"], cwd=work, check=True
        )
        built = (work / "g.bin").read_bytes()
    assert built[: len(MAIN) // 2].hex() == MAIN
    assert built[HANDLER_OFFSET:].hex() == HANDLER


def _run_until_logged(cpu: SoftCpu, gic: Gic, deadline: float) -> int:
    """Run the guest, answering GIC MMIO, until it logs an INTID."""
    while time.monotonic() < deadline:
        exit_ = cpu.run()
        if isinstance(exit_, MmioExit) and gic.contains(exit_.address):
            if exit_.is_write:
                gic.mmio_write(exit_.address, exit_.size, int.from_bytes(bytes(exit_.data), "little"))
            else:
                value = gic.mmio_read(exit_.address, exit_.size)
                exit_.data[: exit_.size] = value.to_bytes(exit_.size, "little")
            continue
        if isinstance(exit_, MmioExit) and exit_.address == LOG:
            return int.from_bytes(bytes(exit_.data), "little")
        assert exit_.kind is ExitKind.HLT, f"unexpected {exit_!r}"
        time.sleep(0.0002)  # WFI with nothing signalled yet: the timer is still counting
    raise AssertionError("the guest logged no interrupt")


def test_timer_ppi_and_spi_through_the_vectors() -> None:
    memory = GuestMemory()
    region = memory.allocate(MemoryRegionSpec(guest_phys_addr=RAM, size=0x20_0000))
    memory.insert(region)
    memory.write(CODE, bytes.fromhex(MAIN))
    memory.write(CODE + HANDLER_OFFSET, bytes.fromhex(HANDLER))
    gic = Gic(1)
    cpu = SoftCpu("aarch64")
    try:
        cpu.map_region(region)
        cpu.init(build_aarch64_boot_state(BootSpec(arch=Arch.AARCH64, entry=CODE, fdt_address=RAM, fdt_size=64)))
        cpu.attach_gic(gic.cpus[0])
        deadline = time.monotonic() + 10
        assert _run_until_logged(cpu, gic, deadline) == VTIMER_PPI
        state = gic.cpus[0]
        assert state.pmr == 0xF0 and state.igrpen1 == 1 and gic.spis[SPI - 32].enabled
        exit_ = cpu.run()  # the handler masked the timer, EOI'd and returned to WFI
        assert exit_.kind is ExitKind.HLT and not state.active_stack and state.timer_ctl == 2
        assert gic.set_spi(SPI) == 0
        assert cpu.irq_signalled()
        assert _run_until_logged(cpu, gic, deadline) == SPI
        assert cpu.run().kind is ExitKind.HLT
        assert state.highest_pending() == SPURIOUS and not state.active_stack
    finally:
        cpu.close()
        memory.close()


def test_priority_mask_and_running_priority() -> None:
    gic = Gic(1)
    cpu = gic.cpus[0]
    gic.mmio_write(gic.distributor_base, 4, 0x12)
    gic.mmio_write(gic.distributor_base + 0x104, 4, 0b11 << 8)  # enable SPIs 40 and 41
    gic.mmio_write(gic.distributor_base + 0x400 + 40, 2, 0x80 | 0x40 << 8)  # 40: 0x80, 41: 0x40
    cpu.write_sysreg((3, 0, 12, 12, 7), 1)
    gic.set_spi(40)
    assert cpu.highest_pending() == SPURIOUS  # PMR 0 masks everything
    cpu.write_sysreg((3, 0, 4, 6, 0), 0x80)
    assert cpu.highest_pending() == SPURIOUS  # priority 0x80 is not below PMR 0x80
    cpu.write_sysreg((3, 0, 4, 6, 0), 0xF0)
    assert cpu.read_sysreg((3, 0, 12, 12, 0)) == 40  # IAR: 40 is active now
    gic.set_spi(41)
    assert cpu.read_sysreg((3, 0, 12, 12, 0)) == 41  # higher priority preempts
    gic.set_spi(40)
    assert cpu.read_sysreg((3, 0, 12, 12, 0)) == SPURIOUS  # 40 is still active
    assert gic.mmio_read(gic.distributor_base + 0x304, 4) == 0b11 << 8  # ISACTIVER1
    cpu.write_sysreg((3, 0, 12, 12, 1), 41)
    cpu.write_sysreg((3, 0, 12, 12, 1), 40)
    assert cpu.read_sysreg((3, 0, 12, 12, 0)) == 40  # pending again after its EOI
    with pytest.raises(ConfigError):
        gic.set_spi(20)
