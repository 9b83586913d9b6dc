"""Statement-level tree alignment of today's version with an old one (GumTree's two phases).

::

    0  anchors     flor.loop by name (a renamed loop by its unique header), def/class by qualified name
    1  top-down    identical subtrees (equal digests, unique on both sides) map whole, children too
    2  bottom-up   block by block under mapped parents, between the mapped statements already there
                   (a longest order-preserving chain of them): the rest of each gap maps by equal
                   digest, then equal key (a compound statement's header), then token similarity
                   (Dice >= 0.5) of the whole statement, its blocks included

A statement with two equally good candidates stays unmapped and remembers them (``ambiguous``): the
placement decides with the other neighbour, or refuses. Today's new statements (the ones to place)
take no part, so a block that gained a log line is still identical to its old self.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Sequence

import libcst as cst

from ._analysis import ScriptIndex, Stmt, node_code

SIMILAR = 0.5  # least Dice coefficient of tokens for two edited statements to map


class Unaligned(Exception):
    """Internal: why a statement of today's version has no counterpart (turned into a refusal)."""


def _dice(a: Counter[str], b: Counter[str]) -> float:
    total = sum(a.values()) + sum(b.values())
    return 2 * sum((a & b).values()) / total if total else 1.0


def _kind(stmt: Stmt) -> tuple[type, ...] | None:
    """Statements of one kind can map by similarity: same ast statement types, one by one. A flor.loop
    maps only by its name (or its header, renamed): it is the anchor, never a similar guess."""
    if stmt.is_flor_loop:
        return None
    if len(stmt.trees) == 1:
        return (type(stmt.trees[0]),)
    return tuple(type(t) for t in stmt.trees)


_COMMON = 64  # a word in more statements of a gap than this finds no candidates (`self`, `=`)


def _postings(index: ScriptIndex, stmts: Sequence[Stmt], counter: Callable[[ScriptIndex, Stmt], Counter[str]]
              ) -> dict[str, list[tuple[int, Stmt]]]:
    """Word -> the statements (with their place in ``stmts``) whose code has it; words only."""
    found: dict[str, list[tuple[int, Stmt]]] = {}
    for i, stmt in enumerate(stmts):
        for word in counter(index, stmt):
            if word[0].isalnum() or word[0] in "_'\"":
                found.setdefault(word, []).append((i, stmt))
    return found


def _sharing(words: Counter[str], postings: dict[str, list[tuple[int, Stmt]]], every: Sequence[Stmt]
             ) -> list[tuple[int, Stmt]]:
    """The statements that share an uncommon word with ``words``; when it has none, every statement
    of a short gap, and none of a long one (it stays unmapped rather than compared with hundreds)."""
    found: dict[int, Stmt] = {}
    usable = False
    for word in words:
        posting = postings.get(word)
        if posting is None or len(posting) > _COMMON:
            continue
        usable = True
        found.update(posting)
    if not usable:
        return list(enumerate(every)) if len(every) <= _COMMON else []
    return sorted(found.items())


