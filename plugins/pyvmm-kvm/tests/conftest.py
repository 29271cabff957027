"""Fixtures for the KVM tests: they run on real /dev/kvm and skip, with the
reason, only where it cannot be used."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.plugins import PluginRegistry
from pyvmm.vm import Backend
from pyvmm_kvm.host_arch import host_is_arm64
from pyvmm_kvm.plugin import plugin as kvm_plugin

#: The tests of this directory that are not about x86: they run on any host.
ARCH_NEUTRAL_PREFIXES = ("test_arm64_", "test_kvm_arm64_")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On an arm64 host, skip the x86_64 tests of this directory (x86 guests and
    the x86 uapi header): KVM runs guests of the host's architecture only."""
    if not host_is_arm64():
        return
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason="x86_64 KVM test: this host is aarch64, whose KVM runs aarch64 guests only")
    for item in items:
        path = Path(str(item.path))
        if path.parent == here and not path.name.startswith(ARCH_NEUTRAL_PREFIXES):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kvm() -> Backend:
    registry = PluginRegistry()
    plugin = registry.register(kvm_plugin)
    availability = plugin.availability()
    if not availability.available:
        pytest.skip(f"KVM is not usable here: {availability.reason}")
    return Backend(plugin)


@pytest.fixture
def vm(kvm: Backend) -> Iterator[object]:
    with kvm.create_vm({"arch": "x86_64"}) as machine:
        yield machine
