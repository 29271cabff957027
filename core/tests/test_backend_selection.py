"""Backend selection: explicit name, then $PYVMM_BACKEND, then the best available."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from coretests_support import ProbeBackend, register

from pyvmm.backend import DllSwitch, HostSwitch, LibcDeviceSeam
from pyvmm.backend.stand_in import has_stand_in, standing_in
from pyvmm.errors import BackendNotFound, BackendUnavailable
from pyvmm.manifest import Availability
from pyvmm.plugins import ENV_BACKEND, PluginRegistry
from pyvmm.vm import get_backend


def _add(registry: PluginRegistry, name: str, **kwargs: Any) -> ProbeBackend:
    test_backend = ProbeBackend(name, **kwargs)
    register(registry, test_backend)
    return test_backend


@pytest.fixture
def three(registry: PluginRegistry) -> PluginRegistry:
    _add(registry, "low", priority=1, auto_select=True)
    _add(registry, "high", priority=10, auto_select=True)
    _add(registry, "manual", priority=100, auto_select=False)
    return registry


def test_best_available_by_priority(three: PluginRegistry) -> None:
    assert get_backend(registry=three).name == "high"
    assert get_backend().name == "high"  # the fixture made it the default registry


def test_auto_select_false_is_never_chosen_automatically(registry: PluginRegistry) -> None:
    _add(registry, "manual", priority=100, auto_select=False)
    with pytest.raises(BackendNotFound, match="no backend is installed"):
        get_backend(registry=registry)
    assert get_backend("manual", registry=registry).name == "manual"


def test_explicit_name_beats_environment_beats_priority(three: PluginRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_BACKEND, "low")
    assert get_backend(registry=three).name == "low"
    assert get_backend("manual", registry=three).name == "manual"
    monkeypatch.setenv(ENV_BACKEND, "manual")  # the environment may name a manual-only backend
    assert get_backend(registry=three).name == "manual"
    monkeypatch.setenv(ENV_BACKEND, "")  # empty means unset
    assert get_backend(registry=three).name == "high"


def test_environment_naming_an_unknown_backend(three: PluginRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_BACKEND, "nope")
    with pytest.raises(BackendNotFound, match="'nope'"):
        get_backend(registry=three)


def test_unavailable_are_skipped(registry: PluginRegistry) -> None:
    _add(registry, "best-but-off", priority=10, auto_select=True, available=False)
    _add(registry, "fallback", priority=1, auto_select=True)
    assert get_backend(registry=registry).name == "fallback"


def test_none_available_lists_every_reason(registry: PluginRegistry) -> None:
    _add(registry, "off", priority=10, auto_select=True, available=False)
    _add(registry, "elsewhere", auto_select=True, host_os=("nowhere-os",))
    _add(registry, "manual", auto_select=False)  # not a candidate, so not listed
    with pytest.raises(BackendNotFound) as info:
        get_backend(registry=registry)
    text = str(info.value)
    assert "off: switched off by the test" in text
    assert "elsewhere: runs on nowhere-os" in text
    assert "manual" not in text


def test_unknown_name_lists_installed(three: PluginRegistry) -> None:
    with pytest.raises(BackendNotFound) as info:
        get_backend("kvm", registry=three)
    assert "no backend named 'kvm' (installed: high, low, manual)" in str(info.value)


def test_unknown_name_with_nothing_installed(registry: PluginRegistry) -> None:
    with pytest.raises(BackendNotFound, match=r"installed: none"):
        get_backend("kvm")


def test_named_but_unavailable(registry: PluginRegistry) -> None:
    _add(registry, "off", available=False)
    with pytest.raises(BackendUnavailable) as info:
        get_backend("off", registry=registry)
    assert info.value.backend == "off"
    assert info.value.reason == "switched off by the test"
    assert "'off' is not available here: switched off by the test" in str(info.value)


def _raises() -> Availability:
    raise OSError(13, "permission denied on /dev/hypervisor")


@pytest.mark.parametrize(
    ("probe", "reason"),
    [
        (_raises, "availability probe raised PermissionError"),
        (lambda: True, "returned bool, not Availability"),
        (lambda: None, "returned NoneType, not Availability"),
        (lambda: {"available": True}, "returned dict, not Availability"),
    ],
    ids=["raises", "bool", "none", "dict"],
)
def test_bad_probe_reads_as_unavailable(registry: PluginRegistry, probe: Callable[[], object], reason: str) -> None:
    test_backend = _add(registry, "flaky", priority=10, auto_select=True, probe=probe)
    _add(registry, "steady", priority=1, auto_select=True)
    plugin = registry.get("flaky")
    availability = plugin.availability()  # never raises
    assert availability.available is False
    assert reason in availability.reason
    assert get_backend(registry=registry).name == "steady"
    with pytest.raises(BackendUnavailable, match=reason):
        get_backend("flaky", registry=registry)
    assert test_backend.calls == []


def test_probe_is_not_run_on_a_foreign_host(registry: PluginRegistry) -> None:
    ran: list[bool] = []

    def probe() -> Availability:
        ran.append(True)
        return Availability.yes()

    _add(registry, "winonly", auto_select=True, host_os=("win32",), probe=probe)
    availability = registry.get("winonly").availability()
    assert not availability.available
    assert "runs on win32" in availability.reason
    assert ran == []


def test_a_stand_in_lifts_the_host_os_limit_for_its_backend_only(registry: PluginRegistry) -> None:
    """A driver model behind a switch answers for the OS: a Windows-only backend's
    probe runs on Linux while it stands in, and only for that backend."""
    ran: list[str] = []

    def probe_of(name: str) -> Callable[[], Availability]:
        def probe() -> Availability:
            ran.append(name)
            return Availability.yes()

        return probe

    _add(registry, "winonly", auto_select=True, host_os=("nowhere-os",), probe=probe_of("winonly"))
    _add(registry, "other", auto_select=True, host_os=("nowhere-os",), probe=probe_of("other"))
    with standing_in("winonly"), standing_in("winonly"):
        assert registry.get("winonly").availability().available
        assert not registry.get("other").availability().available
    assert not has_stand_in("winonly")
    assert not registry.get("winonly").availability().available
    assert ran == ["winonly"]


def test_switches_record_their_stand_in_while_in_use() -> None:
    seam = LibcDeviceSeam()
    devices = HostSwitch("acme-dev", LibcDeviceSeam, {})
    dlls = DllSwitch("acme-dll", lambda: pytest.fail("the real DLLs are never loaded here"))
    with devices.use(seam):
        assert has_stand_in("acme-dev") and not has_stand_in("acme-dll")
    with dlls.use(_NoDll()) as host:
        assert has_stand_in("acme-dll") and dlls.current() is host
    assert not has_stand_in("acme-dev") and not has_stand_in("acme-dll")


class _NoDll:
    """A DLL seam that exports nothing (the switch never calls it here)."""

    def function(self, name: str) -> Any:
        raise KeyError(name)

    def has(self, name: str) -> bool:
        return False

    def last_error(self) -> int:
        return 0


@pytest.mark.parametrize("named", [True, False], ids=["named", "best-available"])
def test_selecting_a_backend_asks_its_probe_once(registry: PluginRegistry, named: bool) -> None:
    asked: list[bool] = []

    def probe() -> Availability:
        asked.append(True)
        return Availability.yes(missing_capabilities=())

    _add(registry, "counted", priority=10, auto_select=True, probe=probe)
    asked.clear()  # registering it made a Backend, which asked
    backend = get_backend("counted" if named else None, registry=registry)
    assert backend.name == "counted"
    assert len(asked) == 1
    backend.availability()  # asked afresh when asked directly
    assert len(asked) == 2
