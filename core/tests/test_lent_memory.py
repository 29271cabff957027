"""Memory lent to the guest: loaded before mapping, refused to the host after."""

from __future__ import annotations

import pytest
from coretests_support import MakeBackend, RecordingBackend, register

from pyvmm.errors import GuestMemoryError
from pyvmm.hookspecs import hookimpl
from pyvmm.memory import RamRegion
from pyvmm.plugins import PluginRegistry
from pyvmm.testing.contract_backend import TestVm


class LendingBackend(RecordingBackend):
    """Lends every region it maps, recording what the region held at that moment."""

    def __init__(self) -> None:
        super().__init__("lending")
        self.seen: list[bytes] = []

    @hookimpl
    def pyvmm_map_memory(self, vm: TestVm, region: RamRegion) -> None:
        self.seen.append(region.view(0x10, 4).tobytes())
        region.host_accessible = False


def test_contents_are_in_place_when_the_backend_maps(registry: PluginRegistry) -> None:
    lending = LendingBackend()
    backend = register(registry, lending)
    seen = lending.seen
    with backend.create_vm({"arch": "aarch64"}) as vm:
        region = vm.add_memory(0x80000000, 0x10000, contents={0x80000010: b"boot"})
        assert seen == [b"boot"], "the payload must be written before the pages are lent"
        with pytest.raises(GuestMemoryError, match="lent to the guest"):
            vm.memory.read(0x80000010, 4)
        with pytest.raises(GuestMemoryError, match="lent"):
            vm.memory.write(0x80000000, b"x")
        with pytest.raises(GuestMemoryError, match="lent"):
            vm.memory.view(0x80000000, 1)
        assert region.host_accessible is False


def test_contents_outside_the_region_refused_before_allocating(make_backend: MakeBackend) -> None:
    test_backend, backend = make_backend()
    with backend.create_vm({"arch": "x86_64"}) as vm:
        with pytest.raises(GuestMemoryError, match="outside the region"):
            vm.add_memory(0, 0x1000, contents={0xFFE: b"abcd"})
        assert len(vm.memory) == 0
        assert vm.add_memory(0, 0x1000).slot == 0, "no slot was consumed"
        assert not [c for c in test_backend.calls if c[0] == "pyvmm_map_memory"][1:]
