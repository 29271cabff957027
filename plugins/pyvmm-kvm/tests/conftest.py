"""Fixtures for the KVM tests: they run on real /dev/kvm and skip, with the
reason, only where it cannot be used."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pyvmm.plugins import PluginRegistry
from pyvmm.vm import Backend
from pyvmm_kvm.plugin import plugin as kvm_plugin


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
