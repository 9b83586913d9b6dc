"""Loop-carried state that no checkpoint holds: the replay depths it makes wrong (issue 12, cause 7). Pure.

A replay skips part of the recorded run and restores the checkpointed objects where the skipped
part ends. Whatever else the skipped code changed keeps, in the replay process, the value it had
before: the later code then computes other values than the record did, silently. So before
anything runs, the planner asks this module which names the skipped code assigns or mutates and
the later code reads, and refuses the run when one is not held by a checkpoint::

    lr = 0.1                                       skipped part          later code that reads it
    with flor.checkpointing(model=model):
        for epoch in flor.loop("epoch", ...):  --  iterations before  -> the iterations after a
            flor.log("lr", lr)                     a restore point       restore point (`lr`)
            for batch in flor.loop("step", ...):-  nested loops (in   -> the rest of the iteration,
                total += step(batch, lr)           validation)           the next ones (`total`)
            if worse: lr /= 4                      ...
    flor.log("final_lr", lr)                   --  every iteration    -> the suffix (`lr`)

Names are followed by scope (LibCST's ScopeProvider and ExpressionContextProvider); a method call
or an attribute or subscript store counts as mutating its receiver (``history.append(x)``,
``self.opt.step()``); a call of a function defined in the script counts as what that function
reads and mutates of the module's globals. Three things keep a changed name from being refused:
a checkpoint holds it (``flor.checkpointing(model=net)`` holds ``net`` and what hangs off it), the
later code rebinds it before reading it (a value rebuilt every iteration), or only ``print`` and
assignments that nothing else reads depend on it. A value that an old ``flor.log`` logs does
matter: the replay compares it with the record, and a difference there withholds the whole run,
so refusing up front says the same sooner and with the name. Anything the analysis cannot see
through is taken to matter: a refusal is cheaper than a wrong value in the store.

Not seen (known gaps): a change through an alias (``for p in params: p.add_(...)`` changes what
``params`` holds, not ``p``), state in the project's other modules, and closures.
"""

from __future__ import annotations

import builtins
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import cast

import libcst as cst
import libcst.matchers as m
from libcst.metadata import (
    CodeRange,
    ExpressionContext,
    ExpressionContextProvider,
    MetadataWrapper,
    ParentNodeProvider,
    PositionProvider,
)

from ._model import Schedule, StepKind

_SKIPPING = (StepKind.SKIP, StepKind.RESTORE, StepKind.VALIDATE)
#: Python's builtin names (``int``, ``dict``, ``open``): not the script's state unless it binds them.
_BUILTINS = frozenset(dir(builtins))
#: Methods that only read their receiver (tensors, containers, estimators' predictions): calling
#: one is not a change. Any other method call is taken to change its receiver.
READ_ONLY_METHODS = frozenset(
    {
        "abs",
        "all",
        "any",
        "argmax",
        "argmin",
        "clone",
        "copy",
        "count",
        "cpu",
        "detach",
        "dim",
        "endswith",
        "eq",
        "exp",
        "float",
        "format",
        "get",
        "get_last_lr",
        "index",
        "item",
        "items",
        "join",
        "keys",
        "log",
        "max",
        "mean",
        "min",
        "named_parameters",
        "ne",
        "norm",
        "numel",
        "numpy",
        "parameters",
        "pow",
        "predict",
        "reshape",
        "size",
        "split",
        "sqrt",
        "squeeze",
        "startswith",
        "state_dict",
        "std",
        "strip",
        "sum",
        "t",
        "tolist",
        "transform",
        "unsqueeze",
        "values",
        "var",
        "view",
        "view_as",
    }
)
_RUN_IN_FULL = (StepKind.FULL, StepKind.SILENT)


