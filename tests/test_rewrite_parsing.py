"""A LibCST module assembled from cached statement parses is the tree a whole parse gives.

``flordb_build.rewrite._parsing`` cuts a module at top-level statements, parses each distinct chunk
once, and puts the module together again; propagation rewrites that tree and prints it, so it must
equal the whole parse field for field (comments, blank lines, indentation, header, footer).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path
from textwrap import dedent

import libcst as cst
import pytest

from flordb_build.rewrite._parsing import _has_indented_branch, parse_module
from tests.test_propagate_golden import _rewrite_test_scripts

HERE = Path(__file__).parent

TRICKY = {
    "comments and blank lines between statements": """
        #!/usr/bin/env python
        # header comment

        # first statement's comment
        import os


        # a comment before a def
        def f():
            x = 1
            # indented comment at the end of the body

        # column-0 comment after it
        y = 2  # trailing
        """,
    "indented comment deeper than the next statement": """
        def f():
            if x:
                y = 1
                    # deeper still
            # the def's level
        z = 3
        """,
    "blank line with spaces between statements": "def f():\n    return 1\n    \nx = 2\n",
    "decorators and a comment between them": """
        import functools
        @functools.cache
        # between decorators
        @staticmethod
        def g():
            pass
        class C(object):
            def m(self): return 1
        """,
    "semicolons and one-line suites": "a = 1; b = 2\nif a: b = 3\nelse:\n    b = 4\nwhile False: pass\n",
    "two-space indentation": "def f():\n  return 1\n\ndef g():\n  if True:\n    return 2\n",
    "mixed indentation": "def f():\n  return 1\n\ndef g():\n    return 2\n",
    "tabs": "def f():\n\treturn 1\n\nx = 1\n",
    "indentation only in brackets": "x = (\n  1,\n)\ny = [\n      2]\n",
    "no final newline": "import os\n\nx = 1",
    "no final newline after a block": "def f():\n    return 1",
    "only comments at the end": "x = 1\n\n# the end\n\n",
    "indented comment at the end": "def f():\n    return 1\n    # end\n",
    "backslash continuation": "x = 1 + \\\n    2\ny = 3\n",
    "multi-line string": 's = """\nline\n"""\nt = 1\n',
    "try except else finally": "try:\n    a = 1\nexcept (KeyError, ValueError) as e:\n    pass\nelse:\n    b = 2\nfinally:\n    c = 3\n",
    "match": "match x:\n    case 1:\n        y = 1\n    case _:\n        y = 2\nz = 1\n",
    "elif chain with one-line first branch": "if a: b = 1\nelif c:\n    d = 2\nelse: e = 3\n",
    "crlf newlines": "x = 1\r\ny = 2\r\n",
    "form feed": "x = 1\n\x0c\ny = 2\n",
    "byte-order mark": "\ufeffx = 1\n",
    "a line separator in a comment": "x = 1  # a\u2028b\n\ny = 2\n",
    "coding cookie": "# -*- coding: latin-1 -*-\nx = 1\n",
    "repeated identical statements": "x = 1\n\nx = 1\n\nx = 1\n\nx = 1\n\ny = 2\n",
    "async and with": "async def f():\n    async with a as b:\n        await b\nwith open('f') as g, open('h'):\n    pass\n",
}

# texts the assembly leaves to a whole parse: only the whole text tells how LibCST reads them
WHOLE = {"mixed indentation", "crlf newlines", "form feed", "byte-order mark", "a line separator in a comment"}


def _sources() -> Iterator[tuple[str, str]]:
    for label, text in TRICKY.items():
        yield label, dedent(text).lstrip("\n") if text.startswith("\n") else text
    for path in sorted((HERE / "replay_corpus").glob("*/*/*.py")):
        yield str(path.relative_to(HERE)), path.read_text(encoding="utf-8")
    for test, scripts in _rewrite_test_scripts():
        for number, text in enumerate(scripts):
            yield f"test_rewrite {test} {number}", text
    sys.path.insert(0, str(HERE.parent / "bench"))
    try:
        from bench_propagate import script
    finally:
        sys.path.remove(str(HERE.parent / "bench"))
    for version in range(3):
        yield f"bench v{version}", script(300, version)


SOURCES = dict(_sources())


def _assert_same(assembled: cst.Module, whole: cst.Module) -> None:
    assert assembled.deep_equals(whole)
    for field in ("header", "footer", "encoding", "default_indent", "default_newline", "has_trailing_newline"):
        got, expected = getattr(assembled, field), getattr(whole, field)
        if field in ("header", "footer"):
            assert len(got) == len(expected) and all(a.deep_equals(b) for a, b in zip(got, expected, strict=True))
        else:
            assert got == expected, field


def _tree(source: str) -> ast.Module | None:
    try:
        return ast.parse(source)
    except SyntaxError:  # (a str with a byte-order mark): ScriptIndex.parse passes None, a whole parse
        return None


def _ids(module: cst.Module) -> list[int]:
    found: list[int] = []

    class Collect(cst.CSTVisitor):
        def on_visit(self, node: cst.CSTNode) -> bool:
            found.append(id(node))
            return True

    module.visit(Collect())
    return found


@pytest.mark.parametrize("label", list(SOURCES))
def test_assembled_module_equals_the_whole_parse(label: str) -> None:
    source = SOURCES[label]
    whole = cst.parse_module(source)
    first = parse_module(source, _tree(source), set())
    again = parse_module(source, _tree(source), set())  # from the cache this time
    for assembled in (first, again):
        _assert_same(assembled, whole)
        assert assembled.code == whole.code
        ids = _ids(assembled)
        assert len(ids) == len(set(ids)), "a node sits twice in one module"
    # the assembly, not a whole parse, is what was compared: the second one came from the cache
    # (only statements with an indented block are kept)
    shared = [a for a, b in zip(first.body, again.body, strict=True) if a is b]
    kept = any(_has_indented_branch(s) for s in whole.body)
    assert bool(shared) == (label not in WHOLE and kept), "only the texts in WHOLE are parsed whole"


def test_versions_share_the_statements_they_have_in_common() -> None:
    one = "import os\n\n\ndef f():\n    return 1\n\n\nx = 1\n"
    two = "import os\n\n\ndef f():\n    return 1\n\n\nx = 2\n"
    used: set[tuple[str, bool, bool]] = set()
    a = parse_module(one, ast.parse(one), set())
    b = parse_module(two, ast.parse(two), used)
    assert a.body[1] is b.body[1]  # the def was parsed once
    assert a.body[2] is not b.body[2] and b.code == two
    # within one propagation (one set of used chunks) a chunk is never handed out twice
    c = parse_module(two, ast.parse(two), used)
    assert all(x is not y for x, y in zip(b.body, c.body, strict=True))
    _assert_same(c, cst.parse_module(two))
