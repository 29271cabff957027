"""The aarch64 machine on the contract backend: board choice, boot (vCPU registers
or the hypervisor's boot context), MMIO devices, PSCI stops, doorbells."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
from coretests_support import MakeBackend, RecordingBackend
from machinetests_support import TINY_IMAGE, machine_config, mmio_exit, value_of

from pyvmm import cli
from pyvmm.arch.aarch64 import PC_ID, PSTATE_EL1H_DAIF, PSTATE_ID, x_reg_id
from pyvmm.boot import Aarch64VcpuInit, BootSpec
from pyvmm.capabilities import Capability
from pyvmm.config import Arch
from pyvmm.errors import ConfigError
from pyvmm.exits import HypercallExit, SystemEvent, SystemEventExit
from pyvmm.guests import DEMO_AARCH64_LOAD_ADDRESS, demo_aarch64_binary
from pyvmm.host import Event
from pyvmm.machine import Machine, StopReason
from pyvmm.machine.devicetree import read_fdt
from pyvmm.machine.images import Aarch64Image
from pyvmm.machine.virt import RAM_BASE, UART_BASE, VIRT_DEBUG_EXIT_BASE, VIRT_DEMO_DEVICE_BASE
from pyvmm.vm import Backend

#: A KVM-style aarch64 backend: core sets the vCPU registers.
KVM_STYLE = (Capability.IMMEDIATE_EXIT, Capability.MULTI_VCPU)
#: What the Gunyah plugin declares that matters to the machine.
GUNYAH_STYLE = (
    Capability.HYPERVISOR_INITIALIZED_BOOT_CONTEXT,
    Capability.VM_START,
    Capability.IMMEDIATE_EXIT,
    Capability.IRQFD,
    Capability.MULTI_VCPU,
)
MiB = 1 << 20
#: The device tree's place in the default 128 MiB of RAM: the last 2 MiB.
FDT_ADDRESS = RAM_BASE + 126 * MiB
#: ``wfi`` at the start of RAM.
WFI = Aarch64Image("wfi", bytes.fromhex("7f2003d5"), RAM_BASE)


@pytest.fixture
def kvm_style(make_backend: MakeBackend) -> tuple[RecordingBackend, Backend]:
    return make_backend(KVM_STYLE, name="arm-kvm-style", arches=(Arch.AARCH64,))


@pytest.fixture
def gunyah_style(make_backend: MakeBackend) -> tuple[RecordingBackend, Backend]:
    return make_backend(GUNYAH_STYLE, name="arm-owns-boot", arches=(Arch.AARCH64,))


def build(backend: Backend, image: object = WFI, **settings: object) -> Machine:
    return Machine(machine_config(**settings), backend=backend, image=image)  # type: ignore[arg-type]


def tree_in_memory(machine: Machine) -> dict[str, dict[str, bytes]]:
    spec = machine.vm._boot
    assert spec is not None and spec.fdt_address is not None
    header = machine.vm.memory.read(spec.fdt_address, 8)
    size = struct.unpack(">I", header[4:8])[0]
    return read_fdt(machine.vm.memory.read(spec.fdt_address, size))


# --- choosing the board ---------------------------------------------------------


def test_a_backend_with_one_arch_gets_that_arch(kvm_style: tuple[RecordingBackend, Backend]) -> None:
    test_backend, backend = kvm_style
    with build(backend) as machine:
        assert machine.arch is Arch.AARCH64
        assert machine.pio.ranges == []  # no port I/O on aarch64
        assert [device.name for _, _, device in machine.mmio.ranges] == [
            "pl011",
            "demo-device",
            "debug-exit",
            "snapshot-request",
        ]
    assert test_backend.calls_of("pyvmm_create_vm")[0][1].arch is Arch.AARCH64
    # RAM at 2 GiB, one region.
    assert [call[2:] for call in test_backend.calls_of("pyvmm_map_memory")] == [(RAM_BASE, 128 * MiB)]


def test_a_backend_with_both_arches_defaults_to_x86_64(make_backend: MakeBackend) -> None:
    _, backend = make_backend((Capability.PORT_IO,), name="both")
    with Machine(machine_config(), backend=backend, image=TINY_IMAGE) as machine:
        assert machine.arch is Arch.X86_64
    with build(backend, arch="aarch64") as machine:
        assert machine.arch is Arch.AARCH64


def test_an_arch_the_backend_does_not_run(kvm_style: tuple[RecordingBackend, Backend]) -> None:
    test_backend, backend = kvm_style
    with pytest.raises(ConfigError, match="arch: backend 'arm-kvm-style' runs aarch64 guests, not x86_64"):
        build(backend, image=TINY_IMAGE, arch="x86_64")
    assert test_backend.calls_of("pyvmm_create_vm") == []


def test_an_x86_image_on_the_aarch64_board(kvm_style: tuple[RecordingBackend, Backend]) -> None:
    test_backend, backend = kvm_style
    with pytest.raises(ConfigError, match="tiny: not an aarch64 image"):
        build(backend, image=TINY_IMAGE)
    assert test_backend.vms[0].destroyed


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"cpus": 124}, "cpus: the aarch64 machine has GIC redistributors for 123 vCPUs, not 124"),
        ({"memory": "2M"}, "memory: the aarch64 machine needs at least 4 MiB"),
        ({"memory": "1023G"}, "end beyond the 40-bit guest-physical space"),
        (
            {"testdev": True, "cpuid_overrides": [{"function": 1, "register": "ecx", "mask": 0}]},
            "cpuid_overrides, testdev: x86_64 settings; this machine is aarch64",
        ),
    ],
)
def test_what_the_board_cannot_lay_out(
    kvm_style: tuple[RecordingBackend, Backend], settings: dict[str, object], problem: str
) -> None:
    test_backend, backend = kvm_style
    with pytest.raises(ConfigError, match=problem):
        build(backend, **settings)
    assert test_backend.calls_of("pyvmm_create_vm") == []


# --- boot -----------------------------------------------------------------------


def test_kvm_style_boot_sets_the_registers_of_the_boot_vcpu(kvm_style: tuple[RecordingBackend, Backend]) -> None:
    test_backend, backend = kvm_style
    with build(backend, cpus=2) as machine:
        result = machine.run()
    assert result.reason is StopReason.HALTED
    inits = {call[1]: call[2] for call in test_backend.calls_of("pyvmm_init_vcpu")}
    boot = inits[0]
    assert isinstance(boot, Aarch64VcpuInit) and boot.boot_cpu and not boot.power_off
    assert boot.regs[PC_ID] == RAM_BASE
    assert boot.regs[x_reg_id(0)] == FDT_ADDRESS
    assert boot.regs[PSTATE_ID] == PSTATE_EL1H_DAIF
    # The secondary waits, powered off, for the guest's PSCI CPU_ON.
    assert inits[1] == Aarch64VcpuInit(regs={}, boot_cpu=False, power_off=True)
    assert test_backend.calls_of("pyvmm_set_boot_context") == []


def test_hypervisor_owned_boot_gets_entry_and_device_tree_and_starts_the_vm(
    gunyah_style: tuple[RecordingBackend, Backend],
) -> None:
    test_backend, backend = gunyah_style
    with build(backend, cpus=2) as machine:
        result = machine.run()
        tree = tree_in_memory(machine)
    assert result.reason is StopReason.HALTED
    # The contract backend raises InitVcpuCalled had core called pyvmm_init_vcpu.
    assert test_backend.calls_of("pyvmm_init_vcpu") == []
    [(_, boot)] = test_backend.calls_of("pyvmm_set_boot_context")
    assert boot == BootSpec(arch=Arch.AARCH64, entry=RAM_BASE, fdt_address=FDT_ADDRESS, fdt_size=2 * MiB)
    names = test_backend.hook_names()
    assert "pyvmm_start_vm" in names
    order = [call[0] for call in test_backend.calls]
    irqfd = order.index("pyvmm_register_irqfd")
    assert irqfd < order.index("pyvmm_set_boot_context") < order.index("pyvmm_start_vm") < order.index("pyvmm_run_vcpu")
    # The irqfd is the UART's SPI, described edge-triggered as the irqfd signals it.
    [(_, event, line, level)] = test_backend.calls_of("pyvmm_register_irqfd")
    assert (line, level) == (1, False) and isinstance(event, Event)
    assert tree["/pl011@9000000"]["interrupts"] == struct.pack(">III", 0, 1, 1)
    # Owning the boot context brings no backend's nodes: those come only with
    # DEVICE_TREE_NODES (test_machine_backend_neutral.py).
    assert not any(path.startswith("/gunyah-vm-config") for path in tree)


def test_the_uart_interrupt_signals_its_event(gunyah_style: tuple[RecordingBackend, Backend]) -> None:
    test_backend, backend = gunyah_style
    test_backend.script_exits(
        mmio_exit(UART_BASE + 0x38, 4, write=True, value=1 << 5),  # IMSC: TXIM
        mmio_exit(UART_BASE, 4, write=True, value=0x41),  # DR: sets TXRIS
    )
    with build(backend, serial="none") as machine:
        [(_, event, _, _)] = test_backend.calls_of("pyvmm_register_irqfd")
        machine.run()
        assert event.consume() >= 1
    assert event.closed  # the machine closes its events with the VM


def test_kvm_style_tree_has_no_hypervisor_nodes(kvm_style: tuple[RecordingBackend, Backend]) -> None:
    test_backend, backend = kvm_style
    with build(backend) as machine:
        tree = tree_in_memory(machine)
    assert not any(path.startswith("/gunyah-vm-config") for path in tree)
    assert tree["/pl011@9000000"]["interrupts"] == struct.pack(">III", 0, 1, 4)  # polled: level, as the PL011 is
    assert test_backend.calls_of("pyvmm_register_irqfd") == []


def test_kernel_command_line_and_initrd_reach_chosen(
    kvm_style: tuple[RecordingBackend, Backend], tmp_path: Path
) -> None:
    _, backend = kvm_style
    kernel = tmp_path / "Image"
    kernel.write_bytes(b"\x1f\x20\x03\xd5" * 4)
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"cpio" * 100)
    config = machine_config(kernel=kernel, load_address=RAM_BASE, append="console=ttyAMA0", initrd=initrd)
    with Machine(config, backend=backend) as machine:
        chosen = tree_in_memory(machine)["/chosen"]
        start, end = (struct.unpack(">Q", chosen[key])[0] for key in ("linux,initrd-start", "linux,initrd-end"))
        assert machine.vm.memory.read(start, end - start) == b"cpio" * 100
    assert chosen["bootargs"] == b"console=ttyAMA0\0"


def test_the_demo_guest_is_the_default(kvm_style: tuple[RecordingBackend, Backend]) -> None:
    _, backend = kvm_style
    with Machine(machine_config(), backend=backend) as machine:
        code = demo_aarch64_binary()
        assert machine.vm.memory.read(DEMO_AARCH64_LOAD_ADDRESS, len(code)) == code
        assert machine.image.description == "pyvmm aarch64 demo guest"


# --- exits ----------------------------------------------------------------------


def test_mmio_devices_answer(kvm_style: tuple[RecordingBackend, Backend]) -> None:
    test_backend, backend = kvm_style
    flags = mmio_exit(UART_BASE + 0x18, 4)
    device_id = mmio_exit(VIRT_DEMO_DEVICE_BASE, 4)
    test_backend.script_exits(*(mmio_exit(UART_BASE, 4, write=True, value=byte) for byte in b"ok\n"), flags, device_id)
    out = io.BytesIO()
    with Machine(machine_config(), backend=backend, image=WFI, serial_output=out) as machine:
        machine.run()
    assert out.getvalue() == b"ok\n"
    assert value_of(flags) == 0x90  # TXFE | RXFE
    assert value_of(device_id) == int.from_bytes(b"PVMM", "little")


@pytest.mark.parametrize(
    ("event", "reason", "status"),
    [
        (SystemEvent.SHUTDOWN, StopReason.POWEROFF, 0),
        (SystemEvent.RESET, StopReason.RESET, 0),
        (SystemEvent.CRASH, StopReason.CRASHED, 4),
    ],
)
def test_psci_system_events_stop_the_machine(
    gunyah_style: tuple[RecordingBackend, Backend], event: SystemEvent, reason: StopReason, status: int
) -> None:
    test_backend, backend = gunyah_style
    test_backend.script_exits(SystemEventExit(event))
    with build(backend) as machine:
        result = machine.run()
    assert (result.reason, result.status) == (reason, status)
    assert test_backend.calls_of("pyvmm_run_vcpu") == [("pyvmm_run_vcpu", 0)]


def test_debug_exit_register_gives_qemus_status(kvm_style: tuple[RecordingBackend, Backend]) -> None:
    test_backend, backend = kvm_style
    test_backend.script_exits(mmio_exit(VIRT_DEBUG_EXIT_BASE, 4, write=True, value=1))
    with build(backend) as machine:
        result = machine.run()
    assert (result.reason, result.status, result.code) == (StopReason.DEBUG_EXIT, 3, 1)


def test_unknown_hypercalls_get_smccc_not_supported(kvm_style: tuple[RecordingBackend, Backend]) -> None:
    test_backend, backend = kvm_style
    call = HypercallExit()
    call.number = 0xC600_0000
    test_backend.script_exits(call)
    with build(backend) as machine:
        machine.run()
    assert call.result == (1 << 64) - 1


# --- the command line ---------------------------------------------------------------


def test_cli_arch_option(make_backend: MakeBackend, tmp_path: Path) -> None:
    test_backend, _ = make_backend(KVM_STYLE, name="both-arches")
    test_backend.script_exits(
        *(mmio_exit(UART_BASE, 4, write=True, value=byte) for byte in b"arm\n"), SystemEventExit(SystemEvent.SHUTDOWN)
    )
    log = tmp_path / "console.log"
    status = cli.main(["run", "--backend", "both-arches", "--arch", "aarch64", "--serial", str(log)])
    assert status == 0
    assert log.read_bytes() == b"arm\n"
    assert test_backend.calls_of("pyvmm_create_vm")[0][1].arch is Arch.AARCH64


def test_cli_arch_from_a_machine_file(make_backend: MakeBackend, tmp_path: Path) -> None:
    test_backend, _ = make_backend(KVM_STYLE, name="both-arches")
    file = tmp_path / "machine.toml"
    file.write_text('backend = "both-arches"\narch = "aarch64"\nserial = "none"\n')
    assert cli.main(["run", "--config", str(file)]) == 0
    assert test_backend.calls_of("pyvmm_create_vm")[0][1].arch is Arch.AARCH64


def test_cli_rejects_an_unknown_arch(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["run", "--arch", "riscv64"])
    assert "invalid choice: 'riscv64'" in capsys.readouterr().err