@dataclass(frozen=True)
class Skipping:
    """What one replay process skips of the main loop, and what runs after it (from its schedule)."""

    iterations: bool  # whole main-loop iterations are skipped (before a restore point)
    nested: bool  # nested loops are skipped inside iterations that run (validation)
    later_iterations: bool  # main-loop iterations run after a skipped part
    later_nested: bool  # ... and some of them run their nested loops in full
    suffix: bool  # the code after the main loop runs after a skipped part

    @classmethod
    def of(cls, schedule: Schedule) -> Skipping | None:
        """What ``schedule`` skips; None when it runs everything it reaches (prefix, full re-run)."""
        steps = schedule.steps
        first = next((i for i, s in enumerate(steps) if s.kind in _SKIPPING), None)
        if first is None:
            return None
        after = steps[first + 1 :]
        return cls(
            iterations=any(s.kind in (StepKind.SKIP, StepKind.RESTORE) for s in steps),
            nested=any(s.kind is StepKind.VALIDATE for s in steps),
            later_iterations=any(s.kind in (*_RUN_IN_FULL, StepKind.VALIDATE) for s in after),
            later_nested=any(s.kind in _RUN_IN_FULL for s in after),
            suffix=not schedule.stop_after,
        )

    def merged(self, other: Skipping) -> Skipping:
        """What either of two processes of one run skips (segments of a range or validation scan)."""
        return Skipping(*(a or b for a, b in zip(self.astuple(), other.astuple(), strict=True)))

    def astuple(self) -> tuple[bool, bool, bool, bool, bool]:
        """The flags in field order."""
        return (self.iterations, self.nested, self.later_iterations, self.later_nested, self.suffix)


@dataclass(frozen=True)
class CarriedName:
    """A name the skipped code changes and the later code reads, that no checkpoint holds."""

    name: str  # a variable, or the attribute path a mutation goes through (``self.opt``)
    loop: str  # the flor.loop whose skipped part changes it
    line: int  # where the skipped code changes it first


@dataclass
class _Stmt:
    """One simple statement (or a compound statement's header), as the analysis sees it."""

    node: cst.CSTNode
    line: int
    end: int
    reads: set[str] = field(default_factory=set)  # root names read
    rebinds: set[str] = field(default_factory=set)  # names assigned a new object
    mutates: set[str] = field(default_factory=set)  # paths of objects changed in place
    #: The conditional suites (if / for / while / try bodies) around it, outermost first: a name it
    #: rebinds is rebound for the later statements of the same suites only.
    path: tuple[int, ...] = ()
    kind: str = "effect"  # "effect" (matters), "assign" (matters if its targets do), "sink" (never)


def _dotted(expr: cst.BaseExpression) -> str | None:
    """``a.b.c`` for a chain of attributes over a name, else None."""
    parts: list[str] = []
    while isinstance(expr, cst.Attribute):
        parts.append(expr.attr.value)
        expr = expr.value
    if not isinstance(expr, cst.Name):
        return None
    return ".".join([expr.value, *reversed(parts)])


def _receiver(expr: cst.BaseExpression) -> str | None:
    """The path of the object a store or call goes into: ``x`` in ``x[i].y = v``, ``self.opt`` in ``self.opt.step()``.

    Through subscripts and method calls, whose results may be views into their receiver
    (``model.parameters()``, ``t[0:4]``); a plain function's result is a new object (None).
    """
    while isinstance(expr, cst.Subscript | cst.Call):
        if isinstance(expr, cst.Subscript):
            expr = expr.value
        elif isinstance(expr.func, cst.Attribute):
            expr = expr.func.value
        else:
            return None
    return _dotted(expr)


