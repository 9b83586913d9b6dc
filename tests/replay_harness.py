"""Issue 12's measuring stick: replay the corpus of real training scripts and compare every value.

For each script of ``tests/replay_corpus`` (see its README), in a temporary git repository of
its own::

    record   each version, its hand-placed statements stripped, committed and run as a user
             would: `python <key>/<script> ARGV` (real processes, real checkpoints)
    fresh    each version WITH its hand-placed statements, in a fresh repository, with the
             recorded argv and flor args: what the statements log there is the expected value
    replay   today's script (the last version, statements kept) over the three recorded runs:
             `flordb-build replay NAMES --yes` per (statement group, depth), and again with
             `--workers 2` for validation and range; replayed values read with flor.dataframe
    compare  every case (version, statement, workers): exact for ints and strings, relative
             1e-6 for floats, the same loop contexts on both sides

A case ends as one :class:`Outcome`. Issue 12's target accepts only ``equal`` and ``refused``
(up front, with a reason); never a wrong value written, never partial values.

Nothing here reads the product's internals: runs are driven through the command line, values
come back through ``flor.dataframe`` and ``flor.query``, and the replay command's own printed
plan and report tell refusals, failures and nondeterminism warnings apart (:class:`ReplayCommand`
is the one place that reads that text).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

CORPUS_DIR = Path(__file__).resolve().with_name("replay_corpus")
MAIN_GROUP = "main"
REL_TOL = 1e-6
#: A hang guard for one process, not a time limit on the corpus: replays on a loaded 2-core
#: machine take minutes.
PROCESS_TIMEOUT = 1800.0
#: Idle seconds a project's warm replay server waits for the next replay command of the corpus;
#: it is stopped explicitly once the project's replays are done.
KEEP_WARM_SECONDS = "300"

GIT_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "Corpus User",
    "GIT_AUTHOR_EMAIL": "corpus@example.com",
    "GIT_COMMITTER_NAME": "Corpus User",
    "GIT_COMMITTER_EMAIL": "corpus@example.com",
}
# Every epoch checkpointed: the adaptive period would otherwise decide by timing which epochs a
# validation scan restores, and the outcome of a case must not depend on the machine's load.
PROJECT_PYPROJECT = "[tool.flordb_build]\ncheckpoint_every = 1\n"
PROJECT_GITIGNORE = "*.pt\n__pycache__/\n"
_FRAME_FIXED = frozenset({"projid", "run_id", "tstamp", "task", "filename"})
_MARKER = re.compile(r"#\s*hindsight\s+(?P<depth>prefix|suffix|validation|range)(?:\s+(?P<group>\w+))?\s*$")
_LOG_NAME = re.compile(r"flor\.log\(\s*[\"'](?P<name>[^\"']+)[\"']")
_RUN_ROW = re.compile(r"^[0-9a-f]{8,}\s+\S")


class CorpusError(RuntimeError):
    """The corpus is inconsistent, or recording or a fresh run failed: no case can be judged."""


class Depth(Enum):
    """Where a hindsight statement sits, as the person who placed it by hand says."""

    PREFIX = "prefix"
    SUFFIX = "suffix"
    VALIDATION = "validation"
    RANGE = "range"

    @property
    def splits(self) -> bool:
        """Scans of this depth split across ``--workers``: such cases also run with two."""
        return self in (Depth.VALIDATION, Depth.RANGE)


class Outcome(Enum):
    """How one case ended."""

    EQUAL = "equal"  # every value equals the fresh run's, and the replay reported nothing odd
    WRONG = "wrong"  # values written that differ from the fresh run's (or missing/extra contexts)
    FLAGGED = "flagged"  # values written, and the replay called this deterministic script nondeterministic
    REFUSED = "refused"  # not placed or not replayed, with a reason, before anything ran
    # replayed, and nothing written because the replay found its statement draws from a generator the
    # script's later code draws from (issue 12.9): no replay from the record's checkpoints can give a
    # fresh run's values then, and the replay said so instead of writing the record's world
    WITHHELD = "withheld"
    FAILED = "failed"  # the replay of the run failed (``partial``: it left values of the statement)


ACCEPTED = frozenset({Outcome.EQUAL, Outcome.REFUSED, Outcome.WITHHELD})
#: The words of a run withheld for its statements' draws (hindsight/_generators.py). A run withheld
#: for any other reason in these deterministic scripts is a replay that failed to retrace its run.
DRAWS_REASON = "the replayed statements draw random numbers"

# -- the corpus ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Statement:
    """One hindsight statement: a ``flor.log`` the person placed by hand in every version."""

    name: str
    depth: Depth
    group: str  # statements of one group are replayed together and share a fresh run


@dataclass(frozen=True)
class Version:
    """One recorded version of a script: its files with the hand-placed statements marked."""

    name: str
    argv: tuple[str, ...]
    edit: str
    files: Mapping[str, str]  # path inside the script's folder -> text

    def statements(self) -> list[Statement]:
        """The marked statements of every file, in file and line order."""
        found: list[Statement] = []
        for path, text in self.files.items():
            for number, line in enumerate(text.splitlines(), 1):
                marker = _MARKER.search(line)
                if marker is None:
                    continue
                logged = _LOG_NAME.search(line)
                if logged is None:
                    raise CorpusError(f"{self.name}/{path}:{number}: a '# hindsight' line must be one flor.log(...) call")
                found.append(Statement(logged["name"], Depth(marker["depth"]), marker["group"] or MAIN_GROUP))
        return found

    def recorded_files(self) -> dict[str, str]:
        """The version as it was recorded: no hindsight statement."""
        return {path: strip_statements(text, keep=None) for path, text in self.files.items()}

    def fresh_files(self, group: str) -> dict[str, str]:
        """The version with the hand-placed statements of ``group``: the expected values' source."""
        return {path: strip_statements(text, keep=group) for path, text in self.files.items()}


