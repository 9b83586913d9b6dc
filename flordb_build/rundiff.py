"""``flordb-build diff RUN_A RUN_B``: what differs between two runs.

Five parts, each from what the runs recorded:

- args: ``runs.args`` (the ``flor.arg`` values) name by name;
- values: the other run-level values (final metrics), as ``flor.dataframe()`` reads them;
- loops: per name logged inside loops, its last value and its best (the minimum for names that
  read like a loss or an error, else the maximum), from the run's series (series.py);
- environment: packages added, removed or at another version, and any other fact of the
  ``envs`` rows that differs (Python, platform, CPU, GPU, selected variables); two spellings of
  one interpreter (``.../bin/python3`` and ``.../bin/python`` of one prefix and version) are
  the same interpreter;
- code: ``git diff`` between the two snapshot commits on ``flor.shadow``, leaving out the
  run journals under ``.flor/`` that each snapshot carries.

The store is opened read-only.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .config import Config, load_config
from .errors import DiffError, SnapshotError
from .reader import reading
from .store import Store

_RUN_ID = re.compile(r"^[0-9a-f]{1,32}$")
_MISSING = object()
_INTERPRETER = re.compile(r"^python(\d+(\.\d+)*)?$")
#: Names whose best value is the smallest (a loss, an error, a time); others are best when largest.
_LOWER_IS_BETTER = ("loss", "err", "mse", "mae", "rmse", "perplexity", "ppl", "time", "seconds", "latency", "regret")


@dataclass(frozen=True)
class LoopSummary:
    """One name logged inside loops: how many points, the last value and the best one."""

    dims: tuple[str, ...]
    points: int
    last: Any
    best: Any
    best_is_min: bool

    def text(self) -> str:
        if self.best is None:
            return f"last {_show(self.last)}"
        return f"last {_show(self.last)}, best ({'min' if self.best_is_min else 'max'}) {_show(self.best)}"


@dataclass(frozen=True)
class RunFacts:
    """What one run recorded that a comparison needs."""

    run_id: str
    task: str | None
    filename: str | None
    tstamp: str | None
    args: dict[str, Any]
    snapshot: str | None
    env: dict[str, Any] | None
    values: dict[str, Any] = field(default_factory=dict)
    loops: dict[str, LoopSummary] = field(default_factory=dict)


@dataclass(frozen=True)
class RunDiff:
    """The differences between run ``a`` and run ``b`` (``(a value, b value)`` pairs; None = absent)."""

    a: RunFacts
    b: RunFacts
    args: dict[str, tuple[Any, Any]]
    packages: dict[str, tuple[str | None, str | None]]
    environment: dict[str, tuple[Any, Any]]
    code_diff: str | None
    code_note: str | None
    values: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    loops: dict[str, tuple[LoopSummary | None, LoopSummary | None]] = field(default_factory=dict)

    @property
    def identical(self) -> bool:
        """True when args, values, loop values, environment and code are all the same."""
        return not (self.args or self.values or self.loops or self.packages or self.environment or self.code_diff)


def resolve_run(store: Store, prefix: str) -> str:
    """The full run id that ``prefix`` starts; refuse unknown and ambiguous prefixes."""
    prefix = prefix.strip().lower()
    if not _RUN_ID.match(prefix):
        raise DiffError(f"'{prefix}' is not a run id; list run ids with 'flordb-build runs'.")
    rows = store.conn.execute(
        "SELECT run_id FROM runs WHERE substr(run_id, 1, ?) = ? LIMIT 3", (len(prefix), prefix)
    ).fetchall()
    if not rows:
        raise DiffError(f"No run '{prefix}' in the store; list run ids with 'flordb-build runs'.")
    if len(rows) > 1:
        raise DiffError(f"Run id prefix '{prefix}' is ambiguous ({', '.join(r[0] for r in rows)}, ...); give more digits.")
    return str(rows[0][0])


def run_facts(store: Store, run_id: str) -> RunFacts:
    """Read one run's args, snapshot and environment."""
    from .environment import load_environment

    row = store.conn.execute(
        "SELECT run_id, task, filename, tstamp, args, snapshot, env_id FROM runs WHERE run_id = ?", (run_id,)
    ).fetchone()
    if row is None:
        raise DiffError(f"No run '{run_id}' in the store; list run ids with 'flordb-build runs'.")
    try:
        args = json.loads(row[4]) if row[4] else {}
    except ValueError:
        args = {"(unreadable args)": row[4]}
    env = load_environment(store, row[6]) if row[6] else None
    values, loops = run_values(store, row[0], args)
    return RunFacts(row[0], row[1], row[2], row[3], args, row[5], env, values, loops)


