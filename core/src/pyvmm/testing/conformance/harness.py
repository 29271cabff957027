"""Set-up shared by the scenarios: one VM, RAM at 0, a program, a booted vCPU."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from pyvmm.boot import BootSpec, X86Mode
from pyvmm.capabilities import Capability
from pyvmm.config import Arch
from pyvmm.exits import ExitKind, IoExit, MmioExit, VcpuExit
from pyvmm.testing.conformance.programs import CODE_ADDRESS, RAM_SIZE, STACK_TOP, GuestProgram
from pyvmm.vm import Backend, Vcpu, Vm

#: No scenario needs more exits than this; more means the guest went astray.
MAX_EXITS = 64


def require(backend: Backend, *caps: Capability) -> None:
    """Skip the scenario, naming the capability, if the backend lacks one."""
    for cap in caps:
        if not backend.supports(cap):
            pytest.skip(f"backend {backend.name!r} does not declare {cap.name}")


def require_arch(backend: Backend, arch: Arch) -> None:
    if arch not in backend.manifest.guest_arches:
        pytest.skip(f"backend {backend.name!r} does not run {arch.value} guests")


@contextmanager
def booted(backend: Backend, program: GuestProgram, *, irqchip: bool = False) -> Iterator[tuple[Vm, Vcpu]]:
    """A VM with RAM at 0..RAM_SIZE, ``program`` at CODE_ADDRESS, vCPU 0 in long
    mode; with ``irqchip``, the hypervisor's interrupt controllers first."""
    require_arch(backend, program.arch)
    with backend.create_vm({"arch": program.arch}) as vm:
        if irqchip:
            vm.create_irqchip()
        vm.add_memory(0, RAM_SIZE)
        vm.memory.write(CODE_ADDRESS, program.code)
        vcpu = vm.create_vcpu()
        vm.boot(BootSpec(arch=program.arch, entry=CODE_ADDRESS, stack=STACK_TOP, x86_mode=X86Mode.LONG))
        yield vm, vcpu


def install_idt(vm: Vm, handlers: dict[int, bytes] | None = None) -> None:
    """The interrupt scenarios' IDT (``programs.IDTR_ADDRESS``): every vector's gate
    points at its own copy of ``REPORT_VECTOR``; ``handlers`` maps a vector to
    other code instead (one handler, at ``programs.HANDLER_ADDRESS``)."""
    from pyvmm.testing.conformance import programs as p

    idt = bytearray()
    for vector in range(256):
        stub = bytearray(p.REPORT_VECTOR.code)
        stub[p.REPORT_VECTOR_OFFSET] = vector
        vm.memory.write(p.VECTOR_STUBS + 16 * vector, bytes(stub))
        idt += interrupt_gate(p.VECTOR_STUBS + 16 * vector)
    for vector, code in (handlers or {}).items():
        vm.memory.write(p.HANDLER_ADDRESS, code)
        idt[16 * vector : 16 * vector + 16] = interrupt_gate(p.HANDLER_ADDRESS)
    vm.memory.write(p.IDT_ADDRESS, bytes(idt))
    vm.memory.write(p.IDTR_ADDRESS, struct.pack("<HQ", len(idt) - 1, p.IDT_ADDRESS))


def interrupt_gate(handler: int, selector: int = 0x08) -> bytes:
    """A 64-bit interrupt gate (type 0xE, present, DPL 0) to ``handler`` in the
    boot GDT's 64-bit code segment."""
    return struct.pack("<HHBBHII", handler & 0xFFFF, selector, 0, 0x8E, (handler >> 16) & 0xFFFF, handler >> 32, 0)


def expect_port_write(vcpu: Vcpu, port: int, value: int | None = None) -> IoExit:
    """The next exit is a one-byte write to ``port`` (of ``value``, if given)."""
    io = expect_io(vcpu)
    assert io.port == port and io.is_write, f"expected a write to port {port:#x}, got {io!r}"
    if value is not None:
        assert io.data[0] == value, f"port {port:#x}: expected {value:#x}, got {io.data[0]:#x}"
    return io