@dataclass(frozen=True)
class Script:
    """A corpus script and its versions; the last version with its statements is today's code."""

    key: str
    origin: str
    script: str
    versions: tuple[Version, ...]

    @property
    def path(self) -> str:
        """The script's path in its project (``<key>/<script>``)."""
        return f"{self.key}/{self.script}"

    @property
    def statements(self) -> tuple[Statement, ...]:
        """Today's statements, in source order."""
        return tuple(self.versions[-1].statements())

    @property
    def groups(self) -> tuple[str, ...]:
        """The statement groups, in order of first appearance."""
        return tuple(dict.fromkeys(s.group for s in self.statements))


def strip_statements(text: str, keep: str | None) -> str:
    """``text`` without the marked lines, except those of group ``keep``."""
    kept = []
    for line in text.splitlines(keepends=True):
        marker = _MARKER.search(line)
        if marker is None or (keep is not None and (marker["group"] or MAIN_GROUP) == keep):
            kept.append(line)
    return "".join(kept)


def load_corpus(directory: Path = CORPUS_DIR) -> tuple[Script, ...]:
    """Read ``corpus.toml`` and every version's files, and check that the corpus is consistent.

    :raises CorpusError: a version lacks a statement of today's, or logs a hindsight name itself.
    """
    manifest = tomllib.loads((directory / "corpus.toml").read_text(encoding="utf-8"))
    scripts = []
    for key, entry in manifest.items():
        paths = [entry["script"], *entry.get("modules", [])]
        versions = tuple(
            Version(
                name=v["name"], argv=tuple(v["argv"]), edit=v["edit"],
                files={p: (directory / key / v["name"] / p).read_text(encoding="utf-8") for p in paths},
            )
            for v in entry["versions"]
        )
        script = Script(key=key, origin=entry["origin"], script=entry["script"], versions=versions)
        _check_script(script)
        scripts.append(script)
    return tuple(scripts)


