"""Gunyah's own device-tree nodes (``/gunyah-vm-config`` and its doorbells), written
by :func:`pyvmm_gunyah.devicetree.add_vm_config_nodes` on a tree and parsed back
(with the library that wrote it, and with dtc where it is installed)."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pyvmm.errors import ConfigError
from pyvmm.machine import virt
from pyvmm.machine.devicetree import PHANDLE_GIC, DeviceTree, build_fdt, read_fdt
from pyvmm.machine.loaders.arm64 import Chosen
from pyvmm_gunyah.devicetree import GUNYAH_SIZE_MAX, add_vm_config_nodes

MiB = 1 << 20
RAM = 128 * MiB
TOP = "/gunyah-vm-config"


def cells(*values: int) -> bytes:
    return b"".join(struct.pack(">I", v) for v in values)


def u64(*values: int) -> bytes:
    return b"".join(struct.pack(">Q", v) for v in values)


def strings(*texts: str) -> bytes:
    return b"".join(t.encode() + b"\0" for t in texts)


def nodes_of(tree: DeviceTree) -> dict[str, dict[str, bytes]]:
    return read_fdt(tree.to_dtb())


def test_vm_config_as_crosvm_writes_it() -> None:
    tree = DeviceTree()
    add_vm_config_nodes(tree, virt.RAM_BASE, RAM, [(1, False), (0x1F, True)])
    nodes = nodes_of(tree)
    assert nodes[TOP] == {"image-name": strings("pyvmm-vm"), "os-type": strings("linux")}
    assert nodes[f"{TOP}/memory"] == {
        "#address-cells": cells(2),
        "#size-cells": cells(2),
        "base-address": u64(0x8000_0000),
        "size-max": u64(0x7_8000_0000),
    }
    assert nodes[f"{TOP}/interrupts"] == {"config": cells(PHANDLE_GIC)}
    assert nodes[f"{TOP}/vcpus"] == {"affinity": strings("proxy")}
    assert nodes[f"{TOP}/vdevices"] == {"generate": strings("/hypervisor")}
    assert nodes[f"{TOP}/vdevices/bell-1"] == {
        "vdevice-type": strings("doorbell"),
        "generate": strings("/hypervisor/bell-1"),
        "label": cells(1),
        "peer-default": b"",
        "source-can-clear": b"",
        "interrupts": cells(0, 1, 1),  # SPI 1, edge
    }
    # Names in hex, as crosvm writes them; level doorbells are level-high.
    assert nodes[f"{TOP}/vdevices/bell-1f"]["interrupts"] == cells(0, 0x1F, 4)
    assert nodes[f"{TOP}/vdevices/bell-1f"]["generate"] == strings("/hypervisor/bell-1f")
    bells = [path for path in nodes if path.startswith(f"{TOP}/vdevices/bell-")]
    assert len(bells) == 2


def test_no_irqfds_no_doorbells() -> None:
    tree = DeviceTree()
    add_vm_config_nodes(tree, virt.RAM_BASE, RAM, ())
    nodes = nodes_of(tree)
    assert nodes[f"{TOP}/vdevices"] == {"generate": strings("/hypervisor")}
    assert not any(path.startswith(f"{TOP}/vdevices/bell-") for path in nodes)


def test_firmware_address_only_when_there_is_firmware() -> None:
    tree = DeviceTree()
    add_vm_config_nodes(tree, virt.RAM_BASE, RAM, (), firmware_address=0x7FE0_0000, image_name="guest")
    nodes = nodes_of(tree)
    assert nodes[f"{TOP}/memory"]["firmware-address"] == u64(0x7FE0_0000)
    assert nodes[TOP]["image-name"] == strings("guest")
    plain = DeviceTree()
    add_vm_config_nodes(plain, virt.RAM_BASE, RAM, ())
    assert "firmware-address" not in nodes_of(plain)[f"{TOP}/memory"]


def test_refuses_more_memory_than_size_max_and_writes_nothing() -> None:
    tree = DeviceTree()
    with pytest.raises(ConfigError, match=r"memory: 0x780001000 bytes; Gunyah VMs may have at most 0x780000000"):
        add_vm_config_nodes(tree, virt.RAM_BASE, GUNYAH_SIZE_MAX + 0x1000, [(1, False)])
    assert not any(path.startswith(TOP) for path in nodes_of(tree))
    # The limit itself is fine.
    add_vm_config_nodes(tree, virt.RAM_BASE, GUNYAH_SIZE_MAX, ())


def test_in_the_board_tree() -> None:
    blob = build_fdt(
        virt.board_tree(
            2, RAM, uart_edge=True, nodes=(lambda tree: add_vm_config_nodes(tree, virt.RAM_BASE, RAM, [(1, False)]),)
        ),
        Chosen(),
    )
    nodes = read_fdt(blob)
    # The doorbell and the UART name the same interrupt, the same way.
    assert nodes[f"{TOP}/vdevices/bell-1"]["interrupts"] == nodes["/pl011@9000000"]["interrupts"] == cells(0, 1, 1)
    assert nodes["/intc@8000000"]["phandle"] == nodes[f"{TOP}/interrupts"]["config"]


@pytest.mark.skipif(shutil.which("dtc") is None, reason="dtc (device-tree-compiler) is not installed")
def test_dtc_reads_the_tree_without_complaint(tmp_path: Path) -> None:
    blob = build_fdt(
        virt.board_tree(
            4, RAM, uart_edge=True, nodes=(lambda tree: add_vm_config_nodes(tree, virt.RAM_BASE, RAM, [(1, False)]),)
        ),
        Chosen("console=ttyAMA0", (0x8100_0000, 0x8110_0000)),
    )
    (tmp_path / "virt.dtb").write_bytes(blob)
    result = subprocess.run(
        ["dtc", "-I", "dtb", "-O", "dts", "virt.dtb"], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert "gunyah-vm-config {" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if "Warning" in line]
    # Gunyah's doorbell label is a number, where dtc expects labels to be strings.
    assert all("label_is_string" in line and "bell-1:label" in line for line in warnings), warnings
