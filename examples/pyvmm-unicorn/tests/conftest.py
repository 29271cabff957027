"""Fixtures: the backend registered in a registry of its own, so these tests do
not depend on what else is installed."""

from __future__ import annotations

import pytest
from pyvmm_unicorn.plugin import plugin as unicorn_plugin

from pyvmm.plugins import PluginRegistry
from pyvmm.vm import Backend


@pytest.fixture(scope="session")
def backend() -> Backend:
    plugin = PluginRegistry().register(unicorn_plugin)
    availability = plugin.availability()
    if not availability.available:
        pytest.skip(f"the software CPU cannot run here: {availability.reason}")
    return Backend(plugin)