def _check_script(script: Script) -> None:
    today = sorted(script.statements, key=lambda s: s.name)
    if len({s.name for s in today}) != len(today):
        raise CorpusError(f"{script.key}: a hindsight name is used twice")
    for version in script.versions:
        if sorted(version.statements(), key=lambda s: s.name) != today:
            raise CorpusError(f"{script.key}/{version.name}: its hand-placed statements differ from today's")
        for path, text in version.recorded_files().items():
            for statement in today:
                if re.search(rf"flor\.log\(\s*[\"']{re.escape(statement.name)}[\"']", text):
                    raise CorpusError(f"{script.key}/{version.name}/{path} logs '{statement.name}' itself")


@dataclass(frozen=True)
class Case:
    """One replayed value series: a statement in one recorded version, with one or two workers."""

    script: str
    version: str
    statement: Statement
    workers: int

    @property
    def id(self) -> str:
        """``script-version-name`` (``-w2`` with two workers)."""
        return f"{self.script}-{self.version}-{self.statement.name}" + ("-w2" if self.workers == 2 else "")


def corpus_cases(scripts: Sequence[Script] | None = None) -> list[Case]:
    """Every case of the corpus, in script, statement, version, workers order."""
    found = []
    for script in scripts if scripts is not None else load_corpus():
        for statement in script.statements:
            for version in script.versions:
                for workers in (1, 2) if statement.depth.splits else (1,):
                    found.append(Case(script.key, version.name, statement, workers))
    return found


# -- values ----------------------------------------------------------------------------------------

Context = tuple[tuple[str, Any], ...]  # ((loop name, iteration index), ...), outermost first
Values = dict[Context, Any]


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _is_null(value: Any) -> bool:
    return value is None or isinstance(value, float) and math.isnan(value)


def values_by_run(name: str, root: Path) -> dict[str, Values]:
    """What ``flor.dataframe(name)`` shows in the project at ``root``, per run and loop context."""
    import flordb_build as flor
    from flordb_build.config import load_config

    frame = flor.dataframe(name, config=load_config(root))
    dims = [c for c in frame.columns if c not in _FRAME_FIXED and c != name and not str(c).endswith("_value")]
    found: dict[str, Values] = {}
    for row in frame.to_dict("records"):
        value = _plain(row[name])
        if _is_null(value):
            continue
        context = tuple((str(d), _plain(row[d])) for d in dims if not _is_null(_plain(row[d])))
        found.setdefault(str(row["run_id"]), {})[context] = value
    return found


def same_value(expected: Any, replayed: Any) -> bool:
    """Exact for ints, bools and strings; relative ``REL_TOL`` for floats."""
    if isinstance(expected, bool) or isinstance(replayed, bool):
        return expected is replayed
    if isinstance(expected, float) or isinstance(replayed, float):
        if not isinstance(expected, int | float) or not isinstance(replayed, int | float):
            return False
        if math.isnan(expected) and math.isnan(replayed):
            return True
        return math.isclose(expected, replayed, rel_tol=REL_TOL, abs_tol=0.0)
    return type(expected) is type(replayed) and bool(expected == replayed)


def first_difference(expected: Values, replayed: Values, labels: tuple[str, str] = ("expected", "replayed")) -> str:
    """The first context where the series differ, readable; empty when they are equal."""
    want, got = labels
    for context, value in expected.items():
        where = ", ".join(f"{k} {v}" for k, v in context) or "run level"
        if context not in replayed:
            return f"{where}: {want} {value!r}, nothing {got} ({len(replayed)} of {len(expected)} values)"
        if not same_value(value, replayed[context]):
            return f"{where}: {want} {value!r}, {got} {replayed[context]!r}"
    for context, value in replayed.items():
        if context not in expected:
            where = ", ".join(f"{k} {v}" for k, v in context) or "run level"
            return f"{where}: {got} {value!r} where {want} nothing"
    return ""