def run_to(vcpu: Vcpu, kind: ExitKind) -> VcpuExit:
    """Run until an exit of ``kind``; any other exit fails the scenario."""
    exit_ = vcpu.run()
    assert exit_.kind is kind, f"expected a {kind.name} exit, got {exit_!r}"
    return exit_


def expect_io(vcpu: Vcpu) -> IoExit:
    exit_ = run_to(vcpu, ExitKind.IO)
    assert isinstance(exit_, IoExit)
    return exit_


def expect_mmio(vcpu: Vcpu) -> MmioExit:
    exit_ = run_to(vcpu, ExitKind.MMIO)
    assert isinstance(exit_, MmioExit)
    return exit_


def expect_mmio_round_trip(vcpu: Vcpu, base: int) -> None:
    """The MMIO sequence both architectures' ``MMIO_ROUND_TRIP`` programs share: a
    4-byte read at ``base`` answered with 0xCAFEBABD, the value + 1 written at
    ``base + 8``, then 0x1122334455667788 written as 8 bytes at ``base + 16``."""
    read = expect_mmio(vcpu)
    assert (read.address, read.size, read.is_write) == (base, 4, False)
    read.data[:4] = struct.pack("<I", 0xCAFEBABD)
    write = expect_mmio(vcpu)
    assert (write.address, write.size, write.is_write) == (base + 8, 4, True)
    assert struct.unpack("<I", write.data[:4])[0] == 0xCAFEBABE
    wide = expect_mmio(vcpu)
    assert (wide.address, wide.size, wide.is_write) == (base + 16, 8, True)
    assert struct.unpack("<Q", wide.data[:8])[0] == 0x1122334455667788


def port_output_until_halt(vcpu: Vcpu, port: int, fill: bytes = b"") -> tuple[bytes, int]:
    """Collect the bytes the guest writes to ``port`` until it halts, answering its
    reads from ``fill``.  Returns the bytes and the number of I/O exits, so that
    backends that batch ``rep`` string I/O (one exit) and those that do not (one
    exit per item) both pass."""
    written = bytearray()
    feed = bytearray(fill)
    for exits in range(MAX_EXITS):
        exit_ = vcpu.run()
        if exit_.kind is ExitKind.HLT:
            return bytes(written), exits
        assert isinstance(exit_, IoExit), f"expected port I/O or a halt, got {exit_!r}"
        nbytes = exit_.size * exit_.count
        if exit_.is_write:
            assert exit_.port == port, f"write to port {exit_.port:#x}, expected {port:#x}"
            written += exit_.data[:nbytes]
        else:
            exit_.data[:nbytes] = bytes(feed[:nbytes])
            del feed[:nbytes]
    raise AssertionError(f"the guest did not halt within {MAX_EXITS} exits")


def check_snapshot_round_trip(
    backend: Backend,
    machine: AbstractContextManager[tuple[Vm, Vcpu]],
    path: Path,
    *,
    reports: Callable[[Vcpu, int], list[int]],
    counter_address: int,
    check_vm: Callable[[Vm], None] | None = None,
) -> None:
    """The snapshot scenario of every arch: a counter guest (``reports(vcpu, n)``
    gives its next ``n`` running sums, its count at ``counter_address``) is saved
    after five reports and restored into a new VM, whose next eight reports and
    memory must be those of the VM never stopped.  ``check_vm`` runs on the
    booted VM first (it may skip)."""
    from pyvmm import snapshot

    with machine as (vm, vcpu):
        if check_vm is not None:
            check_vm(vm)
        reports(vcpu, 5)
        try:
            snapshot.save(vm, path)
        except snapshot.SnapshotError as exc:
            # A backend that cannot read every register set a snapshot holds
            # must say so before anything is written, and the guest goes on.
            assert "cannot read" in str(exc)
            assert not path.exists()
            assert len(reports(vcpu, 2)) == 2
            pytest.skip(f"the backend cannot save a snapshot: {exc}")
        never_stopped = reports(vcpu, 8)
        count = vm.memory.read(counter_address, 4)
    with snapshot.restore(backend, path) as restored:
        (vcpu2,) = restored.vcpus
        assert reports(vcpu2, 8) == never_stopped
        assert restored.memory.read(counter_address, 4) == count
