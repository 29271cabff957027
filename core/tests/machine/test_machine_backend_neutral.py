"""The machine layer knows no backend: its sources name none, and a backend's own
device-tree nodes come from the backend (``DEVICE_TREE_NODES``), never from the
board guessing by another capability."""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

import pytest
from coretests_support import MakeBackend, RecordingBackend
from machinetests_support import TINY_IMAGE, machine_config

import pyvmm.machine
from pyvmm.capabilities import Capability
from pyvmm.config import Arch
from pyvmm.errors import ConfigError
from pyvmm.machine import Machine
from pyvmm.machine.devicetree import DeviceTree, read_fdt
from pyvmm.machine.images import Aarch64Image
from pyvmm.machine.virt import RAM_BASE, UART_SPI
from pyvmm.vm import Vm

#: The hypervisors pyvmm has or plans backends for.
BACKEND_NAMES = re.compile(r"gunyah|kvm|whpx|haxm|geniezone", re.IGNORECASE)
#: kvm-unit-tests is a suite of guest test kernels, not a backend: the machine
#: runs them on any hypervisor and keeps the exit protocol their runner expects.
NOT_A_BACKEND = re.compile(r"kvm-unit-tests", re.IGNORECASE)

#: A backend that owns the boot context and has irqfds, but writes no nodes.
OWNS_BOOT = (
    Capability.HYPERVISOR_INITIALIZED_BOOT_CONTEXT,
    Capability.VM_START,
    Capability.IMMEDIATE_EXIT,
    Capability.IRQFD,
    Capability.MULTI_VCPU,
)
WFI = Aarch64Image("wfi", bytes.fromhex("7f2003d5"), RAM_BASE)


def test_the_machine_layer_names_no_backend() -> None:
    root = Path(pyvmm.machine.__file__).parent
    sources = sorted(root.rglob("*.py"))
    assert root / "machine.py" in sources
    found = [
        f"{path.relative_to(root)}:{number}: {line.strip()}"
        for path in sources
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if BACKEND_NAMES.search(NOT_A_BACKEND.sub("", line))
    ]
    assert found == []


class NodeRecorder:
    """Stands in for ``Vm.add_device_tree_nodes``: records each call with what
    the tree and the backend held at that moment, and adds one node."""

    def __init__(self, test_backend: RecordingBackend) -> None:
        self.test_backend = test_backend
        self.calls: list[tuple[Vm, DeviceTree, set[str], list[str]]] = []

    def record(self, vm: Vm, tree: DeviceTree) -> None:
        hooks = [call[0] for call in self.test_backend.calls]
        self.calls.append((vm, tree, set(read_fdt(tree.to_dtb())), hooks))
        tree.u32("/backend-config", "bells", len(self.test_backend.calls_of("pyvmm_register_irqfd")))


@pytest.fixture
def recorder(make_backend: MakeBackend, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``recorder(capabilities)`` -> (the recorder, the backend); ``Vm.add_device_tree_nodes``
    records instead of calling the backend."""

    def make(capabilities: tuple[Capability, ...], arches: tuple[Arch, ...] = (Arch.AARCH64,)) -> Any:
        test_backend, backend = make_backend(capabilities, name="some-backend", arches=arches)
        nodes = NodeRecorder(test_backend)

        def add_device_tree_nodes(vm: Vm, tree: DeviceTree) -> None:
            nodes.record(vm, tree)

        monkeypatch.setattr(Vm, "add_device_tree_nodes", add_device_tree_nodes)
        return nodes, backend

    return make


def tree_in_memory(machine: Machine) -> dict[str, dict[str, bytes]]:
    spec = machine.vm._boot
    assert spec is not None and spec.fdt_address is not None
    size = struct.unpack(">I", machine.vm.memory.read(spec.fdt_address + 4, 4))[0]
    return read_fdt(machine.vm.memory.read(spec.fdt_address, size))


def test_owning_the_boot_context_brings_no_backend_nodes(recorder: Any) -> None:
    nodes, backend = recorder(OWNS_BOOT)
    with Machine(machine_config(), backend=backend, image=WFI) as machine:
        tree = tree_in_memory(machine)
    assert nodes.calls == []
    assert not any(path.startswith(("/gunyah-vm-config", "/backend-config")) for path in tree)


def test_a_backend_with_device_tree_nodes_writes_them_after_the_board(recorder: Any) -> None:
    nodes, backend = recorder((*OWNS_BOOT, Capability.DEVICE_TREE_NODES))
    with Machine(machine_config(), backend=backend, image=WFI) as machine:
        tree = tree_in_memory(machine)
        [(vm, written, paths_then, hooks_then)] = nodes.calls
        assert vm is machine.vm
    assert isinstance(written, DeviceTree)
    # The board's nodes were in, and the irqfds registered, when the backend was asked ...
    assert {"/chosen", "/memory@80000000", "/cpus/cpu@0", "/pl011@9000000"} <= paths_then
    assert "pyvmm_register_irqfd" in hooks_then and "pyvmm_set_boot_context" not in hooks_then
    # ... and what it wrote is in the tree the guest gets.
    assert tree["/backend-config"] == {"bells": struct.pack(">I", 1)}
    assert tree["/pl011@9000000"]["interrupts"] == struct.pack(">III", 0, UART_SPI, 1)


def test_the_backends_refusal_stops_the_build(recorder: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    nodes, backend = recorder((Capability.IMMEDIATE_EXIT, Capability.DEVICE_TREE_NODES))

    def refuse(vm: Vm, tree: DeviceTree) -> None:
        raise ConfigError("memory: too much for this hypervisor")

    monkeypatch.setattr(Vm, "add_device_tree_nodes", refuse)
    with pytest.raises(ConfigError, match="too much for this hypervisor"):
        Machine(machine_config(), backend=backend, image=WFI)
    assert nodes.test_backend.vms[0].destroyed


def test_the_pc_board_has_no_device_tree(recorder: Any) -> None:
    nodes, backend = recorder((Capability.PORT_IO, Capability.DEVICE_TREE_NODES), arches=(Arch.X86_64,))
    with Machine(machine_config(), backend=backend, image=TINY_IMAGE):
        pass
    assert nodes.calls == []
