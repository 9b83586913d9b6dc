"""Propagation of today's new flor.log statements into an old version of the same script."""

from __future__ import annotations

import ast
import dataclasses
import gc
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import libcst as cst

from ..errors import RewriteError
from ._alignment import Alignment, Unaligned
from ._analysis import (
    Block,
    FlorNames,
    ProjectIndex,
    ScriptIndex,
    Stmt,
    branches,
    call_arg,
    literal_str,
    node_code,
    normalized,
)
from ._model import NotPlaced, Placed, Position, ProjectPropagationResult, PropagationResult

_SHOWN = 60  # characters of code quoted in a reason
_CACHED = 8  # today's versions kept parsed: one propagation per old version reuses today's index
_MEMO = 8  # sets of new names whose per-statement results today's index keeps


def _show(code: str) -> str:
    """Code quoted on one line in a reason, shortened."""
    line = " ".join(code.split())
    return f"`{line if len(line) <= _SHOWN else line[: _SHOWN - 3] + '...'}`"


@dataclass(eq=False)
class _Unit:
    """A statement of today's version that only logs new names: what gets inserted."""

    stmt: Stmt
    calls: tuple[tuple[str, ast.Call], ...]  # its flor.log calls with their names, in source order

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


def _log_calls(flor: FlorNames, trees: Iterable[ast.AST]) -> list[tuple[str | None, ast.Call]]:
    """Every flor.log call below ``trees``, with its literal name (None when computed)."""
    found: list[tuple[str | None, ast.Call]] = []
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and flor.kind(node) == "log":
                found.append((literal_str(call_arg(node, 0, "name")), node))
    return sorted(found, key=lambda f: (f[1].lineno, f[1].col_offset))


class _LogStripper(cst.CSTTransformer):
    """Replaces ``flor.log(name, value)`` by ``value``: the statement as it was before logging."""

    def __init__(self, flor: FlorNames) -> None:
        self.flor = flor

    def leave_Call(self, original_node: cst.Call, updated_node: cst.Call) -> cst.BaseExpression:
        func = original_node.func
        spelled = node_code(func)
        is_log = (isinstance(func, cst.Attribute) and func.attr.value == "log"
                  and node_code(func.value) in self.flor.modules) or self.flor.functions.get(spelled) == "log"
        if not is_log:
            return updated_node
        positional = [a for a in updated_node.args if a.keyword is None and not a.star]
        if len(positional) > 1:
            return positional[1].value
        value = next((a.value for a in updated_node.args if a.keyword is not None and a.keyword.value == "value"), None)
        return value if value is not None else updated_node


class _Inserter(cst.CSTTransformer):
    """Applies located edits to the old module, visiting only the path down to the edited blocks."""

    def __init__(self, old: ScriptIndex, edits: Sequence[_Edit]) -> None:
        self.by_owner: dict[int, list[_Edit]] = {}
        self.path: set[int] = {id(old.module)}
        for edit in edits:
            self.by_owner.setdefault(id(edit.owner), []).append(edit)
            self.path.add(id(edit.owner))
            for frame in old.blocks[id(edit.owner)]:
                self.path |= {id(frame.node), id(frame.block)}
                branch = frame.node.orelse if isinstance(frame.node, cst.If) else None
                while isinstance(branch, cst.If):  # an elif of a chain on the path
                    self.path.add(id(branch))
                    branch = branch.orelse

    def on_visit(self, node: cst.CSTNode) -> bool:
        if isinstance(node, cst.Module | cst.IndentedBlock | cst.BaseCompoundStatement):
            return id(node) in self.path
        # the nodes between a compound statement and its blocks; headers and simple lines are skipped
        return isinstance(node, cst.Else | cst.ExceptHandler | cst.ExceptStarHandler | cst.Finally | cst.MatchCase)

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


def _names_of_smalls(smalls: Iterable[ast.stmt], flor: FlorNames, new: set[str]) -> list[str] | None:
    """The new names logged by ``smalls``, or None unless every one of them logs only new names."""
    names: list[str] = []
    for small in smalls:
        found = _log_calls(flor, [small])
        if not found:
            return None  # this small statement does something besides logging
        for name, _ in found:
            if name is None or name not in new:
                return None
            names.append(name)
    return names


