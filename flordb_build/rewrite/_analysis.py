"""Static analysis of one script: flor aliases, a statement index, loops, log sites and positions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import libcst as cst
from libcst.helpers import get_full_name_for_node
from libcst.metadata import CodeRange, MetadataWrapper, PositionProvider

from ..errors import RewriteError
from ._model import LogSite, LoopSite, Position, ScriptAnalysis, deepest

FLOR_MODULE = "flordb_build"
_CODEGEN = cst.Module(body=())
FlorKind = Literal["loop", "log"]
Block = cst.Module | cst.IndentedBlock


def node_code(node: cst.CSTNode) -> str:
    """The source text libcst generates for ``node``, stripped."""
    return _CODEGEN.code_for_node(node).strip()


def literal_str(expr: cst.BaseExpression) -> str | None:
    """The value of a plain string literal, None for anything computed."""
    if isinstance(expr, cst.SimpleString | cst.ConcatenatedString):
        value = expr.evaluated_value
        return value if isinstance(value, str) else None
    return None


def call_arg(call: cst.Call, position: int, keyword: str) -> cst.BaseExpression | None:
    """The argument at ``position`` or passed as ``keyword=``, None when absent or starred."""
    positional = [a for a in call.args if a.keyword is None and not a.star]
    if len(positional) > position:
        return positional[position].value
    for arg in call.args:
        if arg.keyword is not None and arg.keyword.value == keyword:
            return arg.value
    return None


@dataclass
class FlorNames:
    """The spellings under which a script reaches ``flordb_build.loop`` and ``flordb_build.log``."""

    modules: set[str] = field(default_factory=set)
    functions: dict[str, FlorKind] = field(default_factory=dict)

    def kind(self, call: cst.Call) -> FlorKind | None:
        """``"loop"`` or ``"log"`` when ``call`` calls flordb_build's loop or log, else None."""
        func = call.func
        if isinstance(func, cst.Attribute) and func.attr.value in ("loop", "log"):
            if get_full_name_for_node(func.value) in self.modules:
                return "loop" if func.attr.value == "loop" else "log"
        if isinstance(func, cst.Name):
            return self.functions.get(func.value)
        return None


class _ImportCollector(cst.CSTVisitor):
    """Collects ``import flordb_build [as x]`` and ``from flordb_build import loop [as y]``."""

    def __init__(self) -> None:
        self.names = FlorNames()

    def visit_Import(self, node: cst.Import) -> None:
        for alias in node.names:
            if get_full_name_for_node(alias.name) == FLOR_MODULE:
                bound = alias.asname.name if alias.asname is not None else alias.name
                self.names.modules.add(get_full_name_for_node(bound) or FLOR_MODULE)

    def visit_ImportFrom(self, node: cst.ImportFrom) -> None:
        if node.relative or node.module is None or get_full_name_for_node(node.module) != FLOR_MODULE:
            return
        if isinstance(node.names, cst.ImportStar):
            self.names.functions.update({"loop": "loop", "log": "log"})
            return
        for alias in node.names:
            imported = get_full_name_for_node(alias.name)
            if imported in ("loop", "log"):
                bound = alias.asname.name if alias.asname is not None else alias.name
                self.names.functions[get_full_name_for_node(bound) or imported] = (
                    "loop" if imported == "loop" else "log"
                )


class _OwnPartVisitor(cst.CSTVisitor):
    """Flor calls and identifiers of one statement, not descending into its indented blocks."""

    def __init__(self, flor: FlorNames) -> None:
        self.flor = flor
        self.calls: list[tuple[FlorKind, cst.Call]] = []
        self.idents: set[str] = set()

    def visit_IndentedBlock(self, node: cst.IndentedBlock) -> bool:
        return False

    def visit_Call(self, node: cst.Call) -> None:
        kind = self.flor.kind(node)
        if kind is not None:
            self.calls.append((kind, node))

    def visit_Name(self, node: cst.Name) -> None:
        self.idents.add(node.value)

    def visit_Attribute(self, node: cst.Attribute) -> None:
        self.idents.add(node.attr.value)


@dataclass(frozen=True)
class Frame:
    """One enclosing compound statement of an indexed statement, and the branch it sits in."""

    node: cst.BaseStatement  # always compound: only compound statements have indented blocks
    label: str
    block: cst.IndentedBlock


@dataclass(eq=False)
class Stmt:
    """An indexed statement: its node, enclosing frames (outermost first) and place in its block."""

    node: cst.BaseStatement
    frames: tuple[Frame, ...]
    owner: Block
    index: int
    calls: list[tuple[FlorKind, cst.Call]]
    idents: set[str]
    loop_name: str | None = None  # set when this is a `for ... in flor.loop(NAME, ...)`
    is_flor_loop: bool = False
    loop_call: cst.Call | None = None


