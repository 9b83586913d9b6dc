"""A replay that cannot guarantee equal values writes nothing, and a replay that wrote nothing fails.

Real recorded runs in a temporary git repository, real replays. The values that both the record
and the replay log are the evidence that a replay retraced its run: where they differ beyond
``--rel-tol`` the run's new values are withheld and the command exits non-zero, unless
``--accept-divergent`` writes them, marked. A replay where no run's values were written (none
selected to run, every run skipped, failed or withheld) says "nothing replayed: ..." and fails.
"""

from __future__ import annotations

import json
import re
import sqlite3
from typing import Any

import pytest

import flordb_build as flor
from flordb_build.errors import ReplayError
from tests.conftest import Project

# `val` is logged by the record and by every replay that runs the epoch loop; NOISE makes it
# differ between any two executions (os.urandom), or not at all.
RECORDED = """\
import os
import time
import flordb_build as flor

state = {{"w": 0}}
flor.log("start", 7)
with flor.checkpointing(state=state):
    for epoch in flor.loop("epoch", range(3)):
        for step in flor.loop("step", range(3)):
            state["w"] += 1
            time.sleep(0.01)  # epochs slow enough that every one is checkpointed
        flor.log("val", state["w"]{noise})
flor.log("final", state["w"])
"""
DETERMINISTIC = RECORDED.format(noise="")
NOISY = RECORDED.format(noise=' + int.from_bytes(os.urandom(4), "big") / 2**32')  # noise in [0, 1)
# The 'v' replays below run one segment (--workers 1): split in two, the first segment skips the
# later epochs, and the carried-state check (_carried.py) takes `int.from_bytes` for a change of `int`.

# Today's statement at each depth, and the values a fresh run of the recorded version would log.
STATEMENTS = {
    "prefix": ('flor.log("start", 7)\n', 'flor.log("p", 2 * 7)\n', [14]),
    "suffix": ('flor.log("final", state["w"])\n', 'flor.log("s", state["w"] + 1)\n', [10]),
    "validation": (
        '        flor.log("val", state["w"]',
        '        flor.log("v", state["w"] * 2)\n',
        [6, 12, 18],
    ),
    "range": ('            state["w"] += 1\n', '            flor.log("r", state["w"])\n', list(range(1, 10))),
}


def today(recorded: str, depth: str) -> str:
    """``recorded`` with today's statement of ``depth`` in it (after the line it anchors on)."""
    anchor, statement, _values = STATEMENTS[depth]
    start = recorded.index(anchor)
    end = recorded.index("\n", start) + 1
    return recorded[:end] + statement + recorded[end:]


def record(project: Project, script: str, depth: str) -> None:
    """One recorded run of ``script``; today's version adds the statement of ``depth``."""
    project.write("pyproject.toml", "[tool.flordb_build]\ncheckpoint_every = 1\n")  # restore points by count, not timing
    project.write("train.py", script)
    project.commit_all("recorded version")
    project.run("train.py")
    project.write("train.py", today(script, depth))
    project.commit_all(f"today: a statement at {depth} depth")


def run_id() -> str:
    return str(flor.query("SELECT run_id FROM runs")["run_id"][0])


def replayed_rows(project: Project, name: str) -> int:
    conn = sqlite3.connect(project.root / ".flor" / "flor.db")
    try:
        return int(
            conn.execute(
                "SELECT COUNT(*) FROM logs WHERE name = ? AND source = 'replay'", (name,)
            ).fetchone()[0]
        )
    finally:
        conn.close()


def journal_header(project: Project, run: str) -> dict[str, Any] | None:
    """The header of the run's newest replay journal on flor.shadow (None: none was committed)."""
    path = f".flor/replays/{run}.jsonl"
    commit = project.git("log", "-1", "--format=%H", "--diff-filter=AM", "flor.shadow", "--", path).strip()
    if not commit:
        return None
    header: dict[str, Any] = json.loads(project.git("show", f"{commit}:{path}").splitlines()[0])["replay"]
    return header


def report_row(stdout: str, run: str) -> list[str]:
    """The run's row of the replay report (the last line that starts with its id)."""
    return [line.split() for line in stdout.splitlines() if line.startswith(run)][-1]


