"""``pyvmm run --model``: the backend's driver model behind it, and the rules the
run broke reported at the end with their own exit status."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pytest

from pyvmm import cli_run


@dataclass(frozen=True)
class FakeRule:
    id: str
    summary: str
    source: str


@dataclass(frozen=True)
class FakeRejection:
    rule: FakeRule
    detail: str


class BrokenRuleModel:
    """A model whose run broke one rule (what a plugin bug looks like)."""

    def __init__(self) -> None:
        self.rejections = [FakeRejection(FakeRule("GH-X", "the thing must be aligned", "notes §1"), "at 0x3")]
        self.active = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[Any]:
        self.active = True
        try:
            yield self
        finally:
            self.active = False


def test_a_broken_rule_is_listed_and_changes_the_status(capsys: pytest.CaptureFixture[str]) -> None:
    model = BrokenRuleModel()
    assert cli_run._report_model(model)
    err = capsys.readouterr().err
    assert "1 interface rule(s) broken" in err
    assert "GH-X: the thing must be aligned (at 0x3) [notes §1]" in err
    assert cli_run.STATUS_RULE_BROKEN not in (0, 1, 2, 3, 4, 124, 130)


def test_model_needs_a_backend_name_and_a_shipped_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from pyvmm.errors import ConfigError
    from pyvmm.machine.config import MachineConfig

    monkeypatch.delenv("PYVMM_BACKEND", raising=False)
    words = cli_run._UserWords(None, {}, {})
    with pytest.raises(ConfigError, match="--backend NAME"), cli_run._driver_model(MachineConfig(), words):
        pass
    monkeypatch.setattr(metadata, "entry_points", lambda group: [])
    with (
        pytest.raises(ConfigError, match="ships no driver model"),
        cli_run._driver_model(MachineConfig(backend="acme"), words),
    ):
        pass


def test_the_model_is_installed_for_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from pyvmm.machine.config import MachineConfig

    class Point:
        name = "acme"

        @staticmethod
        def load() -> type[BrokenRuleModel]:
            return BrokenRuleModel

    monkeypatch.setattr(metadata, "entry_points", lambda group: [Point()] if group == "pyvmm.models" else [])
    with cli_run._driver_model(MachineConfig(backend="acme"), cli_run._UserWords(None, {}, {})) as model:
        assert model.active
    assert not model.active
