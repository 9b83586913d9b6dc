"""Static analysis of one script: flor aliases, a statement index, loops, log sites and positions.

A script is parsed twice, by libcst (the tree that propagation rewrites, comments and formatting
included) and by :mod:`ast` (line numbers, names, calls), and the two statement trees are walked in
step, so every indexed statement carries both. Everything the analysis reads comes from the ast side
and Python's own :mod:`symtable`: LibCST's metadata providers (positions, scopes) cost a quarter of a
second per thousand lines, more than a whole propagation may take (see ``bench/bench_propagate.py``).
"""

from __future__ import annotations

import ast
import builtins
import re
import symtable
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import libcst as cst

from ..errors import RewriteError
from ._model import LogSite, LoopSite, Position, ScriptAnalysis, deepest
from ._parsing import parse_module

FLOR_MODULE = "flordb_build"
_CODEGEN = cst.Module(body=())
FlorKind = Literal["loop", "log"]
Block = cst.Module | cst.IndentedBlock
_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d[\w.]*|\S")
# methods that return the module itself, so `Net().to(device)` is still a Net
_SELF_RETURNING = frozenset({"to", "cuda", "cpu", "float", "double", "half", "bfloat16", "train", "eval",
                             "requires_grad_", "type", "share_memory"})


def node_code(node: cst.CSTNode) -> str:
    """The source text libcst generates for ``node``, stripped."""
    return _CODEGEN.code_for_node(node).strip()


def normalized(text: str) -> str:
    """Code with its whitespace runs collapsed: two spellings of one statement compare equal."""
    return " ".join(text.split())


def literal_str(expr: ast.expr | None) -> str | None:
    """The value of a plain string literal, None for anything computed."""
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        return expr.value
    return None


def call_arg(call: ast.Call, position: int, keyword: str) -> ast.expr | None:
    """The argument at ``position`` or passed as ``keyword=``, None when absent or starred."""
    positional = [a for a in call.args if not isinstance(a, ast.Starred)]
    if len(positional) > position:
        return positional[position]
    return next((k.value for k in call.keywords if k.arg == keyword), None)


def dotted_name(expr: ast.expr) -> str | None:
    """``a.b.c`` for a chain of attributes over a name, else None."""
    if isinstance(expr, ast.Name):
        return expr.id
    if isinstance(expr, ast.Attribute):
        base = dotted_name(expr.value)
        return f"{base}.{expr.attr}" if base is not None else None
    return None


@dataclass
class FlorNames:
    """The spellings under which a script reaches ``flordb_build.loop`` and ``flordb_build.log``."""

    modules: set[str] = field(default_factory=set)
    functions: dict[str, FlorKind] = field(default_factory=dict)

    def kind(self, call: ast.Call) -> FlorKind | None:
        """``"loop"`` or ``"log"`` when ``call`` calls flordb_build's loop or log, else None."""
        func = call.func
        if isinstance(func, ast.Attribute) and func.attr in ("loop", "log"):
            if dotted_name(func.value) in self.modules:
                return "loop" if func.attr == "loop" else "log"
        if isinstance(func, ast.Name):
            return self.functions.get(func.id)
        return None

    def merged(self, other: FlorNames) -> FlorNames:
        """The spellings of both."""
        return FlorNames(self.modules | other.modules, {**other.functions, **self.functions})


def _flor_names(tree: ast.Module) -> FlorNames:
    """``import flordb_build [as x]`` and ``from flordb_build import loop [as y]``, anywhere."""
    names = FlorNames()
    for node in _statements(tree.body):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == FLOR_MODULE:
                    names.modules.add(alias.asname or FLOR_MODULE)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module == FLOR_MODULE:
            for alias in node.names:
                if alias.name == "*":
                    names.functions.update({"loop": "loop", "log": "log"})
                elif alias.name in ("loop", "log"):
                    names.functions[alias.asname or alias.name] = "loop" if alias.name == "loop" else "log"
    return names


_BODIES = ("body", "orelse", "finalbody")


def _statements(body: Sequence[ast.stmt]) -> Iterator[ast.stmt]:
    """Every statement of ``body`` and the blocks below, expressions not entered."""
    stack = list(reversed(body))
    while stack:
        node = stack.pop()
        yield node
        inner: list[ast.stmt] = []
        for name in _BODIES:
            inner += getattr(node, name, None) or []
        for handler in getattr(node, "handlers", None) or []:
            inner += handler.body
        for case in getattr(node, "cases", None) or []:
            inner += case.body
        stack.extend(reversed(inner))


@dataclass(frozen=True)
class Frame:
    """One enclosing compound statement of an indexed statement, and the branch it sits in."""

    node: cst.BaseStatement  # always compound: only compound statements have indented blocks
    label: str
    block: cst.IndentedBlock


@dataclass(eq=False)
class Stmt:
    """An indexed statement: its libcst node and ast statements, enclosing frames and place in its block."""

    node: cst.BaseStatement
    trees: tuple[ast.stmt, ...]  # the ast statements of this line (several for `a; b`), one if compound
    frames: tuple[Frame, ...]
    owner: Block
    index: int
    order: int  # preorder number among all indexed statements
    line: int
    end_line: int
    own: list[ast.AST] = field(default_factory=list)  # the parts outside its indented blocks
    inline: list[ast.stmt] = field(default_factory=list)  # statements of its one-line suites
    calls: list[tuple[FlorKind, ast.Call]] = field(default_factory=list)  # flor calls of the own part
    invoked: list[ast.Call] = field(default_factory=list)  # every call of the own part
    loaded: list[str] = field(default_factory=list)  # names the own part reads
    key: str = ""
    digest: int = 0  # the key and the digests of every block below: equal digests, equal subtrees
    last: int = 0  # preorder number of its last descendant (itself when it has none)
    children: list[tuple[str, list[Stmt]]] = field(default_factory=list)  # per indented block
    loop_name: str | None = None  # set when this is a `for ... in flor.loop(NAME, ...)`
    is_flor_loop: bool = False
    loop_call: ast.Call | None = None
    words: Counter[str] | None = None  # its code tokens, counted (see ScriptIndex.word_counts)


