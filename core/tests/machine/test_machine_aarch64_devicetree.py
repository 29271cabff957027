"""The device tree of the aarch64 machine, parsed back node by node (with the
library that wrote it, and with dtc where it is installed).  A backend's own
nodes are the backend's to test (pyvmm-gunyah's ``test_gunyah_devicetree.py``)."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pyvmm.errors import ConfigError
from pyvmm.machine import virt
from pyvmm.machine.devicetree import PHANDLE_CLOCK, PHANDLE_GIC, DeviceTree, build_fdt, cpu_reg, read_fdt
from pyvmm.machine.loaders.arm64 import Chosen

MiB = 1 << 20
RAM = 128 * MiB


def cells(*values: int) -> bytes:
    return b"".join(struct.pack(">I", v) for v in values)


def u64(*values: int) -> bytes:
    return b"".join(struct.pack(">Q", v) for v in values)


def strings(*texts: str) -> bytes:
    return b"".join(t.encode() + b"\0" for t in texts)


def tree_of(cpus: int = 1, uart_edge: bool = False, **chosen: object) -> dict:
    blob = build_fdt(virt.board_tree(cpus, RAM, uart_edge=uart_edge), Chosen(**chosen))  # type: ignore[arg-type]
    return read_fdt(blob)


def test_blob_header() -> None:
    blob = build_fdt(virt.board_tree(1, RAM), Chosen())
    magic, total, _, _, _, version, last_compatible = struct.unpack_from(">7I", blob)
    assert magic == 0xD00DFEED
    assert total == len(blob)
    assert (version, last_compatible) == (17, 16)


def test_root_memory_and_chosen() -> None:
    tree = tree_of(bootargs="console=ttyAMA0 earlycon root=/dev/vda \u00e9", initrd=(0x8100_0000, 0x8123_4567))
    assert tree["/"] == {
        "compatible": strings("linux,dummy-virt"),
        "model": strings("pyvmm virt"),
        "#address-cells": cells(2),
        "#size-cells": cells(2),
        "interrupt-parent": cells(PHANDLE_GIC),
    }
    assert tree["/memory@80000000"] == {"device_type": strings("memory"), "reg": u64(0x8000_0000, RAM)}
    assert tree["/chosen"] == {
        "bootargs": "console=ttyAMA0 earlycon root=/dev/vda \u00e9".encode() + b"\0",
        "stdout-path": strings("/pl011@9000000"),
        "linux,initrd-start": u64(0x8100_0000),
        "linux,initrd-end": u64(0x8123_4567),
    }


def test_chosen_without_initrd_or_command_line() -> None:
    assert tree_of()["/chosen"] == {"bootargs": b"\0", "stdout-path": strings("/pl011@9000000")}


def test_cpus_use_psci_and_kvm_mpidr_affinity() -> None:
    tree = tree_of(cpus=18)
    assert tree["/cpus"] == {"#address-cells": cells(1), "#size-cells": cells(0)}
    cpu_nodes = sorted(path for path in tree if path.startswith("/cpus/"))
    assert len(cpu_nodes) == 18
    assert tree["/cpus/cpu@0"] == {
        "device_type": strings("cpu"),
        "compatible": strings("arm,arm-v8"),
        "enable-method": strings("psci"),
        "reg": cells(0),
    }
    # vCPU 17: Aff1 = 1, Aff0 = 1.
    assert cpu_reg(17) == 0x101
    assert tree["/cpus/cpu@101"]["reg"] == cells(0x101)


def test_psci_timer_and_gic() -> None:
    tree = tree_of(cpus=2)
    assert tree["/psci"] == {"compatible": strings("arm,psci-1.0", "arm,psci-0.2"), "method": strings("hvc")}
    assert tree["/timer"] == {
        "compatible": strings("arm,armv8-timer"),
        "interrupts": cells(1, 13, 4, 1, 14, 4, 1, 11, 4, 1, 10, 4),
        "always-on": b"",
    }
    assert tree["/intc@8000000"] == {
        "compatible": strings("arm,gic-v3"),
        "#interrupt-cells": cells(3),
        "interrupt-controller": b"",
        # Distributor, then one 128 KiB redistributor per vCPU.
        "reg": u64(0x0800_0000, 0x1_0000, 0x080A_0000, 2 * 0x2_0000),
        "#address-cells": cells(2),
        "#size-cells": cells(2),
        "ranges": b"",
        "phandle": cells(PHANDLE_GIC),
    }


def test_pl011_and_its_clock() -> None:
    tree = tree_of()
    assert tree["/pl011@9000000"] == {
        "compatible": strings("arm,pl011", "arm,primecell"),
        "reg": u64(0x0900_0000, 0x1000),
        "interrupts": cells(0, 1, 4),  # SPI 1, level-high: the guest polls or a level line drives it
        "clocks": cells(PHANDLE_CLOCK, PHANDLE_CLOCK),
        "clock-names": strings("uartclk", "apb_pclk"),
    }
    assert tree["/apb-pclk"] == {
        "compatible": strings("fixed-clock"),
        "#clock-cells": cells(0),
        "clock-frequency": cells(24_000_000),
        "clock-output-names": strings("clk24mhz"),
        "phandle": cells(PHANDLE_CLOCK),
    }


def test_uart_delivered_by_an_edge_irqfd_is_described_edge_triggered() -> None:
    assert tree_of(uart_edge=True)["/pl011@9000000"]["interrupts"] == cells(0, 1, 1)
    assert tree_of(uart_edge=False)["/pl011@9000000"]["interrupts"] == cells(0, 1, 4)


def test_pyvmm_devices_are_described() -> None:
    tree = tree_of()
    assert tree["/demo@a000000"] == {"compatible": strings("pyvmm,demo-device"), "reg": u64(0x0A00_0000, 0x1000)}
    assert tree["/debug-exit@a001000"] == {"compatible": strings("pyvmm,debug-exit"), "reg": u64(0x0A00_1000, 0x1000)}


def test_no_hypervisor_nodes_by_default() -> None:
    assert not any(path.startswith("/gunyah-vm-config") for path in tree_of())


def test_backend_nodes_come_after_the_boards() -> None:
    seen: list[set[str]] = []

    def backend_nodes(tree: DeviceTree) -> None:
        seen.append(set(read_fdt(tree.to_dtb())))
        tree.string("/hypervisor-config", "compatible", "example,vm-config")

    blob = build_fdt(virt.board_tree(1, RAM, nodes=(backend_nodes,)), Chosen())
    [paths] = seen
    assert {"/chosen", "/memory@80000000", "/pl011@9000000", "/debug-exit@a001000"} <= paths
    assert read_fdt(blob)["/hypervisor-config"] == {"compatible": strings("example,vm-config")}


@pytest.mark.parametrize(
    ("call", "problem"),
    [
        (lambda t: t.u32("/", "x", 1 << 32), "/x: 0x100000000 does not fit a 32-bit cell"),
        (lambda t: t.u64("/", "x", -1), "/x: -0x1 does not fit 64 bits"),
        (lambda t: t.string("/", "x", ""), "/x: '' is not a printable ASCII string"),
        (lambda t: t.string("/", "x", "caf\u00e9"), "is not a printable ASCII string"),
        (lambda t: (t.flag("/n", "x"), t.flag("/n", "x")), 'device tree: /n: .*"x" property already exists'),
    ],
)
def test_values_are_checked_before_the_library_sees_them(call, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        call(DeviceTree())


def test_read_fdt_refuses_what_is_not_a_tree() -> None:
    with pytest.raises(ConfigError, match="no 0xd00dfeed magic"):
        read_fdt(b"\x7fELF....")
    with pytest.raises(ConfigError, match="not a valid flattened device tree"):
        read_fdt(struct.pack(">II", 0xD00DFEED, 0xFFFF) + bytes(8))


@pytest.mark.skipif(shutil.which("dtc") is None, reason="dtc (device-tree-compiler) is not installed")
def test_dtc_reads_the_tree_without_complaint(tmp_path: Path) -> None:
    blob = build_fdt(virt.board_tree(4, RAM, uart_edge=True), Chosen("console=ttyAMA0", (0x8100_0000, 0x8110_0000)))
    (tmp_path / "virt.dtb").write_bytes(blob)
    result = subprocess.run(
        ["dtc", "-I", "dtb", "-O", "dts", "virt.dtb"], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert 'stdout-path = "/pl011@9000000";' in result.stdout
    assert 'compatible = "arm,pl011\\0arm,primecell";' in result.stdout
    assert [line for line in result.stderr.splitlines() if "Warning" in line] == []
