"""What ``pyvmm`` commands import: only what the command needs (start-up time,
issue 19).  Checked in fresh interpreters, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pyvmm.cli

CHECK = """
import json, sys
from pyvmm.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print(json.dumps(sorted(m for m in sys.modules if m in {modules!r})), file=sys.stderr)
"""

WATCHED = ["pyvmm.cli_run", "pyvmm.machine.machine", "pyvmm.machine.config", "pycparser"]


def _imported(argv: list[str]) -> list[str]:
    code = CHECK.format(argv=argv, modules=WATCHED)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    return list(json.loads(done.stderr.strip().splitlines()[-1]))


def test_pyvmm_backends_imports_neither_the_run_command_nor_the_machine() -> None:
    _imported(["backends", "--json"])  # the first run may fill the cffi cache (and parse)
    assert _imported(["backends", "--json"]) == []


def test_help_lists_run_without_importing_it() -> None:
    assert _imported(["--help"]) == []
    help_text = pyvmm.cli.build_parser(with_run=False).format_help()
    assert "run" in help_text and pyvmm.cli.RUN_HELP in " ".join(help_text.split())


def test_the_run_command_gets_its_real_parser() -> None:
    assert "pyvmm.cli_run" in _imported(["run", "--help"])
    full = pyvmm.cli.build_parser().format_help()
    stand_in = pyvmm.cli.build_parser(with_run=False).format_help()
    assert full == stand_in, "the stand-in lists run exactly as the real parser does"
