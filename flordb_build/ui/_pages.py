"""What each page of the UI shows, read from a read-only store (no Flask here: testable alone).

Every read goes through the store's :class:`~flordb_build.team.ViewReader` (the local store's, or the
team store's for ``flordb-build ui --team``), so the pages show the same over either. The code at a
run's snapshot always comes from this clone's git repository.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..charts import GroupBy, RunLabel
from ..config import Config
from ..errors import SnapshotError, ViewError
from ..plot import name_figure, run_labels
from ..runlist import run_level_values
from ..series import NOT_LOGGED, read_series
from ..store import Store
from ..table import is_missing
from ..team._protocol import ViewReader, as_view_reader

RUN_ID = re.compile(r"^[0-9a-f]{1,32}$")
#: Longest script shown whole on a run page (characters); longer ones are cut with a note.
MAX_CODE = 200_000


@dataclass(frozen=True)
class RunPage:
    """Everything the Run page shows about one run."""

    facts: dict[str, Any]
    args: dict[str, Any]
    values: dict[str, Any]
    figures: dict[str, dict[str, Any]]  # loop-level numeric names -> plotly figure
    other_names: dict[str, dict[str, Any]]  # loop-level text/JSON names -> points, last value
    checkpoints: list[dict[str, Any]]
    environment: dict[str, Any] | None
    code: str | None
    code_note: str | None
    task: dict[str, Any] | None

    @property
    def live(self) -> bool:
        return self.facts.get("status") == "running"


@dataclass(frozen=True)
class ComparePage:
    """Several runs side by side: one name's curves, args and values, code."""

    runs: list[dict[str, Any]]
    names: list[str]
    name: str | None
    figure: dict[str, Any] | None
    rows: list[dict[str, Any]]  # {"section", "name", "cells": [...], "differs": bool}
    code: list[dict[str, Any]] = field(default_factory=list)  # {"a", "b", "table" (HTML) or "note"}


def resolve_run_id(store: Store | ViewReader, prefix: str) -> str:
    """The full run id that ``prefix`` starts.

    :raises ViewError: for something that is not a run id, an unknown or an ambiguous one.
    """
    if not RUN_ID.match(prefix or ""):
        raise ViewError(f"'{prefix}' is not a run id.")
    rows = as_view_reader(store).run_ids_starting(prefix, 2)
    if len(rows) != 1:
        raise ViewError(f"No run '{prefix}' in this store." if not rows else f"Run id prefix '{prefix}' is ambiguous.")
    return rows[0]


def run_facts(store: Store | ViewReader, run_id: str) -> dict[str, Any]:
    """The ``runs`` row of a run, with the status a viewer should show."""
    reader = as_view_reader(store)
    facts = reader.run_record(run_id)
    if facts is None:
        raise ViewError(f"No run '{run_id}' in this store.")
    facts["divergent"] = reader.divergent_marks(run_id)
    return facts


def split_names(store: Store | ViewReader, run_id: str) -> tuple[list[str], list[str]]:
    """The run's names: (logged inside loops, logged at run level only)."""
    reader = as_view_reader(store)
    loop: list[str] = []
    run_level: list[str] = []
    for name in reader.logged_names(run_id):
        (loop if reader.is_loop_level(run_id, name) else run_level).append(name)
    return loop, run_level


@dataclass(frozen=True)
class RunValues:
    """A run's logged names read once: charts, other loop-level names, run-level values."""

    figures: dict[str, dict[str, Any]]
    others: dict[str, dict[str, Any]]
    run_level: dict[str, Any]


def read_run_values(store: Store | ViewReader, run_id: str) -> RunValues:
    """Every name of the run, each series read once (a million-point name is read one time)."""
    store = as_view_reader(store)
    labels = run_labels(store, [run_id])
    figures, others, run_level = {}, {}, {}
    for name in store.logged_names(run_id):
        series = read_series(store, run_id, name)
        if series.run_value is not NOT_LOGGED and not is_missing(series.run_value):
            run_level[name] = series.run_value
        if not series.dims:
            continue
        if series.numeric:
            figures[name] = name_figure(store, name, labels, read={run_id: series})
        else:
            last = series.values[-1] if len(series) else None
            others[name] = {"points": len(series), "dims": series.dims, "last": last}
    return RunValues(figures, others, run_level)


