"""pytest plugin (entry point ``pytest11``): ``--pyvmm-backend NAME`` runs pyvmm's
conformance suite against the installed backend NAME.

With the option, the suite is added to the collected tests (pass
``--pyvmm-no-conformance`` to only select the backend for your own tests) and the
``pyvmm_backend`` fixture yields that backend.  Scenarios a backend's capabilities
excuse are reported as skipped, with the capability named, and the terminal
summary ends with one line per scenario: PASS, FAIL, ERROR or SKIP (with the
reason), so a vendor sees at a glance what their backend does and does not do.

A NAME that no installed plugin provides (or one that is broken or denied by
the plugin policy) is a usage error before anything is collected; a backend
that is installed but cannot run on this host skips every test that needs it,
with the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pytest import TestReport

CONFORMANCE_DIR = Path(__file__).parent / "conformance"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pyvmm")
    group.addoption(
        "--pyvmm-backend",
        action="store",
        default=None,
        metavar="NAME",
        help="run pyvmm's conformance suite against the installed backend NAME",
    )
    group.addoption(
        "--pyvmm-no-conformance",
        action="store_true",
        default=False,
        help="with --pyvmm-backend: do not add the conformance suite to the collected tests",
    )


def pytest_configure(config: pytest.Config) -> None:
    name = config.getoption("pyvmm_backend")
    if name and not config.getoption("pyvmm_no_conformance"):
        suite = str(CONFORMANCE_DIR)
        if suite not in config.args:
            config.args.append(suite)
    config.addinivalue_line("markers", "pyvmm_backend(name): run this test against the named backend")


def _virtualenv_of(path: Path) -> Path | None:
    for directory in (path, *path.parents):
        if (directory / "pyvenv.cfg").is_file() or (directory / "conda-meta").is_dir():
            return directory
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Keep the suite collectable when pyvmm is installed in a virtualenv inside
    the directory pytest collects (a project's ``.venv``): pytest prunes a
    virtualenv, and the suite in it, when it recurses into the project.  The
    path down to the suite is kept; the rest of the virtualenv stays pruned."""
    if not config.getoption("pyvmm_backend") or config.getoption("pyvmm_no_conformance"):
        return None
    # Absolute, not resolved: a venv's lib64 is a symlink to lib, and following
    # it would collect the suite twice.
    suite = Path(os.path.abspath(CONFORMANCE_DIR))
    venv = _virtualenv_of(suite)
    if venv is None:
        return None
    path = Path(os.path.abspath(collection_path))
    if path != venv and venv not in path.parents:
        return None
    if path == suite or path in suite.parents:
        return False
    if suite in path.parents:
        return None
    return True


def pytest_sessionstart(session: pytest.Session) -> None:
    """One usage error, not a traceback per test, for a backend that is not there."""
    name = session.config.getoption("pyvmm_backend")
    if not name:
        return
    from pyvmm.errors import BackendNotFound
    from pyvmm.plugins import default_registry

    try:
        default_registry().get(name)
    except BackendNotFound as exc:
        raise pytest.UsageError(f"--pyvmm-backend {name}: {exc}") from None


#: Stash key: node id -> file of each collected conformance scenario.
_SCENARIOS = pytest.StashKey[dict[str, Path]]()


def pytest_itemcollected(item: pytest.Item) -> None:
    if item.config.getoption("pyvmm_backend"):
        path = Path(item.path)
        if path.parent.resolve() == CONFORMANCE_DIR.resolve():
            item.config.stash.setdefault(_SCENARIOS, {})[item.nodeid] = path


@pytest.fixture(scope="session")
def pyvmm_backend(request: pytest.FixtureRequest) -> object:
    """The backend under test, from ``--pyvmm-backend`` (skips the test without it)."""
    name = request.config.getoption("pyvmm_backend")
    if not name:
        pytest.skip("no backend under test: pass --pyvmm-backend NAME")
    from pyvmm.errors import BackendUnavailable
    from pyvmm.vm import get_backend

    try:
        return get_backend(name)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))


def _scenario(report: TestReport, config: pytest.Config) -> str | None:
    """``module::test`` for a report of a conformance scenario, else None."""
    path = config.stash.get(_SCENARIOS, {}).get(report.nodeid)
    if path is None:
        # Not collected in this process (pytest-xdist's controller): a report's
        # location is relative to the rootdir, wherever pytest was started.
        try:
            path = (config.rootpath / report.location[0]).resolve()
        except (OSError, ValueError):
            return None
        if path.parent != CONFORMANCE_DIR.resolve():
            return None
    test = report.nodeid.split("::", 1)[1] if "::" in report.nodeid else report.nodeid
    return f"{path.name}::{test}"


def _skip_reason(report: TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    """One line per conformance scenario for the backend under test."""
    name = config.getoption("pyvmm_backend")
    if not name:
        return
    outcomes: dict[str, tuple[str, str]] = {}
    rank = {"PASS": 0, "SKIP": 1, "FAIL": 2, "ERROR": 3}
    for key, label in (("passed", "PASS"), ("skipped", "SKIP"), ("failed", "FAIL"), ("error", "ERROR")):
        for report in terminalreporter.stats.get(key, []):
            if not isinstance(report, TestReport):
                continue
            scenario = _scenario(report, config)
            if scenario is None or (label == "PASS" and report.when != "call"):
                continue
            detail = _skip_reason(report) if label == "SKIP" else ""
            if label == "ERROR":
                detail = f"in {report.when}"
            previous = outcomes.get(scenario)
            # A failing teardown after a passing call still fails the scenario.
            if previous is None or rank[label] > rank[previous[0]]:
                outcomes[scenario] = (label, detail)
    if not outcomes:
        return
    terminalreporter.section(f"pyvmm conformance: backend {name!r}")
    for scenario in sorted(outcomes):
        label, detail = outcomes[scenario]
        line = f"{label:<5} {scenario}"
        terminalreporter.write_line(f"{line}  ({detail})" if detail else line)
    counts = {label: sum(1 for o, _ in outcomes.values() if o == label) for label in rank}
    terminalreporter.write_line(
        f"{len(outcomes)} scenarios: {counts['PASS']} passed, {counts['FAIL']} failed, "
        f"{counts['ERROR']} errors, {counts['SKIP']} skipped"
    )
