"""Propagation of today's new flor.log statements into an old version of the same script."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import libcst as cst
from libcst.metadata import GlobalScope, MetadataWrapper, Scope, ScopeProvider

from ..errors import RewriteError
from ._analysis import (
    Block,
    FlorNames,
    ScriptIndex,
    Stmt,
    branches,
    call_arg,
    literal_str,
    node_code,
    statement_code,
)
from ._model import NotPlaced, Placed, Position, PropagationResult

_SHOWN = 60  # characters of code quoted in a reason


def _show(code: str) -> str:
    """Code quoted on one line in a reason, shortened."""
    line = " ".join(code.split())
    return f"`{line if len(line) <= _SHOWN else line[: _SHOWN - 3] + '...'}`"


@dataclass(eq=False)
class _Unit:
    """A statement of today's version that only logs new names: what gets inserted."""

    stmt: Stmt
    calls: tuple[tuple[str, cst.Call], ...]  # its flor.log calls with their names, in source order

    @property
    def names(self) -> tuple[str, ...]:
        """The distinct names the unit logs."""
        return tuple(dict.fromkeys(name for name, _ in self.calls))


@dataclass(eq=False)
class _Edit:
    """Where a unit goes in the old version: before ``index`` of ``owner``, or replacing it."""

    unit: _Unit
    owner: Block
    index: int
    replace: bool
    anchor: str


class _Unplaceable(Exception):
    """Internal: the reason a unit has no confident place (turned into NotPlaced)."""


class _LogCalls(cst.CSTVisitor):
    """Every flor.log call below a node, with its literal name (None when computed)."""

    def __init__(self, flor: FlorNames) -> None:
        self.flor = flor
        self.found: list[tuple[str | None, cst.Call]] = []

    def visit_Call(self, node: cst.Call) -> None:
        if self.flor.kind(node) == "log":
            name_arg = call_arg(node, 0, "name")
            self.found.append((literal_str(name_arg) if name_arg is not None else None, node))


class _SuiteSmalls(cst.CSTVisitor):
    """Small statements of a compound statement's one-line suites (``if c: flor.log(...)``)."""

    def __init__(self) -> None:
        self.smalls: list[cst.BaseSmallStatement] = []

    def visit_IndentedBlock(self, node: cst.IndentedBlock) -> bool:
        return False

    def visit_SimpleStatementSuite(self, node: cst.SimpleStatementSuite) -> bool:
        self.smalls.extend(node.body)
        return False


class _LogStripper(cst.CSTTransformer):
    """Replaces ``flor.log(name, value)`` by ``value``: the statement as it was before logging."""

    def __init__(self, flor: FlorNames) -> None:
        self.flor = flor

    def leave_Call(self, original_node: cst.Call, updated_node: cst.Call) -> cst.BaseExpression:
        value = call_arg(updated_node, 1, "value") if self.flor.kind(original_node) == "log" else None
        return value if value is not None else updated_node


class _Inserter(cst.CSTTransformer):
    """Applies located edits to the old module; every other node is left as parsed."""

    def __init__(self, edits: Sequence[_Edit]) -> None:
        self.by_owner: dict[int, list[_Edit]] = {}
        for edit in edits:
            self.by_owner.setdefault(id(edit.owner), []).append(edit)

    def _rebuild(self, original: Block, body: Sequence[cst.BaseStatement]) -> list[cst.BaseStatement]:
        edits = self.by_owner.get(id(original), [])
        rebuilt: list[cst.BaseStatement] = []
        for index in range(len(body) + 1):
            rebuilt.extend(e.unit.stmt.node for e in edits if e.index == index and not e.replace)
            if index == len(body):
                break
            wrapped = [e for e in edits if e.index == index and e.replace]
            if wrapped:
                old = body[index]
                new = wrapped[0].unit.stmt.node
                assert isinstance(old, cst.SimpleStatementLine) and isinstance(new, cst.SimpleStatementLine)
                # the old line's comments and blank lines stay; only its code becomes today's
                rebuilt.append(new.with_changes(
                    leading_lines=old.leading_lines, trailing_whitespace=old.trailing_whitespace
                ))
            else:
                rebuilt.append(body[index])
        return rebuilt

    def leave_IndentedBlock(
        self, original_node: cst.IndentedBlock, updated_node: cst.IndentedBlock
    ) -> cst.IndentedBlock:
        if id(original_node) not in self.by_owner:
            return updated_node
        return updated_node.with_changes(body=self._rebuild(original_node, updated_node.body))

    def leave_Module(self, original_node: cst.Module, updated_node: cst.Module) -> cst.Module:
        if id(original_node) not in self.by_owner:
            return updated_node
        return updated_node.with_changes(body=self._rebuild(original_node, updated_node.body))