# -- what a replay command said --------------------------------------------------------------------


@dataclass(frozen=True)
class RunReport:
    """What one replay command printed about one run."""

    planned_depth: str | None
    refusals: Mapping[str, str]  # statement name (or "*" for the whole run) -> reason
    status: str | None  # the report row's status ("ok", "FAILED"), None when the run has no row
    errors: tuple[str, ...]
    nondeterminism: tuple[str, ...]
    withheld: str | None = None  # why the run's values were withheld (None: they were not)


@dataclass(frozen=True)
class ReplayCommand:
    """One ``flordb-build replay NAMES --yes [--workers 2]`` and what it printed."""

    group: str
    depth: Depth
    workers: int
    names: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def refused_up_front(self) -> str | None:
        """The command's error when it stopped before replaying any run (a one-line reason)."""
        if self.returncode == 0 or self._report_rows():
            return None
        lines = self.stderr.strip().splitlines()
        last = lines[-1] if lines else ""
        return last.split("error: ", 1)[1] if last.startswith("flordb-build: error: ") else None

    def _sections(self) -> tuple[list[str], list[str]]:
        lines = self.stdout.splitlines()
        for i, line in enumerate(lines):
            if line.startswith("total estimate:"):
                return lines[:i], lines[i + 1:]
        return lines, []

    def _report_rows(self) -> list[list[str]]:
        # rows of the report table start with a run id; its header, errors and notes do not
        return [line.split() for line in self._sections()[1] if _RUN_ROW.match(line)]

    def run_report(self, run_id: str) -> RunReport:
        """The plan's depth, refusals, report status, errors and warnings for ``run_id``."""
        plan, report = self._sections()
        rid = re.escape(run_id)
        depth = None
        refusals: dict[str, str] = {}
        for line in plan:
            parts = line.split()
            if parts[:1] == [run_id] and len(parts) >= 5 and depth is None:
                depth = parts[4]
            if note := re.match(rf"note: run {rid} \([^)]*\): '(?P<name>[^']+)' not placed: (?P<why>.*)$", line):
                refusals[note["name"]] = note["why"]
            if skip := re.match(rf"skip: run {rid} \(.*?\): (?P<why>.*)$", line):
                refusals["*"] = skip["why"]
        status = next((parts[1] for parts in (line.split() for line in report) if parts[:1] == [run_id]), None)
        everything = [*report, *self.stderr.splitlines()]
        errors = tuple(m["what"] for line in everything if (m := re.match(rf"error: run {rid}: (?P<what>.*)$", line)))
        warnings = tuple(
            m["what"] for line in everything if (m := re.match(rf"warning: nondeterminism in run {rid}: (?P<what>.*)$", line))
        )
        withheld = next(
            (m["why"] for line in report if (m := re.match(rf"withheld: run {rid}: (?P<why>.*)$", line))), None
        )
        return RunReport(depth, refusals, status, errors, warnings, withheld)


# -- results ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseResult:
    """How one case ended, and the evidence."""

    case: Case
    outcome: Outcome
    reason: str = ""
    partial: bool = False  # FAILED, and the failed replay left values of the statement in the store
    planned_depth: str | None = None  # the depth the replay's plan showed for the run
    expected_values: int = 0  # values the fresh run logged
    replayed_values: int = 0  # values the replay left in the store

    @property
    def accepted(self) -> bool:
        """Issue 12's target: equal, or refused with a reason (up front, or withheld for the statement's draws)."""
        return self.outcome in ACCEPTED

    def describe(self) -> str:
        """One line for an assertion message or the case list."""
        extra = " (left partial values)" if self.partial else ""
        depth = f", planned as {self.planned_depth}" if self.planned_depth else ""
        return f"{self.case.id}: {self.outcome.value}{extra} [{self.case.statement.depth.value}{depth}] {self.reason}"


