"""Value types of the rewrite package: statement positions and frozen analysis / propagation results."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum


class Position(Enum):
    """Where a statement runs relative to the main loop; decides the replay scan that reaches it."""

    PREFIX = "prefix"
    SUFFIX = "suffix"
    VALIDATION = "validation"
    RANGE = "range"

    @property
    def depth(self) -> int:
        """How much of the script a scan that reaches this position must execute (0 = least)."""
        # Each scan contains the work of the shallower ones, so the deepest position among a run's
        # new statements names the one scan that executes all of them:
        #   PREFIX     0  setup only, stop at the main loop
        #   SUFFIX     1  setup + final checkpoint of the main loop + the tail
        #   VALIDATION 2  setup + every outer iteration restored from its checkpoint (nested loops
        #                 skipped) + the tail
        #   RANGE      3  the nested loops themselves run, from a pseudoresumed start
        return _DEPTHS[self]


_DEPTHS = {Position.PREFIX: 0, Position.SUFFIX: 1, Position.VALIDATION: 2, Position.RANGE: 3}


def deepest(positions: Iterable[Position]) -> Position | None:
    """The deepest of ``positions`` (see :attr:`Position.depth`), or None when there are none."""
    return max(positions, key=lambda p: p.depth, default=None)


@dataclass(frozen=True)
class LoopSite:
    """One ``flor.loop`` used as a for-loop iterable."""

    name: str | None  # None when the first argument is not a string literal
    line: int
    depth: int  # 0 for a loop that no other flor.loop encloses in the same function
    parent: str | None  # name of the enclosing flor.loop, if any
    function: str | None  # qualified name of the enclosing def, None at module level


@dataclass(frozen=True)
class LogSite:
    """One ``flor.log`` call whose name is a string literal."""

    name: str
    line: int
    position: Position | None  # None when no reference to its enclosing function can be found
    loops: tuple[str, ...]  # enclosing flor.loop names in the same function, outermost first
    function: str | None


@dataclass(frozen=True)
class ScriptAnalysis:
    """The flor structure of one script: its loops, logged names and main loop."""

    loops: tuple[LoopSite, ...]
    logs: tuple[LogSite, ...]
    main_loop: LoopSite | None

    @property
    def names(self) -> frozenset[str]:
        """Every name the script logs with a literal name."""
        return frozenset(site.name for site in self.logs)


@dataclass(frozen=True)
class Placed:
    """A new statement inserted into the old version."""

    name: str
    position: Position  # classified in the rewritten old version
    line: int  # line of the flor.log call in PropagationResult.source
    anchor: str  # the evidence that fixed the place, for plans and reports
    path: str | None = None  # the module it went into (propagate_project); None: the one script propagated


@dataclass(frozen=True)
class NotPlaced:
    """A new statement left out of the old version, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class PropagationResult:
    """The old version with today's new statements, and the fate of each requested name."""

    source: str
    placed: tuple[Placed, ...]
    not_placed: tuple[NotPlaced, ...]
    already_logged: tuple[str, ...]  # requested names the old version logs itself

    @property
    def changed(self) -> bool:
        """True when at least one statement was inserted."""
        return bool(self.placed)

    @property
    def depth(self) -> Position | None:
        """The deepest position among the placed statements: the scan this version needs."""
        return deepest(p.position for p in self.placed)


@dataclass(frozen=True)
class ProjectPropagationResult:
    """:class:`PropagationResult` per module of a project propagation, and its project-wide parts."""

    modules: Mapping[str, PropagationResult]  # path -> that module's result (modules with something to place)
    not_placed: tuple[NotPlaced, ...]  # statements of modules the old version lacks
    already_logged: tuple[str, ...]  # requested names some old module logs itself

    @property
    def placed(self) -> tuple[tuple[str, Placed], ...]:
        """Every placed statement with the path of its module."""
        return tuple((path, p) for path, result in self.modules.items() for p in result.placed)

    @property
    def refused(self) -> tuple[tuple[str | None, NotPlaced], ...]:
        """Every refusal with the path of its module (None: the module is missing in the old version)."""
        return (*((None, n) for n in self.not_placed),
                *((path, n) for path, result in self.modules.items() for n in result.not_placed))

    @property
    def sources(self) -> dict[str, str]:
        """The rewritten source of every module that changed."""
        return {path: result.source for path, result in self.modules.items() if result.changed}

    @property
    def depth(self) -> Position | None:
        """The deepest position among every module's placed statements: the scan the version needs."""
        return deepest(p.position for _, p in self.placed)