def run_values(store: Store, run_id: str, args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, LoopSummary]]:
    """The run's run-level values other than its args, and a summary of each loop-level name."""
    from .runlist import run_level_values
    from .series import is_loop_level, logged_names, read_series

    values = {k: v for k, v in run_level_values(store, run_id).items() if k not in args}
    loops = {}
    for name in logged_names(store, run_id):
        if is_loop_level(store, run_id, name):
            loops[name] = summarize(read_series(store, run_id, name))
    return values, loops


def summarize(series: Any) -> LoopSummary:
    """Points, last and best value of a series (best: None for values that are not numbers)."""
    values = series.values.tolist()
    last = values[-1] if values else None
    best = None
    lower = any(word in series.name.lower() for word in _LOWER_IS_BETTER)
    numbers = [v for v in values if isinstance(v, int | float) and not (isinstance(v, float) and math.isnan(v))]
    if series.numeric and numbers:
        best = min(numbers) if lower else max(numbers)
    return LoopSummary(series.dims, len(values), last, best, lower)


def diff_mappings(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (a value, b value)}`` for keys whose values differ (None where a side lacks the key)."""
    out = {}
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
        if va != vb:
            out[key] = (None if va is _MISSING else va, None if vb is _MISSING else vb)
    return out


def same_interpreter(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True when two ``python`` facts name one interpreter spelled two ways (``python3``/``python``).

    Same version and prefix, and either the same file once symlinks are resolved or two
    ``python[N[.M]]`` names in one directory (a virtual environment's spellings).
    """
    ea, eb = str(a.get("executable") or ""), str(b.get("executable") or "")
    if not ea or not eb or a.get("version") != b.get("version") or a.get("prefix") != b.get("prefix"):
        return False
    if os.path.exists(ea) and os.path.exists(eb) and os.path.realpath(ea) == os.path.realpath(eb):
        return True
    return (
        os.path.dirname(ea) == os.path.dirname(eb)
        and bool(_INTERPRETER.match(os.path.basename(ea)))
        and bool(_INTERPRETER.match(os.path.basename(eb)))
    )


