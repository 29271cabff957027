"""The port sinks and the demo MMIO device."""

from __future__ import annotations

from pyvmm.devices import scratch
from pyvmm.devices.scratch import ScratchDevice
from pyvmm.devices.sinks import PortSink


def test_sink_latches_what_was_written() -> None:
    pic = PortSink("pic", ports=2)
    assert pic.read(1, 1) == 0xFF
    pic.write(1, 1, 0x1FB)
    assert pic.read(1, 1) == 0xFB
    assert pic.read(0, 1) == 0xFF
    assert pic.read(5, 1) == 0xFF  # outside its ports


def test_demo_device_id_is_read_only() -> None:
    dev = ScratchDevice()
    assert dev.read(scratch.REG_ID, 4) == scratch.DEMO_DEVICE_ID
    assert dev.read(scratch.REG_ID, 4).to_bytes(4, "little") == b"PVMM"
    dev.write(scratch.REG_ID, 4, 0)
    assert dev.read(scratch.REG_ID, 4) == scratch.DEMO_DEVICE_ID


def test_demo_device_scratch_at_any_width() -> None:
    dev = ScratchDevice()
    dev.write(scratch.REG_SCRATCH, 8, 0x0123_4567_89AB_CDEF)
    assert dev.read(scratch.REG_SCRATCH, 8) == 0x0123_4567_89AB_CDEF
    assert dev.read(scratch.REG_SCRATCH + 4, 4) == 0x0123_4567
    dev.write(scratch.REG_SCRATCH + 1, 1, 0xAA)
    assert dev.scratch == 0x0123_4567_89AB_AAEF
    assert dev.read(0x800, 4) == 0


def test_demo_device_counts_accesses() -> None:
    dev = ScratchDevice()
    dev.write(scratch.REG_SCRATCH, 1, 1)
    dev.read(scratch.REG_ID, 4)
    assert dev.read(scratch.REG_COUNTER, 4) == 3
