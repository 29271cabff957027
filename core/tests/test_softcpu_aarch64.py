"""The software CPU on aarch64 guests: HVC/SMC and PSCI, the hypercall hook,
exceptions, WFI, MMIO pairs, and registers by one-reg id.

Guest code is given as bytes with its source (GNU as) next to it; the
conformance suite covers the common scenarios, these the engine's corners.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

pytest.importorskip("unicorn", reason="the software CPU needs unicorn (pip install 'pyvmm-core[softcpu]')")

from pyvmm.arch.aarch64 import PC_ID, PSTATE_ID, SP_ID, CoreRegs, x_reg_id
from pyvmm.arch.aarch64_boot import build_aarch64_boot_state
from pyvmm.boot import BootSpec
from pyvmm.config import Arch, MemoryRegionSpec
from pyvmm.errors import ConfigError
from pyvmm.exits import (
    ExitKind,
    HypercallExit,
    InternalErrorExit,
    MmioExit,
    SystemEvent,
    SystemEventExit,
    VcpuExit,
)
from pyvmm.memory import GuestMemory
from pyvmm.softcpu import Conduit, Hypercall, SoftCpu
from pyvmm.softcpu._aarch64 import ELR_EL1_ID, SP_EL1_ID

RAM = 0x4000_0000
CODE = RAM + 0x8_0000
FDT = RAM + 0x10_0000
MMIO = 0x0900_0000
NOT_SUPPORTED = (1 << 64) - 1


class Machine:
    def __init__(self, code: bytes) -> None:
        self.memory = GuestMemory()
        region = self.memory.allocate(MemoryRegionSpec(guest_phys_addr=RAM, size=0x20_0000))
        self.memory.insert(region)
        self.memory.write(CODE, code)
        self.cpu = SoftCpu("aarch64")
        self.cpu.map_region(region)
        self.cpu.init(build_aarch64_boot_state(BootSpec(arch=Arch.AARCH64, entry=CODE, fdt_address=FDT, fdt_size=64)))

    def close(self) -> None:
        self.cpu.close()
        self.memory.close()


@pytest.fixture
def machines() -> Iterator[list[Machine]]:
    made: list[Machine] = []
    yield made
    for machine in made:
        machine.close()


def boot(machines: list[Machine], code_hex: str) -> Machine:
    machine = Machine(bytes.fromhex(code_hex))
    machines.append(machine)
    return machine


def run_to(cpu: SoftCpu, kind: ExitKind) -> VcpuExit:
    exit_ = cpu.run()
    assert exit_.kind is kind, f"expected {kind.name}, got {exit_!r}"
    return exit_


def system_event(cpu: SoftCpu) -> SystemEvent:
    exit_ = run_to(cpu, ExitKind.SYSTEM_EVENT)
    assert isinstance(exit_, SystemEventExit)
    return exit_.event


# movz x0, #0x0008 / movk x0, #0x8400, lsl #16 / hvc #0
SYSTEM_OFF = "000180d20080b0f2020000d4"


# --- PSCI and other calls -------------------------------------------------------------


def test_psci_version_is_answered(machines: list[Machine]) -> None:
    # movz x0, #0 / movk x0, #0x8400, lsl #16 / hvc #0 / mov x6, x0 / SYSTEM_OFF
    m = boot(machines, "000080d20080b0f2020000d4e60300aa" + SYSTEM_OFF)
    assert system_event(m.cpu) is SystemEvent.SHUTDOWN
    assert m.cpu.get_one_reg(x_reg_id(6)) == 0x10000


def test_psci_features_and_unsupported_calls(machines: list[Machine]) -> None:
    # x6 = PSCI_FEATURES(SYSTEM_OFF), x7 = PSCI_FEATURES(CPU_ON64), x8 = CPU_ON64(...)
    m = boot(
        machines,
        "400180d20080b0f2010180d20180b0f2020000d4e60300aa400180d20080b0f2610080d20180b8f2020000d4e70300aa"
        "600080d20080b8f2020000d4e80300aa" + SYSTEM_OFF,
    )
    assert system_event(m.cpu) is SystemEvent.SHUTDOWN
    regs = m.cpu.get_core_regs()
    assert (regs.x[6], regs.x[7], regs.x[8]) == (0, NOT_SUPPORTED, NOT_SUPPORTED)


def test_smc_is_a_conduit_too(machines: list[Machine]) -> None:
    m = boot(machines, "000180d20080b0f2030000d4")  # SYSTEM_OFF through smc #0
    assert system_event(m.cpu) is SystemEvent.SHUTDOWN
    assert m.cpu.pc == CODE + 12, "the PC is past the SMC"


def test_other_calls_are_hypercall_exits_answered_through_x0(machines: list[Machine]) -> None:
    # movz x0, #0x1234 / mov x1, #7 / hvc #5 / mov x6, x0 / SYSTEM_OFF
    m = boot(machines, "804682d2e10080d2a20000d4e60300aa" + SYSTEM_OFF)
    exit_ = run_to(m.cpu, ExitKind.HYPERCALL)
    assert isinstance(exit_, HypercallExit)
    assert exit_.number == 0x1234
    assert exit_.args[0] == 7
    assert exit_.result == NOT_SUPPORTED, "the SMCCC answer unless the VMM sets one"
    exit_.result = 99
    assert system_event(m.cpu) is SystemEvent.SHUTDOWN
    assert m.cpu.get_one_reg(x_reg_id(6)) == 99


def test_hypercall_handler_sees_calls_first(machines: list[Machine]) -> None:
    m = boot(machines, "804682d2e10080d2a20000d4e60300aa" + SYSTEM_OFF)
    seen: list[Hypercall] = []

    def handler(cpu: SoftCpu, call: Hypercall) -> bool | None:
        seen.append(call)
        if call.function == 0x1234:
            cpu.set_one_reg(x_reg_id(0), 0xABC)
            return True
        return None  # PSCI: the default handling

    m.cpu.hypercall_handler = handler
    assert system_event(m.cpu) is SystemEvent.SHUTDOWN
    assert m.cpu.get_one_reg(x_reg_id(6)) == 0xABC
    first, second = seen
    assert (first.conduit, first.imm, first.function, first.args[0], first.pc) == (Conduit.HVC, 5, 0x1234, 7, CODE + 8)
    assert second.function == 0x84000008


def test_hypercall_handler_can_end_the_run(machines: list[Machine]) -> None:
    m = boot(machines, SYSTEM_OFF)
    mine = SystemEventExit(SystemEvent.CRASH)
    m.cpu.hypercall_handler = lambda cpu, call: mine
    assert m.cpu.run() is mine


# --- exceptions and WFI ----------------------------------------------------------------


@pytest.mark.parametrize(("code", "name"), [("010000d4", "SVC"), ("00000000", "undefined instruction")])
def test_exceptions_are_internal_errors(machines: list[Machine], code: str, name: str) -> None:
    m = boot(machines, code)  # svc #0 / udf #0
    exit_ = run_to(m.cpu, ExitKind.INTERNAL_ERROR)
    assert isinstance(exit_, InternalErrorExit)
    assert name in exit_.description
    assert exit_.instruction == bytes.fromhex(code)


def test_wfi_halts_and_the_guest_resumes_after_it(machines: list[Machine]) -> None:
    m = boot(machines, "7f2003d5" + SYSTEM_OFF)  # wfi / SYSTEM_OFF
    run_to(m.cpu, ExitKind.HLT)
    assert m.cpu.pc == CODE + 4
    assert system_event(m.cpu) is SystemEvent.SHUTDOWN


# --- MMIO ---------------------------------------------------------------------------------


def test_load_and_store_pairs_are_one_exit_per_register(machines: list[Machine]) -> None:
    # movz x5, #0x0900, lsl #16 / ldp x2, x3, [x5] / stp x3, x2, [x5, #16] / SYSTEM_OFF
    m = boot(machines, "0520a1d2a20c40a9a30801a9" + SYSTEM_OFF)
    reads = []
    for value in (0x1111, 0x2222):
        read = run_to(m.cpu, ExitKind.MMIO)
        assert isinstance(read, MmioExit) and not read.is_write
        reads.append((read.address, read.size))
        read.data[:8] = struct.pack("<Q", value)
    assert reads == [(MMIO, 8), (MMIO + 8, 8)]
    writes = []
    for _ in range(2):
        write = run_to(m.cpu, ExitKind.MMIO)
        assert isinstance(write, MmioExit) and write.is_write
        writes.append((write.address, struct.unpack("<Q", write.data[:8])[0]))
    assert sorted(writes) == [(MMIO + 16, 0x2222), (MMIO + 24, 0x1111)]
    assert system_event(m.cpu) is SystemEvent.SHUTDOWN


# --- registers -------------------------------------------------------------------------------


def test_boot_state(machines: list[Machine]) -> None:
    m = boot(machines, SYSTEM_OFF)
    regs = m.cpu.get_core_regs()
    assert (regs.pc, regs.x[0], regs.x[1], regs.pstate & 0xF) == (CODE, FDT, 0, 0x5)
    assert m.cpu.get_one_reg(PC_ID) == CODE
    assert m.cpu.get_one_reg(PSTATE_ID) & 0x3C0 == 0x3C0, "DAIF masked"


def test_stack_pointers_follow_kvm_one_reg_ids(machines: list[Machine]) -> None:
    """SP_ID is SP_EL0 (user_pt_regs.sp); at EL1h the guest's SP is SP_EL1."""
    # mov x6, sp / movz x5, #0x0900, lsl #16 / str x6, [x5] / SYSTEM_OFF
    m = boot(machines, "e60300910520a1d2a60000f9" + SYSTEM_OFF)
    m.cpu.set_one_reg(SP_EL1_ID, 0x4001_0000)
    m.cpu.set_one_reg(SP_ID, 0x2000)
    assert m.cpu.get_one_reg(SP_ID) == 0x2000
    assert m.cpu.get_one_reg(SP_EL1_ID) == 0x4001_0000 == m.cpu.get_core_regs().sp
    write = run_to(m.cpu, ExitKind.MMIO)
    assert isinstance(write, MmioExit)
    assert struct.unpack("<Q", write.data[:8])[0] == 0x4001_0000


def test_core_registers_round_trip(machines: list[Machine]) -> None:
    m = boot(machines, SYSTEM_OFF)
    regs = CoreRegs(x=list(range(100, 131)), sp=0x4000_8000, pc=CODE, pstate=0x3C5)
    m.cpu.set_core_regs(regs)
    assert m.cpu.get_core_regs() == regs
    m.cpu.set_one_reg(ELR_EL1_ID, 0x1234)
    assert m.cpu.get_one_reg(ELR_EL1_ID) == 0x1234


def test_bad_register_requests_are_refused(machines: list[Machine]) -> None:
    m = boot(machines, SYSTEM_OFF)
    with pytest.raises(ConfigError, match="not modelled"):
        m.cpu.get_one_reg(0x6030_0000_0013_C000)  # a system register
    with pytest.raises(ConfigError, match="31"):
        m.cpu.set_core_regs(CoreRegs(x=[0] * 3))
    with pytest.raises(ConfigError, match="x86_64"):
        m.cpu.get_regs()