def _names_of_smalls(smalls: Iterable[cst.BaseSmallStatement], flor: FlorNames, new: set[str]) -> list[str] | None:
    """The new names logged by ``smalls``, or None unless every one of them logs only new names."""
    names: list[str] = []
    for small in smalls:
        visitor = _LogCalls(flor)
        small.visit(visitor)
        if not visitor.found:
            return None  # this small statement does something besides logging
        for name, _ in visitor.found:
            if name is None or name not in new:
                return None
            names.append(name)
    return names


class _Propagation:
    """One propagation from today's version into one old version."""

    def __init__(self, today: ScriptIndex, old: ScriptIndex, new_names: set[str]) -> None:
        self.today = today
        self.old = old
        self.new_names = new_names
        self._new_only: dict[int, list[str] | None] = {}
        self._old_scopes: dict[cst.CSTNode, Scope | None] | None = None

    # -- units ------------------------------------------------------------------------------------
    def new_only(self, stmt: Stmt) -> list[str] | None:
        """The new names a statement logs when it does nothing but log new names, else None."""
        if id(stmt) in self._new_only:
            return self._new_only[id(stmt)]
        node = stmt.node
        result: list[str] | None
        if isinstance(node, cst.SimpleStatementLine):
            result = _names_of_smalls(node.body, self.today.flor, self.new_names)
        elif isinstance(node, cst.FunctionDef | cst.ClassDef) or stmt.is_flor_loop:
            result = None  # anchors, never part of what is inserted
        else:
            suites = _SuiteSmalls()
            node.visit(suites)
            result = _names_of_smalls(suites.smalls, self.today.flor, self.new_names) if suites.smalls else []
            for _, block in branches(node):
                for child in block.body:
                    names = self.new_only(self.today.stmt_of(child)) if result is not None else None
                    result = None if names is None or result is None else result + names
            if not result:
                result = None
        self._new_only[id(stmt)] = result
        return result

    def units(self, wanted: set[str]) -> tuple[list[_Unit], list[NotPlaced]]:
        """The statements to insert for ``wanted`` names, lifted to the largest log-only block."""
        units: dict[int, _Unit] = {}
        refused: list[NotPlaced] = []
        for name, call, stmt in self.today.log_calls():
            if name not in wanted:
                continue
            if self.new_only(stmt) is None:
                refused.append(NotPlaced(name, (
                    f"flor.log('{name}', ...) at line {self.today.span(call).start.line} is part of "
                    f"{_show(self.today.key(stmt.node))}, which does more than log new names; "
                    "put the flor.log call on a line of its own"
                )))
                continue
            while stmt.frames:
                parent = self.today.stmt_of(stmt.frames[-1].node)
                if self.new_only(parent) is None:
                    break
                stmt = parent
            if id(stmt) not in units:
                visitor = _LogCalls(self.today.flor)
                stmt.node.visit(visitor)
                units[id(stmt)] = _Unit(stmt, tuple((n, c) for n, c in visitor.found if n is not None))
        return sorted(units.values(), key=lambda u: self.today.span(u.stmt.node).start.line), refused

    # -- location ---------------------------------------------------------------------------------
    def _scope_counterpart(self, stmt: Stmt) -> tuple[Stmt, str]:
        """The old statement that plays the role of today's enclosing flor.loop or def."""
        today, old = self.today, self.old
        if stmt.is_flor_loop:
            name = stmt.loop_name
            if name is None:
                raise _Unplaceable(
                    f"its enclosing flor.loop at line {today.span(stmt.node).start.line} has a computed "
                    "name, so it cannot anchor the statement"
                )
            found = [s for s in old.loops if s.loop_name == name]
            if len(found) > 1:
                path = [today.stmt_of(f.node).loop_name for f in today.loop_frames(stmt)]
                found = [s for s in found if [old.stmt_of(f.node).loop_name for f in old.loop_frames(s)] == path]
            if len(found) > 1:
                qual = _function_name(today, stmt)
                found = [s for s in found if _function_name(old, s) == qual]
            if len(found) == 1:
                return found[0], f"flor.loop '{name}'"
            if found:
                raise _Unplaceable(f"the old version has {len(found)} flor.loop '{name}' in the same place")
            return self._renamed_loop(stmt, name)
        qual = today.qualname(stmt)
        found = [s for s in old.stmts if type(s.node) is type(stmt.node) and old.qualname(s) == qual]
        kind = "function" if isinstance(stmt.node, cst.FunctionDef) else "class"
        if len(found) == 1:
            return found[0], f"{kind} '{qual}'"
        if found:
            raise _Unplaceable(f"the old version defines {kind} '{qual}' {len(found)} times")
        raise _Unplaceable(f"its enclosing {kind} '{qual}' does not exist in the old version")

    def _loop_shape(self, index: ScriptIndex, stmt: Stmt) -> tuple[str, ...]:
        """A flor.loop's header without its name, and its nesting depth: evidence for a rename."""
        assert isinstance(stmt.node, cst.For) and stmt.loop_call is not None  # only flor loops get here
        rest = [node_code(arg.value) for arg in stmt.loop_call.args[1:]]
        return (node_code(stmt.node.target), str(len(index.loop_frames(stmt))), *rest)

    def _renamed_loop(self, stmt: Stmt, name: str) -> tuple[Stmt, str]:
        """The old loop that today's loop ``name`` was renamed from, when only one has its header."""
        today_names = {s.loop_name for s in self.today.loops}
        shape = self._loop_shape(self.today, stmt)
        found = [
            s for s in self.old.loops
            if s.loop_name not in today_names and self._loop_shape(self.old, s) == shape
        ]
        if len(found) == 1:
            return found[0], f"flor.loop '{found[0].loop_name}' (today's '{name}', same header)"
        old_names = ", ".join(sorted(f"'{s.loop_name}'" for s in self.old.loops if s.loop_name)) or "none"
        if found:
            raise _Unplaceable(
                f"today's flor.loop '{name}' is missing from the old version and {len(found)} of its "
                "loops have the same header, so the rename is ambiguous"
            )
        raise _Unplaceable(
            f"today's flor.loop '{name}' does not exist in the old version (its loops: {old_names}) and "
            "no old loop has the same header"
        )

    @staticmethod
    def _branch(stmt: Stmt, label: str) -> cst.IndentedBlock | None:
        return next((block for lab, block in branches(stmt.node) if lab == label), None)

    def _target_block(self, unit: _Unit) -> tuple[Block, str]:
        """The old block that corresponds to the unit's block today, and the anchor used."""
        today, old = self.today, self.old
        frames = unit.stmt.frames
        scope = max(
            (i for i, f in enumerate(frames)
             if isinstance(f.node, cst.FunctionDef | cst.ClassDef) or today.stmt_of(f.node).is_flor_loop),
            default=-1,
        )
        block: Block = old.module
        anchor = "module level"
        if scope >= 0:
            counterpart, anchor = self._scope_counterpart(today.stmt_of(frames[scope].node))
            found = self._branch(counterpart, frames[scope].label)
            if found is None:
                raise _Unplaceable(f"{anchor} has no '{frames[scope].label}' branch in the old version")
            block = found
        for frame in frames[scope + 1:]:
            key = today.key(frame.node)
            matches = [old.stmt_of(s) for s in block.body if old.key(s) == key]
            if len(matches) != 1:
                how = "has no counterpart" if not matches else f"appears {len(matches)} times"
                raise _Unplaceable(f"its enclosing block {_show(key)} {how} in the old version (under {anchor})")
            found = self._branch(matches[0], frame.label)
            if found is None:
                raise _Unplaceable(f"{_show(key)} has no '{frame.label}' branch in the old version")
            branch = "" if frame.label in ("body", "if") else f" ({frame.label})"
            block, anchor = found, f"{anchor} > {_show(key)}{branch}"
        return block, anchor

    def _neighbour(self, unit: _Unit, step: int) -> Stmt | None:
        """The nearest statement before (-1) or after (+1) the unit that is not itself new."""
        body = unit.stmt.owner.body
        index = unit.stmt.index + step
        while 0 <= index < len(body):
            stmt = self.today.stmt_of(body[index])
            if self.new_only(stmt) is None:
                return stmt
            index += step
        return None

    def locate(self, unit: _Unit) -> _Edit:
        """Where the unit goes in the old version; raises _Unplaceable when that is not certain."""
        block, anchor = self._target_block(unit)
        old_keys = [self.old.key(s) for s in block.body]
        node = unit.stmt.node
        if isinstance(node, cst.SimpleStatementLine):
            # today's line may wrap a statement the old version has: `loss = flor.log("loss", f(x))`
            # over `loss = f(x)`. Replace that line instead of running f(x) a second time.
            stripped = node.visit(_LogStripper(self.today.flor))
            bare = statement_code(stripped) if isinstance(stripped, cst.SimpleStatementLine) else ""
            same = [
                i for i, (key, old_node) in enumerate(zip(old_keys, block.body, strict=True))
                if key == bare and isinstance(old_node, cst.SimpleStatementLine)
            ]
            if len(same) == 1:
                return _Edit(unit, block, same[0], True, f"{anchor}, wrapping {_show(bare)}")
            if same:
                raise _Unplaceable(f"it wraps {_show(bare)}, which appears {len(same)} times in the old block")
        before, after = self._neighbour(unit, -1), self._neighbour(unit, +1)
        evidence: list[set[int]] = []  # candidate insertion indices, one set per matched neighbour
        described: list[str] = []
        for stmt, offset in ((before, 1), (after, 0)):
            if stmt is None:
                continue
            key = self.today.key(stmt.node)
            hits = {i + offset for i, k in enumerate(old_keys) if k == key}
            described.append(f"{'after' if offset else 'before'} {_show(key)}")
            if hits:
                evidence.append(hits)
        if not evidence:
            if before is None and after is None:
                raise _Unplaceable(f"its block ({anchor}) holds only new statements, so nothing anchors it")
            raise _Unplaceable(
                f"no neighbouring statement ({'; '.join(described)}) exists in the old block ({anchor})"
            )
        candidates = set.intersection(*evidence)
        if not candidates:
            raise _Unplaceable(
                f"its neighbours ({'; '.join(described)}) are not adjacent in the old version, so either "
                "side could be meant"
            )
        if len(candidates) > 1:
            # a block edge today (first or last statement) breaks a tie between repeated anchors
            edges = {0} if before is None else {len(old_keys)} if after is None else set()
            if len(candidates & edges) == 1:
                candidates &= edges
        if len(candidates) > 1:
            raise _Unplaceable(
                f"its anchor ({'; '.join(described)}) appears {len(candidates)} times in the old block "
                f"({anchor}); refusing to guess"
            )
        return _Edit(unit, block, candidates.pop(), False, f"{anchor}, {'; '.join(described)}")

    # -- dependencies -----------------------------------------------------------------------------
    def _scope_at(self, block: Block) -> Scope | None:
        if self._old_scopes is None:
            self._old_scopes = dict(self.old.wrapper.resolve(ScopeProvider))
        if block.body:
            return self._old_scopes.get(block.body[0])
        return next((s for s in self._old_scopes.values() if isinstance(s, GlobalScope)), None)

    def check_names(self, edit: _Edit, defined_by_new: set[str]) -> set[str]:
        """Raise unless every name the unit reads is defined where it lands; return names it binds."""
        # analysed alone, the statement's unresolved names are exactly the ones it needs from outside
        wrapper = MetadataWrapper(cst.Module(body=[cast(cst.SimpleStatementLine, edit.unit.stmt.node)]))
        scopes = {s for s in wrapper.resolve(ScopeProvider).values() if s is not None}
        free = sorted({
            access.node.value for scope in scopes for access in scope.accesses
            if not access.referents and isinstance(access.node, cst.Name)
        })
        bound = {a.name for scope in scopes if isinstance(scope, GlobalScope) for a in scope.assignments}
        target = self._scope_at(edit.owner)
        missing = [n for n in free if n not in defined_by_new and (target is None or n not in target)]
        if missing:
            names = ", ".join(f"'{n}'" for n in missing)
            raise _Unplaceable(f"it reads {names}, which the old version does not define where it would go")
        return bound