def _free_names(trees: Iterable[ast.AST]) -> tuple[list[str], set[str]]:
    """The names a statement reads from outside, and the names it binds."""
    loaded: list[str] = []
    stored: set[str] = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                (stored.add(node.id) if isinstance(node.ctx, ast.Store | ast.Del) else loaded.append(node.id))
            elif isinstance(node, ast.arg):
                stored.add(node.arg)
    return sorted({n for n in loaded if n not in stored}), stored


class _NewOnly:
    """Which of today's statements do nothing but log new names, and which names (memoized).

    It depends on today's version and the set of new names alone, so one serves every old version
    that lacks the same names (kept on today's index); it holds no propagation, so a propagation's
    objects are freed when it returns, not at the next garbage collection.
    """

    def __init__(self, today: ScriptIndex, new_names: set[str]) -> None:
        self.today = today
        self.new_names = new_names
        self._found: dict[int, list[str] | None] = {}
        self.digests: dict[int, int] = {}  # today's statement digests without the new ones (Alignment)

    @classmethod
    def of(cls, today: ScriptIndex, new_names: set[str]) -> _NewOnly:
        """The one for ``today`` and ``new_names``, made once per index and set of names."""
        key = ("new only", frozenset(new_names))
        found = today.memo.pop(key, None)
        if not isinstance(found, _NewOnly):
            found = cls(today, new_names)
        today.memo[key] = found
        while len(today.memo) > _MEMO:
            today.memo.pop(next(iter(today.memo)))
        return found

    def is_new(self, stmt: Stmt) -> bool:
        """True when ``stmt`` only logs new names: one of the statements to place."""
        return self(stmt) is not None

    def __call__(self, stmt: Stmt) -> list[str] | None:
        """The new names a statement logs when it does nothing but log new names, else None."""
        if id(stmt) in self._found:
            return self._found[id(stmt)]
        node = stmt.node
        result: list[str] | None
        if isinstance(node, cst.SimpleStatementLine):
            result = _names_of_smalls(stmt.trees, self.today.flor, self.new_names)
        elif isinstance(node, cst.FunctionDef | cst.ClassDef) or stmt.is_flor_loop:
            result = None  # anchors, never part of what is inserted
        else:
            result = _names_of_smalls(stmt.inline, self.today.flor, self.new_names) if stmt.inline else []
            for _, kids in stmt.children:
                for child in kids:
                    names = self(child) if result is not None else None
                    result = None if names is None or result is None else result + names
            if not result:
                result = None
        self._found[id(stmt)] = result
        return result