@dataclass(frozen=True)
class RecordedRun:
    """One recorded version: its run, recorded flor args and checkpoint coverage."""

    version: str
    run_id: str
    args: Mapping[str, Any]
    iterations: int  # main-loop iterations recorded
    checkpointed: int  # of them with a checkpoint


@dataclass(frozen=True)
class ScriptResult:
    """Everything one script of the corpus did."""

    script: Script
    recorded: tuple[RecordedRun, ...]
    commands: tuple[ReplayCommand, ...]
    cases: tuple[CaseResult, ...]
    seconds: Mapping[str, float]  # record / fresh / replay phase wall times
    log: Path
    #: (version, group) -> the first value the fresh run logged differently from the recording,
    #: for the names both logged. Only a group whose statements draw random numbers may diverge.
    divergences: Mapping[tuple[str, str], str] = field(default_factory=dict)

    @property
    def run_replays(self) -> int:
        """Replays of one run by one command."""
        return len(self.commands) * len(self.recorded)

    @property
    def failed_run_replays(self) -> int:
        """Run replays whose report shows a failure (or no outcome) although the plan kept the run."""
        failed = 0
        for command in self.commands:
            for run in self.recorded:
                report = command.run_report(run.run_id)
                refused = "*" in report.refusals or command.refused_up_front is not None
                withheld = report.withheld is not None and DRAWS_REASON in report.withheld and not report.errors
                failed += not refused and not withheld and (report.status != "ok" or bool(report.errors))
        return failed


@dataclass(frozen=True)
class CorpusResult:
    """The whole corpus."""

    scripts: tuple[ScriptResult, ...]
    seconds: float

    @property
    def cases(self) -> tuple[CaseResult, ...]:
        """Every case, in corpus order."""
        return tuple(c for s in self.scripts for c in s.cases)

    def case(self, case_id: str) -> CaseResult:
        """The result of the case ``case_id``."""
        for result in self.cases:
            if result.case.id == case_id:
                return result
        raise KeyError(case_id)


# -- running ---------------------------------------------------------------------------------------


def corpus_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Our environment without anything that redirects a store or tags runs, plus a git identity."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOR_", "FLORDB_BUILD_"))}
    return {**env, **GIT_ENV, **(extra or {})}


