"""A replay's backfill: all or nothing per run, and the store always agrees with the git journal.

Replay processes stage their values (``_staging.py``); no reader sees them. When every job of a
run is done, :func:`decide` says whether the run is finished or withheld (a job failed, or values
both the record and the replay logged differ, unless ``--accept-divergent``: then finished with
the run's replayed names marked divergent, in the journal and in ``replay_divergent``), and
:meth:`Backfill.settle` carries that out, one run at a time (``.flor/locks/replay-finish.lock``)::

    withhold:   drop the session's staging of the run         the store shows what it showed
    finish:     1 STAGED     the new state: the run's replayed values, those of the replayed
                             names replaced by the staged ones
                2 INTENT     replay_finishing (run, session)
                3 JOURNALED  .flor/replays/<run>.jsonl (the new state) committed to flor.shadow
                4 PROMOTED   one transaction: staged rows -> logs/loops, replay_journals(run) =
                             the commit, the staging and the intent dropped

Killed before 3, store and newest journal both hold the old state; between 3 and 4, the newest
journal holds the new state and an intent says so. Recovery makes the store show the newest
journal of a run (loads it; it never deletes a value that journal holds) where an intent of a
session that is gone names the run (when the next session opens, when a session closes after an
interruption, when a run is settled), and before a run's replay where ``replay_journals`` does
not name its newest journal commit (``rebuild`` gets there by loading every journal). Staged rows
of sessions that are gone are dropped. A session is alive while its driver holds
``.flor/locks/replay-<session>.lock``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ..config import Config
from ..errors import SnapshotError, StoreError
from ..journalfile import replay_journal_text
from ..store import Store
from ._journal import (
    commit_replay_journal,
    divergent_marks,
    ensure_journal_table,
    load_replay_journal,
    newest_journal_commit,
    read_replay_journal,
    recorded_journal_commit,
)
from ._model import DEFAULT_REL_TOL, GENERATORS, Mismatch, RunOutcome, RunPlan
from ._staging import (
    begin_finishing,
    discard,
    ensure_staging,
    finishing_runs,
    finishing_sessions,
    promote,
    promoted_state,
    staging_sessions,
)

#: Test-only: ``<step>:<path>`` makes the driver write ``path`` when it reaches ``step`` of a
#: run's finish and wait there, so a test can kill it at that instant (tests/test_replay_backfill.py).
PAUSE_ENV = "FLORDB_BUILD_TEST_REPLAY_PAUSE"
_SESSION_PREFIX = "replay-"
_FINISH_LOCK = "replay-finish.lock"


class FinishStep(Enum):
    """The steps of finishing a run (module docstring), each done when its name is reached."""

    STAGED = "staged"
    INTENT = "intent"
    JOURNALED = "journaled"
    PROMOTED = "promoted"


@dataclass(frozen=True)
class Decision:
    """Finish a run (its staged values become its replayed values) or withhold them, and why."""

    withheld: str | None = None  # None: finish
    #: Finish although these values of the record and the replay differ (--accept-divergent):
    #: the run's replayed names are marked divergent in the store and the journal.
    divergent: tuple[Mismatch, ...] = ()

    @property
    def finish(self) -> bool:
        """True when the run's values are to be written."""
        return self.withheld is None


def decide(outcome: RunOutcome, *, rel_tol: float = DEFAULT_REL_TOL, accept_divergent: bool = False) -> Decision:
    """The one decision point: a run's replayed values are written only when every job succeeded
    and every value both the record and the replay logged is equal (within ``rel_tol``).

    Those values are the evidence that the replay retraced the recorded run; where they differ,
    the new values may be wrong too, so they are withheld unless ``accept_divergent`` says to
    write them anyway (then marked).
    """
    if not outcome.ok:
        # The first error's first line: the script's output that follows it is in the report already.
        first = outcome.errors[0].splitlines()[0] if outcome.errors else "a replay process failed"
        return Decision(withheld=first.split("; its last output")[0])
    drawn = [m for m in outcome.mismatches if m.name == GENERATORS]
    if drawn and not accept_divergent:
        return Decision(
            withheld=f"the replay cannot give a fresh run's values: {drawn[0].example}. Draw from a generator of "
            "the statement's own (torch.Generator, numpy.random.default_rng) to leave the script's draws as "
            "they were; --accept-divergent writes the values computed on the record's states, marked divergent"
        )
    if outcome.mismatches and not accept_divergent:
        earliest = outcome.mismatches[0]
        return Decision(
            withheld=f"the replay cannot guarantee equal values: '{earliest.name}' differs from the record "
            f"beyond --rel-tol {rel_tol:g} at {earliest.example} ({earliest.differing} of {earliest.compared} values "
            "differ); --accept-divergent writes them anyway, marked divergent"
        )
    return Decision(divergent=outcome.mismatches)