class _Script:
    """The parsed script with the metadata the analysis needs, and its flor and import names."""

    def __init__(self, source: str) -> None:
        self.wrapper = MetadataWrapper(cst.parse_module(source), unsafe_skip_copy=True)  # our own fresh tree
        self.module = self.wrapper.module
        # one batched pass for the three providers; libcst's ``node.children`` runs a visitor per
        # call, so the walks below go through the children the parent map already lists, in order
        meta = self.wrapper.resolve_many([ExpressionContextProvider, PositionProvider, ParentNodeProvider])
        self.context = cast(Mapping[cst.CSTNode, ExpressionContext], meta[ExpressionContextProvider])
        self.position = cast(Mapping[cst.CSTNode, CodeRange], meta[PositionProvider])
        self.parent = cast(Mapping[cst.CSTNode, cst.CSTNode], meta[ParentNodeProvider])
        self._children: dict[cst.CSTNode, list[cst.CSTNode]] = {}
        for child, parent in self.parent.items():
            self._children.setdefault(parent, []).append(child)
        self.nodes = list(self.walk(self.module))  # every node, in source order
        # the names a comprehension binds live in its own scope: ``sum(p.norm() for p in ps)``
        # neither rebinds nor reads a ``p`` of the statement's scope
        self._comprehension_local: set[cst.Name] = set()
        for node in self.nodes:
            if isinstance(node, cst.GeneratorExp | cst.ListComp | cst.SetComp | cst.DictComp):
                targets: set[str] = set()
                comp: cst.CompFor | None = node.for_in
                while comp is not None:
                    targets |= {n.value for n in self.walk(comp.target) if isinstance(n, cst.Name)}
                    comp = comp.inner_for_in
                self._comprehension_local |= {
                    n for n in self.walk(node) if isinstance(n, cst.Name) and n.value in targets
                }
        self.imported: set[str] = set()  # names bound by import statements (modules, library functions)
        self.flor: set[str] = set()  # names of the flordb_build module
        self.flor_functions: dict[str, str] = {}  # local name -> flordb_build function it is
        self.functions: dict[str, list[cst.FunctionDef]] = {}  # def name -> its definitions
        self._summaries: dict[str, _Stmt] = {}
        self._suites = itertools.count(1)
        for node in self.nodes:
            if isinstance(node, cst.Import):
                for alias in node.names:
                    bound = alias.evaluated_alias or alias.evaluated_name.split(".")[0]
                    self.imported.add(bound)
                    if alias.evaluated_name == "flordb_build":
                        self.flor.add(bound)
            elif isinstance(node, cst.ImportFrom) and not isinstance(node.names, cst.ImportStar):
                module = _dotted(node.module) if node.module is not None else None
                for alias in node.names:
                    bound = alias.evaluated_alias or alias.evaluated_name
                    self.imported.add(bound)
                    if module == "flordb_build":
                        self.flor_functions[bound] = alias.evaluated_name
            elif isinstance(node, cst.FunctionDef):
                self.functions.setdefault(node.name.value, []).append(node)
        # Names the script binds anywhere; a builtin it never binds (``int`` in ``int.from_bytes``)
        # is not its state, so a method call on it changes nothing the replay must carry.
        self.bound: set[str] = {
            node.value for node in self.nodes
            if isinstance(node, cst.Name) and self.context.get(node) in (ExpressionContext.STORE, ExpressionContext.DEL)
        }
        self.bound |= {
            node.name.value for node in self.nodes if isinstance(node, cst.FunctionDef | cst.ClassDef | cst.Param)
        }

    def walk(self, node: cst.CSTNode, into_defs: bool = True) -> Iterator[cst.CSTNode]:
        """Every node under ``node`` (itself included), optionally not into nested defs and classes."""
        stack: list[cst.CSTNode] = [node]
        while stack:
            current = stack.pop()
            yield current
            if (
                not into_defs
                and current is not node
                and isinstance(current, cst.FunctionDef | cst.ClassDef | cst.Lambda)
            ):
                continue
            stack.extend(reversed(self._children.get(current, ())))

    def line(self, node: cst.CSTNode) -> int:
        return self.position[node].start.line

    def end(self, node: cst.CSTNode) -> int:
        return self.position[node].end.line

    def flor_call(self, node: cst.CSTNode, function: str) -> cst.Call | None:
        """``node`` as a call of ``flor.<function>``, else None."""
        if not isinstance(node, cst.Call):
            return None
        func = node.func
        if (
            isinstance(func, cst.Attribute)
            and isinstance(func.value, cst.Name)
            and func.value.value in self.flor
        ):
            return node if func.attr.value == function else None
        if isinstance(func, cst.Name) and self.flor_functions.get(func.value) == function:
            return node
        return None

    def flor_loops(self) -> list[tuple[cst.For, str | None]]:
        """Every ``for ... in flor.loop(name, ...)`` with its literal name."""
        found = []
        for node in self.nodes:
            if isinstance(node, cst.For) and (call := self.flor_call(node.iter, "loop")) is not None:
                found.append((node, _literal(call.args[0].value) if call.args else None))
        return found

    def enclosing_function(self, node: cst.CSTNode) -> cst.FunctionDef | None:
        current = self.parent.get(node)
        while current is not None and not isinstance(current, cst.FunctionDef):
            current = self.parent.get(current)
        return current

    def function_locals(self, func: cst.FunctionDef) -> set[str]:
        """The names local to ``func``: its parameters and what it binds, less what it declares global."""
        names = {p.name.value for p in _params(func.params)}
        declared: set[str] = set()
        for node in self.walk(func.body, into_defs=False):
            if isinstance(node, cst.Name) and self.context.get(node) is ExpressionContext.STORE:
                names.add(node.value)
            elif isinstance(node, cst.Global | cst.Nonlocal):
                declared.update(n.name.value for n in node.names)
        return names - declared

    # -- statements -----------------------------------------------------------------------------

    def statements(self, body: Sequence[cst.CSTNode], path: tuple[int, ...]) -> list[_Stmt]:
        """The simple statements of ``body`` in order, compound statements as their header then their suites."""
        out: list[_Stmt] = []
        for stmt in body:
            out.extend(self._statement(stmt, path))
        return out

    def _statement(self, stmt: cst.CSTNode, path: tuple[int, ...]) -> Iterator[_Stmt]:
        if isinstance(stmt, cst.SimpleStatementLine):
            for small in stmt.body:
                yield self._simple(small, path)
            return
        if isinstance(stmt, cst.FunctionDef | cst.ClassDef):
            header = _Stmt(stmt, self.line(stmt), self.line(stmt), path=path, kind="assign")
            header.rebinds.add(stmt.name.value)
            for part in (
                *stmt.decorators,
                *(_defaults(stmt.params) if isinstance(stmt, cst.FunctionDef) else ()),
            ):
                self._collect(part, header)
            yield header
            return
        header = _Stmt(stmt, self.line(stmt), self.line(stmt), path=path)
        suites: list[tuple[Sequence[cst.CSTNode], bool]] = []
        if isinstance(stmt, cst.For):
            self._collect(stmt.iter, header)
            self._collect(stmt.target, header)
            suites = [(stmt.body.body, True)]
            if stmt.orelse is not None:
                suites.append((stmt.orelse.body.body, True))
        elif isinstance(stmt, cst.While | cst.If):
            self._collect(stmt.test, header)
            suites = [(stmt.body.body, True)]
            orelse = stmt.orelse
            while orelse is not None:
                if isinstance(orelse, cst.If):
                    self._collect(orelse.test, header)
                    suites.append((orelse.body.body, True))
                    orelse = orelse.orelse
                else:
                    suites.append((orelse.body.body, True))
                    orelse = None
        elif isinstance(stmt, cst.With):
            for item in stmt.items:
                self._collect(item, header)
            suites = [(stmt.body.body, False)]
        elif isinstance(stmt, cst.Try | cst.TryStar):
            suites = [(stmt.body.body, True)]
            suites += [(h.body.body, True) for h in stmt.handlers]
            suites += [(s.body.body, True) for s in (stmt.orelse, stmt.finalbody) if s is not None]
            for handler in stmt.handlers:
                if handler.name is not None:
                    self._collect(handler.name, header)
        else:  # match and anything newer: everything in it matters and may change anything it names
            self._collect(stmt, header)
            header.mutates.update(header.reads)
        yield header
        for suite, conditional in suites:
            yield from self.statements(suite, (*path, next(self._suites)) if conditional else path)

    def _simple(self, small: cst.BaseSmallStatement, path: tuple[int, ...]) -> _Stmt:
        record = _Stmt(small, self.line(small), self.end(small), path=path)
        self._collect(small, record)
        value = small.value if isinstance(small, cst.Expr) else None
        logs = any(self.flor_call(n, "log") is not None for n in self.walk(small))
        if logs:
            record.kind = "effect"  # stored (a replayed name) or compared with the record (any other)
        elif value is not None and m.matches(value, m.Call(func=m.Name("print"))):
            record.kind = "sink"  # printed, never stored nor compared
        elif isinstance(small, cst.Assign | cst.AugAssign | cst.AnnAssign) and not record.mutates:
            record.kind = "assign"
        return record

    def _collect(self, node: cst.CSTNode, record: _Stmt) -> None:
        """Add what ``node`` reads, rebinds and mutates to ``record``."""
        for sub in self.walk(node, into_defs=False):
            if isinstance(sub, cst.Name) and sub in self._comprehension_local:
                continue
            if isinstance(sub, cst.Name):
                context = self.context.get(sub)
                if context is ExpressionContext.STORE:
                    record.rebinds.add(sub.value)
                elif context is ExpressionContext.DEL:
                    record.rebinds.add(sub.value)
                else:
                    record.reads.add(sub.value)
            elif isinstance(sub, cst.Attribute | cst.Subscript) and self.context.get(sub) in (
                ExpressionContext.STORE,
                ExpressionContext.DEL,
            ):
                self._mutate(_receiver(sub.value), record)  # x.a = v, x[i] = v, del x[i] change x
            elif isinstance(sub, cst.AugAssign) and isinstance(sub.target, cst.Name):
                record.reads.add(sub.target.value)  # x += v reads x first
            elif isinstance(sub, cst.Call):
                self._call(sub, record)

    def _call(self, call: cst.Call, record: _Stmt) -> None:
        func = call.func
        if isinstance(func, cst.Attribute):
            if func.attr.value not in READ_ONLY_METHODS:
                self._mutate(_receiver(func.value), record)  # a method call may change its receiver
        elif isinstance(func, cst.Name) and func.value in self.functions:
            summary = self._summary(func.value)  # a function of the script: what it does to the globals
            record.reads |= summary.reads
            record.rebinds |= summary.rebinds
            record.mutates |= summary.mutates

    def _summary(self, name: str) -> _Stmt:
        """What the module-level function ``name`` reads, rebinds and mutates of the module's globals."""
        if name in self._summaries:
            return self._summaries[name]  # computed, or being computed (a recursive call adds nothing new)
        summary = _Stmt(self.module, 0, 0)
        self._summaries[name] = summary
        for definition in self.functions[name]:
            if self.enclosing_function(definition) is not None or _in_class(self, definition):
                continue  # methods and inner functions are not what a bare name calls at module level
            local = self.function_locals(definition)
            for part in self.statements(definition.body.body, ()):
                summary.reads |= {n for n in part.reads if n not in local}
                summary.rebinds |= {n for n in part.rebinds if n not in local}
                summary.mutates |= {p for p in part.mutates if p.split(".")[0] not in local}
        return summary

    def _mutate(self, path: str | None, record: _Stmt) -> None:
        if path is None:
            return
        root = path.split(".")[0]
        if root in self.imported or root in self.flor:
            return  # a library's function (torch.manual_seed): not the script's state
        if root in _BUILTINS and root not in self.bound:
            return  # int.from_bytes(...), str.join(...): a builtin, not the script's state
        record.mutates.add(path)


