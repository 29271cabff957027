"""docs/writing-a-backend.md stays in step with the contract it explains: every
hook and every capability of this pyvmm is named in it.  Runs inside pyvmm's
repository only (a copy of this example can delete the file)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from pyvmm import hookspecs
from pyvmm.capabilities import Capability
from pyvmm.contract import hooks_by_capability

GUIDE = Path(__file__).resolve().parents[3] / "docs" / "writing-a-backend.md"


@pytest.fixture(scope="module")
def guide() -> str:
    if not GUIDE.is_file():
        pytest.skip(f"not inside pyvmm's repository ({GUIDE} is absent)")
    return GUIDE.read_text()


def test_every_hook_is_documented_with_its_parameters(guide: str) -> None:
    for name in dir(hookspecs):
        if name.startswith("pyvmm_"):
            params = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
            assert f"{name}({params}" in guide or f"`{name}`" in guide, name


def test_every_gating_capability_is_in_the_hook_table(guide: str) -> None:
    for capability in hooks_by_capability():
        assert f"| `{capability.name}` |" in guide, capability.name


def test_the_boot_context_rule_is_stated(guide: str) -> None:
    assert Capability.HYPERVISOR_INITIALIZED_BOOT_CONTEXT.name in guide
    assert "must **not** implement `pyvmm_init_vcpu`" in guide
