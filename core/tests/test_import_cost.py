"""``import pyvmm`` stays cheap: no backend, no pydantic, no pluggy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import pyvmm

CHECK = "import pyvmm, sys; print(sorted(m for m in sys.modules if m.startswith(('pydantic', 'pluggy', 'pyvmm_'))))"


def test_import_pyvmm_loads_no_backend_and_no_heavy_dependency() -> None:
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_lazy_names_load_on_first_use_and_the_records_need_no_pydantic() -> None:
    code = (
        "import json, sys, pyvmm; before = 'pyvmm.config' in sys.modules; cfg = pyvmm.VmConfig(vcpus=2); "
        "spec = pyvmm.BootSpec(arch='x86_64', entry=0x1000); "
        "print(json.dumps([before, 'pyvmm.config' in sys.modules, 'pydantic' in sys.modules, type(cfg).__module__]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [False, True, False, "pyvmm.config"]


@pytest.mark.parametrize("name", pyvmm.__all__)
def test_every_public_name_resolves(name: str) -> None:
    assert getattr(pyvmm, name) is not None


def test_unknown_attribute() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Frobnicator'"):
        _ = pyvmm.Frobnicator


# --- pyvmm.arch.x86_64: the records beyond the boot registers load on first use ----------

X86_CHECK = """
import json, sys
from pyvmm.arch import x86_64
before = "pyvmm.arch.x86_64_extra_state" in sys.modules
from pyvmm.arch.x86_64 import VcpuEvents
from pyvmm.arch import x86_64_extra_state
print(json.dumps([before, VcpuEvents is x86_64_extra_state.VcpuEvents, x86_64.VcpuEvents is VcpuEvents]))
"""


def test_the_x86_64_extra_state_records_load_on_first_use_as_the_same_classes() -> None:
    result = subprocess.run([sys.executable, "-c", X86_CHECK], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [False, True, True]


def test_every_x86_64_public_name_resolves_and_an_unknown_one_does_not() -> None:
    from pyvmm.arch import x86_64, x86_64_extra_state

    for name in x86_64.__all__:
        assert getattr(x86_64, name) is not None
    lazy = {name for name in x86_64.__all__ if hasattr(x86_64_extra_state, name) and name[0].isupper()}
    assert lazy == set(x86_64._EXTRA_STATE)
    with pytest.raises(AttributeError, match="no attribute 'Frobnicator'"):
        _ = x86_64.Frobnicator  # type: ignore[attr-defined]
