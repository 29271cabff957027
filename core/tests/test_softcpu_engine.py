"""The software CPU's plumbing: optional import, memory bookkeeping, errors."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from pyvmm.config import MemoryRegionSpec
from pyvmm.errors import ConfigError, HypervisorError, VmStateError
from pyvmm.memory import GuestMemory, RamRegion
from pyvmm.softcpu import SoftCpuUnavailable, _uc, available

needs_unicorn = pytest.mark.skipif(not available()[0], reason="the software CPU needs unicorn")


@pytest.fixture
def region() -> Iterator[RamRegion]:
    memory = GuestMemory()
    ram = memory.allocate(MemoryRegionSpec(guest_phys_addr=0x10000, size=0x4000))
    memory.insert(ram)
    yield ram
    memory.close()


def test_importing_the_package_does_not_import_unicorn() -> None:
    code = "import json, sys, pyvmm.softcpu; print(json.dumps('unicorn' in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) is False


def test_missing_unicorn_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _uc.unicorn.cache_clear()
    monkeypatch.setitem(sys.modules, "unicorn", None)  # makes "import unicorn" fail
    try:
        ok, reason = available()
        assert not ok
        assert "pyvmm-core[softcpu]" in reason
        from pyvmm.softcpu import SoftCpu

        with pytest.raises(SoftCpuUnavailable, match=r"pyvmm-core\[softcpu\]"):
            SoftCpu("x86_64")
    finally:
        _uc.unicorn.cache_clear()


@needs_unicorn
def test_mapping_errors(region: RamRegion) -> None:
    from pyvmm.softcpu import SoftCpu

    with SoftCpu("x86_64") as cpu:
        cpu.map_region(region)
        assert cpu.read_physical(0x10000, 4) == bytes(4)
        with pytest.raises(HypervisorError) as overlap:
            cpu.map_host(0x12000, 0x1000, region.host_addr)
        assert overlap.value.errno == errno.EEXIST
        with pytest.raises(ConfigError, match="page-aligned"):
            cpu.map_host(0x20001, 0x1000, region.host_addr)
        with pytest.raises(HypervisorError) as absent:
            cpu.unmap(0x30000, 0x1000)
        assert absent.value.errno == errno.ENOENT
        cpu.unmap_region(region)
        assert cpu.read_physical(0x10000, 4) is None
        with pytest.raises(ConfigError, match="log_dirty"):
            cpu.dirty_log(0x10000)


@needs_unicorn
def test_host_and_guest_share_the_pages(region: RamRegion) -> None:
    """Zero-copy: what the host writes the emulator reads, and the reverse."""
    from pyvmm.softcpu import SoftCpu

    with SoftCpu("aarch64") as cpu:
        cpu.map_region(region)
        region.view(0x10, 4)[:] = b"abcd"
        assert cpu.read_physical(0x10010, 4) == b"abcd"
        cpu._uc.mem_write(0x10020, b"wxyz")
        assert region.view(0x20, 4).tobytes() == b"wxyz"


@needs_unicorn
def test_a_closed_cpu_refuses_work() -> None:
    from pyvmm.softcpu import SoftCpu

    cpu = SoftCpu("x86_64")
    cpu.close()
    cpu.close()  # idempotent
    cpu.kick()  # a late kick from another thread is harmless
    with pytest.raises(VmStateError, match="closed"):
        cpu.run()
    with pytest.raises(VmStateError, match="closed"):
        cpu.get_regs()


@needs_unicorn
def test_unknown_arch_is_refused() -> None:
    from pyvmm.softcpu import SoftCpu

    with pytest.raises(ValueError, match="riscv"):
        SoftCpu("riscv64")
