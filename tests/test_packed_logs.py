"""A packed value lives in its ``log_columns`` chunk only (schema 7, packedlogs.py), and every reader
still answers what it answered when each value also had a ``logs`` row (schema 6).

The schema-6 side is real: the code of the commit before schema 7 (``git archive``) records the run
and reads it; today's code migrates that store, records the same script anew, rebuilds it from its
journal, and every reader must give the same answers. A reader that ignored the chunks would miss
the packed values (no `logs` row holds them any more), so each comparison fails for it.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import GIT_ENV, Project

#: The last commit of schema 6, whose code writes every recorded value as a `logs` row too.
SCHEMA_6_COMMIT = "ff30745933322ece34038c69697a816bbfdda5bc"
SOURCE_ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import math
import flordb_build as flor

flor.log("lr", 0.001)                      # run level: stays a row
flor.log("note", "hello")
flor.log("big", 2**70)                     # beyond int64: rows
flor.log("both", 0.5)                      # run level (a row), then packed in the loop below
from flordb_build.runtime import SESSION
SESSION.run.flush()                        # so that the loop's values of "both" are a batch of their own
for epoch in flor.loop("epoch", range(3)):
    for step in flor.loop("step", range(150)):
        flor.log("loss", 1.0 / (step + 1) + epoch)   # interleaved with acc: seqs step 2 or 3
        flor.log("acc", step % 7)                    # ints
        flor.log("both", float(step))
        if step % 4 == 0:
            flor.log("sparse", step * 0.5)           # seqs not evenly spaced
    for value in (math.nan, math.inf, -math.inf, -0.0, 5e-324, 1.0, 2.0**-1074 * 3):
        flor.log("special", value)
    flor.log("mixed", 1.5)
    flor.log("mixed", "text")              # a batch with a float and a str: rows
    flor.log("flag", epoch == 1)
flor.log("accuracy", 0.75)
"""

#: Prints, as JSON, what each reader of recorded values answers for the project's runs, by run
#: position (run ids differ between two recordings): user SQL, the dataframe, the UI protocol's
#: names/points/probes, the run-level rows, validation replay's recorded values, push's count.
DUMP = r"""
import json, math, sys
import numpy as np
import flordb_build as flor
from flordb_build.config import load_config
from flordb_build.reader import open_read_only
from flordb_build.team._protocol import SQLiteReader
from flordb_build.hindsight._execute import read_recorded

def plain(v):
    if isinstance(v, np.ndarray):
        return [str(v.dtype), [plain(x) for x in v.tolist()]]
    if isinstance(v, (np.floating, float)):
        return ["f", float(v).hex()]
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
    return v

out = {}
rows = flor.query("SELECT * FROM logs ORDER BY run_id, name, source, seq")
out["query_columns"] = list(rows.columns)
out["query"] = [plain(list(r)[1:]) for r in rows.itertuples(index=False)]  # without run_id
raw = flor.query("SELECT typeof(value), count(*) FROM logs GROUP BY 1 ORDER BY 1")
out["query_types"] = plain([list(r) for r in raw.itertuples(index=False)])
out["flordb_logs"] = flor.query("SELECT value_name, value_type, count(*), total(value) FROM flordb_logs GROUP BY 1, 2 ORDER BY 1, 2").values.tolist()
frame = flor.dataframe("loss", "acc", "sparse", "special", "mixed", "flag", "both")
out["frame_columns"] = list(frame.columns)
out["frame"] = [plain(frame[c].tolist()) for c in frame.columns if c not in ("run_id", "tstamp", "projid", "filename", "seconds", "started", "ended", "git_head", "code_tree", "snapshot", "env_id", "pid", "host", "journal", "args", "argv", "git_branch")]
store = open_read_only(load_config())
reader = SQLiteReader(store.conn, store)
run_ids = [r for (r,) in store.conn.execute("SELECT run_id FROM runs ORDER BY tstamp")]
names = ["loss", "acc", "sparse", "special", "mixed", "flag", "both", "lr", "note", "big", "accuracy", "absent"]
runs = []
for run_id in run_ids:
    per = {"names": reader.logged_names(run_id), "run_level": plain(sorted(reader.run_level_rows(run_id)))}
    per["probes"] = [[reader.is_loop_level(run_id, n), reader.has_logged(run_id, n)] for n in names]
    per["points"] = {n: plain(reader.series_points(run_id, n)) for n in names}
    recorded, _describe = read_recorded(load_config(), run_id, names, store)
    per["recorded"] = plain({f"{k[0]}:{k[1]}": v for k, v in recorded.items()})
    per["count"] = int(flor.query("SELECT count(*) FROM logs WHERE run_id = ? AND source = 'record'", (run_id,)).iloc[0, 0])
    runs.append(per)
out["runs"] = runs
store.close()
json.dump(out, sys.stdout, sort_keys=True)
"""


