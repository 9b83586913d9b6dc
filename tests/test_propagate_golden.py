"""Propagation's full output on a few hundred generated cases, pinned in a golden file.

The speed work on ``flordb_build.rewrite`` (issue 13's Speed point) must not move a single
placement or refusal. Each case propagates today's version into an old one and records everything
the result says: the rewritten source (as its SHA-256: byte for byte), each placement (name,
depth, line, anchor, module) and each refusal (name, reason), the names logged already, or the
error. The golden file was written by the propagate of main before the optimization
(``FLORDB_WRITE_GOLDEN=1`` writes it again, on purpose only).

Cases: every ordered pair of scripts in one test of tests/test_rewrite.py; every version of the
replay corpus with each of today's hindsight statements alone and all together (project-wide, and
the entry script alone); synthetic edits of the corpus's versions (a changed literal, a renamed
variable, a deleted and an inserted statement, a statement moved into a new method); and the
generated scripts of bench/bench_propagate.py.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from textwrap import dedent
from typing import Any

import pytest

from flordb_build.errors import RewriteError
from flordb_build.rewrite import ProjectPropagationResult, PropagationResult, propagate, propagate_project
from tests.replay_harness import load_corpus

HERE = Path(__file__).parent
GOLDEN = HERE / "propagate_golden.json"
REWRITE_TESTS = HERE / "test_rewrite.py"
BENCH = HERE.parent / "bench"

Case = tuple[str, Callable[[], Any]]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _single(result: PropagationResult) -> dict[str, Any]:
    return {
        "source": _digest(result.source),
        "placed": [[p.name, p.position.value, p.line, p.anchor, p.path] for p in result.placed],
        "not_placed": [[n.name, n.reason] for n in result.not_placed],
        "already_logged": list(result.already_logged),
    }


def _project(result: ProjectPropagationResult) -> dict[str, Any]:
    return {
        "modules": {path: _single(r) for path, r in result.modules.items()},
        "not_placed": [[n.name, n.reason] for n in result.not_placed],
        "already_logged": list(result.already_logged),
    }


def _outcome(call: Callable[[], Any]) -> dict[str, Any]:
    try:
        result = call()
    except RewriteError as exc:
        return {"error": str(exc)}
    return _project(result) if isinstance(result, ProjectPropagationResult) else _single(result)


# -- cases -------------------------------------------------------------------------------------------


def _rewrite_test_scripts() -> Iterator[tuple[str, list[str]]]:
    """Per test function (and module-level constants) of test_rewrite.py: the scripts it spells."""
    tree = ast.parse(REWRITE_TESTS.read_text(encoding="utf-8"))
    constants: list[str] = []
    for node in tree.body:
        texts = [
            dedent(n.value).lstrip("\n")
            for n in ast.walk(node)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and "\n" in n.value
        ]
        texts = [t for t in dict.fromkeys(texts) if _parses(t)]
        if isinstance(node, ast.FunctionDef):
            yield node.name, texts
        else:
            constants += texts
    yield "module constants", constants


def _parses(text: str) -> bool:
    try:
        ast.parse(text)
    except SyntaxError:
        return False
    return "flor" in text


def _pair_cases() -> Iterator[Case]:
    for test, scripts in _rewrite_test_scripts():
        for i, today in enumerate(scripts):
            for j, old in enumerate(scripts):
                if i != j:
                    yield f"test_rewrite {test} {i}<-{j}", lambda t=today, o=old: propagate(t, o)


def _corpus_cases() -> Iterator[Case]:
    for script in load_corpus():
        today = script.versions[-1].files
        names = [s.name for s in script.statements]
        entry = script.script
        for version in script.versions:
            old = version.recorded_files()
            key = f"corpus {script.key} {version.name}"
            yield f"{key} all", lambda t=today, o=old: propagate_project(t, o)
            yield f"{key} entry alone", lambda t=today, o=old, e=entry: propagate(t[e], o[e])
            for name in names:
                yield f"{key} {name}", lambda t=today, o=old, n=name: propagate_project(t, o, [n])
            for number, edited in enumerate(_edits(old[entry])):
                files = {**old, entry: edited}
                yield f"{key} edit {number}", lambda t=today, o=files: propagate_project(t, o)


_NUMBER = re.compile(r"(?<![\w.])(\d+\.\d+|\d+)(?![\w.])")
_ASSIGNED = re.compile(r"^(\s+)([a-z_][a-z0-9_]*) = ")


def _edits(text: str) -> Iterator[str]:
    """Deterministic edits of an old version, the kinds recorded versions show."""
    lines = text.splitlines(keepends=True)
    code_lines = [
        i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith(("#", "@"))
    ]
    # a changed literal, at three places
    numbered = [i for i in code_lines if _NUMBER.search(lines[i]) and "flor.loop" not in lines[i]]
    for i in numbered[:: max(1, len(numbered) // 3)][:3]:
        yield "".join(
            [*lines[:i], _NUMBER.sub(lambda m: m.group(1) + "7", lines[i], count=1), *lines[i + 1 :]]
        )
    # a renamed variable (every use in the file)
    assigned = [m.group(2) for i in code_lines if (m := _ASSIGNED.match(lines[i]))]
    for name in assigned[:: max(1, len(assigned) // 2)][:2]:
        yield re.sub(rf"\b{name}\b", f"{name}_v", text)
    # a deleted simple statement, and an inserted one after it
    simple = [
        i
        for i in code_lines
        if _ASSIGNED.match(lines[i])
        and not lines[i].rstrip().endswith(("(", "[", "{", ",", ":", "\\"))
        and (i + 1 == len(lines) or _indent(lines[i + 1]) <= _indent(lines[i]) or not lines[i + 1].strip())
    ]
    for i in simple[:: max(1, len(simple) // 3)][:3]:
        yield "".join([*lines[:i], *lines[i + 1 :]])
        yield "".join([*lines[: i + 1], f"{' ' * _indent(lines[i])}extra_{i} = {i}\n", *lines[i + 1 :]])


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _bench_cases() -> Iterator[Case]:
    sys.path.insert(0, str(BENCH))
    try:
        from bench_propagate import NAMES, script
    finally:
        sys.path.remove(str(BENCH))
    for lines, versions in ((150, 8), (1000, 3)):
        today = script(lines, versions, today=True)
        for v in range(versions):
            old = script(lines, v)
            yield f"bench {lines} lines v{v}", lambda t=today, o=old: propagate(t, o, NAMES)
        yield f"bench {lines} lines today into itself", lambda t=today: propagate(t, t, NAMES)


def _method_cases() -> Iterator[Case]:
    """Statements in methods and helper modules, with the method edited or missing in the old one."""
    model = dedent("""
        import flordb_build as flor


        class Net:
            def __init__(self, width):
                self.width = width
                self.scale = 1.0 / width

            def forward(self, x):
                h = [v * self.scale for v in x]
                flor.log("h_sum", sum(h))
                return sum(h)
    """).lstrip("\n")
    main = dedent("""
        import flordb_build as flor
        from model import Net

        net = Net(4)
        for epoch in flor.loop("epoch", range(2)):
            for step in flor.loop("step", range(3)):
                loss = net([epoch, step])
            flor.log("loss", loss)
    """).lstrip("\n")
    variants = {
        "same": model,
        "edited scale": model.replace("1.0 / width", "2.0 / width"),
        "renamed h": model.replace("h = [", "hidden = [").replace("return sum(h)", "return sum(hidden)"),
        "no forward": model.split("    def forward")[0],
        "forward inline": model.replace(
            "    def forward(self, x):\n", "    def forward(self, x):\n        pass\n"
        ),
    }
    for label, old_model in variants.items():
        stripped = old_model.replace('        flor.log("h_sum", sum(h))\n', "")
        yield (
            f"methods {label}",
            lambda o=stripped: propagate_project(
                {"main.py": main, "model.py": model}, {"main.py": main, "model.py": o}
            ),
        )
        yield f"methods {label} alone", lambda o=stripped: propagate(model, o)


def cases() -> list[Case]:
    """Every case, in a fixed order, with unique labels."""
    found = [*_pair_cases(), *_corpus_cases(), *_method_cases(), *_bench_cases()]
    labels = [label for label, _ in found]
    assert len(set(labels)) == len(labels), "case labels must be unique"
    return found


def outcomes() -> dict[str, dict[str, Any]]:
    """The outcome of every case with the propagate imported now."""
    return {label: _outcome(call) for label, call in cases()}


def test_propagation_output_is_unchanged_case_for_case() -> None:
    got = outcomes()
    if os.environ.get("FLORDB_WRITE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        pytest.skip(f"wrote {GOLDEN.name} ({len(got)} cases)")
    expected = json.loads(GOLDEN.read_text(encoding="utf-8"))
    assert sorted(got) == sorted(expected), "the set of cases changed: regenerate the golden file on main"
    differing = [label for label in expected if got[label] != expected[label]]
    shown = "\n".join(
        f"{label}:\n  golden {expected[label]}\n  now    {got[label]}" for label in differing[:5]
    )
    assert not differing, f"{len(differing)} of {len(expected)} cases differ, the first ones:\n{shown}"


def test_the_golden_cases_cover_placements_refusals_and_errors() -> None:
    # the golden file is only worth something when it pins each kind of outcome, many times over
    expected = json.loads(GOLDEN.read_text(encoding="utf-8"))
    results = [r for r in expected.values() if "error" not in r]
    singles = [r for r in results if "source" in r] + [
        m for r in results for m in r.get("modules", {}).values()
    ]
    placed = sum(len(r["placed"]) for r in singles)
    refused = sum(len(r["not_placed"]) for r in singles) + sum(len(r["not_placed"]) for r in results)
    assert len(expected) >= 250
    assert placed >= 300 and refused >= 100
    assert sum(1 for r in expected.values() if "error" in r) >= 1