class _Source:
    """The lines of a source text, sliced by ast's (line, UTF-8 byte column) offsets."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines(keepends=True)

    def _at(self, line: int, col: int, end: bool = False) -> tuple[int, int]:
        text = self.lines[line - 1] if line - 1 < len(self.lines) else ""
        if text.isascii():
            return line, col
        return line, len(text.encode("utf-8")[:col].decode("utf-8", errors="ignore"))

    def segment(self, node: ast.AST, last: ast.AST | None = None) -> str:
        """The source text from ``node``'s start to ``last``'s end (``node``'s own by default)."""
        end_node = last if last is not None else node
        line, col = self._at(node.lineno, node.col_offset)  # type: ignore[attr-defined]
        end_line, end_col = self._at(end_node.end_lineno, end_node.end_col_offset)  # type: ignore[attr-defined]
        if line == end_line:
            return self.lines[line - 1][col:end_col]
        parts = [self.lines[line - 1][col:], *self.lines[line:end_line - 1], self.lines[end_line - 1][:end_col]]
        return "".join(parts)

    def indent_of(self, line: int) -> str:
        """The leading whitespace of a line."""
        text = self.lines[line - 1]
        return text[: len(text) - len(text.lstrip())]


def _suites(node: cst.BaseStatement, tree: ast.stmt) -> tuple[list[ast.AST], list[tuple[str, cst.BaseSuite, list[ast.stmt]]]]:
    """A compound statement's own parts (ast) and its branches: label, libcst suite, ast body."""
    own: list[ast.AST] = []
    found: list[tuple[str, cst.BaseSuite, list[ast.stmt]]] = []
    if isinstance(node, cst.FunctionDef) and isinstance(tree, ast.FunctionDef | ast.AsyncFunctionDef):
        own += [*tree.decorator_list, tree.args, *([tree.returns] if tree.returns is not None else [])]
        found.append(("body", node.body, tree.body))
    elif isinstance(node, cst.ClassDef) and isinstance(tree, ast.ClassDef):
        own += [*tree.decorator_list, *tree.bases, *tree.keywords]
        found.append(("body", node.body, tree.body))
    elif isinstance(node, cst.With) and isinstance(tree, ast.With | ast.AsyncWith):
        own += tree.items
        found.append(("body", node.body, tree.body))
    elif isinstance(node, cst.For | cst.While) and isinstance(tree, ast.For | ast.AsyncFor | ast.While):
        own += [tree.test] if isinstance(tree, ast.While) else [tree.target, tree.iter]
        found.append(("body", node.body, tree.body))
        if node.orelse is not None:
            found.append(("else", node.orelse.body, tree.orelse))
    elif isinstance(node, cst.If) and isinstance(tree, ast.If):
        # an elif chain is one statement with one branch per test, so `elif` never becomes a frame
        own.append(tree.test)
        found.append(("if", node.body, tree.body))
        branch: cst.If | cst.Else | None = node.orelse
        current = tree
        while isinstance(branch, cst.If) and current.orelse and isinstance(current.orelse[0], ast.If):
            current = current.orelse[0]
            own.append(current.test)
            found.append((f"elif {node_code(branch.test)}", branch.body, current.body))
            branch = branch.orelse
        if branch is not None:
            found.append(("else", branch.body, current.orelse))
    elif isinstance(node, cst.Try | cst.TryStar) and isinstance(tree, ast.Try | ast.TryStar):
        found.append(("body", node.body, tree.body))
        handlers: Sequence[cst.ExceptHandler | cst.ExceptStarHandler] = node.handlers
        for handler, handler_tree in zip(handlers, tree.handlers, strict=True):
            if handler_tree.type is not None:
                own.append(handler_tree.type)
            caught = node_code(handler.type) if handler.type is not None else ""
            found.append((f"except {caught}".strip(), handler.body, handler_tree.body))
        if node.orelse is not None:
            found.append(("else", node.orelse.body, tree.orelse))
        if node.finalbody is not None:
            found.append(("finally", node.finalbody.body, tree.finalbody))
    elif isinstance(node, cst.Match) and isinstance(tree, ast.Match):
        own.append(tree.subject)
        for case, case_tree in zip(node.cases, tree.cases, strict=True):
            own += [case_tree.pattern, *([case_tree.guard] if case_tree.guard is not None else [])]
            guard = f" if {node_code(case.guard)}" if case.guard is not None else ""
            found.append((f"case {node_code(case.pattern)}{guard}", case.body, case_tree.body))
    else:
        raise RewriteError(f"Unexpected statement {type(node).__name__} / {type(tree).__name__} in the index.")
    return own, found


def branches(node: cst.BaseStatement) -> list[tuple[str, cst.IndentedBlock]]:
    """The indented blocks of a compound statement with a label that names the branch."""
    if isinstance(node, cst.SimpleStatementLine):
        return []
    found: list[tuple[str, cst.IndentedBlock]] = []
    suites: list[tuple[str, cst.BaseSuite]] = []
    if isinstance(node, cst.FunctionDef | cst.ClassDef | cst.With):
        suites.append(("body", node.body))
    elif isinstance(node, cst.For | cst.While):
        suites.append(("body", node.body))
        if node.orelse is not None:
            suites.append(("else", node.orelse.body))
    elif isinstance(node, cst.If):
        suites.append(("if", node.body))
        branch: cst.If | cst.Else | None = node.orelse
        while isinstance(branch, cst.If):
            suites.append((f"elif {node_code(branch.test)}", branch.body))
            branch = branch.orelse
        if branch is not None:
            suites.append(("else", branch.body))
    elif isinstance(node, cst.Try | cst.TryStar):
        suites.append(("body", node.body))
        for handler in node.handlers:
            caught = node_code(handler.type) if handler.type is not None else ""
            suites.append((f"except {caught}".strip(), handler.body))
        if node.orelse is not None:
            suites.append(("else", node.orelse.body))
        if node.finalbody is not None:
            suites.append(("finally", node.finalbody.body))
    elif isinstance(node, cst.Match):
        for case in node.cases:
            guard = f" if {node_code(case.guard)}" if case.guard is not None else ""
            suites.append((f"case {node_code(case.pattern)}{guard}", case.body))
    for label, suite in suites:
        if isinstance(suite, cst.IndentedBlock):
            found.append((label, suite))
    return found


def walk_own(parts: Sequence[ast.AST]) -> Iterator[ast.AST]:
    """Every ast node of ``parts`` (statements of one-line suites included)."""
    for part in parts:
        yield from ast.walk(part)


class ScriptIndex:
    """Every statement of a parsed script with its frames, flor calls, loops and positions."""

    @classmethod
    def parse(cls, source: str, label: str, chunks: set[tuple[str, bool, bool]] | None = None) -> ScriptIndex:
        """Parse and index ``source``; ``label`` names it in errors ("the old version").

        :param chunks: assemble the LibCST module from cached statement parses (see ``_parsing``),
            recording the chunks used in this set (one per propagation); None parses it whole.
        """
        try:
            tree: ast.Module | None = ast.parse(source)
        except SyntaxError:
            tree = None  # reported below, after LibCST's own message as before
        try:
            module = parse_module(source, tree, chunks if tree is not None else None)
        except cst.ParserSyntaxError as exc:
            raise RewriteError(
                f"Could not parse {label} at line {exc.raw_line}: {exc.message}. "
                "Fix the syntax error in that version before replaying it."
            ) from exc
        if tree is None:
            try:
                tree = ast.parse(source)
            except SyntaxError as exc:
                raise RewriteError(
                    f"Could not parse {label} at line {exc.lineno}: {exc.msg}. "
                    "Fix the syntax error in that version before replaying it."
                ) from exc
        return cls(module, tree, source, label)

    def __init__(self, module: cst.Module, tree: ast.Module, source: str, label: str) -> None:
        self.module = module
        self.tree = tree
        self.source_text = source
        self.source = _Source(source)
        self.label = label
        self.flor = _flor_names(tree)
        self.stmts: list[Stmt] = []
        self.by_node: dict[int, Stmt] = {}
        self.blocks: dict[int, tuple[Frame, ...]] = {id(module): ()}  # block -> frames of its statements
        self.top: list[Stmt] = self._walk(module.body, tree.body, module, ())
        self.loops = [s for s in self.stmts if s.is_flor_loop]
        self._calls: _CallGraph | None = None
        self.project: ProjectIndex | None = None  # set when the script is one module of several
        # results that depend on this index and a key alone, kept for the next propagation (today's
        # version serves every old one): see _propagation._NewOnly
        self.memo: dict[object, object] = {}
        self.main_loop = self._find_main_loop()
        self._markers = self._main_markers()

    def _relink(self, project: ProjectIndex) -> None:
        """Resolve calls again, now seeing the project's other modules."""
        self.project = project
        self._calls = None
        self.main_loop = self._find_main_loop()
        self._markers = self._main_markers()

    def release(self) -> None:
        """Drop the call graph, which refers back to this index: the index is then freed by
        reference counting when its last user lets go, not by a garbage collection later (it is
        rebuilt if asked for again)."""
        self._calls = None

    # -- indexing -----------------------------------------------------------------------------------
    def _walk(self, body: Sequence[cst.BaseStatement], trees: Sequence[ast.stmt], owner: Block,
              frames: tuple[Frame, ...]) -> list[Stmt]:
        indexed: list[Stmt] = []
        position = 0
        for index, node in enumerate(body):
            count = len(node.body) if isinstance(node, cst.SimpleStatementLine) else 1
            mine = tuple(trees[position:position + count])
            position += count
            first, last = mine[0], mine[-1]
            stmt = Stmt(node, mine, frames, owner, index, len(self.stmts), first.lineno,
                        last.end_lineno or first.lineno)
            self.stmts.append(stmt)
            self.by_node[id(node)] = stmt
            if isinstance(node, cst.SimpleStatementLine):
                stmt.own = list(mine)
                stmt.key = normalized(self.source.segment(first, last))
                stmt.digest = hash(stmt.key)
            else:
                own, suites = _suites(node, first)
                stmt.own = own
                for label, suite, suite_trees in suites:
                    if isinstance(suite, cst.IndentedBlock):
                        inner = (*frames, Frame(node, label, suite))
                        self.blocks[id(suite)] = inner
                        stmt.children.append((label, self._walk(suite.body, suite_trees, suite, inner)))
                    else:
                        stmt.own += suite_trees  # `if c: x = 1`: the suite is part of the statement
                        stmt.inline += suite_trees
            self._own_calls(stmt)
            if not isinstance(node, cst.SimpleStatementLine):
                stmt.key = self._header_key(stmt)
                stmt.digest = hash((stmt.key, tuple((lab, tuple(c.digest for c in kids)) for lab, kids in stmt.children)))
            stmt.last = len(self.stmts) - 1
            indexed.append(stmt)
        return indexed

    def _own_calls(self, stmt: Stmt) -> None:
        for node in walk_own(stmt.own):
            if isinstance(node, ast.Call):
                stmt.invoked.append(node)
                kind = self.flor.kind(node)
                if kind is not None:
                    stmt.calls.append((kind, node))
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                stmt.loaded.append(node.id)
        tree = stmt.trees[0]
        if isinstance(stmt.node, cst.For) and isinstance(tree, ast.For | ast.AsyncFor):
            loop_calls = [c for c in ast.walk(tree.iter) if isinstance(c, ast.Call) and self.flor.kind(c) == "loop"]
            if loop_calls:
                stmt.is_flor_loop = True
                stmt.loop_call = loop_calls[0]
                stmt.loop_name = literal_str(call_arg(loop_calls[0], 0, "name"))

    def _header_key(self, stmt: Stmt) -> str:
        """What must be equal for two compound statements to anchor each other: their header."""
        node, tree = stmt.node, stmt.trees[0]
        seg = self.source.segment
        if stmt.is_flor_loop and stmt.loop_name is not None:
            return f"flor.loop {stmt.loop_name!r}"
        if isinstance(node, cst.FunctionDef | cst.ClassDef):
            return f"{'def' if isinstance(node, cst.FunctionDef) else 'class'} {node.name.value}"
        if isinstance(tree, ast.With | ast.AsyncWith):
            return normalized("with " + ", ".join(seg(item.context_expr) + (
                f" as {seg(item.optional_vars)}" if item.optional_vars is not None else "") for item in tree.items))
        if isinstance(tree, ast.If):
            return normalized(f"if {seg(tree.test)}")
        if isinstance(tree, ast.For | ast.AsyncFor):
            return normalized(f"for {seg(tree.target)} in {seg(tree.iter)}")
        if isinstance(tree, ast.While):
            return normalized(f"while {seg(tree.test)}")
        if isinstance(tree, ast.Try | ast.TryStar):
            return "try"
        if isinstance(tree, ast.Match):
            return normalized(f"match {seg(tree.subject)}")
        return normalized(seg(tree))

    def key(self, node: cst.BaseStatement) -> str:
        """A simple statement's code, a compound statement's header (its body may differ)."""
        return self.by_node[id(node)].key

    def text(self, stmt: Stmt) -> str:
        """The whole source text of a statement, its blocks included."""
        return self.source.segment(stmt.trees[0], self._deepest_tree(stmt))

    def _deepest_tree(self, stmt: Stmt) -> ast.AST:
        last = self.stmts[stmt.last]
        return last.trees[-1]

    def tokens(self, stmt: Stmt) -> list[str]:
        """The code tokens of a statement and everything below it (for similarity)."""
        return _TOKEN.findall(self.text(stmt))

    def word_counts(self, stmt: Stmt) -> Counter[str]:
        """:meth:`tokens`, counted, computed once per statement (today's serve every old version)."""
        if stmt.words is None:
            stmt.words = Counter(self.tokens(stmt))
        return stmt.words

    def stmt_of(self, node: cst.CSTNode) -> Stmt:
        """The indexed statement for a statement node of this script."""
        return self.by_node[id(node)]

    def parent_of(self, stmt: Stmt) -> Stmt | None:
        """The statement whose block holds ``stmt``."""
        return self.stmt_of(stmt.frames[-1].node) if stmt.frames else None

    def function_of(self, stmt: Stmt) -> Stmt | None:
        """The innermost enclosing def (class bodies run where the class statement is)."""
        return self.function_of_frames(stmt.frames)

    def function_of_frames(self, frames: Sequence[Frame]) -> Stmt | None:
        """The innermost def among ``frames``."""
        for frame in reversed(frames):
            if isinstance(frame.node, cst.FunctionDef):
                return self.stmt_of(frame.node)
        return None

    def qualname(self, stmt: Stmt) -> str | None:
        """Dotted names of the defs and classes enclosing ``stmt`` (and ``stmt`` itself if one)."""
        parts = [f.node.name.value for f in stmt.frames if isinstance(f.node, cst.FunctionDef | cst.ClassDef)]
        if isinstance(stmt.node, cst.FunctionDef | cst.ClassDef):
            parts.append(stmt.node.name.value)
        return ".".join(parts) or None

    def loop_frames(self, stmt: Stmt) -> list[Frame]:
        """Enclosing flor.loop frames inside the innermost def, outermost first."""
        return self.loop_frames_of(stmt.frames)

    def loop_frames_of(self, frames: Sequence[Frame]) -> list[Frame]:
        """The flor.loop frames among ``frames`` inside the innermost def, outermost first."""
        found: list[Frame] = []
        for frame in frames:
            if isinstance(frame.node, cst.FunctionDef):
                found = []
            elif self.stmt_of(frame.node).is_flor_loop:
                found.append(frame)
        return found

    @property
    def calls(self) -> _CallGraph:
        """Call sites resolved through scopes, classes and instances (built on first use)."""
        if self._calls is None:
            self._calls = _CallGraph(self)
        return self._calls

    def references(self, func: Stmt) -> list[Stmt]:
        """Statements outside ``func`` that call it (through its class and instances too) or pass it on."""
        return self.calls.sites(func)

    # -- the main loop --------------------------------------------------------------------------------
    def _runs_inside_loop(self, func: Stmt | None, seen: frozenset[int]) -> bool:
        if func is None or id(func) in seen:
            return False
        for site in self.references(func):
            if any(self.stmt_of(f.node).is_flor_loop for f in site.frames):
                return True
            if self._runs_inside_loop(self.function_of(site), seen | {id(func)}):
                return True
        return False

    def _find_main_loop(self) -> Stmt | None:
        # the outermost flor.loop: no flor.loop encloses it, neither in its own function nor
        # through a call (an evaluation loop in a helper called every epoch is nested, not main)
        for loop in self.loops:
            if any(self.stmt_of(f.node).is_flor_loop for f in loop.frames):
                continue
            if not self._runs_inside_loop(self.function_of(loop), frozenset()):
                return loop
        return None

    def _main_markers(self) -> dict[int | None, Stmt]:
        # For each function on the way from the module to the main loop, the statement in it that
        # runs the main loop: the loop itself in its own function, then the first call site of
        # that function in its caller, and so on up to module level.
        markers: dict[int | None, Stmt] = {}
        marker = self.main_loop
        while marker is not None:
            func = self.function_of(marker)
            key = id(func) if func is not None else None
            if key in markers:
                break
            markers[key] = marker
            if func is None:
                break
            sites = self.references(func)
            marker = sites[0] if sites else None
        return markers

    # -- positions --------------------------------------------------------------------------------
    def position(self, stmt: Stmt) -> Position | None:
        """Where ``stmt`` runs relative to the main loop; None when that cannot be told statically."""
        return self._position(stmt.frames, stmt.order, stmt.last, frozenset())

    def slot_position(self, block: Block, index: int) -> Position | None:
        """Where a statement inserted before ``block.body[index]`` (at its end: ``len``) would run."""
        frames = self.blocks[id(block)]
        body = block.body
        if index < len(body):
            here = self.stmt_of(body[index]).order - 0.5
        elif body:
            here = self.stmt_of(body[-1]).last + 0.5
        else:
            here = (self.stmt_of(frames[-1].node).order if frames else -1) + 0.5
        return self._position(frames, here, here, frozenset())

    def _position(self, frames: Sequence[Frame], first: float, last: float, seen: frozenset[int]) -> Position | None:
        loops = self.loop_frames_of(frames)
        if loops:
            outer = loops[0]
            if self.main_loop is not None and outer.node is self.main_loop.node:
                if outer.label == "else":
                    return Position.SUFFIX  # a for-else clause runs after the last iteration
                nested = any(f.label == "body" for f in loops[1:])
                return Position.RANGE if nested else Position.VALIDATION
            loop = self.stmt_of(outer.node)
            outer_position = self._position(loop.frames, loop.order, loop.last, seen)
            if outer_position in (Position.VALIDATION, Position.RANGE):
                return Position.RANGE  # a flor.loop that runs inside the main loop is a nested loop
            return outer_position
        func = self.function_of_frames(frames)
        marker = self._markers.get(id(func) if func is not None else None)
        if marker is not None:
            if last < marker.order:
                return Position.PREFIX
            if first > marker.last:
                return Position.SUFFIX
            return Position.VALIDATION  # the statement that runs the main loop spans all of it
        if func is None:
            return Position.PREFIX if self.main_loop is None else None
        if id(func) in seen:
            return None
        seen = seen | {id(func)}
        sites = self.references(func)
        if not sites and self.project is not None:
            # a function of a helper module runs where the other modules call it (model.py's
            # forward from main.py's loop): classified by the caller's position there
            return deepest(
                p for index, site in self.project.sites(self, func)
                if (p := index._position(site.frames, site.order, site.last, seen)) is not None
            )
        return deepest(p for p in (self._position(s.frames, s.order, s.last, seen) for s in sites) if p is not None)

    # -- names ------------------------------------------------------------------------------------
    def defines(self, block: Block, name: str) -> bool:
        """True when ``name`` is bound where ``block`` runs: its function, enclosing ones, the module."""
        return self.calls.defines(self.blocks[id(block)], name)

    # -- public views -----------------------------------------------------------------------------
    def log_calls(self) -> list[tuple[str, ast.Call, Stmt]]:
        """Every flor.log call with a literal name, in source order, with its statement."""
        found: list[tuple[str, ast.Call, Stmt]] = []
        for stmt in self.stmts:
            for kind, call in stmt.calls:
                name = literal_str(call_arg(call, 0, "name")) if kind == "log" else None
                if name is not None:
                    found.append((name, call, stmt))
        return found

    def log_names(self) -> set[str]:
        """The literal names this script logs."""
        return {name for name, _, _ in self.log_calls()}

    def loop_site(self, stmt: Stmt) -> LoopSite:
        """The public view of an indexed flor.loop statement."""
        loops = self.loop_frames(stmt)
        func = self.function_of(stmt)
        return LoopSite(
            name=stmt.loop_name,
            line=stmt.line,
            depth=len(loops),
            parent=self.stmt_of(loops[-1].node).loop_name if loops else None,
            function=self.qualname(func) if func is not None else None,
        )

    def analysis(self) -> ScriptAnalysis:
        """The public :class:`ScriptAnalysis` of this script."""
        logs = []
        for name, call, stmt in self.log_calls():
            func = self.function_of(stmt)
            logs.append(LogSite(
                name=name,
                line=call.lineno,
                position=self.position(stmt),
                loops=tuple(self.stmt_of(f.node).loop_name or "?" for f in self.loop_frames(stmt)),
                function=self.qualname(func) if func is not None else None,
            ))
        return ScriptAnalysis(
            loops=tuple(self.loop_site(s) for s in self.loops),
            logs=tuple(logs),
            main_loop=self.loop_site(self.main_loop) if self.main_loop is not None else None,
        )


class _CallGraph:
    """Which statements call which defs, resolved through Python's scopes (:mod:`symtable`).

    A call reaches a def when its name resolves, scope by scope, to that def; ``Net(...)`` reaches
    ``Net.__init__``; ``model(x)`` reaches ``Net.forward`` when every assignment of ``model`` in its
    scope is a ``Net(...)`` (``Net(...).to(device)`` included); ``self.m()`` reaches the method of
    the enclosing class (or a base defined in the script), and ``self.layer.m()`` the class that
    ``self.layer = Layer(...)`` assigned. A method call on a receiver of unknown type counts for a
    same-named method only when nothing calls that method through a known type.
    """

    def __init__(self, index: ScriptIndex) -> None:
        self.index = index
        self.table = symtable.symtable(index.source_text, "<script>", "exec")
        self.defs: dict[int | None, dict[str, Stmt]] = {}  # scope (def/class stmt id, None: module) -> defs
        self.tables: dict[int | None, symtable.SymbolTable] = {None: self.table}
        self.values: dict[int | None, dict[str, list[ast.expr | None]]] = {}  # scope -> name -> assigned values
        self.attrs: dict[int, dict[str, list[ast.expr | None]]] = {}  # class stmt id -> self.attr values
        self.methods: dict[str, list[Stmt]] = {}  # method name -> defs in classes
        for stmt in index.stmts:
            scope = self._scope(stmt.frames)
            if isinstance(stmt.node, cst.FunctionDef | cst.ClassDef):
                self.defs.setdefault(id(scope) if scope is not None else None, {})[stmt.node.name.value] = stmt
                if scope is not None and isinstance(scope.node, cst.ClassDef) and isinstance(stmt.node, cst.FunctionDef):
                    self.methods.setdefault(stmt.node.name.value, []).append(stmt)
            self._assignments(stmt, scope)
        self._map_tables(None, self.table)
        self.imports: dict[str, tuple[str, str | None]] = {}  # bound name -> (module, name in it or None)
        for stmt in index.stmts:
            for tree in stmt.trees:
                if isinstance(tree, ast.Import):
                    for alias in tree.names:
                        bound = alias.asname or alias.name.split(".")[0]
                        self.imports[bound] = (alias.name if alias.asname else bound, None)
                elif isinstance(tree, ast.ImportFrom) and not tree.level and tree.module is not None:
                    for alias in tree.names:
                        self.imports[alias.asname or alias.name] = (tree.module, alias.name)
        self._exact: dict[int, list[Stmt]] | None = None
        self._loose: dict[int, list[Stmt]] = {}

    def _resolve_all(self) -> dict[int, list[Stmt]]:
        exact: dict[int, list[Stmt]] = {}
        defs = {name for scoped in self.defs.values() for name in scoped}
        for stmt in self.index.stmts:
            for call in stmt.invoked:
                found, guessed = self.targets(call, stmt)
                for target in found:
                    exact.setdefault(id(target), []).append(stmt)
                for target in guessed:
                    self._loose.setdefault(id(target), []).append(stmt)
            for name in stmt.loaded:
                if name not in defs:
                    continue
                passed = self.resolve(name, stmt.frames)  # a callback: `register(hook)`
                if isinstance(passed, Stmt) and isinstance(passed.node, cst.FunctionDef):
                    exact.setdefault(id(passed), []).append(stmt)
        return exact

    def sites(self, func: Stmt) -> list[Stmt]:
        """The statements outside ``func`` that reach it, in source order, each once."""
        if self._exact is None:
            self._exact = self._resolve_all()

        def outside(sites: list[Stmt]) -> list[Stmt]:
            unique = {id(s): s for s in sites if s is not func and all(f.node is not func.node for f in s.frames)}
            return sorted(unique.values(), key=lambda s: s.order)
        return outside(self._exact.get(id(func), [])) or outside(self._loose.get(id(func), []))

    # -- scopes -----------------------------------------------------------------------------------
    def _scope(self, frames: Sequence[Frame]) -> Stmt | None:
        """The innermost def or class whose body holds a statement with these frames."""
        for frame in reversed(frames):
            if isinstance(frame.node, cst.FunctionDef | cst.ClassDef):
                return self.index.stmt_of(frame.node)
        return None

    def _map_tables(self, scope: Stmt | None, table: symtable.SymbolTable) -> None:
        children = {(c.get_name(), c.get_lineno()): c for c in table.get_children()}
        for name, stmt in self.defs.get(id(scope) if scope is not None else None, {}).items():
            child = children.get((name, stmt.trees[0].lineno))
            if child is not None:
                self.tables[id(stmt)] = child
                self._map_tables(stmt, child)

    def _assignments(self, stmt: Stmt, scope: Stmt | None) -> None:
        key = id(scope) if scope is not None else None
        for tree in stmt.trees:
            targets: list[ast.expr] = []
            value: ast.expr | None = None
            if isinstance(tree, ast.Assign):
                targets, value = tree.targets, tree.value
            elif isinstance(tree, ast.AnnAssign) and tree.value is not None:
                targets, value = [tree.target], tree.value
            for target in targets:
                if isinstance(target, ast.Name):
                    self.values.setdefault(key, {}).setdefault(target.id, []).append(value)
                elif (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                      and target.value.id == "self" and scope is not None):
                    owner = self._scope(scope.frames)
                    if owner is not None and isinstance(owner.node, cst.ClassDef):
                        self.attrs.setdefault(id(owner), {}).setdefault(target.attr, []).append(value)
                else:
                    for inner in ast.walk(target):
                        if isinstance(inner, ast.Name):  # unpacked: its type is unknown
                            self.values.setdefault(key, {}).setdefault(inner.id, []).append(None)

    def _binding_scope(self, name: str, frames: Sequence[Frame]) -> Stmt | None | bool:
        """The def/class stmt (None: module) whose scope binds ``name`` as seen from ``frames``;
        False when no scope of the script binds it (a builtin or an undefined name)."""
        chain: list[Stmt] = []
        for frame in frames:
            if isinstance(frame.node, cst.FunctionDef | cst.ClassDef):
                chain.append(self.index.stmt_of(frame.node))
        for depth in range(len(chain) - 1, -1, -1):
            scope = chain[depth]
            if isinstance(scope.node, cst.ClassDef) and depth != len(chain) - 1:
                continue  # class scopes are not visible from the functions inside them
            table = self.tables.get(id(scope))
            if table is None:
                return False
            try:
                symbol = table.lookup(name)
            except KeyError:
                continue
            if symbol.is_global() or symbol.is_declared_global():
                break
            if symbol.is_local() or symbol.is_parameter() or symbol.is_imported():
                return scope
        try:
            symbol = self.table.lookup(name)
        except KeyError:
            return False
        return None if (symbol.is_assigned() or symbol.is_imported() or symbol.is_local()) else False

    def resolve(self, name: str, frames: Sequence[Frame]) -> Stmt | str | None:
        """The def/class ``name`` names from ``frames``, or ``"var"`` for another binding, None if unbound."""
        scope = self._binding_scope(name, frames)
        if scope is False:
            return None
        key = id(scope) if isinstance(scope, Stmt) else None
        found = self.defs.get(key, {}).get(name)
        if found is not None and name not in self.values.get(key, {}):
            return found
        if key is None and name in self.imports and self.index.project is not None:
            module, imported = self.imports[name]
            if imported is not None:  # `from model import RNNModel`
                external = self.index.project.lookup(module, imported)
                if external is not None:
                    return external
        return "var"

    def _module_member(self, expr: ast.expr, frames: Sequence[Frame]) -> Stmt | None:
        """The def or class ``module.name`` names, for ``import module`` of a project module."""
        if not (isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name)) or self.index.project is None:
            return None
        imported = self.imports.get(expr.value.id)
        if imported is None or imported[1] is not None or self._binding_scope(expr.value.id, frames) is not None:
            return None
        if expr.value.id in self.values.get(None, {}):
            return None  # the module's name is rebound to something else
        return self.index.project.lookup(imported[0], expr.attr)

    def defines(self, frames: Sequence[Frame], name: str) -> bool:
        """True when ``name`` is bound in a scope a statement with ``frames`` sees, or is a builtin."""
        return self._binding_scope(name, frames) is not False or hasattr(builtins, name)

    # -- types and targets ------------------------------------------------------------------------
    def _class_of_value(self, value: ast.expr | None, frames: Sequence[Frame], depth: int) -> Stmt | None:
        """The script class that ``value`` evaluates to an instance of, when certain."""
        if value is None or depth > 8:
            return None
        if isinstance(value, ast.Call):
            func = value.func
            if isinstance(func, ast.Attribute) and func.attr in _SELF_RETURNING:
                return self._class_of_value(func.value, frames, depth + 1)
            target = self.resolve(func.id, frames) if isinstance(func, ast.Name) else self._module_member(func, frames)
            if isinstance(target, Stmt) and isinstance(target.node, cst.ClassDef):
                return target
            return None
        return self._class_of(value, frames, depth + 1)

    def _class_of(self, expr: ast.expr, frames: Sequence[Frame], depth: int = 0) -> Stmt | None:
        """The script class of the object ``expr`` names, when every binding agrees."""
        if depth > 8:
            return None
        func = self.index.function_of_frames(frames)
        if isinstance(expr, ast.Name):
            if func is not None and self._is_self(expr.id, func):
                owner = self._scope(func.frames)
                return owner if owner is not None and isinstance(owner.node, cst.ClassDef) else None
            scope = self._binding_scope(expr.id, frames)
            if scope is False:
                return None
            values = self.values.get(id(scope) if isinstance(scope, Stmt) else None, {}).get(expr.id, [])
            scope_frames = self._frames_inside(scope if isinstance(scope, Stmt) else None)
            classes = {id(c): c for c in (self._class_of_value(v, scope_frames, depth + 1) for v in values) if c}
            if len(classes) == 1 and all(self._class_of_value(v, scope_frames, depth + 1) for v in values):
                return next(iter(classes.values()))
            return None
        if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name) and func is not None:
            if self._is_self(expr.value.id, func):
                owner = self._scope(func.frames)
                if owner is not None and isinstance(owner.node, cst.ClassDef):
                    values = self.attrs.get(id(owner), {}).get(expr.attr, [])
                    classes = {id(c): c for c in (self._class_of_value(v, self._frames_inside(func), depth + 1)
                                                  for v in values) if c}
                    if len(classes) == 1 and all(
                        self._class_of_value(v, self._frames_inside(func), depth + 1) for v in values
                    ):
                        return next(iter(classes.values()))
        return None

    def _frames_inside(self, scope: Stmt | None) -> tuple[Frame, ...]:
        """Frames of a statement in ``scope``'s body (for resolving names as that scope sees them)."""
        if scope is None:
            return ()
        label, _kids = scope.children[0] if scope.children else ("body", [])
        block = next((b for lab, b in branches(scope.node) if lab == label), None)
        if block is None:
            return scope.frames
        return (*scope.frames, Frame(scope.node, label, block))

    @staticmethod
    def _is_self(name: str, func: Stmt) -> bool:
        tree = func.trees[0]
        if not isinstance(tree, ast.FunctionDef | ast.AsyncFunctionDef) or not tree.args.args:
            return False
        decorators = {dotted_name(d) for d in tree.decorator_list}
        return tree.args.args[0].arg == name and "staticmethod" not in decorators

    def _method(self, cls: Stmt, name: str, depth: int = 0) -> Stmt | None:
        """``cls.name`` defined in the class or a base class of the script (or of its own module)."""
        project = self.index.project
        if id(cls) not in self.defs and project is not None:
            owner = project.owner(cls)
            if owner is not None and owner is not self.index:
                return owner.calls._method(cls, name, depth)
        found = self.defs.get(id(cls), {}).get(name)
        if found is not None or depth > 8:
            return found
        tree = cls.trees[0]
        assert isinstance(tree, ast.ClassDef)
        for base in tree.bases:
            if isinstance(base, ast.Name):
                target = self.resolve(base.id, cls.frames)
                if isinstance(target, Stmt) and isinstance(target.node, cst.ClassDef):
                    inherited = self._method(target, name, depth + 1)
                    if inherited is not None:
                        return inherited
        return None

    def targets(self, call: ast.Call, stmt: Stmt) -> tuple[list[Stmt], list[Stmt]]:
        """The defs ``call`` reaches for certain, and those it may reach (unknown receiver)."""
        func = call.func
        frames = stmt.frames
        if isinstance(func, ast.Name):
            target = self.resolve(func.id, frames)
            if isinstance(target, Stmt):
                if isinstance(target.node, cst.ClassDef):
                    init = self._method(target, "__init__")
                    return ([init] if init is not None else []), []
                return [target], []
            if target == "var":
                cls = self._class_of(func, frames)
                if cls is not None:  # calling an instance: nn.Module.__call__ runs forward
                    return [m for m in (self._method(cls, "forward"), self._method(cls, "__call__")) if m], []
            return [], []
        if isinstance(func, ast.Attribute):
            member = self._module_member(func, frames)
            if member is not None:  # `model.RNNModel(...)`, `data.batchify(...)`
                if isinstance(member.node, cst.ClassDef):
                    init = self._method(member, "__init__")
                    return ([init] if init is not None else []), []
                return [member], []
            cls = self._class_of(func.value, frames)
            if cls is None and isinstance(func.value, ast.Name):
                named = self.resolve(func.value.id, frames)
                cls = named if isinstance(named, Stmt) and isinstance(named.node, cst.ClassDef) else None
            if cls is not None:
                method = self._method(cls, func.attr)
                return ([method] if method is not None else []), []
            if isinstance(func.value, ast.Call) and isinstance(func.value.func, ast.Name) and func.value.func.id == "super":
                return [], []
            return [], list(self.methods.get(func.attr, []))
        return [], []