class _Propagation:
    """One propagation from today's version into one old version."""

    def __init__(self, today: ScriptIndex, old: ScriptIndex, new_names: set[str]) -> None:
        self.today = today
        self.old = old
        self.new_names = new_names
        self.new_only = _NewOnly.of(today, new_names)
        self.imports: dict[int, Stmt] = {}  # today's flor imports the placed statements need in the old module
        self.align = Alignment(today, old, self.new_only.is_new, self.new_only.digests)

    # -- units ------------------------------------------------------------------------------------
    def units(self, wanted: set[str]) -> tuple[list[_Unit], list[NotPlaced]]:
        """The statements to insert for ``wanted`` names, lifted to the largest log-only block."""
        units: dict[int, _Unit] = {}
        refused: list[NotPlaced] = []
        for name, call, stmt in self.today.log_calls():
            if name not in wanted:
                continue
            if self.new_only(stmt) is None:
                refused.append(NotPlaced(name, (
                    f"flor.log('{name}', ...) at line {call.lineno} is part of "
                    f"{_show(stmt.key)}, which does more than log new names; "
                    "put the flor.log call on a line of its own"
                )))
                continue
            while stmt.frames:
                parent = self.today.stmt_of(stmt.frames[-1].node)
                if self.new_only(parent) is None:
                    break
                stmt = parent
            if id(stmt) not in units:
                found = _log_calls(self.today.flor, [*stmt.trees])
                units[id(stmt)] = _Unit(stmt, tuple((n, c) for n, c in found if n is not None))
        return sorted(units.values(), key=lambda u: u.stmt.order), refused

    # -- location ---------------------------------------------------------------------------------
    def describe(self, block: Block) -> str:
        """The old block as an anchor: its innermost flor.loop / def / class, then the blocks below."""
        frames = self.old.blocks[id(block)]
        scope = max(
            (i for i, f in enumerate(frames)
             if isinstance(f.node, cst.FunctionDef | cst.ClassDef) or self.old.stmt_of(f.node).is_flor_loop),
            default=-1,
        )
        if scope < 0:
            anchor = "module level"
        else:
            stmt = self.old.stmt_of(frames[scope].node)
            if stmt.is_flor_loop:
                anchor = f"flor.loop '{stmt.loop_name}'"
                today = self.align.o2t.get(id(stmt))
                if today is not None and today.loop_name != stmt.loop_name:
                    anchor += f" (today's '{today.loop_name}', same header)"
            else:
                kind = "function" if isinstance(stmt.node, cst.FunctionDef) else "class"
                anchor = f"{kind} '{self.old.qualname(stmt)}'"
            if frames[scope].label not in ("body", "if"):
                anchor += f" ({frames[scope].label})"
        for frame in frames[scope + 1:]:
            branch = "" if frame.label in ("body", "if") else f" ({frame.label})"
            anchor += f" > {_show(self.old.stmt_of(frame.node).key)}{branch}"
        return anchor

    def _missing(self, stmt: Stmt) -> str:
        """Why today's enclosing statement ``stmt`` has no old counterpart."""
        if id(stmt) in self.align.why:
            return self.align.why[id(stmt)]
        candidates = self.align.ambiguous.get(id(stmt))
        parent = self.today.parent_of(stmt)
        under = self.align.image(parent) if parent is not None else None
        where = ""
        if parent is None:
            where = " (under module level)"
        elif under is None:
            where = f" ({self._missing(parent)})"
        else:
            label = stmt.frames[-1].label
            block = next((b for lab, b in branches(under.node) if lab == label), None)
            where = f" (under {self.describe(block)})" if block is not None else ""
        if candidates:
            return f"its enclosing block {_show(stmt.key)} matches {len(candidates)} old blocks equally well{where}"
        return f"its enclosing block {_show(stmt.key)} has no counterpart in the old version{where}"

    def _target_block(self, unit: _Unit) -> tuple[Block, list[Stmt], Stmt | None]:
        """The old block for the unit, today's statements of its block, and the inlined function if any."""
        frames = unit.stmt.frames
        if not frames:
            return self.old.module, self.align.kids(None, "module"), None
        owner = self.today.stmt_of(frames[-1].node)
        label = frames[-1].label
        mine = self.align.kids(owner, label)
        image = self.align.image(owner)
        if image is None:
            if isinstance(owner.node, cst.FunctionDef):
                return self._inlined(owner, mine), mine, owner
            raise _Unplaceable(self._missing(owner))
        block = next((b for lab, b in branches(image.node) if lab == label), None)
        if block is None:
            raise _Unplaceable(f"{_show(image.key)} has no '{label}' branch in the old version")
        return block, mine, None

    def _inlined(self, func: Stmt, mine: list[Stmt]) -> Block:
        """The old block that holds today's function body inline, statement for statement."""
        images = [self.align.image(s) for s in mine]
        missing = [s for s, o in zip(mine, images, strict=True) if o is None]
        reason = self.align.why.get(id(func), f"its enclosing function '{self.today.qualname(func)}' does not exist")
        if not mine or missing:
            shown = f"; {_show(missing[0].key)} has no counterpart" if missing else ""
            raise _Unplaceable(f"{reason}, and its body is not found inline{shown}")
        owners = {id(o.owner) for o in images if o is not None}
        indices = [o.index for o in images if o is not None]
        if len(owners) != 1 or indices != list(range(indices[0], indices[0] + len(indices))):
            raise _Unplaceable(f"{reason}, and its body maps to old statements that are not one run in one block")
        first = images[0]
        assert first is not None
        return first.owner

    def _slots(self, stmt: Stmt | None, block: Block, offset: int) -> set[int] | None:
        """Insertion indices a neighbour stands for: next to its image, or its equal candidates."""
        if stmt is None:
            return None
        image = self.align.image(stmt)
        if image is not None:
            return {image.index + offset} if image.owner is block else None
        candidates = self.align.ambiguous.get(id(stmt), [])
        found = {o.index + offset for o in candidates if o.owner is block}
        return found or None

    def locate(self, unit: _Unit) -> _Edit:
        """Where the unit goes in the old version; raises _Unplaceable when that is not certain."""
        try:
            block, mine, inlined = self._target_block(unit)
        except Unaligned as why:
            raise _Unplaceable(str(why)) from None
        anchor = self.describe(block)
        if inlined is not None:
            anchor = f"function '{self.today.qualname(inlined)}' inline in the old version at {anchor}"
            params = self._parameters(inlined)
            read = [n for n in _free_names(unit.stmt.trees)[0] if n in params]
            if read:
                raise _Unplaceable(
                    f"it reads {', '.join(repr(n) for n in read)}, a parameter of '{self.today.qualname(inlined)}', "
                    "which the old version has inline: the value passed is not known there"
                )
        body = block.body
        # where today's block puts it among the statements that map into this block
        before = [s for s in mine if s.order < unit.stmt.order]
        after = [s for s in mine if s.order > unit.stmt.order]
        # statements that moved on their own (out of every order-preserving chain) are no evidence;
        # the rest must stay on their side of it
        moved = self.align.moved(mine, block)
        lo = max((o.index + 1 for s in before if id(s) not in moved
                  and (o := self.align.image(s)) is not None and o.owner is block), default=0)
        hi = min((o.index for s in after if id(s) not in moved
                  and (o := self.align.image(s)) is not None and o.owner is block), default=len(body))
        wrapped = self._wrapped(unit, block, lo, hi)
        if wrapped is not None:
            index, what = wrapped
            return _Edit(unit, block, index, True, f"{anchor}, wrapping {_show(what)}")
        prev = before[-1] if before else None
        nxt = after[0] if after else None
        evidence: list[set[int]] = []
        described: list[str] = []
        for stmt, offset, side in ((prev, 1, "after"), (nxt, 0, "before")):
            if stmt is None:
                continue
            slots = self._slots(stmt, block, offset)
            image = self.align.image(stmt)
            how = self.align.how.get(id(stmt))
            note = f" (old: {_show(image.key)})" if image is not None and how == "similar" else ""
            described.append(f"{side} {_show(stmt.key)}{note}")
            if slots:
                evidence.append(slots)
        if not evidence:
            if prev is None and nxt is None:
                raise _Unplaceable(f"its block ({anchor}) holds only new statements, so nothing anchors it")
            raise _Unplaceable(
                f"no neighbouring statement ({'; '.join(described)}) has a counterpart in the old block ({anchor})"
            )
        candidates = set.intersection(*evidence)
        if not candidates:
            raise _Unplaceable(
                f"its neighbours ({'; '.join(described)}) are not adjacent in the old version, so either "
                "side could be meant"
            )
        if len(candidates) > 1:
            # a block edge today (first or last statement) breaks a tie between repeated anchors
            edges = {0} if prev is None else {len(body)} if nxt is None else set()
            if len(candidates & edges) == 1:
                candidates &= edges
        if len(candidates) > 1:
            raise _Unplaceable(
                f"its anchor ({'; '.join(described)}) appears {len(candidates)} times in the old block "
                f"({anchor}); refusing to guess"
            )
        slot = candidates.pop()
        if not lo <= slot <= hi:
            raise _Unplaceable(
                f"the statements around it ({'; '.join(described)}) come in another order in the old block "
                f"({anchor}), so its place among them is not known"
            )
        return _Edit(unit, block, slot, False, f"{anchor}, {'; '.join(described)}")

    def _wrapped(self, unit: _Unit, block: Block, lo: int, hi: int) -> tuple[int, str] | None:
        """The old line today's line logs the value of: ``x = flor.log("x", f())`` over ``x = f()``,
        or ``flor.log("n", f().item())`` over a bare ``f()``. It is replaced instead of run twice."""
        node = unit.stmt.node
        if not isinstance(node, cst.SimpleStatementLine):
            return None
        stripped = node.visit(_LogStripper(self.today.flor))
        bare = normalized(node_code(stripped.with_changes(
            leading_lines=(), trailing_whitespace=cst.TrailingWhitespace()
        ))) if isinstance(stripped, cst.SimpleStatementLine) else ""
        free = [self.old.stmt_of(s) for s in block.body]
        same = [o for o in free if o.key == bare and isinstance(o.node, cst.SimpleStatementLine)
                and id(o) not in self.align.o2t]
        if len(same) > 1:
            raise _Unplaceable(f"it wraps {_show(bare)}, which appears {len(same)} times in the old block")
        if same:
            return same[0].index, bare
        # a bare call whose value today's line logs: `clip_grad_norm_(...)` under `.item()`
        inner = {
            normalized(self.today.source.segment(n))
            for _, call in unit.calls for value in [call_arg(call, 1, "value")] if value is not None
            for n in ast.walk(value) if isinstance(n, ast.Call)
        }
        calls = [
            o for o in free[lo:hi]
            if id(o) not in self.align.o2t and len(o.trees) == 1 and isinstance(o.trees[0], ast.Expr)
            and isinstance(o.trees[0].value, ast.Call) and o.key in inner
        ]
        if len(calls) == 1:
            return calls[0].index, calls[0].key
        if calls:
            raise _Unplaceable(f"it logs the value of {_show(calls[0].key)}, which appears {len(calls)} times there")
        return None

    @staticmethod
    def _parameters(func: Stmt) -> set[str]:
        tree = func.trees[0]
        assert isinstance(tree, ast.FunctionDef | ast.AsyncFunctionDef)
        args = tree.args
        names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
        names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
        return set(names)

    # -- dependencies -----------------------------------------------------------------------------
    def check_names(self, edit: _Edit, defined_by_new: set[str]) -> set[str]:
        """Raise unless every name the unit reads is defined where it lands; return names it binds."""
        free, bound = _free_names(edit.unit.stmt.trees)
        missing = [n for n in free if n not in defined_by_new and not self.old.defines(edit.owner, n)]
        # a module that never logged before lacks `import flordb_build as flor`: today's import comes along
        imports = {n: found for n in missing if (found := self._flor_import(n)) is not None}
        missing = [n for n in missing if n not in imports]
        if missing:
            names = ", ".join(f"'{n}'" for n in missing)
            raise _Unplaceable(f"it reads {names}, which the old version does not define where it would go")
        self.imports.update({id(stmt): stmt for stmt in imports.values()})
        return bound | set(imports)

    def _flor_import(self, name: str) -> Stmt | None:
        """Today's module-level statement that binds ``name`` to flordb_build (or its loop/log) alone."""
        if name not in self.today.flor.modules and name not in self.today.flor.functions:
            return None
        for stmt in self.today.top:
            tree = stmt.trees[0] if len(stmt.trees) == 1 else None
            if isinstance(tree, ast.Import) and all(a.name == "flordb_build" for a in tree.names):
                if name in {a.asname or a.name for a in tree.names}:
                    return stmt
            if isinstance(tree, ast.ImportFrom) and tree.module == "flordb_build" and not tree.level:
                if name in {a.asname or a.name for a in tree.names}:
                    return stmt
        return None

    def import_slot(self) -> int:
        """Where an import goes in the old module: after its docstring and ``__future__`` imports."""
        index = 0
        for stmt in self.old.top:
            tree = stmt.trees[0]
            docstring = index == 0 and isinstance(tree, ast.Expr) and isinstance(tree.value, ast.Constant)
            future = isinstance(tree, ast.ImportFrom) and tree.module == "__future__"
            if not (docstring or future):
                break
            index += 1
        return index