def _in_class(script: _Script, node: cst.CSTNode) -> bool:
    parent = script.parent.get(node)
    while parent is not None:
        if isinstance(parent, cst.ClassDef):
            return True
        parent = script.parent.get(parent)
    return False


def _params(params: cst.Parameters) -> Iterator[cst.Param]:
    yield from params.posonly_params
    yield from params.params
    yield from params.kwonly_params
    for star in (params.star_arg, params.star_kwarg):
        if isinstance(star, cst.Param):
            yield star


def _defaults(params: cst.Parameters) -> Iterator[cst.CSTNode]:
    for param in _params(params):
        if param.default is not None:
            yield param.default


def _literal(expr: cst.BaseExpression) -> str | None:
    if isinstance(expr, cst.SimpleString):
        value = expr.evaluated_value
        return value if isinstance(value, str) else None
    return None


# -- the analysis ------------------------------------------------------------------------------------


def _exposed(records: Iterable[_Stmt], killed: Iterable[str] = ()) -> set[str]:
    """Names read before the statements rebind them, in order.

    A rebinding inside a conditional suite holds for the rest of that suite only: ``if c: x = 0``
    followed by a read of ``x`` reads the old value when ``c`` is false.
    """
    dead: set[tuple[str, tuple[int, ...]]] = {(name, ()) for name in killed}
    exposed: set[str] = set()
    for record in records:
        prefixes = {record.path[:i] for i in range(len(record.path) + 1)}
        exposed |= {n for n in record.reads if not any((n, p) in dead for p in prefixes)}
        dead |= {(n, record.path) for n in record.rebinds}
    return exposed


