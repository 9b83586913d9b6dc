"""Hindsight-logging rewrites with libcst: find flor loops and logs, classify, propagate statements.

Pure functions over source text, no I/O. Imported by replay only, never by ``import flordb_build``
(libcst is a heavy import).

Positions (see :attr:`Position.depth`): ``prefix`` before the main loop (the outermost ``flor.loop``,
followed through function calls), ``validation`` in the main loop outside nested flor loops, ``range``
inside a nested flor loop, ``suffix`` after the main loop.

Propagation aligns each new statement of today's version (T) with the old version (O)::

    T (today)                                 O (old version)
    for epoch in flor.loop("epoch", ...): --1--> for epoch in flor.loop("epoch", ...):
        with torch.no_grad():           --2-->     with torch.no_grad():
            for step in flor.loop(...):  -3P->         for step in flor.loop(...):   # body may differ
            + flor.log("w2", w * 2)      ====>         + flor.log("w2", w * 2)
            flor.log("val", w)           -3N->         flor.log("val", w)
                                          --4--> names read by the new line are defined in O?

    1  scope: the innermost enclosing flor.loop (by name; a renamed loop only when exactly one old
       loop has the same header) or def/class (by qualified name); else module level. Must be unique.
    2  every block between the scope and the statement (with / if / for / while / try): same header,
       exactly once, in the corresponding old block.
    3  neighbours P (before) and N (after), skipping other new statements: a simple statement matches
       by exact code (libcst, comments excluded), a compound one by its header. Each matched neighbour
       gives candidate slots; they must agree on exactly one slot. A today's line that wraps an old
       line (``x = flor.log("x", f())`` over ``x = f()``) replaces it instead.
    4  free names of the statement resolve in the old scope (or are bound by an earlier new statement),
       and a prefix/suffix statement stays prefix/suffix where it lands.

    Anything short of that is a NotPlaced with the reason; nothing is inserted at a guess.
"""

from __future__ import annotations

from ._analysis import analyze_script, classify
from ._model import (
    LogSite,
    LoopSite,
    NotPlaced,
    Placed,
    Position,
    ProjectPropagationResult,
    PropagationResult,
    ScriptAnalysis,
    deepest,
)
from ._propagation import propagate, propagate_project

__all__ = [
    "LogSite",
    "LoopSite",
    "NotPlaced",
    "Placed",
    "Position",
    "ProjectPropagationResult",
    "PropagationResult",
    "ScriptAnalysis",
    "analyze_script",
    "classify",
    "deepest",
    "propagate",
    "propagate_project",
]