_TODAY: dict[str, ScriptIndex] = {}


def _today_index(source: str) -> ScriptIndex:
    """Today's version, parsed once for every old version it is propagated into."""
    found = _TODAY.pop(source, None)
    if found is None:
        found = ScriptIndex.parse(source, "today's version")
    _TODAY[source] = found
    while len(_TODAY) > _CACHED:
        _TODAY.pop(next(iter(_TODAY)))
    return found


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for one propagation, as it was after it.

    A propagation builds two trees of some 10^5 objects that live until it returns; with the
    collector on, each generation-2 pass walks all of them (and today's cached index) again, which
    took about as long as the propagation itself. Its garbage is freed by reference counting or by
    the first collection after it.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def propagate(today_source: str, old_source: str, names: Iterable[str] | None = None) -> PropagationResult:
    """Insert today's new flor.log statements into ``old_source`` where they align, or say why not.

    The two versions are aligned statement by statement (see :mod:`._alignment`): identical code,
    then edited code by its header or its tokens, so a neighbour whose constant or condition changed
    still anchors. A new statement lands between the old counterparts of its neighbours, inside the
    counterpart of its enclosing block; wherever that is ambiguous or missing, it is refused with the
    reason, never inserted at a guess.

    :param names: the logged names to propagate; default: every name today logs that the old one lacks.
    :returns: the rewritten old source, each placed statement (name, position, line, anchor), each
        refusal (name, reason), and the requested names the old version logs itself.
    :raises RewriteError: a version does not parse, or a requested name is not logged today.
    """
    with _collector_paused():
        today = _today_index(today_source)
        old = ScriptIndex.parse(old_source, "the old version", chunks=set())
        try:
            today_names = today.log_names()
            requested = set(names) if names is not None else today_names - old.log_names()
            unknown = sorted(requested - today_names)
            if unknown:
                raise _unknown_names(unknown, today_names)
            return _propagate(today, old, requested)
        finally:
            old.release()


def _unknown_names(unknown: Iterable[str], logged: Iterable[str]) -> RewriteError:
    known = ", ".join(f"'{n}'" for n in sorted(logged)) or "no names"
    return RewriteError(
        f"Today's version does not log {', '.join(repr(n) for n in unknown)} (it logs {known}). "
        "Add the flor.log statement to today's script first, or check the spelling."
    )


def _propagate(today: ScriptIndex, old: ScriptIndex, requested: set[str]) -> PropagationResult:
    """Place the ``requested`` names (logged today) into ``old``."""
    today_names, old_names = today.log_names(), old.log_names()
    if not requested - old_names:
        return PropagationResult(old.source_text, (), (), tuple(sorted(requested & old_names)))
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
            reason = _position_mismatch(today.position(unit.stmt), _edit_position(old, edit))
            if reason is not None:
                raise _Unplaceable(reason)
            defined_by_new |= propagation.check_names(edit, defined_by_new)
        except _Unplaceable as why:
            not_placed.extend(NotPlaced(name, str(why)) for name in unit.names)
            continue
        if edit.replace:
            taken.add((id(edit.owner), edit.index))
        edits.append(edit)
    if edits:
        slot = propagation.import_slot()
        edits += [_Edit(_Unit(stmt, ()), old.module, slot, False, "module top") for stmt in propagation.imports.values()]
    source, placed = _apply(today, old, edits)
    return PropagationResult(
        source=source,
        placed=tuple(placed),
        not_placed=tuple(not_placed),
        already_logged=tuple(sorted(requested & old_names)),
    )


def propagate_project(
    today: Mapping[str, str], old: Mapping[str, str], names: Iterable[str] | None = None
) -> ProjectPropagationResult:
    """:func:`propagate` over several modules of one project: each module's new statements go into
    that module's old version, and a statement in a helper module (``model.py``'s ``forward``) is
    classified by where the other modules call it (``main.py``'s epoch loop).

    :param today: path -> today's source of every module that matters (the entry script included).
    :param old: path -> the recorded source of the same modules (a module missing there is new).
    :param names: the names to propagate; default: every name today logs that the old project lacks.
    :raises RewriteError: a module does not parse, or a requested name is logged in no module today.
    """
    with _collector_paused():
        return _propagate_project(today, old, names)


def _propagate_project(
    today: Mapping[str, str], old: Mapping[str, str], names: Iterable[str] | None
) -> ProjectPropagationResult:
    todays = ProjectIndex.parse(dict(today), "today's version")
    olds = ProjectIndex.parse({p: s for p, s in old.items() if p in today}, "the old version", cached=True)
    logged_today = {path: index.log_names() for path, index in todays.indexes.items()}
    logged_old = set().union(*(index.log_names() for index in olds.indexes.values()))
    everywhere = set().union(*logged_today.values())
    requested = set(names) if names is not None else everywhere - logged_old
    unknown = sorted(requested - everywhere)
    if unknown:
        raise _unknown_names(unknown, everywhere)
    modules: dict[str, PropagationResult] = {}
    missing: list[NotPlaced] = []
    for path, index in todays.indexes.items():
        wanted = requested & logged_today[path]
        if not wanted:
            continue
        recorded = olds.indexes.get(path)
        if recorded is None:
            missing.extend(NotPlaced(n, f"'{path}' does not exist in the old version") for n in sorted(wanted - logged_old))
            continue
        # a name the old project logs in another module is logged there already
        result = _propagate(index, recorded, wanted - (logged_old - recorded.log_names()))
        modules[path] = dataclasses.replace(result, placed=tuple(dataclasses.replace(p, path=path) for p in result.placed))
    return ProjectPropagationResult(
        modules=modules, not_placed=tuple(missing), already_logged=tuple(sorted(requested & logged_old))
    )


def _edit_position(old: ScriptIndex, edit: _Edit) -> Position | None:
    """Where the edited statement runs in the old version."""
    if edit.replace:
        return old.position(old.stmt_of(edit.owner.body[edit.index]))
    return old.slot_position(edit.owner, edit.index)


def _edit_order(old: ScriptIndex, edit: _Edit) -> float:
    """Where the edit lands in the old version's statement order (for reading lines back)."""
    body = edit.owner.body
    if edit.index < len(body):
        return old.stmt_of(body[edit.index]).order - (0 if edit.replace else 0.5)
    if body:
        return old.stmt_of(body[-1]).last + 0.5
    frames = old.blocks[id(edit.owner)]
    return (old.stmt_of(frames[-1].node).order if frames else -1) + 0.5


def _apply(today: ScriptIndex, old: ScriptIndex, edits: list[_Edit]) -> tuple[str, list[Placed]]:
    """Rewrite the old module with ``edits`` and read each placed call's line back."""
    if not edits:
        return old.module.code, []
    module = old.module.visit(_Inserter(old, edits))
    assert isinstance(module, cst.Module)
    source = _splice(old, module, {id(e.unit.stmt.node) for e in edits if e.owner is old.module and not e.replace})
    # Each placed call's line is read back from the text: the line that holds it is today's line,
    # word for word, and the old version cannot hold it (it does not log the name). Repeats of one
    # line are told apart by order: the edits are visited in the order they land.
    wanted = {_code_on_line(today, e.unit, call) for e in edits for _, call in e.unit.calls}
    lines: dict[str, list[int]] = {}
    for number, text in enumerate(source.splitlines(), 1):
        line = normalized(text)
        for code in wanted:
            # a wrapped line keeps the old line's comment after today's code
            if line == code or line.startswith(code + " #"):
                lines.setdefault(code, []).append(number)
    landing = sorted(enumerate(edits), key=lambda e: (_edit_order(old, e[1]), e[0]))
    try:
        per_edit = _placed_by_text(today, old, landing, lines)
    except (KeyError, IndexError):  # a line the text search cannot tell: ask the parsed result
        per_edit = _placed_by_tree(today, old, landing, source)
    placed = [p for seq in range(len(edits)) for p in per_edit.get(seq, [])]
    return source, placed


def _placed_by_text(today: ScriptIndex, old: ScriptIndex, landing: list[tuple[int, _Edit]],
                    lines: dict[str, list[int]]) -> dict[int, list[Placed]]:
    taken: dict[str, int] = {}
    per_edit: dict[int, list[Placed]] = {}
    for seq, edit in landing:
        position = _edit_position(old, edit)
        assert position is not None  # _position_mismatch refused None
        seen: set[str] = set()
        for name, call in edit.unit.calls:
            text = _code_on_line(today, edit.unit, call)
            if text in seen:
                continue  # several calls on one line: that line counts once
            seen.add(text)
            at = taken.get(text, 0)
            taken[text] = at + 1
            if all(p.name != name for p in per_edit.get(seq, [])):
                per_edit.setdefault(seq, []).append(Placed(name, position, lines[text][at], edit.anchor))
    return per_edit


def _placed_by_tree(today: ScriptIndex, old: ScriptIndex, landing: list[tuple[int, _Edit]],
                    source: str) -> dict[int, list[Placed]]:
    """The placed lines from the parsed result: the k-th call logging a (new) name is the k-th placed."""
    found: dict[str, list[int]] = {}
    for name, call in _log_calls(today.flor.merged(old.flor), [ast.parse(source)]):
        if name is not None:
            found.setdefault(name, []).append(call.lineno)
    taken: dict[str, int] = {}
    per_edit: dict[int, list[Placed]] = {}
    for seq, edit in landing:
        position = _edit_position(old, edit)
        assert position is not None  # _position_mismatch refused None
        for name in edit.unit.names:
            at = taken.get(name, 0)
            per_edit.setdefault(seq, []).append(Placed(name, position, found[name][at], edit.anchor))
            taken[name] = at + sum(1 for n, _ in edit.unit.calls if n == name)
    return per_edit


def _splice(old: ScriptIndex, module: cst.Module, inserted: set[int]) -> str:
    """The rewritten module's code: the old text, with only the new and changed top-level statements
    generated (generating the whole module costs more than the rest of a propagation). ``inserted``:
    ids of the statements inserted at module level."""
    before = old.module.body
    if not before or not old.module.has_trailing_newline:
        return module.code  # (libcst adds the last line's newline when a statement follows it)
    lines = old.source.lines
    starts = []
    for stmt in before:
        first = old.stmt_of(stmt).trees[0]
        decorators = getattr(first, "decorator_list", None)
        line = decorators[0].lineno if decorators else first.lineno
        starts.append(line - len(stmt.leading_lines))
    starts.append(len(lines) + 1 - len(old.module.footer))
    parts: list[str] = []
    at = 0  # the next old statement
    for now in module.body:
        if id(now) in inserted or at >= len(before):
            parts.append(module.code_for_node(now))
            continue
        was = before[at]
        text = "".join(lines[starts[at] - 1:starts[at + 1] - 1])
        if now is not was:
            if text != old.module.code_for_node(was):
                return module.code  # the text does not split where the statements do: generate it all
            text = module.code_for_node(now)
        parts.append(text)
        at += 1
    if at != len(before):
        return module.code
    head = "".join(lines[:starts[0] - 1])
    tail = "".join(lines[starts[-1] - 1:])
    return head + "".join(parts) + tail


def _code_on_line(today: ScriptIndex, unit: _Unit, call: ast.Call) -> str:
    """Today's code on the line of ``call``, without the comment that ends the statement there."""
    text = today.source.lines[call.lineno - 1]
    for tree in unit.stmt.trees if not unit.stmt.children else []:
        if tree.end_lineno == call.lineno and tree.end_col_offset is not None and text.isascii():
            text = text[: tree.end_col_offset]
    return normalized(text)


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