def _function_name(index: ScriptIndex, stmt: Stmt) -> str | None:
    """Qualified name of the def enclosing ``stmt``, None at module level."""
    func = index.function_of(stmt)
    return index.qualname(func) if func is not None else None


def propagate(today_source: str, old_source: str, names: Iterable[str] | None = None) -> PropagationResult:
    """Insert today's new flor.log statements into ``old_source`` where they align, or say why not.

    :param names: the logged names to propagate; default: every name today logs that the old one lacks.
    :raises RewriteError: a version does not parse, or a requested name is not logged today.
    """
    today = ScriptIndex.parse(today_source, "today's version")
    old = ScriptIndex.parse(old_source, "the old version")
    today_names, old_names = today.log_names(), old.log_names()
    requested = set(names) if names is not None else today_names - old_names
    unknown = sorted(requested - today_names)
    if unknown:
        known = ", ".join(f"'{n}'" for n in sorted(today_names)) or "no names"
        raise RewriteError(
            f"Today's version does not log {', '.join(repr(n) for n in unknown)} (it logs {known}). "
            "Add the flor.log statement to today's script first, or check the spelling."
        )
    propagation = _Propagation(today, old, today_names - old_names)
    units, not_placed = propagation.units(requested - old_names)
    edits: list[_Edit] = []
    defined_by_new: set[str] = set()
    taken: set[tuple[int, int]] = set()
    for unit in units:
        try:
            edit = propagation.locate(unit)
            if edit.replace and (id(edit.owner), edit.index) in taken:
                raise _Unplaceable("another new statement already wraps the same old line")
            defined_by_new |= propagation.check_names(edit, defined_by_new)
        except _Unplaceable as why:
            not_placed.extend(NotPlaced(name, str(why)) for name in unit.names)
            continue
        if edit.replace:
            taken.add((id(edit.owner), edit.index))
        edits.append(edit)
    source, placed = _apply(today, old, edits, not_placed)
    return PropagationResult(
        source=source,
        placed=tuple(placed),
        not_placed=tuple(not_placed),
        already_logged=tuple(sorted(requested & old_names)),
    )


