#!/usr/bin/env python3
"""Mutation testing of a driver model: do the tests notice every rule and
behaviour of the model taken away?

The mutants of a model (default: the Gunyah model,
``plugins/pyvmm-gunyah/src/pyvmm_gunyah/model.py``):

``rule``       each ``raise RuleViolation(...)`` statement becomes ``pass`` (the
               model accepts what the driver refuses);
``advise``     each ``....advise(...)`` call becomes ``pass`` (an advisory rule
               no longer recorded);
``behaviour``  each statement whose first line carries a ``# behaviour: <name>``
               comment: the condition of an ``if``/``elif``/``while`` is negated,
               any other statement becomes ``pass``.

Each mutant runs the plugin's tests (``pytest -x --pyvmm-backend NAME`` on a
temporary copy of the plugin's ``src`` and ``tests``, put first on
``PYTHONPATH`` so the copy is what gets imported), with a per-mutant timeout; at
most ``--jobs`` mutants run at once (2 by default: every mutant runs a full
pytest).  A mutant is *killed* when the tests fail (or time out), *survives*
when they pass.  The report gives the kill ratio and lists the survivors; the
exit status is 0 only when every mutant was killed and the unmutated model
passed.  Run from the repository with pyvmm and the plugin installed::

    python tools/mutate_model.py                  # every mutant of the Gunyah model
    python tools/mutate_model.py --list           # what would be mutated
    python tools/mutate_model.py --only immediate-exit --only GH-MEM-WRAP
"""

from __future__ import annotations

import argparse
import ast
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tokenize
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PLUGIN = REPO / "plugins" / "pyvmm-gunyah"
MARKER = "# behaviour:"


@dataclass(frozen=True)
class Mutant:
    """One change to the model's source: the text of lines ``first..last``
    (1-based, inclusive) replaced by ``replacement`` (same number of lines)."""

    kind: str  # "rule", "advise", "behaviour"
    name: str  # the rule's variable name or the behaviour's marker name
    line: int
    first: int
    last: int
    replacement: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.name}@{self.line}"

    def apply(self, lines: list[str]) -> list[str]:
        return lines[: self.first - 1] + list(self.replacement) + lines[self.last :]


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _blank_statement(lines: list[str], node: ast.stmt) -> tuple[int, int, tuple[str, ...]]:
    """Replace a whole statement by ``pass`` (padding with empty lines)."""
    first, last = node.lineno, node.end_lineno or node.lineno
    indent = _indent(lines[first - 1])
    return first, last, (f"{indent}pass",) + ("",) * (last - first)


def _negate_test(lines: list[str], node: ast.If | ast.While) -> tuple[int, int, tuple[str, ...]]:
    """Wrap the statement's condition in ``not (...)``."""
    test = node.test
    first, last = test.lineno, test.end_lineno or test.lineno
    segment = lines[first - 1 : last]
    start, end = test.col_offset, test.end_col_offset or 0
    # Columns are byte offsets into UTF-8: convert per affected line.
    head = segment[0].encode()
    tail = segment[-1].encode()
    if first == last:
        text = head[:start] + b"not (" + head[start:end] + b")" + head[end:]
        return first, last, (text.decode(),)
    new_first = (head[:start] + b"not (" + head[start:]).decode()
    new_last = (tail[:end] + b")" + tail[end:]).decode()
    return first, last, (new_first, *segment[1:-1], new_last)


def _rule_name(call: ast.expr) -> str:
    if isinstance(call, ast.Call) and call.args:
        arg = call.args[0]
        if isinstance(arg, ast.Name):
            return arg.id
        if isinstance(arg, ast.Attribute):
            return arg.attr
    return "?"


def _is_call_to(node: ast.expr | None, name: str) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    return (isinstance(func, ast.Name) and func.id == name) or (isinstance(func, ast.Attribute) and func.attr == name)


def mutants(source: str) -> list[Mutant]:
    """Every mutant of ``source``, in line order."""
    lines = source.splitlines()
    tree = ast.parse(source)
    comments = {
        token.start[0]: token.string
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    }
    found: list[Mutant] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.stmt):
            continue
        comment = comments.get(node.lineno, "")
        if isinstance(node, ast.Raise) and _is_call_to(node.exc, "RuleViolation"):
            assert node.exc is not None
            found.append(Mutant("rule", _rule_name(node.exc), node.lineno, *_blank_statement(lines, node)))
        elif isinstance(node, ast.Expr) and _is_call_to(node.value, "advise"):
            found.append(Mutant("advise", _rule_name(node.value), node.lineno, *_blank_statement(lines, node)))
        if MARKER in comment:
            name = comment.split(MARKER, 1)[1].strip().split()[0]
            if isinstance(node, (ast.If, ast.While)):
                change = _negate_test(lines, node)
            else:
                change = _blank_statement(lines, node)
            found.append(Mutant("behaviour", name, node.lineno, *change))
    marked = sum(MARKER in comment for comment in comments.values())
    behaviours = sum(m.kind == "behaviour" for m in found)
    if marked != behaviours:
        raise SystemExit(f"{marked} '{MARKER}' markers but {behaviours} marked statements: a marker is misplaced")
    return sorted(found, key=lambda m: (m.line, m.kind))