class Alignment:
    """A one-to-one mapping of today's statements onto the old version's."""

    def __init__(self, today: ScriptIndex, old: ScriptIndex, is_new: Callable[[Stmt], bool],
                 digests: dict[int, int] | None = None) -> None:
        """``digests``: today's digests computed already under the same ``is_new`` (kept across old versions)."""
        self.today, self.old, self.is_new = today, old, is_new
        self.t2o: dict[int, Stmt] = {}
        self.o2t: dict[int, Stmt] = {}
        self.how: dict[int, str] = {}  # today stmt id -> "identical" / "same header" / "similar" / "anchor"
        self.ambiguous: dict[int, list[Stmt]] = {}  # today stmt id -> equally good old candidates
        self.why: dict[int, str] = {}  # today scope id -> why it has no counterpart
        self._digests: dict[int, int] = digests if digests is not None else {}
        self._scopes: dict[tuple[type, str | None], list[Stmt]] | None = None
        self._anchor_scopes()
        self._identical_subtrees()
        self._align_blocks()

    # -- queries ----------------------------------------------------------------------------------
    def image(self, stmt: Stmt) -> Stmt | None:
        """The old statement ``stmt`` maps to."""
        return self.t2o.get(id(stmt))

    def kids(self, stmt: Stmt | None, label: str) -> list[Stmt]:
        """Today's statements of one block of ``stmt`` (None: the module), today's new ones left out."""
        if stmt is None:
            return [s for s in self.today.top if not self.is_new(s)]
        return [s for lab, kids in stmt.children if lab == label for s in kids if not self.is_new(s)]

    def moved(self, mine: Sequence[Stmt], block: object) -> set[int]:
        """Today's statements of a block whose images in the old ``block`` are out of order with the
        rest: in no longest order-preserving chain. The others (in at least one chain) stay evidence."""
        pairs = [(i, o.index, id(t)) for i, t in enumerate(mine) if (o := self.image(t)) is not None and o.owner is block]
        seconds = [p[1] for p in pairs]
        ending = _chain_lengths(seconds)
        starting = _chain_lengths([-x for x in reversed(seconds)])[::-1]
        longest = max(ending, default=0)
        return {p[2] for p, e, b in zip(pairs, ending, starting, strict=True) if e + b - 1 != longest}

    # -- phase 0: scopes ----------------------------------------------------------------------------
    def _map(self, t: Stmt, o: Stmt, how: str) -> None:
        self.t2o[id(t)] = o
        self.o2t[id(o)] = t
        self.how[id(t)] = how
        self.ambiguous.pop(id(t), None)

    def _anchor_scopes(self) -> None:
        for stmt in self.today.stmts:
            if not (stmt.is_flor_loop or isinstance(stmt.node, cst.FunctionDef | cst.ClassDef)):
                continue
            try:
                found = self.scope_counterpart(stmt)
            except Unaligned as why:
                self.why[id(stmt)] = str(why)
                continue
            if id(found) not in self.o2t:
                self._map(stmt, found, "anchor")

    def scope_counterpart(self, stmt: Stmt) -> Stmt:
        """The old flor.loop (by name), def or class (by qualified name) that plays ``stmt``'s role."""
        today, old = self.today, self.old
        if stmt.is_flor_loop:
            name = stmt.loop_name
            if name is None:
                raise Unaligned(
                    f"its enclosing flor.loop at line {stmt.line} has a computed name, so it cannot anchor the statement"
                )
            found = [s for s in old.loops if s.loop_name == name]
            if len(found) > 1:
                path = [today.stmt_of(f.node).loop_name for f in today.loop_frames(stmt)]
                found = [s for s in found if [old.stmt_of(f.node).loop_name for f in old.loop_frames(s)] == path]
            if len(found) > 1:
                qual = _function_name(today, stmt)
                found = [s for s in found if _function_name(old, s) == qual]
            if len(found) == 1:
                return found[0]
            if found:
                raise Unaligned(f"the old version has {len(found)} flor.loop '{name}' in the same place")
            return self._renamed_loop(stmt, name)
        qual = today.qualname(stmt)
        found = self._old_scopes().get((type(stmt.node), qual), [])
        kind = "function" if isinstance(stmt.node, cst.FunctionDef) else "class"
        if len(found) == 1:
            return found[0]
        if found:
            raise Unaligned(f"the old version defines {kind} '{qual}' {len(found)} times")
        raise Unaligned(f"its enclosing {kind} '{qual}' does not exist in the old version")

    def _old_scopes(self) -> dict[tuple[type, str | None], list[Stmt]]:
        """The old version's defs and classes by kind and qualified name, in source order."""
        if self._scopes is None:
            self._scopes = {}
            for s in self.old.stmts:
                if isinstance(s.node, cst.FunctionDef | cst.ClassDef):
                    self._scopes.setdefault((type(s.node), self.old.qualname(s)), []).append(s)
        return self._scopes

    def _loop_shape(self, index: ScriptIndex, stmt: Stmt) -> tuple[str, ...]:
        """A flor.loop's header without its name, and its nesting depth: evidence for a rename."""
        assert stmt.loop_call is not None  # only flor loops get here
        tree = stmt.trees[0]
        target = getattr(tree, "target", None)
        rest = [index.source.segment(arg) for arg in stmt.loop_call.args[1:]]
        shown = index.source.segment(target) if target is not None else ""
        return (shown, str(len(index.loop_frames(stmt))), *rest)

    def _renamed_loop(self, stmt: Stmt, name: str) -> Stmt:
        today_names = {s.loop_name for s in self.today.loops}
        shape = self._loop_shape(self.today, stmt)
        found = [s for s in self.old.loops if s.loop_name not in today_names and self._loop_shape(self.old, s) == shape]
        if len(found) == 1:
            return found[0]
        if found:
            raise Unaligned(
                f"today's flor.loop '{name}' is missing from the old version and {len(found)} of its "
                "loops have the same header, so the rename is ambiguous"
            )
        old_names = ", ".join(sorted(f"'{s.loop_name}'" for s in self.old.loops if s.loop_name)) or "none"
        raise Unaligned(
            f"today's flor.loop '{name}' does not exist in the old version (its loops: {old_names}) and "
            "no old loop has the same header"
        )

    # -- phase 1: identical subtrees ------------------------------------------------------------------
    def digest(self, stmt: Stmt) -> int:
        """Today's digest of ``stmt`` without today's new statements (old ones: the index's)."""
        found = self._digests.get(id(stmt))
        if found is None:
            if not stmt.children:
                found = stmt.digest
            else:
                found = hash((stmt.key, tuple(
                    (label, tuple(self.digest(k) for k in kids if not self.is_new(k))) for label, kids in stmt.children
                )))
            self._digests[id(stmt)] = found
        return found

    def _map_subtree(self, t: Stmt, o: Stmt) -> None:
        self._map(t, o, "identical")
        old_blocks = dict(o.children)
        for label, kids in t.children:
            mine = [k for k in kids if not self.is_new(k)]
            theirs = old_blocks.get(label, [])
            if len(mine) == len(theirs):
                for a, b in zip(mine, theirs, strict=True):
                    if id(a) not in self.t2o and id(b) not in self.o2t:
                        self._map_subtree(a, b)

    def _identical_subtrees(self) -> None:
        old_by: dict[int, list[Stmt]] = {}
        for o in self.old.stmts:
            old_by.setdefault(o.digest, []).append(o)
        counts = Counter(self.digest(t) for t in self.today.stmts if not self.is_new(t))
        for t in self.today.stmts:  # preorder: the largest subtrees first
            if self.is_new(t) or id(t) in self.t2o:
                continue
            d = self.digest(t)
            olds = [o for o in old_by.get(d, []) if id(o) not in self.o2t]
            if len(olds) == 1 and counts[d] == 1:
                self._map_subtree(t, olds[0])

    # -- phase 2: blocks --------------------------------------------------------------------------
    def _align_blocks(self) -> None:
        done: set[tuple[int, str]] = set()
        pending: list[tuple[Stmt | None, Stmt | None]] = [(None, None)]
        while pending:
            t, o = pending.pop()
            labels = [lab for lab, _ in t.children] if t is not None else ["module"]
            old_blocks = dict(o.children) if o is not None else {"module": self.old.top}
            for label in labels:
                if (id(t), label) in done or label not in old_blocks:
                    continue
                done.add((id(t), label))
                mine = self.kids(t, label)
                self._align_block(mine, old_blocks[label])
                pending.extend((k, self.t2o[id(k)]) for k in mine if id(k) in self.t2o and k.children)
            if not pending:  # mapped scopes whose parents did not map (a loop moved into a function)
                pending = [
                    (k, image) for k in self.today.stmts
                    if (image := self.t2o.get(id(k))) is not None
                    and any((id(k), lab) not in done and lab in dict(image.children) for lab, _ in k.children)
                ]

    def _align_block(self, mine: Sequence[Stmt], theirs: Sequence[Stmt]) -> None:
        where = {id(o): i for i, o in enumerate(theirs)}
        pairs = [(i, where[id(self.t2o[id(t)])]) for i, t in enumerate(mine)
                 if id(t) in self.t2o and id(self.t2o[id(t)]) in where]
        chain = _increasing(pairs)
        bounds = [(-1, -1), *chain, (len(mine), len(theirs))]
        for (ta, oa), (tb, ob) in zip(bounds, bounds[1:], strict=False):
            gap_t = [t for t in mine[ta + 1:tb] if id(t) not in self.t2o]
            gap_o = [o for o in theirs[oa + 1:ob] if id(o) not in self.o2t]
            if gap_t and gap_o:
                self._match_gap(gap_t, gap_o)

    def _match_gap(self, gap_t: list[Stmt], gap_o: list[Stmt]) -> None:
        # equal digests map whole subtrees, equal keys (headers) map one statement; a key that
        # several old statements share makes today's statement ambiguous
        rules: list[tuple[str, Callable[[Stmt], object], Callable[[Stmt], object]]] = [
            ("identical", self.digest, lambda o: o.digest),
            ("same header", lambda t: (t.key, _kind(t)) if _kind(t) else None,
             lambda o: (o.key, _kind(o)) if _kind(o) else None),
        ]
        for how, mine, theirs in rules:
            olds: dict[object, list[Stmt]] = {}
            for o in gap_o:
                if id(o) not in self.o2t and (k := theirs(o)) is not None:
                    olds.setdefault(k, []).append(o)
            todays: dict[object, list[Stmt]] = {}
            for t in gap_t:
                if id(t) not in self.t2o and (k := mine(t)) is not None:
                    todays.setdefault(k, []).append(t)
            for k, ts in todays.items():
                free = [o for o in olds.get(k, []) if id(o) not in self.o2t]
                if len(free) == 1 and len(ts) == 1:
                    if how == "identical":
                        self._map_subtree(ts[0], free[0])
                    else:
                        self._map(ts[0], free[0], how)
                elif len(free) > 1:
                    for t in ts:
                        self.ambiguous[id(t)] = free
        self._similar(gap_t, gap_o)

    def _similar(self, gap_t: list[Stmt], gap_o: list[Stmt]) -> None:
        """Edited statements: the most similar old one of the same kind, when it is the only best
        and prefers this one back. Candidates share a word of code (an inverted index), so a long
        gap costs what its overlapping pairs cost, not every pair."""
        olds = [o for o in gap_o if id(o) not in self.o2t and _kind(o) is not None]
        todays = [t for t in gap_t if id(t) not in self.t2o and id(t) not in self.ambiguous and _kind(t) is not None]
        if not olds or not todays:
            return
        old_words = _postings(self.old, olds, self._counter)
        today_words = _postings(self.today, todays, self._counter)
        for t in todays:
            candidates = _sharing(self._counter(self.today, t), old_words, olds)
            scored = sorted(
                ((self._similarity(t, o), i, o) for i, o in candidates if id(o) not in self.o2t and _kind(o) == _kind(t)),
                key=lambda x: (-x[0], x[1]),
            )
            if not scored or scored[0][0] < SIMILAR:
                continue
            best, _, o = scored[0]
            if len(scored) > 1 and scored[1][0] == best:
                self.ambiguous[id(t)] = [c for score, _, c in scored if score == best]
                continue
            # the old statement must prefer it back: two edited lines never swap partners
            competing = [
                self._similarity(u, o) for _, u in _sharing(self._counter(self.old, o), today_words, todays)
                if u is not t and id(u) not in self.t2o and _kind(u) == _kind(o)
            ]
            if competing and max(competing) >= best:
                continue
            self._map(t, o, "similar")

    def _similarity(self, t: Stmt, o: Stmt) -> float:
        return _dice(self._counter(self.today, t), self._counter(self.old, o))

    def _counter(self, index: ScriptIndex, stmt: Stmt) -> Counter[str]:
        return index.word_counts(stmt)