def _schema_6_code(tmp_path: Path) -> Path:
    """The package as of :data:`SCHEMA_6_COMMIT`, extracted from this checkout's history."""
    target = tmp_path / "schema6"
    target.mkdir()
    try:
        archive = subprocess.run(
            ["git", "-C", str(SOURCE_ROOT), "archive", "--format=tar", SCHEMA_6_COMMIT, "flordb_build"],
            capture_output=True, check=True, timeout=120,
        ).stdout
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.skip(f"the schema-6 code is not in this checkout's history: {exc}")
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True, timeout=120)
    return target


def _run(project: Project, code: Path | None, *args: str) -> str:
    env = {**os.environ, **GIT_ENV}
    if code is not None:
        env["PYTHONPATH"] = str(code)
    proc = subprocess.run([sys.executable, *args], cwd=project.root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _dump(project: Project, code: Path | None) -> dict:
    project.write("dump.py", DUMP)
    return json.loads(_run(project, code, "dump.py"))


def _packed_values_without_rows(db: Path) -> tuple[int, int]:
    """``(values in f8/i8 chunks, recorded logs rows inside such a chunk's seqs)``."""
    from flordb_build.packedlogs import chunk_seqs

    conn = sqlite3.connect(db)
    try:
        packed = overlap = 0
        chunks = conn.execute(
            "SELECT run_id, name, first_seq, count, seq_step, seqs FROM log_columns WHERE format IN ('f8', 'i8')"
        ).fetchall()
        for run_id, name, first_seq, count, step, seqs in chunks:
            assert step is not None or seqs is not None, "a packed chunk without its seqs"
            covered = set(chunk_seqs(first_seq, count, step, seqs))
            assert len(covered) == count
            packed += count
            rows = conn.execute(
                "SELECT seq FROM logs WHERE run_id = ? AND name = ? AND source = 'record'", (run_id, name)
            ).fetchall()
            overlap += sum(1 for (seq,) in rows if seq in covered)
        return packed, overlap
    finally:
        conn.close()


def test_schema_6_store_migrates_and_new_recordings_read_the_same(project: Project, tmp_path: Path) -> None:
    old_code = _schema_6_code(tmp_path)
    project.write("train.py", SCRIPT)
    project.commit_all("train")
    _run(project, old_code, "train.py")
    db = project.root / ".flor" / "flor.db"
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == 6
    before = _dump(project, old_code)
    (old_rows,) = sqlite3.connect(db).execute("SELECT count(*) FROM logs WHERE source = 'record'").fetchone()

    # today's code migrates the schema-6 store: the packed values leave `logs`, the answers stay
    _run(project, None, "-m", "flordb_build", "migrate")
    packed, overlap = _packed_values_without_rows(db)
    (rows_left,) = sqlite3.connect(db).execute("SELECT count(*) FROM logs WHERE source = 'record'").fetchone()
    assert packed > 1000 and overlap == 0
    assert rows_left + packed == old_rows
    assert _dump(project, None) == before

    # a recording by today's code writes no row for a packed value and reads the same
    shutil.rmtree(project.root / ".flor")
    _run(project, None, "train.py")
    packed, overlap = _packed_values_without_rows(db)
    assert packed > 1000 and overlap == 0
    assert _dump(project, None) == before

    # and a rebuild from the journals (the schema-6 run's, committed, and this one's) gives both runs
    _run(project, None, "-m", "flordb_build", "rebuild")
    packed_again, overlap = _packed_values_without_rows(db)
    assert (packed_again, overlap) == (2 * packed, 0)
    rebuilt = _dump(project, None)
    assert rebuilt["runs"] == before["runs"] * 2
    assert sorted(map(json.dumps, rebuilt["query"])) == sorted(map(json.dumps, before["query"] * 2))


def test_user_sql_expansion_of_a_chunk_keeps_every_value_bit_for_bit() -> None:
    """The user-SQL ``logs`` view expands a chunk through JSON text (packedlogs._chunk_json +
    SQLite's json_each): every float must come back with its exact bits and type (REAL, 1.0 too),
    a NaN as NULL (what SQLite stored for a NaN row), infinities as infinities, int64 as INTEGER."""
    import math
    import random
    import struct
    from array import array

    from flordb_build.packedlogs import ALL_LOGS_OVER_STORE, register_chunk_function

    rng = random.Random(14)
    floats = [struct.unpack("<d", struct.pack("<Q", rng.getrandbits(64)))[0] for _ in range(20_000)]
    floats += [rng.random() for _ in range(5_000)] + [i / 7 for i in range(1_000)]
    floats += [math.nan, math.inf, -math.inf, -0.0, 0.0, 1.0, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, 1e16, 1e22, 2.0**53 + 2]
    ints = [rng.getrandbits(63) - 2**62 for _ in range(5_000)] + [0, 1, -1, 2**63 - 1, -(2**63) + 1, 2**53 + 1]
    conn = sqlite3.connect(":memory:")
    register_chunk_function(conn)
    conn.execute("CREATE TABLE logs (run_id TEXT, seq INTEGER, ctx_id INTEGER, name TEXT, value BLOB, kind INTEGER, source TEXT)")
    conn.execute(
        "CREATE TABLE log_columns (run_id TEXT, name TEXT, first_seq INTEGER, count INTEGER, format TEXT, "
        "ctx_ids BLOB, vals BLOB, seq_step INTEGER, seqs BLOB)"
    )
    sql = "SELECT seq, ctx_id, value, typeof(value) FROM (" + ALL_LOGS_OVER_STORE + ") WHERE name = ?"  # noqa: S608 - constant SQL
    for fmt, values in (("f8", floats), ("i8", ints)):
        seqs = array("q", range(5, 5 + 3 * len(values), 3))
        ctxs = array("q", [rng.randrange(1, 2**40) for _ in values])
        data = array("d" if fmt == "f8" else "q", values).tobytes()
        for step, seq_blob in ((3, None), (None, seqs.tobytes())):  # arithmetic seqs, and seqs stored
            conn.execute("DELETE FROM log_columns")
            conn.execute(
                "INSERT INTO log_columns VALUES ('r', ?, 5, ?, ?, ?, ?, ?, ?)",
                (fmt, len(values), fmt, ctxs.tobytes(), data, step, seq_blob),
            )
            rows = conn.execute(sql, (fmt,)).fetchall()
            assert [r[0] for r in rows] == list(seqs)
            assert [r[1] for r in rows] == list(ctxs)
            for value, (_seq, _ctx, got, kind) in zip(values, rows, strict=True):
                if value != value:  # NaN
                    assert got is None and kind == "null"
                elif fmt == "f8":
                    assert kind == "real" and struct.pack("<d", got) == struct.pack("<d", value), (value, got)
                else:
                    assert kind == "integer" and got == value
    conn.close()