def module_name(path: str) -> str:
    """The import name of a project file: ``model.py`` -> ``model``, ``pkg/__init__.py`` -> ``pkg``."""
    parts = path.replace("\\", "/").removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(p for p in parts if p and p != ".")


class ProjectIndex:
    """Several modules of one project, indexed, whose calls resolve into each other's defs."""

    def __init__(self, indexes: dict[str, ScriptIndex]) -> None:
        self.indexes = indexes  # path -> index
        self.by_module = {module_name(path): index for path, index in indexes.items()}
        self._owners: dict[int, ScriptIndex] = {
            id(stmt): index for index in indexes.values() for stmt in index.stmts
            if isinstance(stmt.node, cst.FunctionDef | cst.ClassDef)
        }
        for index in indexes.values():
            index._relink(self)

    @classmethod
    def parse(cls, sources: dict[str, str], label: str, cached: bool = False) -> ProjectIndex:
        """Parse and index every module; ``label`` names the version in errors; ``cached``: from
        cached statement parses (see ``_parsing``), no node shared between two of the modules."""
        chunks: set[tuple[str, bool, bool]] | None = set() if cached else None
        return cls({path: ScriptIndex.parse(text, f"{label} of '{path}'", chunks) for path, text in sources.items()})

    def lookup(self, module: str, name: str) -> Stmt | None:
        """The module-level def or class ``name`` of project module ``module``."""
        index = self.by_module.get(module)
        return index.calls.defs.get(None, {}).get(name) if index is not None else None

    def owner(self, stmt: Stmt) -> ScriptIndex | None:
        """The module index that holds a def or class statement."""
        return self._owners.get(id(stmt))

    def sites(self, home: ScriptIndex, func: Stmt) -> list[tuple[ScriptIndex, Stmt]]:
        """The statements of the other modules that call ``func`` (a def of ``home``)."""
        return [(index, site) for index in self.indexes.values() if index is not home for site in index.references(func)]


def analyze_script(source: str) -> ScriptAnalysis:
    """Find the flor.loop nesting, the main loop and every literal flor.log name of a script."""
    return ScriptIndex.parse(source, "the script").analysis()


def classify(source: str, name: str) -> Position:
    """The deepest position at which ``source`` logs ``name``.

    :raises RewriteError: the script does not log ``name``, or one of its statements for ``name`` sits
        in a function that nothing references, so no scan is known to reach it.
    """
    index = ScriptIndex.parse(source, "the script")
    sites = [(call, stmt) for logged, call, stmt in index.log_calls() if logged == name]
    if not sites:
        known = ", ".join(f"'{n}'" for n in sorted(index.log_names())) or "no names"
        raise RewriteError(f"The script does not log '{name}' (it logs {known}). Check the name's spelling.")
    positions = []
    for call, stmt in sites:
        position = index.position(stmt)
        if position is None:
            raise RewriteError(
                f"Cannot tell when flor.log('{name}', ...) at line {call.lineno} runs: "
                "it sits in a function that the script never references by name. Call it from the "
                "script, or move the statement to where the function is called."
            )
        positions.append(position)
    result = deepest(positions)
    assert result is not None  # sites is not empty
    return result
