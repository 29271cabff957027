"""Plugin policy (allow/deny from the environment and the config file) and the
hook-contract version check, as discovery and ``pyvmm backends`` apply them."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

import pytest

import pyvmm
from pyvmm import cli, plugins
from pyvmm.contract import MIN_CONTRACT_VERSION
from pyvmm.errors import BackendNotFound, ConfigError, PluginContractError
from pyvmm.manifest import CONTRACT_VERSION
from pyvmm.plugins import ENTRY_POINT_GROUP, PluginRegistry
from pyvmm.policy import ENV_ALLOW, ENV_CONFIG, ENV_DENY, PluginPolicy, config_path, load_policy, read_config
from pyvmm.testing.contract_backend import ContractTestBackend

PLUGIN_MODULE = """
from pyvmm.testing.contract_backend import ContractTestBackend

backend = ContractTestBackend({name!r})
plugin = backend.plugin()
IMPORTED = True
"""

Environ = dict[str, str]


@pytest.fixture
def env(tmp_path: Path) -> Environ:
    """An environment whose config file is a path under tmp_path (absent at first)."""
    return {ENV_CONFIG: str(tmp_path / "config.toml"), "HOME": str(tmp_path)}


def write_config(env: Environ, text: str) -> Path:
    path = Path(env[ENV_CONFIG])
    path.write_text(text)
    return path


# --- reading the policy ----------------------------------------------------------------


def test_no_config_and_no_variables_allow_everything(env: Environ) -> None:
    policy = load_policy(env)
    assert not policy.active
    assert policy.denial("kvm") is None


def test_config_path_defaults_to_xdg_then_home(tmp_path: Path) -> None:
    assert config_path({"HOME": "/home/me"}) == Path("/home/me/.config/pyvmm/config.toml")
    assert config_path({"HOME": "/home/me", "XDG_CONFIG_HOME": "/etc/xdg"}) == Path("/etc/xdg/pyvmm/config.toml")
    assert config_path({ENV_CONFIG: str(tmp_path / "x.toml"), "HOME": "/home/me"}) == tmp_path / "x.toml"


def test_file_lists(env: Environ) -> None:
    path = write_config(env, '[plugins]\nallow = ["kvm", "acme"]\ndeny = ["acme"]\n\n[run]\nmemory = "1G"\n')
    policy = load_policy(env)
    assert policy.allow == frozenset({"kvm", "acme"}) and policy.deny == frozenset({"acme"})
    assert policy.denial("kvm") is None
    assert policy.denial("acme") == f"denied by {path} [plugins] deny", "deny wins over allow"
    reason = policy.denial("unicorn")
    assert reason is not None and "not on the allow list" in reason and str(path) in reason


def test_variables_replace_the_files_lists(env: Environ) -> None:
    write_config(env, '[plugins]\nallow = ["kvm"]\ndeny = ["whpx"]\n')
    policy = load_policy({**env, ENV_ALLOW: " kvm , unicorn ", ENV_DENY: ""})
    assert policy.allow == frozenset({"kvm", "unicorn"}) and policy.allow_source == ENV_ALLOW
    assert policy.deny == frozenset(), "an empty variable lifts the file's list"
    lifted = load_policy({**env, ENV_ALLOW: ""})
    assert lifted.allow is None and lifted.deny == frozenset({"whpx"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[plugins\n", "not valid TOML"),
        ('[plugins]\nallow = "kvm"\n', "plugins.allow"),
        ('[plugins]\ndeny = ["Not A Name"]\n', "plugins.deny.0"),
        ('[plugins]\nalow = ["kvm"]\n', "plugins.alow"),
    ],
)
def test_a_bad_config_file_is_an_error_naming_it(env: Environ, text: str, message: str) -> None:
    path = write_config(env, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_policy(env)
    assert str(path) in str(info.value)


def test_a_bad_variable_is_an_error_naming_it(env: Environ) -> None:
    with pytest.raises(ConfigError, match=f"{ENV_DENY}: 'Bad/Name'"):
        load_policy({**env, ENV_DENY: "kvm,Bad/Name"})


def test_an_empty_file_is_an_empty_config(env: Environ) -> None:
    assert read_config(write_config(env, "")).plugins.allow is None


# --- discovery applies it --------------------------------------------------------------


@pytest.fixture
def plugin_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[str], metadata.EntryPoint]]:
    """``make(name)`` -> an entry point for a fresh plugin module that records being imported."""
    monkeypatch.syspath_prepend(str(tmp_path))
    modules: list[str] = []

    def make(name: str) -> metadata.EntryPoint:
        module = f"pyvmm_policy_test_{uuid.uuid4().hex[:12]}"
        (tmp_path / f"{module}.py").write_text(PLUGIN_MODULE.format(name=name))
        modules.append(module)
        return metadata.EntryPoint(name=name, value=f"{module}:plugin", group=ENTRY_POINT_GROUP)

    yield make
    for module in modules:
        sys.modules.pop(module, None)


def test_a_denied_plugin_is_reported_and_never_imported(
    plugin_entry_point: Callable[[str], metadata.EntryPoint],
) -> None:
    allowed, denied = plugin_entry_point("allowed"), plugin_entry_point("denied")
    registry = PluginRegistry(policy=PluginPolicy(deny=frozenset({"denied"}), deny_source=ENV_DENY))
    registry.load_entry_points([allowed, denied])
    assert set(registry.backends) == {"allowed"}
    assert [(d.source.entry_point, d.reason) for d in registry.denied] == [("denied", f"denied by {ENV_DENY}")]
    assert registry.failures == []
    assert denied.value.split(":")[0] not in sys.modules, "a denied plugin's module must not be imported"
    assert allowed.value.split(":")[0] in sys.modules
    with pytest.raises(BackendNotFound, match="installed but denied by"):
        registry.select("denied")


def test_the_allow_list_keeps_everything_else_out(plugin_entry_point: Callable[[str], metadata.EntryPoint]) -> None:
    registry = PluginRegistry(policy=PluginPolicy(allow=frozenset({"one"}), allow_source="test"))
    registry.load_entry_points([plugin_entry_point("one"), plugin_entry_point("two")])
    assert set(registry.backends) == {"one"}
    assert [d.source.entry_point for d in registry.denied] == ["two"]


def test_discovery_reads_the_environment(
    plugin_entry_point: Callable[[str], metadata.EntryPoint], monkeypatch: pytest.MonkeyPatch, env: Environ
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(ENV_DENY, "gone")
    registry = PluginRegistry()
    registry.load_entry_points([plugin_entry_point("kept"), plugin_entry_point("gone")])
    assert set(registry.backends) == {"kept"}
    assert registry.policy is not None and registry.policy.deny == frozenset({"gone"})


# --- pyvmm backends shows it -------------------------------------------------------------


@pytest.fixture
def denied_registry(
    plugin_entry_point: Callable[[str], metadata.EntryPoint], monkeypatch: pytest.MonkeyPatch
) -> PluginRegistry:
    registry = PluginRegistry(policy=PluginPolicy(deny=frozenset({"blocked"}), deny_source=ENV_DENY))
    registry.load_entry_points([plugin_entry_point("open"), plugin_entry_point("blocked")])
    monkeypatch.setattr(plugins, "_default", registry)
    return registry


def test_backends_json_lists_denied_plugins_and_the_policy(
    denied_registry: PluginRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["backends", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [b["name"] for b in report["backends"]] == ["open"]
    assert report["denied"] == [
        {
            "entry_point": "blocked",
            "distribution": "(unknown)",
            "version": "",
            "location": "",
            "reason": "denied by PYVMM_BACKENDS_DENY",
        }
    ]
    assert report["policy"] == {"allow": None, "allow_source": "", "deny": ["blocked"], "deny_source": ENV_DENY}


def test_backends_text_marks_denied_plugins(
    denied_registry: PluginRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "open 0  [available]" in out
    assert "DENIED blocked from (unknown): denied by PYVMM_BACKENDS_DENY" in out
    assert "policy: blocked denied (PYVMM_BACKENDS_DENY)" in out


def test_a_bad_policy_fails_the_command(
    monkeypatch: pytest.MonkeyPatch, env: Environ, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(plugins, "_default", None)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    write_config(env, "[plugins]\nallow = 3\n")
    assert cli.main(["backends"]) == 2
    assert "plugins.allow" in capsys.readouterr().err
    monkeypatch.setattr(plugins, "_default", None)


# --- the hook contract version ------------------------------------------------------------


@pytest.mark.parametrize("version", [CONTRACT_VERSION + 1, CONTRACT_VERSION + 7])
def test_a_plugin_for_another_contract_version_is_refused_naming_both(version: int) -> None:
    plugin = ContractTestBackend("future", contract_version=version).plugin()
    registry = PluginRegistry()
    with pytest.raises(PluginContractError) as info:
        registry.register(plugin)
    message = str(info.value)
    assert f"contract version {version}" in message
    assert f"this pyvmm supports versions {MIN_CONTRACT_VERSION} to {CONTRACT_VERSION}" in message
    assert "'future'" in message
    assert registry.backends == {}


def test_the_contract_version_is_public() -> None:
    assert pyvmm.CONTRACT_VERSION == CONTRACT_VERSION >= 1