class ScriptRun:
    """Records, runs fresh, replays and judges one corpus script in ``base/<key>``."""

    def __init__(self, script: Script, base: Path) -> None:
        self.script = script
        self.base = base / script.key
        self.project = self.base / "project"
        self.log_path = self.base / "corpus.log"
        self.seconds: dict[str, float] = {}
        self.divergences: dict[tuple[str, str], str] = {}

    def execute(self) -> ScriptResult:
        """Run every phase; :class:`CorpusError` when recording or a fresh run fails."""
        self.base.mkdir(parents=True)
        started = time.perf_counter()
        recorded = self._record()
        self.seconds["record"] = time.perf_counter() - started
        started = time.perf_counter()
        expected = self._fresh(recorded)
        self.seconds["fresh"] = time.perf_counter() - started
        started = time.perf_counter()
        try:
            replays = self._replay()
        finally:
            self._call([sys.executable, "-m", "flordb_build", "warm", "stop"], self.project, check=False)
        self.seconds["replay"] = time.perf_counter() - started
        cases = tuple(self._judge(case, recorded, expected, replays) for case in corpus_cases([self.script]))
        return ScriptResult(
            self.script, tuple(recorded.values()), tuple(c for c, _v in replays.values()), cases, dict(self.seconds),
            self.log_path, dict(self.divergences),
        )

    # -- phases --
    def _record(self) -> dict[str, RecordedRun]:
        init_repository(self.project)
        recorded = {}
        for version in self.script.versions:
            self._write(self.project, version.recorded_files())
            self._git(self.project, "add", "-A")
            self._git(self.project, "commit", "-q", "-m", f"{self.script.key} {version.name}: {version.edit}")
            self._call([sys.executable, self.script.path, *version.argv], self.project)
            recorded[version.name] = self._newest_run(version.name)
        self._write(self.project, self.script.versions[-1].files)  # today: the statements added, not committed
        return recorded

    def _fresh(self, recorded: Mapping[str, RecordedRun]) -> dict[tuple[str, str], Values]:
        expected: dict[tuple[str, str], Values] = {}
        for version in self.script.versions:
            args = recorded[version.name].args
            for group in self.script.groups:
                root = self.base / "fresh" / f"{version.name}-{group}"
                init_repository(root)
                self._write(root, version.fresh_files(group))
                self._git(root, "add", "-A")
                self._git(root, "commit", "-q", "-m", f"{version.name} with its {group} statements")
                self._call([sys.executable, self.script.path, *version.argv, *kwargs_tokens(args)], root)
                for statement in self.script.statements:
                    if statement.group == group:
                        runs = values_by_run(statement.name, root)
                        expected[(version.name, statement.name)] = next(iter(runs.values()), {})
                divergence = self._divergence(recorded[version.name].run_id, root)
                if divergence:
                    self.divergences[(version.name, group)] = divergence
        return expected

    def _divergence(self, run_id: str, fresh_root: Path) -> str:
        """Where the fresh run at ``fresh_root`` first logged a recorded name differently from the recording."""
        import flordb_build as flor
        from flordb_build.config import load_config

        names = flor.query(
            "SELECT DISTINCT name FROM logs WHERE run_id = ? AND source = 'record' ORDER BY name", [run_id],
            config=load_config(self.project),
        )["name"].tolist()
        for name in names:
            fresh = next(iter(values_by_run(name, fresh_root).values()), {})
            difference = first_difference(values_by_run(name, self.project).get(run_id, {}), fresh, ("recorded", "fresh"))
            if difference:
                return f"'{name}' at {difference}"
        return ""

    def _replay(self) -> dict[tuple[str, Depth, int], tuple[ReplayCommand, dict[str, dict[str, Values]]]]:
        done: dict[tuple[str, Depth, int], tuple[ReplayCommand, dict[str, dict[str, Values]]]] = {}
        env = corpus_environment({"FLORDB_BUILD_REPLAY_KEEP_WARM": KEEP_WARM_SECONDS})
        for group in self.script.groups:
            for depth in Depth:
                names = tuple(s.name for s in self.script.statements if s.group == group and s.depth is depth)
                if not names:
                    continue
                for workers in (1, 2) if depth.splits else (1,):
                    argv = [sys.executable, "-m", "flordb_build", "replay", *names, "--yes"]
                    argv += ["--workers", "2"] if workers == 2 else []
                    started = time.perf_counter()
                    proc = self._call(argv, self.project, check=False, env=env)
                    command = ReplayCommand(
                        group, depth, workers, names, proc.returncode, proc.stdout, proc.stderr,
                        time.perf_counter() - started,
                    )
                    done[(group, depth, workers)] = (command, {n: values_by_run(n, self.project) for n in names})
        return done

    def _judge(
        self,
        case: Case,
        recorded: Mapping[str, RecordedRun],
        expected: Mapping[tuple[str, str], Values],
        replays: Mapping[tuple[str, Depth, int], tuple[ReplayCommand, dict[str, dict[str, Values]]]],
    ) -> CaseResult:
        statement = case.statement
        command, values = replays[(statement.group, statement.depth, case.workers)]
        run_id = recorded[case.version].run_id
        report = command.run_report(run_id)
        replayed = values[statement.name].get(run_id, {})
        wanted = expected[(case.version, statement.name)]

        def result(outcome: Outcome, reason: str, partial: bool = False) -> CaseResult:
            return CaseResult(case, outcome, reason, partial, report.planned_depth, len(wanted), len(replayed))

        refusal = report.refusals.get(statement.name) or report.refusals.get("*") or command.refused_up_front
        # A run the plan skipped was not replayed by this command: values of the statement in the
        # store then come from an earlier command (the 1-worker replay of the same statement).
        if refusal and (not replayed or "*" in report.refusals):
            return result(Outcome.REFUSED, refusal)
        difference = first_difference(wanted, replayed)
        if report.withheld and DRAWS_REASON in report.withheld and not replayed and not report.errors:
            return result(Outcome.WITHHELD, report.withheld)
        if report.status != "ok" or report.errors:
            why = report.errors[0] if report.errors else f"status {report.status or 'missing'}, exit {command.returncode}"
            if difference and replayed:
                why += f"; the values it left: {difference}"
            return result(Outcome.FAILED, why, partial=bool(replayed))
        if not replayed:
            return result(Outcome.FAILED, "nothing written, and no error or refusal reported")
        if report.nondeterminism:
            note = "values equal the fresh run's" if not difference else difference
            return result(Outcome.FLAGGED, f"reported: {report.nondeterminism[0]}; {note}")
        if difference:
            return result(Outcome.WRONG, difference)
        return result(Outcome.EQUAL, "")

    # -- helpers --
    def _newest_run(self, version: str) -> RecordedRun:
        import flordb_build as flor
        from flordb_build.config import load_config

        config = load_config(self.project)
        row = flor.query("SELECT run_id, args FROM runs ORDER BY tstamp DESC LIMIT 1", config=config).iloc[0]
        run_id = str(row["run_id"])
        counts = flor.query(
            "SELECT (SELECT COUNT(*) FROM timings WHERE run_id = :run AND kind = 'iteration') AS iterations, "
            "(SELECT COUNT(DISTINCT ctx_id) FROM checkpoints WHERE run_id = :run) AS checkpointed",
            {"run": run_id}, config=config,
        ).iloc[0]
        return RecordedRun(version, run_id, json.loads(row["args"] or "{}"), int(counts["iterations"]),
                           int(counts["checkpointed"]))

    def _write(self, root: Path, files: Mapping[str, str]) -> None:
        for path, text in files.items():
            target = root / self.script.key / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")

    def _git(self, root: Path, *args: str) -> None:
        self._call(["git", *args], root)

    def _call(
        self, argv: Sequence[str], cwd: Path, *, check: bool = True, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            list(argv), cwd=cwd, env=dict(env) if env is not None else corpus_environment(), capture_output=True,
            text=True, timeout=PROCESS_TIMEOUT,
        )
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(f"$ (cd {cwd} && {' '.join(argv)})  -> exit {proc.returncode}\n{proc.stdout}{proc.stderr}\n")
        if check and proc.returncode != 0:
            raise CorpusError(
                f"{self.script.key}: '{' '.join(argv)}' exited {proc.returncode} in {cwd}:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc


def init_repository(root: Path) -> None:
    """A new git repository at ``root`` with the corpus project's settings, committed."""
    root.mkdir(parents=True)
    (root / "pyproject.toml").write_text(PROJECT_PYPROJECT, encoding="utf-8")
    (root / ".gitignore").write_text(PROJECT_GITIGNORE, encoding="utf-8")
    env = corpus_environment()
    for argv in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "project"]):
        subprocess.run(argv, cwd=root, env=env, check=True, capture_output=True, timeout=PROCESS_TIMEOUT)


