"""``flordb-build diff RUN_A RUN_B``: what differs between two runs.

Three parts, each from what the runs recorded:

- args: ``runs.args`` (the ``flor.arg`` values) name by name;
- environment: packages added, removed or at another version, and any other fact of the
  ``envs`` rows that differs (Python, platform, CPU, GPU, selected variables);
- code: ``git diff`` between the two snapshot commits on ``flor.shadow``, leaving out the
  run journals under ``.flor/`` that each snapshot carries.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .config import Config, load_config
from .errors import DiffError, SnapshotError
from .store import Store

_RUN_ID = re.compile(r"^[0-9a-f]{1,32}$")
_MISSING = object()


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

    @property
    def identical(self) -> bool:
        """True when args, environment and code are all the same."""
        return not (self.args or self.packages or self.environment or self.code_diff)


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
    return RunFacts(row[0], row[1], row[2], row[3], args, row[5], env)


def diff_mappings(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (a value, b value)}`` for keys whose values differ (None where a side lacks the key)."""
    out = {}
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
        if va != vb:
            out[key] = (None if va is _MISSING else va, None if vb is _MISSING else vb)
    return out


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
    from . import snapshot

    if not config.in_git:
        return None, f"'{config.root}' is not a git repository: runs have no snapshot commits"
    if not a or not b:
        return None, "a run has no snapshot commit (recorded outside git, or still running)"
    try:
        text = snapshot.run_git(config.root, "diff", "--no-color", "--no-ext-diff", a, b, "--", ".", ":(exclude).flor")
    except SnapshotError as exc:
        return None, f"could not diff the snapshots: {exc}"
    return text, None


def diff_runs(run_a: str, run_b: str, config: Config | None = None) -> RunDiff:
    """Compare two runs (ids or unique prefixes): args, packages, environment, code.

    :raises DiffError: for an unknown or ambiguous run id, or when nothing was recorded yet.
    """
    config = config or load_config()
    store = Store.open_existing(config)
    if store is None:
        raise DiffError(f"No flordb_build store at '{config.db_path}' yet; record a run first.")
    try:
        a = run_facts(store, resolve_run(store, run_a))
        b = run_facts(store, resolve_run(store, run_b))
    finally:
        store.close()
    env_a, env_b = dict(a.env or {}), dict(b.env or {})
    packages = diff_mappings(env_a.pop("packages", {}) or {}, env_b.pop("packages", {}) or {})
    environment = diff_mappings(flatten(env_a), flatten(env_b)) if (a.env and b.env) else {}
    text, note = code_diff(config, a.snapshot, b.snapshot)
    return RunDiff(a, b, diff_mappings(a.args, b.args), packages, environment, text or None, note)


def render_diff(diff: RunDiff) -> str:
    """The comparison as text (what ``flordb-build diff`` prints)."""
    lines = []
    for side, facts in (("A", diff.a), ("B", diff.b)):
        lines.append(
            f"{side}: run {facts.run_id}  {facts.filename or '?'}  task {facts.task or '-'}  {facts.tstamp or ''}  "
            f"snapshot {(facts.snapshot or '-')[:12]}"
        )
    lines.append("")
    lines.append("args:" if diff.args else "args: same")
    for name, (va, vb) in diff.args.items():
        lines.append(f"  {name}: {_show(va)} -> {_show(vb)}")
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


def _show(value: Any) -> str:
    return "-" if value is None else json.dumps(value, default=str)