def _increasing(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The longest chain of ``pairs`` increasing in both coordinates (pairs come sorted by the first)."""
    tails: list[int] = []  # tails[k]: index in pairs of the smallest end of a chain of length k + 1
    back: list[int] = [-1] * len(pairs)
    for i, (_, second) in enumerate(pairs):
        k = _search(pairs, tails, second)
        if k > 0:
            back[i] = tails[k - 1]
        if k == len(tails):
            tails.append(i)
        else:
            tails[k] = i
    chain = []
    i = tails[-1] if tails else -1
    while i >= 0:
        chain.append(pairs[i])
        i = back[i]
    return chain[::-1]


def _chain_lengths(values: Sequence[int]) -> list[int]:
    """For each value, the length of the longest strictly increasing run of ``values`` ending there."""
    tails: list[int] = []
    lengths = []
    for value in values:
        k = bisect_left(tails, value)
        if k == len(tails):
            tails.append(value)
        else:
            tails[k] = value
        lengths.append(k + 1)
    return lengths


def _search(pairs: list[tuple[int, int]], tails: list[int], second: int) -> int:
    lo, hi = 0, len(tails)
    while lo < hi:
        mid = (lo + hi) // 2
        if pairs[tails[mid]][1] < second:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _function_name(index: ScriptIndex, stmt: Stmt) -> str | None:
    """Qualified name of the def enclosing ``stmt``, None at module level."""
    func = index.function_of(stmt)
    return index.qualname(func) if func is not None else None


def describe_header(stmt: Stmt) -> str:
    """A statement's header for anchors and reasons."""
    return stmt.key if stmt.key else node_code(stmt.node)