def flatten(facts: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b.c": leaf}`` so differences name their exact fact."""
    flat: dict[str, Any] = {}
    for key, value in facts.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def code_diff(config: Config, a: str | None, b: str | None) -> tuple[str | None, str | None]:
    """``(diff text, note)`` between two snapshot commits, journals under ``.flor/`` left out."""
    from .history import diff_snapshots

    if not config.in_git:
        return None, f"'{config.root}' is not a git repository: runs have no snapshot commits"
    if not a or not b:
        return None, "a run has no snapshot commit (recorded outside git, or still running)"
    try:
        text = diff_snapshots(config.root, a, b, exclude=".flor")
    except SnapshotError as exc:
        return None, f"could not diff the snapshots: {exc}"
    return text, None


def diff_runs(run_a: str, run_b: str, config: Config | None = None) -> RunDiff:
    """Compare two runs (ids or unique prefixes): args, packages, environment, code.

    :raises DiffError: for an unknown or ambiguous run id, or when nothing was recorded yet.
    """
    config = config or load_config()
    if not config.db_path.exists():
        raise DiffError(f"No flordb_build store at '{config.db_path}' yet; record a run first.")
    with reading(config) as store:
        a = run_facts(store, resolve_run(store, run_a))
        b = run_facts(store, resolve_run(store, run_b))
    env_a, env_b = dict(a.env or {}), dict(b.env or {})
    packages = diff_mappings(env_a.pop("packages", {}) or {}, env_b.pop("packages", {}) or {})
    if isinstance(env_a.get("python"), dict) and isinstance(env_b.get("python"), dict):
        if same_interpreter(env_a["python"], env_b["python"]):
            env_b["python"] = {**env_b["python"], "executable": env_a["python"].get("executable")}
    environment = diff_mappings(flatten(env_a), flatten(env_b)) if (a.env and b.env) else {}
    text, note = code_diff(config, a.snapshot, b.snapshot)
    loops = {
        name: (a.loops.get(name), b.loops.get(name))
        for name in sorted(set(a.loops) | set(b.loops))
        if _summary_key(a.loops.get(name)) != _summary_key(b.loops.get(name))
    }
    return RunDiff(
        a, b, diff_mappings(a.args, b.args), packages, environment, text or None, note,
        diff_mappings(a.values, b.values), loops,
    )


def _summary_key(summary: LoopSummary | None) -> tuple[Any, ...] | None:
    return None if summary is None else (summary.points, summary.last, summary.best)


def render_diff(diff: RunDiff) -> str:
    """The comparison as text (what ``flordb-build diff`` prints)."""
    lines = []
    for side, facts in (("A", diff.a), ("B", diff.b)):
        lines.append(
            f"{side}: run {facts.run_id}  {facts.filename or '?'}  task {facts.task or '-'}  {facts.tstamp or ''}  "
            f"snapshot {(facts.snapshot or '-')[:12]}"
        )
    lines.append("")
    _render_side_by_side(lines, "args", diff.a.args, diff.b.args, diff.args)
    _render_side_by_side(lines, "values", diff.a.values, diff.b.values, diff.values)
    _render_loops(lines, diff)
    if diff.a.env is None or diff.b.env is None:
        lines.append("packages: unknown (a run has no recorded environment)")
    else:
        lines.append("packages:" if diff.packages else "packages: same")
        for name, (va, vb) in diff.packages.items():
            change = "added" if va is None else "removed" if vb is None else "changed"
            lines.append(f"  {name}: {va or '-'} -> {vb or '-'}  ({change})")
        lines.append("environment:" if diff.environment else "environment: same")
        for name, (va, vb) in diff.environment.items():
            lines.append(f"  {name}: {_show(va)} -> {_show(vb)}")
    if diff.code_note:
        lines.append(f"code: unknown ({diff.code_note})")
    elif diff.code_diff:
        lines.append("code:")
        lines.append(diff.code_diff)
    else:
        lines.append("code: same")
    return "\n".join(lines)


def _render_side_by_side(lines: list[str], title: str, a: dict[str, Any], b: dict[str, Any],
                         changed: dict[str, tuple[Any, Any]]) -> None:
    """Every name of either run: ``* name: a -> b`` where it changed, ``  name: value`` where not."""
    names = sorted(set(a) | set(b))
    if not names:
        lines.append(f"{title}: none")
        return
    lines.append(f"{title}:" if changed else f"{title}: same")
    for name in names:
        if name in changed:
            va, vb = changed[name]
            lines.append(f"  * {name}: {_show(va)} -> {_show(vb)}")
        else:
            lines.append(f"    {name}: {_show(a[name])}")


def _render_loops(lines: list[str], diff: RunDiff) -> None:
    names = sorted(set(diff.a.loops) | set(diff.b.loops))
    if not names:
        lines.append("loops: none")
        return
    lines.append("loops (last, best):" if diff.loops else "loops (last, best): same")
    for name in names:
        sa, sb = diff.a.loops.get(name), diff.b.loops.get(name)
        if name in diff.loops:
            left = f"{sa.text()} ({sa.points} points)" if sa else "-"
            right = f"{sb.text()} ({sb.points} points)" if sb else "-"
            lines.append(f"  * {name}: {left} -> {right}")
        elif sa is not None:
            lines.append(f"    {name}: {sa.text()} ({sa.points} points)")


def diff_rows(diff: RunDiff) -> list[dict[str, Any]]:
    """The comparison as rows ``section, name, a, b, changed`` (``diff --format csv|json``)."""
    rows: list[dict[str, Any]] = []
    for section, a, b, changed in (
        ("args", diff.a.args, diff.b.args, diff.args),
        ("values", diff.a.values, diff.b.values, diff.values),
    ):
        for name in sorted(set(a) | set(b)):
            rows.append({"section": section, "name": name, "a": a.get(name), "b": b.get(name), "changed": name in changed})
    for name in sorted(set(diff.a.loops) | set(diff.b.loops)):
        sa, sb = diff.a.loops.get(name), diff.b.loops.get(name)
        for part in ("last", "best", "points"):
            va, vb = (getattr(s, part) if s else None for s in (sa, sb))
            rows.append({"section": "loops", "name": f"{name}.{part}", "a": va, "b": vb, "changed": va != vb})
    for name, (va, vb) in diff.packages.items():
        rows.append({"section": "packages", "name": name, "a": va, "b": vb, "changed": True})
    for name, (va, vb) in diff.environment.items():
        rows.append({"section": "environment", "name": name, "a": va, "b": vb, "changed": True})
    rows.append({"section": "code", "name": "diff", "a": diff.a.snapshot, "b": diff.b.snapshot,
                 "changed": bool(diff.code_diff) if not diff.code_note else None})
    return rows


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return json.dumps(value, default=str)
