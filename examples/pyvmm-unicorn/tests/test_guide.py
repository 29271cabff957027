"""docs/writing-a-backend.md stays in step with the contract it explains (every
hook and every capability of this pyvmm is named in it) and works as written (a
vendor following sections 2 and 7 literally ends with a passing backend of their
own).  Runs inside pyvmm's repository only (a copy of this example deletes the file)."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import zipfile
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


# --- the guide followed literally ------------------------------------------------

#: The sections whose shell blocks a vendor runs, in order: start from the example
#: (2), test with the conformance suite and tox (7).
RUN_SECTIONS = ("2", "7")
#: Set by tox's ``example`` environment: the walk-through installs pyvmm-core, the
#: copy and tox into fresh environments (about a minute), so it runs there only.
ENV_GUIDE_TEST = "PYVMM_GUIDE_TEST"


def guide_script(text: str) -> str:
    """The shell blocks of the sections a vendor follows, as one bash script; an
    ``ini`` block there is the ``tox.ini`` the section shows."""
    lines = ["set -euxo pipefail"]
    for section in re.split(r"^## ", text, flags=re.M):
        if section.split(".", 1)[0] not in RUN_SECTIONS:
            continue
        for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", section, re.S | re.M):
            if lang == "sh":
                lines.append(body)
            elif lang == "ini":
                lines.append(f"cat > tox.ini <<'GUIDE_INI'\n{body}GUIDE_INI")
    return "\n".join(lines) + "\n"


def output_of(log: str, command: str) -> str:
    """What ``command`` printed in a ``bash -x`` log: the lines after its ``+``
    line, up to the next command."""
    start = log.index(f"\n+ {command}\n") + len(command) + 4
    following = log.find("\n+ ", start)
    return log[start : following if following >= 0 else len(log)]


def test_the_guide_script_covers_every_step(guide: str) -> None:
    script = guide_script(guide)
    for step in ("cp -r pyvmm/examples/pyvmm-unicorn pyvmm-acme", "pip install", "pyvmm backends", "tox -e acme"):
        assert step in script, step
    assert "cat > tox.ini" in script


@pytest.mark.skipif(os.environ.get(ENV_GUIDE_TEST) != "1", reason=f"slow: tox -e example sets {ENV_GUIDE_TEST}=1")
def test_the_guide_works_as_written(guide: str, tmp_path: Path) -> None:
    """Sections 2 and 7, command by command, in a scratch directory next to a
    "checkout" of pyvmm (this repository): copy and rename the example, install it
    with pyvmm-core from the checkout into a fresh virtual environment, list the
    backends, run the conformance suite with pytest and with the guide's tox.ini."""
    (tmp_path / "pyvmm").symlink_to(GUIDE.parents[1], target_is_directory=True)
    script = tmp_path / "guide.sh"
    script.write_text(guide_script(guide))
    # A vendor's shell: a Python >= 3.10 as python3, nothing of this test run's
    # environments, tox or pyvmm settings.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TOX_", "PYVMM_", "PYTEST_", "VIRTUAL_ENV", "PYTHON", "CONDA"))
    }
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")  # no pyvmm plugin policy from the user's config
    try:
        result = subprocess.run(
            ["bash", str(script)],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=900,
            check=False,
        )
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"the guide did not finish in {expired.timeout} s:\n{expired.output!r}"[-4000:])
    log = result.stdout
    assert result.returncode == 0, log[-6000:]

    backends = output_of(log, "pyvmm backends")
    assert backends.startswith("acme 0.1.0  [available]\n"), backends
    assert "from:         pyvmm-acme 0.1.0" in backends
    for run in re.findall(r"^\d+ scenarios: .*$", log, re.M):
        # skips are scenarios for capabilities the example does not declare
        assert re.fullmatch(r"\d+ scenarios: [1-9]\d* passed, 0 failed, 0 errors, \d+ skipped", run), run
    # section 2's pytest, section 7's two runs with the suite (not the one without), tox's
    assert len(re.findall(r"^\d+ scenarios: ", log, re.M)) == 4, log[-6000:]
    assert re.search(r"^  acme: OK ", log, re.M), "tox -e acme"

    copy = tmp_path / "pyvmm-acme"
    own = [p for p in copy.rglob("*") if p.is_file() and not {".venv", ".tox", "build"} & set(p.parts)]
    leftovers = [str(p.relative_to(copy)) for p in own if re.search(b"unicorn", p.read_bytes(), re.I)]
    assert leftovers == [], "the rename leaves 'unicorn' in these files"
    (wheel,) = (copy / ".tox" / "acme" / "tmp" / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {n.split("/")[0] for n in names} == {"pyvmm_acme", "pyvmm_acme-0.1.0.dist-info"}, names
    assert "Summary: pyvmm backend for the Acme hypervisor" in metadata
    assert 'description="the Acme hypervisor"' in (copy / "src" / "pyvmm_acme" / "manifest.py").read_text()