def branches(node: cst.BaseStatement) -> list[tuple[str, cst.IndentedBlock]]:
    """The indented blocks of a compound statement with a label that names the branch."""
    found: list[tuple[str, cst.IndentedBlock]] = []

    def add(label: str, suite: cst.BaseSuite) -> None:
        if isinstance(suite, cst.IndentedBlock):
            found.append((label, suite))

    if isinstance(node, cst.FunctionDef | cst.ClassDef | cst.With):
        add("body", node.body)
    elif isinstance(node, cst.For | cst.While):
        add("body", node.body)
        if node.orelse is not None:
            add("else", node.orelse.body)
    elif isinstance(node, cst.If):
        # an elif chain is one statement with one branch per test, so `elif` never becomes a frame
        add("if", node.body)
        branch: cst.If | cst.Else | None = node.orelse
        while isinstance(branch, cst.If):
            add(f"elif {node_code(branch.test)}", branch.body)
            branch = branch.orelse
        if branch is not None:
            add("else", branch.body)
    elif isinstance(node, cst.Try | cst.TryStar):
        add("body", node.body)
        for handler in node.handlers:
            caught = node_code(handler.type) if handler.type is not None else ""
            add(f"except {caught}".strip(), handler.body)
        if node.orelse is not None:
            add("else", node.orelse.body)
        if node.finalbody is not None:
            add("finally", node.finalbody.body)
    elif isinstance(node, cst.Match):
        for case in node.cases:
            guard = f" if {node_code(case.guard)}" if case.guard is not None else ""
            add(f"case {node_code(case.pattern)}{guard}", case.body)
    return found


def statement_code(node: cst.BaseStatement) -> str:
    """A simple statement line's code without its comments and surrounding blank lines."""
    if isinstance(node, cst.SimpleStatementLine):
        bare = node.with_changes(leading_lines=(), trailing_whitespace=cst.TrailingWhitespace())
        return node_code(bare)
    return node_code(node.with_changes(leading_lines=()))


