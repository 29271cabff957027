"""The KVM backend on an arm64 host, with real guests: vCPU init and PSCI CPU_ON,
one-reg access, the in-kernel GICv3 with irq lines and irqfds, the architected
timer, the dirty log, kicks, and ``pyvmm run`` of the aarch64 demo on 1 and 2
vCPUs.  (The conformance suite's aarch64 scenarios cover MMIO, PSCI off/reset,
WFI, registers, read-only memory and memory removal.)

These need KVM on an aarch64 host: on any other host they skip, and they run in
the arm64 test bed (real upstream KVM inside QEMU; README "test beds").
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator

import pytest

from pyvmm import cli
from pyvmm.arch.aarch64 import MPIDR_EL1_ID, PC_ID, sysreg_id, x_reg_id
from pyvmm.boot import BootSpec
from pyvmm.config import PAGE_SIZE, Arch
from pyvmm.errors import ConfigError, VmStateError
from pyvmm.exits import ExitKind, MmioExit, SystemEvent, SystemEventExit
from pyvmm.host import Event
from pyvmm.machine.devicetree import cpu_reg
from pyvmm.plugins import PluginRegistry
from pyvmm.testing.conformance import programs_aarch64 as p
from pyvmm.vm import Backend, Vcpu, Vm
from pyvmm_kvm import arm64_uapi as a
from pyvmm_kvm import bindings as k
from pyvmm_kvm.arm64_plugin import plugin as arm64_plugin
from pyvmm_kvm.host_arch import host_is_arm64

pytestmark = pytest.mark.skipif(not host_is_arm64(), reason="needs KVM on an aarch64 host: runs in the arm64 test bed")

#: PSCI CPU_ON (SMC64) for MPIDR 1 at ``secondary`` with context id 0x55; the
#: secondary reports X0 (the context id) and its MPIDR, then powers the system off.
CPU_ON = p.aarch64_program(
    "cpu_on",
    """
    movz x0, #0x0003
    movk x0, #0xc400, lsl #16
    mov x1, #1
    adr x2, secondary
    movz x3, #0x55
    hvc #0
    movz x5, #0x0900, lsl #16
    str x0, [x5]
1:  wfi
    b 1b