class Backfill:
    """One replay session's side of the store: its staging, its finishes, its recovery of others'."""

    def __init__(self, config: Config) -> None:
        """Open a session: take its lock, create the staging tables, recover sessions that are gone."""
        self.config = config
        self.session = os.urandom(8).hex()
        self._locks = config.flor_dir / "locks"
        self._locks.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = _take_lock(self._lock_path(self.session))
        try:
            with self._finishing() as conn:
                ensure_staging(conn)
                ensure_journal_table(conn)
                held = {p.name.removeprefix(_SESSION_PREFIX).removesuffix(".lock")
                        for p in self._locks.glob(_SESSION_PREFIX + "*.lock") if p.name != _FINISH_LOCK}
                for session in sorted((held | staging_sessions(conn)) - {self.session}):
                    if _drop_lock_if_dead(self._lock_path(session)):
                        self._recover(conn, session)
        except BaseException:
            self._release()
            raise

    def begin_run(self, run_id: str) -> None:
        """Before a run's first replay process: the store shows the run's newest journal."""
        with self._finishing() as conn:
            self._reconcile(conn, run_id)

    def settle(self, run: RunPlan, decision: Decision) -> Decision:
        """Finish or withhold ``run`` as ``decision`` says (module docstring); the decision as carried out."""
        with self._finishing() as conn:
            for session in finishing_sessions(conn, run.run_id):  # a finish that died comes first
                if session != self.session and _drop_lock_if_dead(self._lock_path(session)):
                    self._recover(conn, session)
            if not decision.finish:
                discard(conn, self.session, run.run_id)
                return decision
            return self._finish(conn, run, decision.divergent)

    def close(self) -> None:
        """End the session: complete or roll back a finish it was interrupted in, drop its staging."""
        if self._lock_fd is None:
            return
        try:
            with self._finishing() as conn:
                self._recover(conn, self.session)
        finally:
            self._release()

    # -- the finish protocol ---------------------------------------------------------------------

    def _finish(self, conn: sqlite3.Connection, run: RunPlan, divergent: tuple[Mismatch, ...]) -> Decision:
        loops, logs, changed = promoted_state(conn, self.session, run.run_id, run.names)
        pause_for_tests(FinishStep.STAGED)
        if not changed:  # nothing staged and nothing to replace: the run keeps what it has
            discard(conn, self.session, run.run_id)
            return Decision()
        # This replay's names are marked when it diverged (and unmarked when it did not); the
        # marks of the run's other replayed names stay as they are.
        why = ""
        if divergent:
            first = divergent[0]
            why = first.example if first.name == GENERATORS else f"'{first.name}' differs at {first.example}"
        marks = {name: why for name in run.names} if divergent else {}
        state_marks = {n: why for n, why in divergent_marks(conn, run.run_id).items() if n not in run.names} | marks
        commit: str | None = None
        if self.config.in_git:
            begin_finishing(conn, self.session, run.run_id)
            pause_for_tests(FinishStep.INTENT)
            try:
                text = replay_journal_text(run.run_id, run.names, loops, logs, state_marks)
                commit = commit_replay_journal(self.config, run.run_id, text, run.names)
            except SnapshotError as exc:
                landed = self._reconcile(conn, run.run_id)  # git failed before its ref moved, but make sure
                discard(conn, self.session, run.run_id)
                return Decision() if landed else Decision(withheld=f"its replay journal could not be committed: {exc}")
            pause_for_tests(FinishStep.JOURNALED)
        try:
            promote(conn, self.session, run.run_id, run.names, commit, marks)
        except sqlite3.Error as exc:
            return Decision(
                withheld=f"they are journaled in {str(commit)[:12]} but the store refused them ({exc}); the next "
                "replay or 'flordb-build rebuild' brings them in"
            )
        pause_for_tests(FinishStep.PROMOTED)
        return Decision(divergent=divergent)

    # -- recovery --------------------------------------------------------------------------------

    def _recover(self, conn: sqlite3.Connection, session: str, run_id: str | None = None) -> None:
        """Complete or roll back ``session``'s unfinished finishes (of one run or all), drop its staging."""
        for pending in finishing_runs(conn, session):
            if run_id is None or pending == run_id:
                self._reconcile(conn, pending)
        discard(conn, session, run_id)

    def _reconcile(self, conn: sqlite3.Connection, run_id: str) -> bool:
        """Load the run's newest journal where the store does not show it; whether it did."""
        if not self.config.in_git:
            return False
        newest = newest_journal_commit(self.config, run_id)
        if newest is None or newest == recorded_journal_commit(conn, run_id):
            return False
        load_replay_journal(conn, read_replay_journal(self.config, newest, run_id), commit=newest)
        return True

    def _lock_path(self, session: str) -> Path:
        return self._locks / f"{_SESSION_PREFIX}{session}.lock"

    @contextlib.contextmanager
    def _finishing(self) -> Iterator[sqlite3.Connection]:
        """The store, with the project's finish lock held (one finish or recovery at a time)."""
        fd = os.open(self._locks / _FINISH_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            store = Store.open(self.config)
            try:
                yield store.conn
            except sqlite3.Error as exc:
                raise StoreError(f"The replay could not update the store '{self.config.db_path}': {exc}.") from exc
            finally:
                store.close()
        finally:
            os.close(fd)  # closing the descriptor drops the lock; the file stays for the next one

    def _release(self) -> None:
        if self._lock_fd is not None:
            self._lock_path(self.session).unlink(missing_ok=True)  # while held: see _take_lock
            os.close(self._lock_fd)
            self._lock_fd = None


# A session's lock file exists while the session may be alive. Whoever removes one (the session at
# its end, or a later session that found it unlocked) removes it while holding its lock, and
# _take_lock checks that the file it locked is still the one at the path, so a session never holds
# a lock that others cannot see.


def _take_lock(path: Path) -> int:
    """Create and lock ``path``; the descriptor (the lock lasts until it is closed, or the process dies)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # removed between our open and our lock: make a new one
            same = False
        if same:
            return fd
        os.close(fd)


def _drop_lock_if_dead(path: Path) -> bool:
    """True when no process holds the session lock at ``path`` (then the file is removed)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        path.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


def pause_for_tests(step: FinishStep) -> None:
    """With :data:`PAUSE_ENV` naming ``step``: write its path and wait until killed (tests only)."""
    wanted, _, path = os.environ.get(PAUSE_ENV, "").partition(":")
    if wanted != step.value or not path:
        return
    Path(path).write_text(str(os.getpid()), encoding="utf-8")
    threading.Event().wait()
