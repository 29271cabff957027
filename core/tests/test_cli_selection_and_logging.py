"""``pyvmm run`` says which backend runs the guest and why; auto-selection
follows --arch; -q, -v, --log-level and $PYVMM_LOG set what reaches stderr;
--gdb is refused on a backend that cannot debug."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from coretests_support import MakeBackend

from pyvmm import cli, cli_log
from pyvmm.capabilities import Capability
from pyvmm.config import Arch
from pyvmm.plugins import ENV_BACKEND, PluginRegistry

CAPS = (Capability.PORT_IO, Capability.IMMEDIATE_EXIT, Capability.VCPU_REGISTERS, Capability.MULTI_VCPU)


@pytest.fixture(autouse=True)
def _logging_back_to_default(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(cli_log.ENV_LOG, raising=False)
    yield
    monkeypatch.delenv(cli_log.ENV_LOG, raising=False)
    cli_log.configure()


def lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def test_the_backend_line_names_the_backend_why_and_the_arch(
    make_backend: MakeBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    make_backend(CAPS, name="halts", arches=(Arch.X86_64,))
    assert cli.main(["run", "--backend", "halts", "--serial", "none"]) == 0
    assert lines(capsys.readouterr().err)[0] == "pyvmm: backend halts (--backend), x86_64 guest"


def test_the_environment_and_best_available_are_named(
    make_backend: MakeBackend, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    make_backend(CAPS, name="fast", arches=(Arch.X86_64,), priority=50, auto_select=True, available=False)
    make_backend(CAPS, name="slow", arches=(Arch.X86_64,), priority=10, auto_select=True)
    assert cli.main(["run", "--serial", "none"]) == 0
    first = lines(capsys.readouterr().err)[0]
    assert first.startswith("pyvmm: backend slow (best available; fast unavailable: ")
    assert first.endswith("), x86_64 guest")
    monkeypatch.setenv(ENV_BACKEND, "slow")
    assert cli.main(["run", "--serial", "none"]) == 0
    assert lines(capsys.readouterr().err)[0] == f"pyvmm: backend slow (${ENV_BACKEND}), x86_64 guest"


def test_auto_selection_takes_the_arch_into_account(
    make_backend: MakeBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    make_backend(CAPS, name="x86only", arches=(Arch.X86_64,), priority=100, auto_select=True)
    make_backend(CAPS, name="both", arches=(Arch.X86_64, Arch.AARCH64), priority=10, auto_select=True)
    assert cli.main(["run", "--arch", "aarch64", "--serial", "none"]) == 0
    first = lines(capsys.readouterr().err)[0]
    assert first == "pyvmm: backend both (best available for aarch64; x86only runs no aarch64 guests), aarch64 guest"
    assert cli.main(["run", "--serial", "none"]) == 0
    assert lines(capsys.readouterr().err)[0] == "pyvmm: backend x86only (best available), x86_64 guest"


def test_registry_select_filters_by_arch(registry: PluginRegistry, make_backend: MakeBackend) -> None:
    make_backend(CAPS, name="x86only", arches=(Arch.X86_64,), priority=100, auto_select=True)
    with pytest.raises(Exception, match="no backend available on this host runs aarch64 guests"):
        registry.select(None, arch=Arch.AARCH64)
    assert registry.select(None, arch=Arch.X86_64).name == "x86only"


def test_quiet_drops_the_line_and_verbose_adds_info(
    make_backend: MakeBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    make_backend(CAPS, name="halts", arches=(Arch.X86_64,))
    assert cli.main(["run", "-q", "--backend", "halts", "--serial", "none"]) == 0
    assert "pyvmm: backend" not in capsys.readouterr().err
    assert cli.main(["-q", "run", "--backend", "halts", "--serial", "none"]) == 0  # before the command too
    assert "pyvmm: backend" not in capsys.readouterr().err
    assert cli.main(["run", "-v", "--backend", "halts", "--serial", "none"]) == 0
    assert logging.getLogger("pyvmm").getEffectiveLevel() == logging.INFO
    assert cli.main(["run", "-vv", "--backend", "halts", "--serial", "none"]) == 0
    assert logging.getLogger("pyvmm").getEffectiveLevel() == logging.DEBUG


def test_log_level_and_the_environment(
    make_backend: MakeBackend, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    make_backend(CAPS, name="halts", arches=(Arch.X86_64,))
    monkeypatch.setenv(cli_log.ENV_LOG, "warning,pyvmm.gdbstub=debug")
    assert cli.main(["run", "--backend", "halts", "--serial", "none"]) == 0
    assert "pyvmm: backend" not in capsys.readouterr().err
    assert logging.getLogger("pyvmm.gdbstub").level == logging.DEBUG
    assert cli.main(["run", "--log-level", "notice", "--backend", "halts", "--serial", "none"]) == 0  # the option wins
    assert "pyvmm: backend halts" in capsys.readouterr().err
    assert logging.getLogger("pyvmm.gdbstub").level == logging.DEBUG  # still: $PYVMM_LOG's per-logger part


def test_a_bad_level_is_a_usage_error(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["run", "--log-level", "loud"])
    assert info.value.code == 2
    assert "--log-level: unknown log level 'loud' (use debug, info, notice, warning, error)" in capsys.readouterr().err
    monkeypatch.setenv(cli_log.ENV_LOG, "chatty")
    with pytest.raises(SystemExit):
        cli.main(["backends"])
    assert f"${cli_log.ENV_LOG}: unknown log level 'chatty'" in capsys.readouterr().err


def test_a_mistyped_option_gets_a_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["run", "--legacy_bios"])
    assert "unrecognized arguments: --legacy_bios (did you mean --legacy-bios?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["run", "--kernal", "x"])
    assert "--kernal (did you mean --kernel?)" in capsys.readouterr().err


def test_gdb_is_refused_on_a_backend_without_guest_debug(
    make_backend: MakeBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    test_backend, _ = make_backend(CAPS, name="nodebug", arches=(Arch.X86_64,))
    assert cli.main(["run", "--backend", "nodebug", "--gdb", "tcp::0", "--serial", "none"]) == 2
    err = capsys.readouterr().err
    assert "pyvmm: error: backend 'nodebug' does not support GUEST_DEBUG (needed for --gdb: the gdb stub" in err
    assert test_backend.vms == []  # refused before any VM exists


def test_a_bad_gdb_address_names_the_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--gdb", "tcp:host:port"]) == 2
    assert "--gdb: 'tcp:host:port': the port must be a number" in capsys.readouterr().err


def test_a_port_in_use_is_a_configuration_error(make_backend: MakeBackend, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    make_backend((*CAPS, Capability.GUEST_DEBUG), name="debuggable", arches=(Arch.X86_64,))
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert cli.main(["run", "--backend", "debuggable", "--gdb", f"tcp:127.0.0.1:{port}"]) == 2
    assert f"pyvmm: error: --gdb: cannot listen on 127.0.0.1:{port}: " in capsys.readouterr().err
