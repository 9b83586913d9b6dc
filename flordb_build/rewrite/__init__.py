"""Hindsight-logging rewrites with libcst: find flor loops and logs, classify, propagate statements.

Pure functions over source text, no I/O. Imported by replay only, never by ``import flordb_build``
(libcst is a heavy import).

Positions (see :attr:`Position.depth`): ``prefix`` before the main loop (the outermost ``flor.loop``,
followed through function calls), ``validation`` in the main loop outside nested flor loops, ``range``
inside a nested flor loop, ``suffix`` after the main loop.

Propagation (:func:`propagate`, :func:`propagate_project` for several modules) maps today's
version (T) onto the old one (O) statement by statement (see ``_alignment``) and places each new
statement by the mapping::

    T (today)                                  O (old version)
    for epoch in flor.loop("epoch", ...): -anchor-> for epoch in flor.loop("epoch", ...):
        with torch.no_grad():             -same---->     with torch.no_grad():
            loss = step(lr=0.05)          -similar->         loss = step(lr=0.1)
            + flor.log("loss", loss)      ========>          + flor.log("loss", loss)
            print(loss)                   -same---->         print(loss)

    1  block: the old counterpart of today's enclosing block (a function that old versions have
       inline: the one old run of statements its body maps onto, one to one)
    2  slot: next to the images of its neighbours (skipping other new statements); statements
       that moved on their own are no evidence, the rest must stay on their side; a tie between
       equal candidates is broken only by a block edge. A line that logs what an old line computes
       (``x = flor.log("x", f())`` over ``x = f()``, ``flor.log("n", f().item())`` over ``f()``)
       replaces it.
    3  it runs where it ran today (a prefix/suffix statement stays one), and every name it reads
       is defined there (or bound by an earlier new statement; flor's import comes along).

    Anything short of that is a NotPlaced with the reason; nothing is inserted at a guess.
"""

from __future__ import annotations

from ._analysis import analyze_script, classify, module_name
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
    "module_name",
    "propagate",
    "propagate_project",
]
