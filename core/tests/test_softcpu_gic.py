"""The software CPU's GICv3 (:mod:`pyvmm.softcpu.gic`): an aarch64 guest
(:mod:`pyvmm.testing.guests.gicv3`, shared with the Gunyah model's tests)
programs the distributor and redistributor over MMIO, the CPU interface through
ICC_* system registers and the virtual timer through CNTV_*, and takes the timer
PPI and an SPI through its VBAR_EL1 vectors."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("unicorn", reason="the software CPU needs unicorn (pip install 'pyvmm-core[softcpu]')")

from pyvmm.arch.aarch64_boot import build_aarch64_boot_state
from pyvmm.boot import BootSpec
from pyvmm.config import Arch, MemoryRegionSpec
from pyvmm.errors import ConfigError
from pyvmm.exits import ExitKind, MmioExit, SystemEvent, SystemEventExit
from pyvmm.memory import GuestMemory
from pyvmm.softcpu import SoftCpu
from pyvmm.softcpu.gic import SPURIOUS, VTIMER_PPI, Gic
from pyvmm.testing.guests import gicv3

RAM = 0x4000_0000
CODE = RAM + 0x8_0000  # 2 KiB-aligned: the program starts with its vector table
LOG = gicv3.LOG_ADDRESS
SPI = gicv3.SPI_INTID


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
    memory.write(CODE, gicv3.TIMER_AND_DOORBELL.code)
    gic = Gic(1)
    cpu = SoftCpu("aarch64")
    try:
        cpu.map_region(region)
        cpu.init(build_aarch64_boot_state(BootSpec(arch=Arch.AARCH64, entry=CODE, fdt_address=RAM, fdt_size=64)))
        cpu.attach_gic(gic.cpus[0])
        deadline = time.monotonic() + 10
        assert _run_until_logged(cpu, gic, deadline) == VTIMER_PPI == gicv3.VTIMER_INTID
        state = gic.cpus[0]
        assert state.pmr == 0xF0 and state.igrpen1 == 1 and gic.spis[SPI - 32].enabled
        exit_ = cpu.run()  # the handler masked the timer, EOI'd and returned to WFI
        assert exit_.kind is ExitKind.HLT and not state.active_stack and state.timer_ctl == 2
        assert gic.set_spi(SPI) == 0
        assert cpu.irq_signalled()
        assert _run_until_logged(cpu, gic, deadline) == SPI
        exit_ = cpu.run()  # two interrupts taken: the guest powers off
        assert isinstance(exit_, SystemEventExit) and exit_.event is SystemEvent.SHUTDOWN
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