def _relevant(records: Sequence[_Stmt]) -> set[str]:
    """Names that what the replay keeps may depend on: read by statements that matter, to a fixpoint."""
    relevant: set[str] = set()
    changed = True
    while changed:
        changed = False
        for record in records:
            matters = record.kind == "effect" or (record.kind == "assign" and record.rebinds & relevant)
            if matters and not record.reads <= relevant:
                relevant |= record.reads
                changed = True
    return relevant


def _held(script: _Script, stateless: frozenset[str]) -> set[str]:
    """Paths the checkpoints hold: the values of ``flor.checkpointing(name=value)`` that are names or attributes."""
    held: set[str] = set()
    calls = [node for node in script.nodes if isinstance(node, cst.Call)]
    for node in calls:
        call = script.flor_call(node, "checkpointing")
        if call is None:
            continue
        for arg in call.args:
            if arg.keyword is not None and arg.keyword.value in stateless:
                continue
            path = _dotted(arg.value)
            if path is not None:
                held.add(path)
    # Parameters that receive a held object at a call site hold it too (``train(model, optimizer)``).
    for name, definitions in script.functions.items():
        for definition in definitions:
            params = [p.name.value for p in _params(definition.params)]
            if params and params[0] == "self" and _in_class(script, definition):
                params = params[1:]
            for node in calls:
                if not m.matches(node.func, m.Name(name) | m.Attribute(attr=m.Name(name))):
                    continue
                for index, arg in enumerate(node.args):
                    path = _dotted(arg.value)
                    if path is None or path not in held:
                        continue
                    if arg.keyword is not None:
                        held.add(arg.keyword.value)
                    elif arg.star == "" and index < len(params):
                        held.add(params[index])
    return held