@dataclass
class Result:
    mutant: Mutant | None  # None: the unmutated model
    killed: bool
    outcome: str  # "failed", "passed", "timeout", "error"
    seconds: float
    tail: str


def _copy_plugin(plugin: Path, into: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache")
    shutil.copytree(plugin / "src", into / "src", ignore=ignore)
    shutil.copytree(plugin / "tests", into / "tests", ignore=ignore)


def run_tests(
    plugin: Path, model: Path, mutated: str | None, *, backend: str, timeout: float, extra: list[str]
) -> Result:
    """The plugin's tests on a copy of it whose model is ``mutated`` (None: as is)."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pyvmm-mutant-") as tmp:
        root = Path(tmp)
        _copy_plugin(plugin, root)
        if mutated is not None:
            (root / model.relative_to(plugin)).write_text(mutated)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
        command += ["--pyvmm-backend", backend, *extra, str(root / "tests")]
        try:
            done = subprocess.run(
                command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return Result(None, True, "timeout", time.monotonic() - started, "")
        output = (done.stdout + done.stderr).strip().splitlines()
        tail = "\n".join(output[-3:])
        if done.returncode == 0:
            return Result(None, False, "passed", time.monotonic() - started, tail)
        return Result(None, True, "failed" if done.returncode == 1 else "error", time.monotonic() - started, tail)


def _selected(all_mutants: list[Mutant], only: list[str]) -> Iterator[Mutant]:
    for mutant in all_mutants:
        if not only or any(key in (mutant.name, mutant.id, mutant.kind) for key in only):
            yield mutant


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plugin", type=Path, default=DEFAULT_PLUGIN, help="the plugin's directory (src/, tests/)")
    parser.add_argument("--model", type=Path, help="the model module (default: <plugin>/src/<package>/model.py)")
    parser.add_argument("--backend", default="gunyah", help="the backend name for --pyvmm-backend")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once (default 2)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant (default 300)")
    parser.add_argument("--only", action="append", default=[], help="a mutant id, name or kind (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--no-conformance", action="store_true", help="skip pyvmm's conformance suite")
    args = parser.parse_args(argv)

    plugin = args.plugin.resolve()
    model = args.model.resolve() if args.model else next((plugin / "src").glob("*/model.py"))
    source = model.read_text()
    lines = source.splitlines()
    chosen = list(_selected(mutants(source), args.only))
    if args.list:
        for mutant in chosen:
            print(f"{mutant.id:55} {lines[mutant.line - 1].strip()[:70]}")
        print(f"{len(chosen)} mutants of {model.relative_to(REPO) if model.is_relative_to(REPO) else model}")
        return 0
    extra = ["--pyvmm-no-conformance"] if args.no_conformance else []

    baseline = run_tests(plugin, model, None, backend=args.backend, timeout=args.timeout, extra=extra)
    print(f"unmutated model: {baseline.outcome} ({baseline.seconds:.1f} s)", flush=True)
    if baseline.outcome != "passed":
        print(baseline.tail)
        print("the tests must pass on the unmutated model first")
        return 2

    def test(mutant: Mutant) -> Result:
        mutated = "\n".join(mutant.apply(lines)) + "\n"
        compile(mutated, str(model), "exec")  # a mutant must be valid Python
        result = run_tests(plugin, model, mutated, backend=args.backend, timeout=args.timeout, extra=extra)
        result.mutant = mutant
        verdict = "killed " if result.killed else "SURVIVED"
        print(f"{verdict} {mutant.id:55} {result.outcome:8} {result.seconds:5.1f} s", flush=True)
        return result

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(test, chosen))
    killed = [r for r in results if r.killed]
    survivors = [r for r in results if not r.killed]
    by_kind: dict[str, list[int]] = {}
    for result in results:
        assert result.mutant is not None
        tally = by_kind.setdefault(result.mutant.kind, [0, 0])
        tally[0] += result.killed
        tally[1] += 1
    print()
    print(f"model: {model.relative_to(REPO) if model.is_relative_to(REPO) else model}")
    for kind, (dead, total) in sorted(by_kind.items()):
        print(f"  {kind:10} {dead}/{total} killed")
    ratio = len(killed) / len(results) if results else 1.0
    print(f"kill ratio: {len(killed)}/{len(results)} ({ratio:.0%}) in {time.monotonic() - started:.0f} s")
    if survivors:
        print("survivors:")
        for result in survivors:
            assert result.mutant is not None
            print(f"  {result.mutant.id}: {lines[result.mutant.line - 1].strip()}")
    return 0 if not survivors else 1


if __name__ == "__main__":
    raise SystemExit(main())