# -- no false withholding -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("depth", "workers"),
    [("prefix", 1), ("suffix", 1), ("validation", 1), ("validation", 2), ("range", 1), ("range", 2)],
)
def test_a_deterministic_replay_is_written_at_every_depth(project: Project, depth: str, workers: int) -> None:
    record(project, DETERMINISTIC, depth)
    name, values = STATEMENTS[depth][1].split('"')[1], STATEMENTS[depth][2]

    out = project.cli("replay", name, "--yes", "--workers", str(workers))
    planned = f" {depth} x2 " if workers == 2 else f" {depth} "  # the plan's depth column
    assert planned in out.stdout, out.stdout
    assert "withheld" not in out.stdout and "nondeterminism" not in out.stdout, out.stdout
    assert "nothing replayed" not in out.stdout
    row = report_row(out.stdout, run_id())
    assert row[1] == "ok" and int(row[3]) == len(values) == replayed_rows(project, name), out.stdout
    assert flor.dataframe(name)[name].tolist() == values
    header = journal_header(project, run_id())
    assert header is not None and "divergent" not in header


def test_a_recorded_nan_is_no_evidence_of_divergence(project: Project) -> None:
    # SQLite stores a float NaN as NULL: the record's NaN reads back as None, the replay's is NaN.
    # They are the same value, and the run's new values are written.
    script = DETERMINISTIC.replace(
        '        flor.log("val", state["w"])\n', '        flor.log("val", state["w"])\n        flor.log("gap", float("nan"))\n'
    )
    record(project, script, "validation")
    out = project.cli("replay", "v", "--yes", "--workers", "1")
    assert "withheld" not in out.stdout and "nondeterminism" not in out.stdout, out.stdout
    assert flor.dataframe("v")["v"].tolist() == [6, 12, 18]


# -- divergence: withheld, or written marked -----------------------------------------------------


