"""examples/fuzzing/fuzz_parser.py runs on KVM and finds its planted bug: the
reset makes every execution start from the same state, so a fixed seed always
finds the same crashes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from pyvmm.vm import Backend

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "fuzzing" / "fuzz_parser.py"


@pytest.fixture(scope="module")
def fuzz_parser() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_parser", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_parser"] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


def test_a_fixed_seed_finds_the_same_crashes_every_time(kvm: Backend, fuzz_parser: ModuleType) -> None:
    first = fuzz_parser.fuzz(iterations=1500, seconds=None, seed=19)
    second = fuzz_parser.fuzz(iterations=1500, seconds=None, seed=19)
    assert first.executions == second.executions == 1500
    assert first.crashes, "the planted bug is found"
    assert set(first.crashes) == {b"FUZZ"}, "only the magic crashes the parser"
    assert first.crashes == second.crashes


def test_the_command_prints_the_rate_and_the_crashes(
    kvm: Backend, fuzz_parser: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fuzz_parser.main(["--iterations", "500", "--seed", "19"]) == 0
    out = capsys.readouterr().out
    assert "500 executions in" in out and "executions per second" in out
    assert "crashing input: b'FUZZ'" in out