def _is_held(path: str, held: set[str]) -> bool:
    parts = path.split(".")
    return any(".".join(parts[:i]) in held for i in range(1, len(parts) + 1))


def _after(script: _Script, node: cst.CSTNode, scope: cst.CSTNode | None) -> list[_Stmt]:
    """The statements that run after ``node`` in its scope: its later siblings, then theirs, up to the scope."""
    records: list[_Stmt] = []
    current: cst.CSTNode = node
    while current is not scope:
        parent = script.parent.get(current)
        if parent is None:
            break
        body = getattr(parent, "body", None)
        if isinstance(body, Sequence) and current in body and not isinstance(parent, cst.SimpleStatementLine):
            later = list(body)[list(body).index(current) + 1 :]
            records += script.statements(later, ())
        if isinstance(parent, cst.FunctionDef | cst.ClassDef | cst.Module):
            break
        current = parent
    return records


def _changed(records: Iterable[_Stmt], script: _Script) -> dict[str, int]:
    """Path -> first line where ``records`` rebind or mutate it."""
    found: dict[str, int] = {}
    for record in records:
        for path in sorted(record.rebinds | record.mutates):
            if path.split(".")[0] not in script.imported and path not in script.flor:
                found.setdefault(path, record.line)
    return found


def _carried(
    changed: dict[str, int], later: Sequence[_Stmt], held: set[str], loop: str, killed: Iterable[str] = ()
) -> list[CarriedName]:
    if not changed or not later:
        return []
    exposed = _exposed(later, killed)
    relevant = _relevant(later)
    return [
        CarriedName(path, loop, line)
        for path, line in changed.items()
        if path.split(".")[0] in exposed and path.split(".")[0] in relevant and not _is_held(path, held)
    ]