secondary:
    movz x5, #0x0900, lsl #16
    str x0, [x5, #8]
    mrs x1, mpidr_el1
    str x1, [x5, #16]
"""
    + p.SYSTEM_OFF_SOURCE,
    "600080d20080b8f2210080d2e2000010a30a80d2020000d40520a1d2a00000f97f2003d5ffffff170520a1d2a00400f9"
    "a10038d5a10800f9000180d20080b0f2020000d4",
)

#: The architected timer: CNTFRQ_EL0, then CNTVCT_EL0 twice.
TIMER = p.aarch64_program(
    "timer",
    """
    movz x5, #0x0900, lsl #16
    mrs x1, cntfrq_el0
    str x1, [x5]
    isb
    mrs x2, cntvct_el0
    str x2, [x5, #8]
    isb
    mrs x3, cntvct_el0
    str x3, [x5, #16]
"""
    + p.SYSTEM_OFF_SOURCE,
    "0520a1d201e03bd5a10000f9df3f03d542e03bd5a20400f9df3f03d543e03bd5a30800f9000180d20080b0f2020000d4",
)

#: One store into the second page after RAM (a dirty-logged region).
DIRTY = p.aarch64_program(
    "dirty",
    """
    movz x1, #0x4020, lsl #16
    movz x2, #0x77
    str x2, [x1, #0x1008]
"""
    + p.SYSTEM_OFF_SOURCE,
    "0104a8d2e20e80d2220408f9000180d20080b0f2020000d4",
)

#: Interrupts through the vGIC: a vector table at the load address (VBAR_EL1 must
#: be 2 KiB-aligned), whose IRQ entry reports the INTID from ICC_IAR1_EL1, EOIs it
#: and powers off; the program turns the distributor on, makes SPI 3 (INTID 35)
#: and the virtual timer's PPI (INTID 27) group-1 and enabled, opens the CPU
#: interface, arms the virtual timer when X3 is non-zero, unmasks IRQs and waits.
INTERRUPTS = p.aarch64_program(
    "interrupts",
    """
    b main
    .skip 0x280 - 4
    mrs x0, S3_0_C12_C12_0          // ICC_IAR1_EL1
    str x0, [x5]
    msr S3_0_C12_C12_1, x0          // ICC_EOIR1_EL1
    movz x0, #0x0008
    movk x0, #0x8400, lsl #16
    hvc #0
main:
    movz x5, #0x0900, lsl #16
    adr x1, .
    and x1, x1, #~0x7ff
    msr vbar_el1, x1
    movz x1, #0x0800, lsl #16       // GICD
    mov w2, #0x13                   // ARE, EnableGrp1, EnableGrp0
    str w2, [x1]
    mov w2, #(1 << 3)
    str w2, [x1, #0x84]             // GICD_IGROUPR1
    str w2, [x1, #0x104]            // GICD_ISENABLER1
    movz x1, #0x080a, lsl #16       // GICR of vCPU 0
    str wzr, [x1, #0x14]            // GICR_WAKER: awake
    add x1, x1, #0x10000            // its SGI frame
    mov w2, #(1 << 27)
    str w2, [x1, #0x80]             // GICR_IGROUPR0
    str w2, [x1, #0x100]            // GICR_ISENABLER0
    mov x2, #0xff
    msr S3_0_C4_C6_0, x2            // ICC_PMR_EL1
    mov x2, #1
    msr S3_0_C12_C12_7, x2          // ICC_IGRPEN1_EL1
    isb
    cbz x3, 2f
    mov x2, #1000
    msr cntv_tval_el0, x2
    mov x2, #1
    msr cntv_ctl_el0, x2
    isb
2:  msr daifclr, #2
1:  wfi
    b 1b
""",
    "a6000014"
    + "00" * 0x27C
    + "00cc38d5a00000f920cc18d5000180d20080b0f2020000d40520a1d20100001021d0759201c018d50100a1d262028052220000b9"
    "02018052228400b9220401b94101a1d23f1400b9214040910200a152228000b9220001b9e21f80d2024618d5220080d2e2cc18d5"
    "df3f03d5c30000b4027d80d202e31bd5220080d222e31bd5df3f03d5ff4203d57f2003d5ffffff17",
)

#: The test programs of this module, for the source check.
PROGRAMS = (CPU_ON, TIMER, DIRTY, INTERRUPTS)

#: TPIDR_EL1: a system register a guest never needs set, free to write.
TPIDR_EL1_ID = sysreg_id(3, 0, 13, 0, 4)
#: GICD_ISPENDR<n>: the pending bits of INTIDs 32n..32n+31.
GICD_ISPENDR = 0x200


@pytest.fixture(scope="module")
def kvm() -> Backend:
    registry = PluginRegistry()
    plugin = registry.register(arm64_plugin)
    availability = plugin.availability()
    if not availability.available:
        pytest.skip(f"KVM is not usable here: {availability.reason}")
    return Backend(plugin)


@contextlib.contextmanager
def booted(
    kvm: Backend, program: p.Aarch64Program, *, cpus: int = 1, irqchip: bool = False, room: int = 0
) -> Iterator[tuple[Vm, list[Vcpu]]]:
    """A VM with ``cpus`` vCPUs created (and ``room`` more it may create), the
    program at CODE_ADDRESS, not booted yet."""
    with kvm.create_vm({"arch": "aarch64", "vcpus": cpus + room}) as vm:
        vm.add_memory(p.RAM_BASE, p.RAM_SIZE, contents={p.CODE_ADDRESS: program.code, p.FDT_ADDRESS: p.minimal_fdt()})
        if irqchip:
            vm.create_irqchip()
        vcpus = [vm.create_vcpu() for _ in range(cpus)]
        yield vm, vcpus


def boot(vm: Vm) -> None:
    vm.boot(BootSpec(arch=Arch.AARCH64, entry=p.CODE_ADDRESS, fdt_address=p.FDT_ADDRESS, fdt_size=p.FDT_SIZE))


def write_of(vcpu: Vcpu, offset: int) -> int:
    exit_ = vcpu.run()
    assert isinstance(exit_, MmioExit), exit_
    assert (exit_.address, exit_.size, exit_.is_write) == (p.MMIO_BASE + offset, 8, True)
    return int(struct.unpack("<Q", exit_.data[:8])[0])


def shuts_down(vcpu: Vcpu) -> None:
    exit_ = vcpu.run()
    assert isinstance(exit_, SystemEventExit), exit_
    assert exit_.event is SystemEvent.SHUTDOWN


def test_secondaries_start_powered_off_with_their_own_mpidr(kvm: Backend) -> None:
    with booted(kvm, p.PSCI_OFF, cpus=2) as (_, vcpus):
        handles = [vcpu.handle for vcpu in vcpus]
        assert [h.get_mp_state() for h in handles] == [k.KVM_MP_STATE_RUNNABLE, k.KVM_MP_STATE_STOPPED]
        # MPIDR_EL1: RES1 bit 31 over the affinity the device tree's cpu@N names.
        assert [h.mpidr() & 0xFF_FFFF for h in handles] == [cpu_reg(0), cpu_reg(1)]
        ids = set(handles[0].reg_list())
        assert {x_reg_id(0), x_reg_id(30), PC_ID, MPIDR_EL1_ID} <= ids


def test_one_reg_core_and_system_registers(kvm: Backend) -> None:
    with booted(kvm, p.PSCI_OFF) as (_, vcpus):
        handle = vcpus[0].handle
        handle.set_one_reg(x_reg_id(7), 0x1122_3344_5566_7788)
        handle.set_one_reg(TPIDR_EL1_ID, 0xCAFE_F00D)
        assert handle.get_one_reg(x_reg_id(7)) == 0x1122_3344_5566_7788
        assert handle.get_one_reg(TPIDR_EL1_ID) == 0xCAFE_F00D
        with pytest.raises(ConfigError, match="does not fit"):
            handle.set_one_reg(x_reg_id(7), 1 << 64)


def test_psci_cpu_on_starts_the_second_vcpu(kvm: Backend) -> None:
    with booted(kvm, CPU_ON, cpus=2) as (vm, (boot_cpu, second)):
        boot(vm)
        assert write_of(boot_cpu, 0) == 0, "CPU_ON must return PSCI SUCCESS"
        assert write_of(second, 8) == 0x55, "the secondary starts with the context id in X0"
        assert write_of(second, 16) & 0xFF_FFFF == cpu_reg(1)
        shuts_down(second)


def test_architected_timer_counts(kvm: Backend) -> None:
    with booted(kvm, TIMER) as (vm, (vcpu,)):
        boot(vm)
        frequency, first, second = write_of(vcpu, 0), write_of(vcpu, 8), write_of(vcpu, 16)
        assert frequency > 0
        assert second > first
        shuts_down(vcpu)


def test_dirty_log_shows_the_page_the_guest_wrote(kvm: Backend) -> None:
    with booted(kvm, DIRTY) as (vm, (vcpu,)):
        region = vm.add_memory(p.READ_ONLY_ADDRESS, 4 * PAGE_SIZE, log_dirty=True)
        boot(vm)
        shuts_down(vcpu)
        assert vm.dirty_pages(region) == [p.READ_ONLY_ADDRESS + PAGE_SIZE]
        assert vm.memory.read_u64(p.READ_ONLY_ADDRESS + PAGE_SIZE + 8) == 0x77


def test_kick_before_run_interrupts_it(kvm: Backend) -> None:
    with booted(kvm, p.WFI) as (vm, (vcpu,)):
        boot(vm)
        vcpu.kick()
        assert vcpu.run().kind is ExitKind.INTERRUPTED


def test_vgic_lines_and_irqfds_reach_the_distributor(kvm: Backend) -> None:
    with (
        Event() as edge,
        Event() as level,
        Event() as resample,
        booted(kvm, p.PSCI_OFF, cpus=2, irqchip=True, room=1) as (vm, _),
    ):
        # Registered before the vGIC is initialised: held until VM start.
        vm.register_irqfd(edge, 3, level=False)
        vm.register_irqfd(level, 6, level=True, resample=resample)
        boot(vm)
        vgic = vm.handle.vgic
        assert vgic is not None and vgic.initialized
        assert vgic.distributor_register(GICD_ISPENDR + 4) == 0
        edge.signal()
        assert vgic.distributor_register(GICD_ISPENDR + 4) == 1 << 3, "SPI 3 is INTID 35"
        level.signal()
        assert vgic.distributor_register(GICD_ISPENDR + 4) == 1 << 3 | 1 << 6
        vm.set_irq_line(5, True)
        assert vgic.distributor_register(GICD_ISPENDR + 4) == 1 << 3 | 1 << 5 | 1 << 6
        with pytest.raises(VmStateError, match="vGIC"):
            vm.create_vcpu()
        vm.unregister_irqfd(edge, 3)
        vm.unregister_irqfd(level, 6)


def boot_with(vm: Vm, registers: dict[str, int]) -> None:
    spec = BootSpec(
        arch=Arch.AARCH64, entry=p.CODE_ADDRESS, fdt_address=p.FDT_ADDRESS, fdt_size=p.FDT_SIZE, registers=registers
    )
    vm.boot(spec)


def test_an_spi_raised_by_the_vmm_reaches_the_guest(kvm: Backend) -> None:
    with booted(kvm, INTERRUPTS, irqchip=True) as (vm, (vcpu,)):
        boot_with(vm, {"x3": 0})
        # After start: KVM refuses lines into a GICv3 it has not initialised (EBUSY).
        vm.set_irq_line(3, True)
        assert write_of(vcpu, 0) == 35, "the guest acknowledges INTID 35 (SPI 3)"
        shuts_down(vcpu)


def test_the_virtual_timer_interrupts_the_guest(kvm: Backend) -> None:
    with booted(kvm, INTERRUPTS, irqchip=True) as (vm, (vcpu,)):
        boot_with(vm, {"x3": 1})
        assert write_of(vcpu, 0) == a.VTIMER_INTID
        shuts_down(vcpu)


def test_irq_line_without_the_vgic_is_refused(kvm: Backend) -> None:
    with booted(kvm, p.PSCI_OFF) as (vm, _):
        with pytest.raises(ConfigError, match="create_irqchip"):
            vm.set_irq_line(1, True)
        with Event() as event, pytest.raises(ConfigError, match="create_irqchip"):
            vm.register_irqfd(event, 1, level=False)


@pytest.mark.parametrize("cpus", [1, 2])
def test_pyvmm_run_boots_the_demo_guest(cpus: int, capfd: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["run", "--arch", "aarch64", "--backend", "kvm", "--cpus", str(cpus), "--timeout", "300"])
    out = capfd.readouterr().out
    assert status == 0, out
    assert "MMIO round trips ok" in out
    assert "powering off through PSCI SYSTEM_OFF" in out