def build_run_page(store: Store | ViewReader, run_id: str, config: Config) -> RunPage:
    """The Run page of ``run_id``; its code from ``config``'s repository."""
    store = as_view_reader(store)
    facts = run_facts(store, run_id)
    try:
        args = json.loads(facts.get("args") or "{}")
    except ValueError:
        args = {}
    read = read_run_values(store, run_id)
    values, figures, others = read.run_level, read.figures, read.others
    checkpoints = store.checkpoint_rows(run_id)
    env = store.environment(facts["env_id"]) if facts.get("env_id") else None
    code, note = script_at_snapshot(config, facts.get("snapshot"), facts.get("filename"))
    task = None
    if facts.get("pipeline_id") and facts.get("task"):
        task = store.task_row(facts["pipeline_id"], facts["task"])
    shown_values = {k: v for k, v in values.items() if k not in args}
    return RunPage(facts, args, shown_values, figures, others, checkpoints, env, code, note, task)


def script_at_snapshot(config: Config, snapshot: str | None, filename: str | None) -> tuple[str | None, str | None]:
    """``(code, note)``: the run's script as its snapshot commit holds it, or why it cannot be shown."""
    from ..history import read_snapshot_file

    if not snapshot:
        return None, "no snapshot commit (recorded outside git, or still running)"
    if not filename or filename.startswith("<") or filename.startswith("/") or filename == "-c":
        return None, f"the script '{filename}' is not a file of the project"
    try:
        text = read_snapshot_file(config.root, snapshot, filename)
    except SnapshotError as exc:
        return None, f"'{filename}' is not in snapshot {snapshot[:12]}: {exc}"
    if len(text) > MAX_CODE:
        return text[:MAX_CODE], f"cut at {MAX_CODE} characters"
    return text, None


def build_compare_page(store: Store | ViewReader, run_ids: list[str], name: str | None, config: Config) -> ComparePage:
    """The Compare page of ``run_ids`` (oldest first: A is the baseline), charting ``name``."""
    from ..table import format_cell

    store = as_view_reader(store)
    runs = sorted((run_facts(store, r) for r in run_ids), key=lambda f: str(f.get("tstamp") or ""))
    run_ids = [f["run_id"] for f in runs]
    arg_sets = []
    value_sets = []
    name_sets = []
    for facts in runs:
        try:
            args = json.loads(facts.get("args") or "{}")
        except ValueError:
            args = {}
        values = run_level_values(store, facts["run_id"])
        arg_sets.append(args)
        value_sets.append({k: v for k, v in values.items() if k not in args})
        name_sets.append(split_names(store, facts["run_id"])[0])
    names = sorted({n for names in name_sets for n in names})
    charted = [n for n in names if all(n in s for s in name_sets)] or names
    chosen = name if name in names else (charted[0] if charted else None)
    figure = None
    if chosen is not None:
        labels: dict[str, RunLabel] = run_labels(store, run_ids)
        try:
            figure = name_figure(store, chosen, labels, by=GroupBy.RUN)
        except ViewError:
            figure = None
    rows = []
    for section, sets in (("args", arg_sets), ("values", value_sets)):
        for key in sorted({k for s in sets for k in s}):
            cells = [s.get(key) for s in sets]
            shown = [format_cell(c) for c in cells]
            rows.append({"section": section, "name": key, "cells": shown,
                         "changed": [c != cells[0] for c in cells], "differs": len(set(shown)) > 1})
    for key in names:
        summaries = []
        for facts in runs:
            if key in name_sets[runs.index(facts)]:
                series = read_series(store, facts["run_id"], key)
                summaries.append(format_cell(series.values[-1]) if len(series) else "-")
            else:
                summaries.append("-")
        rows.append({"section": "last value", "name": key, "cells": summaries,
                     "changed": [c != summaries[0] for c in summaries], "differs": len(set(summaries)) > 1})
    return ComparePage(runs, names, chosen, figure, rows, compare_code(config, runs))


def compare_code(config: Config, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run's script beside the first run's, changed lines marked (difflib's side-by-side table)."""
    if len(runs) < 2:
        return []
    base = runs[0]
    base_code, base_note = script_at_snapshot(config, base.get("snapshot"), base.get("filename"))
    out = []
    for other in runs[1:]:
        code, note = script_at_snapshot(config, other.get("snapshot"), other.get("filename"))
        entry: dict[str, Any] = {"a": base["run_id"], "b": other["run_id"]}
        if base_code is None or code is None:
            entry["note"] = base_note or note
        elif base_code == code and base.get("filename") == other.get("filename"):
            entry["note"] = "same code"
        else:
            entry["table"] = difflib.HtmlDiff(wrapcolumn=80).make_table(
                base_code.splitlines(), code.splitlines(),
                f"{base['run_id'][:8]} {base.get('filename')}", f"{other['run_id'][:8]} {other.get('filename')}",
                context=True, numlines=3,
            )
        out.append(entry)
    return out
