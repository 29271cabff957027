"""fw_cfg: the items kvm-unit-tests reads, byte by byte, as QEMU serves them."""

from __future__ import annotations

import pytest

from pyvmm.devices import fw_cfg
from pyvmm.devices.fw_cfg import FwCfg

DATA = fw_cfg.DATA_PORT - fw_cfg.SELECTOR_PORT


def read_item(dev: FwCfg, key: int, length: int) -> bytes:
    dev.write(0, 2, key)
    return bytes(dev.read(DATA, 1) for _ in range(length))


@pytest.fixture
def dev() -> FwCfg:
    return FwCfg(ram_size=256 << 20, cpus=3)


def test_signature_and_id(dev: FwCfg) -> None:
    assert read_item(dev, fw_cfg.FW_CFG_SIGNATURE, 4) == b"QEMU"
    assert int.from_bytes(read_item(dev, fw_cfg.FW_CFG_ID, 4), "little") == 1  # no DMA


def test_cpu_count_and_ram_size(dev: FwCfg) -> None:
    assert int.from_bytes(read_item(dev, fw_cfg.FW_CFG_NB_CPUS, 2), "little") == 3
    assert int.from_bytes(read_item(dev, fw_cfg.FW_CFG_MAX_CPUS, 2), "little") == 3
    assert int.from_bytes(read_item(dev, fw_cfg.FW_CFG_RAM_SIZE, 8), "little") == 256 << 20


def test_key_0x11_means_no_memory_limit(dev: FwCfg) -> None:
    assert read_item(dev, 0x11, 8) == bytes(8)


def test_unknown_items_and_reads_past_the_end_are_zero(dev: FwCfg) -> None:
    assert read_item(dev, 0x4242, 4) == bytes(4)
    assert read_item(dev, fw_cfg.FW_CFG_SIGNATURE, 6) == b"QEMU\0\0"


def test_selecting_rewinds_and_the_selector_reads_back(dev: FwCfg) -> None:
    assert read_item(dev, fw_cfg.FW_CFG_SIGNATURE, 2) == b"QE"
    assert read_item(dev, fw_cfg.FW_CFG_SIGNATURE, 4) == b"QEMU"
    assert dev.read(0, 2) == fw_cfg.FW_CFG_SIGNATURE


def test_a_wide_data_read_returns_consecutive_bytes(dev: FwCfg) -> None:
    dev.write(0, 2, fw_cfg.FW_CFG_SIGNATURE)
    assert dev.read(DATA, 4).to_bytes(4, "little") == b"QEMU"


def test_data_writes_are_ignored(dev: FwCfg) -> None:
    dev.write(0, 2, fw_cfg.FW_CFG_NB_CPUS)
    dev.write(DATA, 1, 0x77)
    assert dev.read(DATA, 1) == 3