class ScriptIndex:
    """Every statement of a parsed script with its frames, flor calls, loops and positions."""

    @classmethod
    def parse(cls, source: str, label: str) -> ScriptIndex:
        """Parse and index ``source``; ``label`` names it in errors ("the old version")."""
        try:
            module = cst.parse_module(source)
        except cst.ParserSyntaxError as exc:
            raise RewriteError(
                f"Could not parse {label} at line {exc.raw_line}: {exc.message}. "
                "Fix the syntax error in that version before replaying it."
            ) from exc
        return cls(module, label)

    def __init__(self, module: cst.Module, label: str) -> None:
        # unsafe_skip_copy keeps node identity, so positions and the index refer to `module` itself
        self.module = module
        self.label = label
        wrapper = MetadataWrapper(module, unsafe_skip_copy=True)
        self.positions = wrapper.resolve(PositionProvider)
        self.wrapper = wrapper
        collector = _ImportCollector()
        module.visit(collector)
        self.flor = collector.names
        self.stmts: list[Stmt] = []
        self.by_node: dict[int, Stmt] = {}
        self._walk(module.body, module, ())
        self.loops = [s for s in self.stmts if s.is_flor_loop]
        self._refs: dict[int, list[Stmt]] = {}
        self.main_loop = self._find_main_loop()
        self._markers = self._main_markers()

    # -- indexing -----------------------------------------------------------------------------------
    def _walk(self, body: Sequence[cst.BaseStatement], owner: Block, frames: tuple[Frame, ...]) -> None:
        for index, node in enumerate(body):
            visitor = _OwnPartVisitor(self.flor)
            node.visit(visitor)
            stmt = Stmt(node, frames, owner, index, visitor.calls, visitor.idents)
            if isinstance(node, cst.For):
                iter_visitor = _OwnPartVisitor(self.flor)
                node.iter.visit(iter_visitor)
                loop_calls = [call for kind, call in iter_visitor.calls if kind == "loop"]
                if loop_calls:
                    stmt.is_flor_loop = True
                    stmt.loop_call = loop_calls[0]
                    name_arg = call_arg(loop_calls[0], 0, "name")
                    stmt.loop_name = literal_str(name_arg) if name_arg is not None else None
            self.stmts.append(stmt)
            self.by_node[id(node)] = stmt
            for label, block in branches(node):
                self._walk(block.body, block, (*frames, Frame(node, label, block)))

    def span(self, node: cst.CSTNode) -> CodeRange:
        """Source range of ``node`` (without its leading comment lines)."""
        return self.positions[node]

    def key(self, node: cst.BaseStatement) -> str:
        """What must be equal for two statements to anchor each other: a simple statement's exact
        code, a compound statement's header (its body may differ between versions)."""
        stmt = self.by_node.get(id(node))
        if stmt is not None and stmt.is_flor_loop and stmt.loop_name is not None:
            return f"flor.loop {stmt.loop_name!r}"
        if isinstance(node, cst.FunctionDef | cst.ClassDef):
            kind = "def" if isinstance(node, cst.FunctionDef) else "class"
            return f"{kind} {node.name.value}"
        if isinstance(node, cst.With):
            items = ", ".join(
                node_code(item.item) + (f" as {node_code(item.asname.name)}" if item.asname else "")
                for item in node.items
            )
            return f"with {items}"
        if isinstance(node, cst.If):
            return f"if {node_code(node.test)}"
        if isinstance(node, cst.For):
            return f"for {node_code(node.target)} in {node_code(node.iter)}"
        if isinstance(node, cst.While):
            return f"while {node_code(node.test)}"
        if isinstance(node, cst.Try | cst.TryStar):
            return "try"
        if isinstance(node, cst.Match):
            return f"match {node_code(node.subject)}"
        return statement_code(node)

    def stmt_of(self, node: cst.CSTNode) -> Stmt:
        """The indexed statement for a statement node of this script."""
        return self.by_node[id(node)]

    def function_of(self, stmt: Stmt) -> Stmt | None:
        """The innermost enclosing def (class bodies run where the class statement is)."""
        for frame in reversed(stmt.frames):
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
        found: list[Frame] = []
        for frame in stmt.frames:
            if isinstance(frame.node, cst.FunctionDef):
                found = []
            elif self.stmt_of(frame.node).is_flor_loop:
                found.append(frame)
        return found

    def references(self, func: Stmt) -> list[Stmt]:
        """Statements outside ``func`` that mention its name (calls, callbacks, method calls)."""
        cached = self._refs.get(id(func))
        if cached is None:
            assert isinstance(func.node, cst.FunctionDef)
            name = func.node.name.value
            cached = [
                s for s in self.stmts
                if s is not func and name in s.idents and all(f.node is not func.node for f in s.frames)
            ]
            self._refs[id(func)] = cached
        return cached

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
        return self._position(stmt, frozenset())

    def _position(self, stmt: Stmt, seen: frozenset[int]) -> Position | None:
        loops = self.loop_frames(stmt)
        if loops:
            outer = loops[0]
            if self.main_loop is not None and outer.node is self.main_loop.node:
                if outer.label == "else":
                    return Position.SUFFIX  # a for-else clause runs after the last iteration
                nested = any(f.label == "body" for f in loops[1:])
                return Position.RANGE if nested else Position.VALIDATION
            outer_position = self._position(self.stmt_of(outer.node), seen)
            if outer_position in (Position.VALIDATION, Position.RANGE):
                return Position.RANGE  # a flor.loop that runs inside the main loop is a nested loop
            return outer_position
        func = self.function_of(stmt)
        marker = self._markers.get(id(func) if func is not None else None)
        if marker is not None:
            here, there = self.span(stmt.node), self.span(marker.node)
            if here.end.line < there.start.line:
                return Position.PREFIX
            if here.start.line > there.end.line:
                return Position.SUFFIX
            return Position.VALIDATION  # the statement that runs the main loop spans all of it
        if func is None:
            return Position.PREFIX if self.main_loop is None else None
        if id(func) in seen:
            return None
        sites = self.references(func)
        return deepest(
            p for p in (self._position(site, seen | {id(func)}) for site in sites) if p is not None
        )

    # -- public views -----------------------------------------------------------------------------
    def log_calls(self) -> list[tuple[str, cst.Call, Stmt]]:
        """Every flor.log call with a literal name, in source order, with its statement."""
        found: list[tuple[str, cst.Call, Stmt]] = []
        for stmt in self.stmts:
            for kind, call in stmt.calls:
                name_arg = call_arg(call, 0, "name") if kind == "log" else None
                name = literal_str(name_arg) if name_arg is not None else None
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
            line=self.span(stmt.node).start.line,
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
                line=self.span(call).start.line,
                position=self.position(stmt),
                loops=tuple(self.stmt_of(f.node).loop_name or "?" for f in self.loop_frames(stmt)),
                function=self.qualname(func) if func is not None else None,
            ))
        return ScriptAnalysis(
            loops=tuple(self.loop_site(s) for s in self.loops),
            logs=tuple(logs),
            main_loop=self.loop_site(self.main_loop) if self.main_loop is not None else None,
        )


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
                f"Cannot tell when flor.log('{name}', ...) at line {index.span(call).start.line} runs: "
                "it sits in a function that the script never references by name. Call it from the "
                "script, or move the statement to where the function is called."
            )
        positions.append(position)
    result = deepest(positions)
    assert result is not None  # sites is not empty
    return result
