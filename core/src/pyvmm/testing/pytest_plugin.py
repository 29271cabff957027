"""pytest plugin (entry point ``pytest11``): ``--pyvmm-backend NAME`` runs pyvmm's
conformance suite against the installed backend NAME.

With the option, the suite is added to the collected tests (pass
``--pyvmm-no-conformance`` to only select the backend for your own tests) and the
``pyvmm_backend`` fixture yields that backend.  Scenarios a backend's capabilities
excuse are reported as skipped, with the capability named.
"""

from __future__ import annotations

from pathlib import Path

import pytest

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
