"""Booting a test guest on the geniezone backend: RAM where the conformance
suite puts it, the program and a minimal device tree in it, optionally the
vGIC, ``vcpus`` vCPUs, vCPU 0 booted with X0 = the device tree."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pyvmm.boot import BootSpec
from pyvmm.config import Arch
from pyvmm.exits import ExitKind, MmioExit, SystemEvent, SystemEventExit, VcpuExit
from pyvmm.testing.conformance import programs_aarch64 as p
from pyvmm.vm import Backend, Vcpu, Vm


@contextmanager
def booted(
    backend: Backend, program: p.Aarch64Program, *, irqchip: bool = False, vcpus: int = 1, config: dict | None = None
) -> Iterator[tuple[Vm, list[Vcpu]]]:
    with backend.create_vm({"arch": "aarch64", "vcpus": vcpus, **(config or {})}) as vm:
        vm.add_memory(p.RAM_BASE, p.RAM_SIZE, contents={p.CODE_ADDRESS: program.code, p.FDT_ADDRESS: p.minimal_fdt()})
        if irqchip:
            vm.create_irqchip()
        created = [vm.create_vcpu() for _ in range(vcpus)]
        vm.boot(BootSpec(arch=Arch.AARCH64, entry=p.CODE_ADDRESS, fdt_address=p.FDT_ADDRESS, fdt_size=p.FDT_SIZE))
        yield vm, created


def mmio(exit_: VcpuExit, address: int, *, write: bool) -> MmioExit:
    """``exit_`` is an MMIO access of that kind at ``address``."""
    assert isinstance(exit_, MmioExit), exit_
    assert (exit_.address, exit_.is_write) == (address, write), exit_
    return exit_


def written(exit_: VcpuExit, address: int) -> int:
    """The value of an MMIO write at ``address``."""
    access = mmio(exit_, address, write=True)
    return int.from_bytes(bytes(access.data[: access.size]), "little")


def powers_off(vcpu: Vcpu) -> None:
    exit_ = vcpu.run()
    assert exit_.kind is ExitKind.SYSTEM_EVENT, exit_
    assert isinstance(exit_, SystemEventExit) and exit_.event is SystemEvent.SHUTDOWN, exit_