def kwargs_tokens(args: Mapping[str, Any]) -> list[str]:
    """``--kwargs name=value ...`` giving a script the recorded flor args."""
    if not args:
        return []
    return ["--kwargs", *(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in args.items())]


def run_corpus(base: Path, *, lanes: int = 2, keys: Sequence[str] | None = None) -> CorpusResult:
    """Run the corpus (or the scripts ``keys``) under ``base``, ``lanes`` scripts at a time."""
    scripts = [s for s in load_corpus() if keys is None or s.key in keys]
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, lanes)) as pool:
        results = list(pool.map(lambda s: ScriptRun(s, base).execute(), scripts))
    return CorpusResult(tuple(results), time.perf_counter() - started)


# -- the summary -----------------------------------------------------------------------------------


@dataclass
class Tally:
    """Counts of outcomes over some cases."""

    counts: dict[Outcome, int] = field(default_factory=lambda: dict.fromkeys(Outcome, 0))
    partial: int = 0

    def add(self, result: CaseResult) -> None:
        """Count one case."""
        self.counts[result.outcome] += 1
        self.partial += result.partial

    @property
    def total(self) -> int:
        """Cases counted."""
        return sum(self.counts.values())

    def row(self, *labels: str) -> list[str]:
        """Table cells: labels, cases, then each outcome."""
        failed = f"{self.counts[Outcome.FAILED]}" + (f" ({self.partial} partial)" if self.partial else "")
        return [*labels, str(self.total), *(str(self.counts[o]) for o in Outcome if o is not Outcome.FAILED), failed]


