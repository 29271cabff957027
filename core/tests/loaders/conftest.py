"""Fixtures for the loader tests: guest memory without a hypervisor, image files."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyvmm.config import MemoryRegionSpec
from pyvmm.memory import GuestMemory

MakeMemory = Callable[..., GuestMemory]
WriteImage = Callable[..., Path]


@pytest.fixture
def make_memory() -> Iterator[MakeMemory]:
    """``make_memory((gpa, size), ..., read_only=[(gpa, size)])`` -> GuestMemory."""
    made: list[GuestMemory] = []

    def make(*regions: tuple[int, int], read_only: tuple[tuple[int, int], ...] = ()) -> GuestMemory:
        memory = GuestMemory()
        specs = [MemoryRegionSpec(guest_phys_addr=gpa, size=size) for gpa, size in regions]
        specs += [MemoryRegionSpec(guest_phys_addr=gpa, size=size, read_only=True) for gpa, size in read_only]
        for spec in specs:
            memory.insert(memory.allocate(spec))
        made.append(memory)
        return memory

    yield make
    for memory in made:
        memory.close()


@pytest.fixture
def write_image(tmp_path: Path) -> WriteImage:
    """``write_image(data, name="kernel")`` -> path of a file holding ``data``."""

    def write(data: bytes, name: str = "kernel") -> Path:
        path = tmp_path / name
        path.write_bytes(data)
        return path

    return write
