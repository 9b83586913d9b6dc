"""LibCST modules of old versions assembled from cached parses of their top-level statements.

Old versions of one script share most of their code, and LibCST's parse is the largest cost of a
propagation (about half of it for a 1,000-line script). A module is cut into chunks at top-level
statement boundaries (per chunk: the blank and comment lines before a statement, then the
statement), each distinct chunk text that holds an indented block is parsed once (an LRU keyed by
the text, never by an object), and the module is put together from the chunks' statements.

The result is the tree a parse of the whole text gives: a cut is made only where that tree is
known to split there (the lines between two statements are empty or comments at column 0, which
LibCST gives to the next statement), and any text with something unusual (another newline
convention, a form feed, a byte-order mark, mixed indentation, a syntax LibCST rejects) is parsed
whole instead.

A cached statement node may sit in several modules, but never twice in one: the caller passes the
chunks it has used (one set per propagation), and a chunk used already is parsed afresh.
"""

from __future__ import annotations

import ast
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import libcst as cst

_CAPACITY = 4096  # chunks kept parsed: a few dozen versions of a 1,000-line script


@dataclass(frozen=True)
class _Chunk:
    """One chunk parsed: its statements (leading lines included) and what the module needs of it."""

    body: tuple[cst.SimpleStatementLine | cst.BaseCompoundStatement, ...]
    header: tuple[cst.EmptyLine, ...]  # only the first chunk has one: lines before the first statement
    footer: tuple[cst.EmptyLine, ...]  # only the last chunk has one
    indent: str | None  # the chunk's detected indentation, None when it has no indented block
    has_trailing_newline: bool
    encoding: str


_CHUNKS: OrderedDict[tuple[str, bool, bool], _Chunk] = OrderedDict()
_LOCK = threading.Lock()  # propagations may run on several threads (the LRU's moves are not atomic)


def parse_module(source: str, tree: ast.Module | None, used: set[tuple[str, bool, bool]] | None) -> cst.Module:
    """The LibCST module of ``source`` (whose ast is ``tree``), from cached chunks where possible.

    :param used: the chunks handed out already in this propagation; None parses the whole text.
    :raises cst.ParserSyntaxError: LibCST cannot parse ``source`` (reported as for a whole parse).
    """
    if used is None or tree is None:
        return cst.parse_module(source)
    cuts = _cuts(source, tree.body)
    if cuts is None:
        return cst.parse_module(source)
    lines = source.splitlines(keepends=True)
    chunks: list[_Chunk] = []
    begin = 0
    for number, end in enumerate(cuts):
        key = ("".join(lines[begin:end]), number == 0, number == len(cuts) - 1)
        begin = end
        try:
            chunk = _chunk(key, fresh=key in used)
        except cst.ParserSyntaxError:
            return cst.parse_module(source)  # raises with the whole text's line numbers
        if chunk is None:
            return cst.parse_module(source)
        used.add(key)
        chunks.append(chunk)
    indents = {c.indent for c in chunks if c.indent is not None}
    if len(indents) > 1:
        return cst.parse_module(source)  # blocks indented differently: only the whole text says which is default
    first, last = chunks[0], chunks[-1]
    return cst.Module(
        body=[stmt for c in chunks for stmt in c.body],
        header=first.header,
        footer=last.footer,
        encoding=first.encoding,
        default_indent=indents.pop() if indents else _DEFAULT_INDENT,
        default_newline="\n",
        has_trailing_newline=last.has_trailing_newline,
    )


_DEFAULT_INDENT = cst.Module(body=()).default_indent


def _cuts(source: str, body: Sequence[ast.stmt]) -> list[int] | None:
    """The line numbers each chunk ends at (the last one: the end of the text), or None when the
    text must be parsed whole."""
    if not body or "\r" in source or "\f" in source or source.startswith("\ufeff"):
        return None
    lines = source.splitlines(keepends=True)
    if len(lines) != source.count("\n") + (not source.endswith("\n")):
        return None  # str.splitlines breaks at characters (\x1c, \u2028, ...) that Python's lines do not
    cuts: list[int] = []
    previous_end = 0
    for number, stmt in enumerate(body):
        decorators = getattr(stmt, "decorator_list", None) or []
        start = min([stmt.lineno, *(d.lineno for d in decorators)])
        end = stmt.end_lineno if stmt.end_lineno is not None else stmt.lineno
        between = lines[previous_end:start - 1]
        if number and start > previous_end and all(line == "\n" or line.startswith("#") for line in between):
            cuts.append(previous_end)  # the previous chunk ends with its statement's last line
        previous_end = max(previous_end, end)
    cuts.append(len(lines))
    return cuts


def _chunk(key: tuple[str, bool, bool], fresh: bool) -> _Chunk | None:
    """The parsed chunk for ``key`` (text, is first, is last); None when it cannot stand alone."""
    if not fresh:
        with _LOCK:
            found = _CHUNKS.get(key)
            if found is not None:
                _CHUNKS.move_to_end(key)
                return found
    text, is_first, is_last = key
    module = cst.parse_module(text)
    if module.default_newline != "\n" or not module.body:
        return None
    if not is_last and (module.footer or not module.has_trailing_newline):
        return None
    body = list(module.body)
    header = tuple(module.header)
    if not is_first and header:
        # inside a module, the lines before a statement are its own leading lines
        body[0] = body[0].with_changes(leading_lines=[*header, *body[0].leading_lines])
        header = ()
    blocks = any(_has_indented_branch(node) for node in body)
    chunk = _Chunk(
        body=tuple(body),
        header=header,
        footer=tuple(module.footer),
        indent=module.default_indent if blocks else None,
        has_trailing_newline=module.has_trailing_newline,
        encoding=module.encoding,
    )
    # only chunks with an indented block are kept: a simple line costs less to parse again than to
    # keep (its objects would be walked by every later garbage collection of the process)
    if not fresh and blocks:
        with _LOCK:
            _CHUNKS[key] = chunk
            while len(_CHUNKS) > _CAPACITY:
                _CHUNKS.popitem(last=False)
    return chunk


def _has_indented_branch(node: cst.CSTNode) -> bool:
    """True when any branch of a compound statement (else, except, finally, elif, case) is indented."""
    if isinstance(node, cst.SimpleStatementLine):
        return False
    for child in node.children:
        if isinstance(child, cst.IndentedBlock):
            return True
        if isinstance(child, cst.If | cst.Else | cst.ExceptHandler | cst.ExceptStarHandler | cst.Finally
                      | cst.MatchCase) and _has_indented_branch(child):
            return True
    return False