def _apply(today: ScriptIndex, old: ScriptIndex, edits: list[_Edit], not_placed: list[NotPlaced]
           ) -> tuple[str, list[Placed]]:
    """Rewrite the old module with ``edits``; drop (and report) edits whose position is wrong."""
    while True:
        if not edits:
            return old.module.code, []
        module = old.module.visit(_Inserter(edits))
        assert isinstance(module, cst.Module)
        result = ScriptIndex(module, "the rewritten old version")
        placed: list[Placed] = []
        rejected: list[_Edit] = []
        for edit in edits:
            node = edit.unit.stmt.node
            if edit.replace:
                # the inserted line is a copy carrying the old comments; its calls are today's nodes
                node = _find_line(result, edit.unit.calls[0][1])
            position = result.position(result.stmt_of(node))
            reason = _position_mismatch(today.position(edit.unit.stmt), position)
            if reason is not None:
                not_placed.extend(NotPlaced(name, reason) for name in edit.unit.names)
                rejected.append(edit)
                continue
            assert position is not None  # _position_mismatch refuses None
            for name in edit.unit.names:
                call = next(c for n, c in edit.unit.calls if n == name)
                placed.append(Placed(name, position, result.span(call).start.line, edit.anchor))
        if not rejected:
            return module.code, placed
        edits = [e for e in edits if e not in rejected]


def _find_line(index: ScriptIndex, call: cst.Call) -> cst.BaseStatement:
    """The statement of ``index`` whose own code holds ``call``."""
    return next(s.node for s in index.stmts if any(c is call for _, c in s.calls))


def _position_mismatch(today: Position | None, there: Position | None) -> str | None:
    """Why a placement must be refused after all, judged by where it runs; None when it is fine."""
    if there is None:
        return ("at the aligned place it would sit in a function that the old version never references, "
                "so replay would not run it")
    shallow = (Position.PREFIX, Position.SUFFIX)
    if today in shallow and there != today:
        assert today is not None
        return (f"today it runs in the {today.value} but at the aligned place in the old version it would "
                f"run in the {there.value}")
    return None
