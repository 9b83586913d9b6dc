"""Issue 12's target on the replay corpus: every replayed value equals a fresh run, or is refused.

The corpus (``tests/replay_corpus``, driven by ``tests/replay_harness.py``) records six training
scripts ported from public code in three versions each, then replays 39 hindsight statements over
the recorded runs with ``flordb-build replay`` (with ``--workers 2`` too, for validation and range)
and compares every value with a fresh run of that version with the statement placed by hand. One
test per case; the cases that miss the target today are marked ``xfail(strict=True)`` with the
cause of issue 12's list they show, so the fix of a cause turns exactly its cases into XPASS, which
``strict`` reports as a failure: remove their marks then. ``python -m pytest
tests/test_replay_corpus.py -s`` prints the table (``bench/bench_replay_corpus.py`` does too).
"""

from __future__ import annotations

import pytest

from tests.replay_harness import (
    MAIN_GROUP,
    CorpusResult,
    Outcome,
    corpus_cases,
    format_summary,
    load_corpus,
    run_corpus,
    strip_statements,
)

CAUSES = {
    "12.1": "12.1 state changed after the nested loop is applied twice",
    "12.2": "12.2 RNG state is not restored",
    "12.3": "12.3 gradients are not restored",
    "12.4": "12.4 a non-torch checkpoint cannot be restored by replay",
    "12.5": "12.5 command-line flags are not replayed",
    "12.6": "12.6 a file the skipped loop wrote is missing",
    "12.7": "12.7 loop-carried state that no checkpoint holds",
    "12.8": "12.8 a failed replay leaves partial values",
    # Found by the corpus, beyond issue 12's list:
    "12.9": (
        "12.9 (new) the statement draws from the global RNG (torch.randn; iterating a DataLoader draws its base "
        "seed), which changes every later epoch of a fresh run; a replay from recorded checkpoints cannot "
        "reproduce that: refuse, or re-run the loop in full"
    ),
    "12.10": (
        "12.10 (new) a prefix statement is planned as suffix: Layer.train, a method of another class, counts as "
        "a call site of Net.train (the function that runs the main loop), so the code before net.train(...) "
        "is taken for code after it"
    ),
}

#: Today's failing cases and the causes each needs fixed before it can pass, as observed (and,
#: where one cause hides another, as read from the script: e.g. online_sgd's range segments crash
#: on 12.4 before its RandomState, 12.7, would make them wrong).
#: Cases that 12.7 now refuses up front (accepted) no longer have an entry; the other causes they
#: showed would come back once their carried state is checkpointed: vae sample_mean (12.2) and z_probe
#: (12.9, 12.2); word_language_model batch_loss-w2 (12.2, and 12.5 in v2/v3), v3-lr_now-w2 (12.5),
#: final_lr (12.6, 12.8), best_file_val and test_bpc (12.6: refused because their command replays
#: final_lr too); forward_forward's -w2 cases (12.8), v3-g_gap-w2 (12.5); online_sgd batch_mse-w2
#: (12.4, 12.8, and 12.5 in v2/v3). Tutorial's test_logit (12.9) is withheld now, its replay naming
#: the generator its statement draws from (Outcome.WITHHELD, accepted).
FAILING: dict[str, tuple[str, ...]] = {}


def _marks(case_id: str) -> list[pytest.MarkDecorator]:
    causes = FAILING.get(case_id)
    if causes is None:
        return []
    return [pytest.mark.xfail(strict=True, reason="; ".join(CAUSES[c] for c in causes))]


CASES = corpus_cases()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> CorpusResult:
    """The whole corpus, recorded, run fresh and replayed once for all the cases."""
    return run_corpus(tmp_path_factory.mktemp("replay-corpus"))


def test_every_version_places_every_statement_and_records_without_them() -> None:
    scripts = load_corpus()
    assert len(scripts) == 6 and all(len(s.versions) == 3 for s in scripts)
    assert sum(len(s.statements) for s in scripts) == 39
    for script in scripts:
        assert {s.depth.value for s in script.statements} == {"prefix", "suffix", "validation", "range"}, script.key
        for version in script.versions:
            for path, text in version.recorded_files().items():
                compile(text, f"{script.key}/{version.name}/{path}", "exec")
                assert "# hindsight" not in text
            placed = version.fresh_files(MAIN_GROUP)
            assert all(strip_statements(text, keep=None) == version.recorded_files()[p] for p, text in placed.items())
    assert len({c.id for c in CASES}) == len(CASES)
    assert set(FAILING) <= {c.id for c in CASES}, "a FAILING entry names no case of the corpus"


@pytest.mark.slow
def test_the_corpus_recorded_checkpointed_and_ran_fresh(corpus: CorpusResult) -> None:
    print("\n" + format_summary(corpus))
    for script in corpus.scripts:
        for run in script.recorded:
            # Every main-loop iteration checkpointed: otherwise which epochs a scan restores
            # would depend on timing, and so would the outcome of the cases.
            assert run.iterations > 1 and run.checkpointed == run.iterations, (script.script.key, run)
    # The statements of the main group only read state: their fresh runs log every recorded value
    # as the recording did, so each case's expected values are what that version computes.
    changed = {(s.script.key, *k): d for s in corpus.scripts for k, d in s.divergences.items() if k[1] == MAIN_GROUP}
    assert not changed, changed
    empty = [r.case.id for r in corpus.cases if r.expected_values == 0]
    assert not empty, f"hand-placed statements that log nothing in a fresh run: {empty}"
    unexplained = [r.describe() for r in corpus.cases if r.outcome in (Outcome.REFUSED, Outcome.FAILED) and not r.reason]
    assert not unexplained


@pytest.mark.slow
@pytest.mark.parametrize("case_id", [pytest.param(c.id, id=c.id, marks=_marks(c.id)) for c in CASES])
def test_replayed_values_equal_a_fresh_run_or_are_refused_up_front(corpus: CorpusResult, case_id: str) -> None:
    result = corpus.case(case_id)
    assert result.accepted, result.describe()