def test_a_replay_that_diverges_from_the_record_is_withheld_and_the_command_fails(project: Project) -> None:
    record(project, NOISY, "validation")
    recorded = flor.dataframe("val")["val"].tolist()

    out = project.cli("replay", "v", "--yes", "--workers", "1", check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    run = run_id()
    assert report_row(out.stdout, run)[3] == "withheld", out.stdout
    withheld = next(line for line in out.stdout.splitlines() if line.startswith(f"withheld: run {run}"))
    # The first differing name, its loop context and both values.
    assert "'val' differs from the record beyond --rel-tol 1e-06 at epoch 0: recorded " in withheld, withheld
    assert f"recorded {recorded[0]!r}, replayed " in withheld
    assert "--accept-divergent" in withheld
    assert out.stdout.rstrip().splitlines()[-1].startswith("nothing replayed: "), out.stdout
    assert replayed_rows(project, "v") == 0 and flor.dataframe("v").empty
    assert journal_header(project, run) is None  # the journal never held the withheld values


def test_accept_divergent_writes_the_values_marked_and_rebuild_keeps_the_mark(project: Project) -> None:
    record(project, NOISY, "validation")
    run = run_id()

    out = project.cli("replay", "v", "--yes", "--workers", "1", "--accept-divergent")
    row = report_row(out.stdout, run)
    assert row[1] == "divergent" and row[3] == "3", out.stdout
    assert f"divergent: run {run}: its replayed values were written" in out.stdout
    assert flor.dataframe("v")["v"].tolist() == [6, 12, 18]
    header = journal_header(project, run)
    assert header is not None and list(header["divergent"]) == ["v"]
    assert header["divergent"]["v"].startswith("'val' differs at epoch 0: recorded ")

    listing = project.cli("runs", "--format", "json")
    assert [row["replay_divergent"] for row in json.loads(listing.stdout)] == ["v"], listing.stdout

    for suffix in ("", "-wal", "-shm"):
        (project.root / ".flor" / f"flor.db{suffix}").unlink(missing_ok=True)
    project.cli("rebuild")
    marks = flor.query("SELECT run_id, name FROM replay_divergent")
    assert marks.values.tolist() == [[run, "v"]]
    assert flor.dataframe("v")["v"].tolist() == [6, 12, 18]


def test_flor_replay_withholds_divergent_values_unless_told_to_accept_them(project: Project) -> None:
    record(project, NOISY, "validation")
    with pytest.raises(
        ReplayError, match=r"^nothing replayed: .*'val' differs from the record beyond --rel-tol 1e-06"
    ):
        flor.replay("v", quiet=True, workers=1)
    assert replayed_rows(project, "v") == 0

    report = flor.replay("v", quiet=True, workers=1, accept_divergent=True)
    assert report.ok and [(o.divergent, o.stored) for o in report.outcomes] == [(True, 3)]
    assert flor.dataframe("v")["v"].tolist() == [6, 12, 18]
    assert flor.query("SELECT name FROM replay_divergent")["name"].tolist() == ["v"]

    # The noise is below 1 on values of 3 and more: within rel_tol 0.5 the replay agrees with the
    # record, so its values are written unmarked, and the earlier mark goes with the values it marked.
    report = flor.replay("v", quiet=True, workers=1, rel_tol=0.5)
    assert report.ok and [(o.divergent, o.stored) for o in report.outcomes] == [(False, 3)]
    assert flor.query("SELECT name FROM replay_divergent").empty
    header = journal_header(project, run_id())
    assert header is not None and "divergent" not in header


# -- nothing replayed ---------------------------------------------------------------------------


def _lose_snapshot(project: Project) -> None:
    conn = sqlite3.connect(project.root / ".flor" / "flor.db")
    conn.execute("UPDATE runs SET snapshot = ?", ("f" * 40,))
    conn.commit()
    conn.close()


def test_a_replay_whose_every_run_is_skipped_says_nothing_replayed_and_fails(project: Project) -> None:
    record(project, DETERMINISTIC, "suffix")
    _lose_snapshot(project)

    out = project.cli("replay", "s", "--yes", check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    last = out.stdout.rstrip().splitlines()[-1]
    assert last.startswith("nothing replayed: every selected run was skipped (1); first: run "), out.stdout
    assert "no longer exists" in last

    report = flor.replay("s", quiet=True)
    assert not report.ok and report.outcomes == ()
    assert str(report.nothing_replayed).startswith("nothing replayed: every selected run was skipped")
    assert flor.replay("s", quiet=True, dry_run=True).ok  # a dry run replays nothing by design


def test_a_replay_whose_every_run_failed_says_nothing_replayed(project: Project) -> None:
    record(project, DETERMINISTIC, "suffix")
    project.write("train.py", today(DETERMINISTIC, "suffix").replace('state["w"] + 1)', 'state["w"] // 0)'))
    project.commit_all("today: s fails")

    out = project.cli("replay", "s", "--yes", check=False)
    assert out.returncode == 1
    assert report_row(out.stdout, run_id())[1:2] == ["FAILED"]
    assert "nothing replayed: every run's values were left out (1 failed); first: " in out.stdout
    assert "ZeroDivisionError" in out.stdout
    assert replayed_rows(project, "s") == 0 and journal_header(project, run_id()) is None


def test_the_ui_shows_a_run_written_divergent_and_why(project: Project) -> None:
    pytest.importorskip("flask", reason="the UI extra (flask) is not installed")
    from flordb_build.ui import create_app

    record(project, NOISY, "validation")
    run = run_id()
    client = create_app().test_client()
    assert 'class="divergent"' not in client.get("/").get_data(as_text=True)

    flor.replay("v", quiet=True, workers=1, accept_divergent=True)
    runs_page = client.get("/").get_data(as_text=True)
    assert re.search(r'<span class="divergent" title="replayed with --accept-divergent: v">divergent</span>', runs_page)
    run_page = client.get(f"/run/{run}").get_data(as_text=True)
    mark = re.search(r'<td colspan="3" class="divergent" id="divergent">(.*?)</td>', run_page, re.S)
    assert mark is not None and "<b>v</b> (&#39;val&#39; differs at epoch 0: recorded " in mark.group(1), run_page