def find_carried(
    source: str,
    main_loop: str | None,
    skipping: Skipping,
    stateless: Iterable[str] = (),
) -> tuple[CarriedName, ...]:
    """The names that the parts ``skipping`` skips change and the later code reads, held by no checkpoint.

    :param source: the version the replay runs (the recorded script with the new statements).
    :param stateless: ``flor.checkpointing`` keywords whose checkpoints held no state: they hold nothing.
    """
    try:
        script = _Script(source)
    except cst.ParserSyntaxError:
        return ()
    loops = script.flor_loops()
    main = next((node for node, name in loops if name == main_loop), None)
    if main is None:
        return ()
    held = _held(script, frozenset(stateless))
    scope = script.enclosing_function(main)
    body = script.statements(main.body.body, ())
    target = set(script.statements([main], ())[0].rebinds)  # rebound by every iteration
    suffix = _after(script, main, scope) if skipping.suffix else []
    nested_in_body = [
        (node, name)
        for node, name in loops
        if node is not main
        and script.line(main) < script.line(node) <= script.end(main)
        and script.enclosing_function(node) is scope
    ]
    nested_lines = [(script.line(n), script.end(n)) for n, _ in nested_in_body]

    def outside_nested(records: Sequence[_Stmt]) -> list[_Stmt]:
        # iterations whose nested loops are skipped: the bodies never run, and a header's iterable
        # is built but never iterated, so nothing the replay keeps depends on what it reads
        kept = []
        for r in records:
            inside = [(a, b) for a, b in nested_lines if a <= r.line and r.end <= b]
            if not inside:
                kept.append(r)
            elif all(r.line == a for a, _b in inside):
                kept.append(replace(r, kind="sink"))
        return kept

    next_iterations = body if skipping.later_nested else outside_nested(body)
    found: list[CarriedName] = []
    name = main_loop or "main"
    if skipping.iterations:
        changed = _changed(body, script)
        changed.update({t: script.line(main) for t in target if t not in changed})
        later = (next_iterations if skipping.later_iterations else []) + suffix
        killed = target if skipping.later_iterations else ()
        found += _carried(changed, later, held, name, killed)
    if skipping.nested:
        for node, nested_name in loops:
            own_scope = script.enclosing_function(node)
            if node is main or (own_scope is scope and (node, nested_name) not in nested_in_body):
                continue  # not nested: a loop of the main loop's scope before or after it runs in full
            inner = script.statements(node.body.body, ())
            changed = _changed(inner, script)
            for t in script.statements([node], ())[0].rebinds:
                changed.setdefault(t, script.line(node))
            rest = _after(script, node, own_scope)
            if own_scope is scope:
                rest = [r for r in rest if r.line <= script.end(main)]  # the rest of the iteration
                later = rest + (next_iterations if skipping.later_iterations else []) + suffix
                found += _carried(
                    changed, later, held, nested_name or "nested", target if skipping.later_iterations else ()
                )
                continue
            # a nested loop in a function (maybe one the main loop calls; taken to be): its locals
            # live on in the rest of the function, what it changes of the globals in the main loop
            local = script.function_locals(own_scope) if own_scope is not None else set()
            loop = nested_name or "nested"
            found += _carried(
                {p: ln for p, ln in changed.items() if p.split(".")[0] in local}, rest, held, loop
            )
            later = (next_iterations if skipping.later_iterations else []) + suffix
            found += _carried(
                {p: ln for p, ln in changed.items() if p.split(".")[0] not in local}, later, held, loop
            )
    unique: dict[str, CarriedName] = {}
    for carried in found:
        unique.setdefault(carried.name, carried)
    return tuple(unique.values())


def describe_carried(carried: Sequence[CarriedName]) -> str:
    """The refusal: which loop changes which names, and what to do about it."""
    by_loop: dict[str, list[str]] = {}
    for c in carried:
        by_loop.setdefault(c.loop, []).append(f"`{c.name}`")
    parts = []
    for loop, names in by_loop.items():
        what = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        parts.append(f"the {loop} loop changes {what}, which no checkpoint holds")
    return (
        "; ".join(parts) + ": a replay that skips that code would compute other values than the record; "
        "add them to flor.checkpointing(...) (a dict holds plain values), or replay a depth that runs it"
    )


def describe_stateless(names: Sequence[str]) -> str:
    """The refusal for checkpoints that held no state when they were recorded."""
    listed = ", ".join(f"'{n}'" for n in names)
    return (
        f"the checkpoint of {listed} held no state when the run was recorded (an empty state_dict: torch "
        "registers no layers kept in a plain Python list), so a replay that skips part of the main loop cannot "
        "restore what it changed; use torch.nn.ModuleList and record again, or replay a prefix statement"
    )