def _grouped(results: Sequence[CaseResult], key: Any) -> Iterator[tuple[Any, Tally]]:
    tallies: dict[Any, Tally] = {}
    for result in results:
        tallies.setdefault(key(result), Tally()).add(result)
    yield from tallies.items()


def format_summary(result: CorpusResult, *, cases: bool = True) -> str:
    """The table per script and depth, the totals, run replays that failed, and the unaccepted cases."""
    header = ["script", "depth", "cases", *(o.value for o in Outcome)]
    rows = []
    for script in result.scripts:
        order = {d: i for i, d in enumerate(Depth)}
        ordered = sorted(script.cases, key=lambda c: order[c.case.statement.depth])
        rows += [t.row(script.script.key, d) for d, t in _grouped(ordered, lambda c: c.case.statement.depth.value)]
    everything = list(result.cases)
    by_depth = sorted(everything, key=lambda c: list(Depth).index(c.case.statement.depth))
    rows += [t.row("all", d) for d, t in _grouped(by_depth, lambda c: c.case.statement.depth.value)]
    rows += [t.row("all", f"{w} worker{'s' if w > 1 else ''}") for w, t in _grouped(everything, lambda c: c.case.workers)]
    total = Tally()
    for case in everything:
        total.add(case)
    rows.append(total.row("all", "all"))
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    accepted = sum(c.accepted for c in everything)
    run_replays = sum(s.run_replays for s in result.scripts)
    failed = sum(s.failed_run_replays for s in result.scripts)
    lines += [
        "",
        f"equal to a fresh run in {total.counts[Outcome.EQUAL]} of {total.total} cases; accepted by issue 12's target "
        f"(equal, or refused with a reason, up front or for the statement's draws) {accepted} of {total.total}",
        f"wrong values written: {total.counts[Outcome.WRONG]} silently, {total.counts[Outcome.FLAGGED]} reported as "
        f"nondeterminism; failed: {total.counts[Outcome.FAILED]} ({total.partial} left partial values)",
        f"run replays that failed: {failed} of {run_replays}; corpus wall time {result.seconds:.0f}s",
    ]
    diverged = [f"{s.script.key}/{v}-{g}: {d}" for s in result.scripts for (v, g), d in s.divergences.items()]
    if diverged:
        lines.append("fresh runs that log recorded names differently (their statements change what runs after them):")
        lines += [f"  {d}" for d in diverged]
    uncovered = [f"{s.script.key}/{r.version}: {r.checkpointed} of {r.iterations}" for s in result.scripts
                 for r in s.recorded if r.checkpointed != r.iterations]
    if uncovered:
        lines.append("iterations checkpointed (every one expected): " + "; ".join(uncovered))
    if cases:
        lines += ["", "cases not accepted:"]
        lines += [f"  {c.describe()}" for c in everything if not c.accepted]
    return "\n".join(lines)
