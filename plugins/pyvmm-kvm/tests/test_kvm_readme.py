"""The README's Python example runs as written (on KVM, where it is usable)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pyvmm.exits import IoExit
from pyvmm.vm import Backend

README = Path(__file__).resolve().parents[3] / "README.md"


def test_readme_example_runs(kvm: Backend) -> None:
    if not README.exists():  # installed elsewhere than the repository
        pytest.skip("the repository README is not next to these tests")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README has a Python example"
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    exit_ = namespace["exit"]
    assert isinstance(exit_, IoExit)
    assert (exit_.port, exit_.size, exit_.is_write) == (0x10, 1, True)
