"""The recording API, exercised through real scripts run in subprocesses inside a git repo."""

from __future__ import annotations

import json
import sqlite3

import pytest

import flordb_build as flor
from flordb_build.errors import QueryError
from flordb_build.journalfile import batch_line_rows
from tests.conftest import Project

TRAIN = """
import flordb_build as flor

lr = flor.arg("lr", 1e-3)
epochs = flor.arg("epochs", 2)
steps = flor.arg("steps", 3)
for epoch in flor.loop("epoch", range(epochs)):
    for step in flor.loop("step", range(steps)):
        flor.log("loss", lr * 100 / (1 + epoch * steps + step))
    flor.log("val_acc", 0.5 + epoch / 10)
flor.log("accuracy", 0.9)
"""


def rows(project: Project, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(project.root / ".flor" / "flor.db")
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def test_training_script_twice_gives_the_documented_frames(project: Project) -> None:
    project.write("train.py", TRAIN)
    project.run("train.py")
    project.run("train.py", "--kwargs", "epochs=1", "lr=5e-4")

    loss = flor.dataframe("loss")
    assert list(loss.columns) == ["projid", "run_id", "tstamp", "task", "filename", "epoch", "step", "loss"]
    assert len(loss) == 9
    assert loss["loss"].dtype == "float64"
    assert loss["epoch"].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0]
    assert loss["step"].tolist() == [0, 1, 2] * 3
    assert set(loss["filename"]) == {"train.py"}
    assert loss["task"].isna().all()
    assert loss["projid"].iloc[0] == "proj"
    assert loss["loss"].iloc[3] == pytest.approx(1e-3 * 100 / 4)  # epoch 1, step 0

    both = flor.dataframe("loss", "val_acc")
    assert len(both) == 9
    assert both["val_acc"].tolist() == [0.5] * 3 + [0.6] * 3 + [0.5] * 3  # epoch value repeats on steps

    per_epoch = flor.dataframe("lr", "val_acc")
    assert len(per_epoch) == 3
    assert list(per_epoch.columns) == ["projid", "run_id", "tstamp", "task", "filename", "epoch", "lr", "val_acc"]
    assert per_epoch["lr"].tolist() == [1e-3, 1e-3, 5e-4]
    assert per_epoch["lr"].dtype == "float64"

    newest = flor.latest(loss)
    assert len(newest) == 3
    assert newest["run_id"].nunique() == 1
    assert newest["tstamp"].iloc[0] == loss["tstamp"].max()


def test_two_scripts_logging_one_name_are_told_apart_by_filename(project: Project) -> None:
    project.write("prep.py", "import flordb_build as flor\nflor.log('batch_size', 16)\n")
    project.write("train.py", "import flordb_build as flor\nflor.log('batch_size', 32)\n")
    project.run("prep.py")
    project.run("train.py")
    frame = flor.dataframe("batch_size")
    assert sorted(zip(frame["filename"], frame["batch_size"], strict=True)) == [("prep.py", 16), ("train.py", 32)]
    assert len(flor.latest(frame)) == 2


def test_values_keep_their_types(project: Project) -> None:
    project.write(
        "types.py",
        """
        import numpy as np
        import flordb_build as flor
        flor.log("an_int", 3)
        flor.log("a_float", 2.0)
        flor.log("a_bool", True)
        flor.log("a_str", "hello")
        flor.log("a_list", [1, 2.5, "x"])
        flor.log("a_dict", {"k": [1, 2]})
        flor.log("np_float", np.float32(0.25))
        flor.log("np_int", np.int64(7))
        flor.log("np_zero_dim", np.array(1.5))
        flor.log("np_array", np.arange(3))
        assert flor.log("returned", 41) + 1 == 42
        """,
    )
    project.run("types.py")
    frame = flor.dataframe()
    row = frame.iloc[0]
    assert frame["an_int"].dtype == "int64" and row["an_int"] == 3
    assert frame["a_float"].dtype == "float64" and row["a_float"] == 2.0
    assert frame["a_bool"].dtype == "bool" and bool(row["a_bool"]) is True
    assert row["a_str"] == "hello"
    assert row["a_list"] == [1, 2.5, "x"]
    assert row["a_dict"] == {"k": [1, 2]}
    assert frame["np_float"].dtype == "float64" and row["np_float"] == 0.25
    assert frame["np_int"].dtype == "int64" and row["np_int"] == 7
    assert row["np_zero_dim"] == 1.5
    assert row["np_array"] == [0, 1, 2]


def test_zero_dim_tensor_is_stored_as_a_number(project: Project) -> None:
    pytest.importorskip("torch")
    project.write("t.py", "import torch, flordb_build as flor\nflor.log('loss', torch.tensor(0.5))\n")
    project.run("t.py")
    frame = flor.dataframe("loss")
    assert frame["loss"].dtype == "float64" and frame["loss"].iloc[0] == 0.5


def test_loop_is_lazy_survives_break_and_exceptions_and_stores_values(project: Project) -> None:
    project.write(
        "loops.py",
        """
        import itertools
        import flordb_build as flor

        def endless():
            for i in itertools.count():
                yield i

        for i in flor.loop("tick", endless()):   # never materialised
            flor.log("t", i)
            if i == 2:
                break
        flor.log("after_break", 1)              # back at run level

        try:
            for doc in flor.loop("doc", ["a.txt", "b.txt"]):
                flor.log("chars", len(doc))
                raise RuntimeError("boom")
        except RuntimeError:
            pass
        flor.log("after_error", 2)
        """,
    )
    project.run("loops.py")
    ticks = flor.dataframe("t")
    assert ticks["tick"].tolist() == [0, 1, 2] and "tick_value" not in ticks.columns
    docs = flor.dataframe("chars")
    assert docs["doc"].tolist() == [0] and docs["doc_value"].tolist() == ["a.txt"]
    run_level = flor.dataframe("after_break", "after_error")
    assert len(run_level) == 1 and "tick" not in run_level.columns
    assert run_level[["after_break", "after_error"]].iloc[0].tolist() == [1, 2]


def test_arg_casts_to_the_default_type(project: Project) -> None:
    project.write(
        "args.py",
        """
        import json, sys
        import flordb_build as flor
        out = {
            "flag": flor.arg("flag", False),
            "n": flor.arg("n", 1),
            "x": flor.arg("x", 1.0),
            "name": flor.arg("name", "a"),
            "layers": flor.arg("layers", [1]),
            "opts": flor.arg("opts", {"a": 1}),
            "untouched": flor.arg("untouched", 5),
        }
        out["types"] = {k: type(v).__name__ for k, v in out.items()}
        print(json.dumps(out))
        """,
    )
    proc = project.run(
        "args.py", "--kwargs", "flag=YES", "n=4", "x=2", "name=zed", "layers=[3,4]", 'opts={"b":2}'
    )
    out = json.loads(proc.stdout)
    assert out["flag"] is True and out["n"] == 4 and out["x"] == 2.0 and out["types"]["x"] == "float"
    assert out["name"] == "zed" and out["layers"] == [3, 4] and out["opts"] == {"b": 2} and out["untouched"] == 5
    for raw, expected in [("no", False), ("0", False), ("TRUE", True), ("1", True)]:
        proc = project.run("args.py", "--kwargs", f"flag={raw}")
        assert json.loads(proc.stdout)["flag"] is expected
    stored = flor.dataframe("n", "x", "flag")
    assert stored["n"].tolist()[0] == 4 and stored["flag"].dtype == "bool"


def test_argparse_after_import_keeps_working(project: Project) -> None:
    project.write(
        "cli_script.py",
        """
        import argparse
        import flordb_build as flor
        parser = argparse.ArgumentParser()
        parser.add_argument("--data", required=True)
        opts = parser.parse_args()
        print(opts.data, flor.arg("lr", 0.1))
        """,
    )
    proc = project.run("cli_script.py", "--data", "d.csv", "--kwargs", "lr=0.5")
    assert proc.stdout.split() == ["d.csv", "0.5"]


def test_missing_arg_exits_with_one_clear_line(project: Project) -> None:
    project.write("needs.py", "import flordb_build as flor\nflor.arg('dataset')\n")
    proc = project.run("needs.py", check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "'dataset'" in lines[0] and "--kwargs dataset=" in lines[0]
    assert rows(project, "SELECT status FROM runs") == [("failed",)]


def test_a_script_can_catch_an_arg_it_cannot_have(project: Project) -> None:
    """flor.arg raises ArgError (library code never exits the process); uncaught, it is one line."""
    project.write(
        "catches.py",
        """
        import flordb_build as flor
        from flordb_build.errors import ArgError
        try:
            flor.arg('epochs', 3)
        except ArgError as exc:
            print('caught:', exc)
        flor.log('after', 1)
        """,
    )
    proc = project.run("catches.py", "--kwargs", "epochs=many")
    assert proc.stdout.startswith("caught:") and "'many'" in proc.stdout
    assert rows(project, "SELECT status FROM runs") == [("ok",)]


def test_bad_arg_value_exits_with_one_clear_line(project: Project) -> None:
    project.write("bad.py", "import flordb_build as flor\nflor.arg('epochs', 3)\n")
    proc = project.run("bad.py", "--kwargs", "epochs=many", check=False)
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1 and "'epochs'" in proc.stderr and "'many'" in proc.stderr


@pytest.mark.parametrize("name", ["tstamp", "run_id", "projid", "task", "filename", "epoch"])
def test_names_colliding_with_dimensions_are_refused(project: Project, name: str) -> None:
    project.write(
        "collide.py",
        f"""
        import flordb_build as flor
        for epoch in flor.loop("epoch", range(1)):
            flor.log({name!r}, 1)
        """,
    )
    proc = project.run("collide.py", check=False)
    assert proc.returncode == 1
    assert "LogNameError" in proc.stderr and f"'{name}'" in proc.stderr


def test_a_process_that_only_reads_records_nothing(project: Project) -> None:
    project.write("train.py", TRAIN)
    project.run("train.py")
    shadow_before = project.git("rev-parse", "flor.shadow")
    project.write("reader.py", "import flordb_build as flor\nprint(len(flor.dataframe('loss')), len(flor.query('SELECT 1')))\n")
    assert project.run("reader.py").stdout.split() == ["6", "1"]
    project.cli("runs")
    assert rows(project, "SELECT count(*) FROM runs") == [(1,)]
    assert project.git("rev-parse", "flor.shadow") == shadow_before


def test_import_has_no_side_effects(project: Project) -> None:
    project.write("only_import.py", "import flordb_build as flor\nprint('ok')\n")
    project.run("only_import.py", "--kwargs", "a=1")
    assert not (project.root / ".flor").exists()
    assert "flor.shadow" not in project.git("branch", "--list")


def test_iteration_and_commit_make_one_run_per_transaction(project: Project) -> None:
    project.write(
        "server.py",
        """
        import flordb_build as flor
        for request in range(3):
            with flor.iteration("document", None, f"doc{request}.pdf"):
                flor.log("label", request * 10)
            flor.commit()
        """,
    )
    project.run("server.py")
    frame = flor.dataframe("label")
    assert frame["run_id"].nunique() == 3
    assert frame["tstamp"].is_unique
    assert frame["label"].tolist() == [0, 10, 20]
    assert frame["document"].tolist() == [0, 0, 0]
    assert frame["document_value"].tolist() == ["doc0.pdf", "doc1.pdf", "doc2.pdf"]
    assert rows(project, "SELECT count(DISTINCT snapshot) FROM runs WHERE status = 'ok'") == [(3,)]


def test_floats_after_commit_go_to_the_new_run(project: Project) -> None:
    # runtime.log appends a float of a known name to the current run's column itself: a commit
    # must leave it none of the old run's columns (their values would be lost with that run).
    project.write(
        "floats.py",
        """
        import flordb_build as flor
        for request in range(3):
            flor.log("score", request + 0.0)  # a run's first call: the float starts the new run
            flor.log("score", request + 0.25)
            flor.commit()
        """,
    )
    project.run("floats.py")
    frame = flor.dataframe("score")
    assert frame["run_id"].nunique() == 3
    assert sorted(frame["score"].tolist()) == [0.25, 1.25, 2.25]  # a context's last value
    assert rows(project, "SELECT sum(count) FROM log_columns WHERE name = 'score'") == [(6,)]


def test_failed_script_records_status_and_exit_code(project: Project) -> None:
    project.write("fail.py", "import flordb_build as flor\nflor.log('x', 1)\nraise ValueError('bad data')\n")
    proc = project.run("fail.py", check=False)
    assert proc.returncode == 1
    assert rows(project, "SELECT status, exit_code, error FROM runs") == [("failed", 1, "ValueError: bad data")]
    assert flor.dataframe("x")["x"].tolist() == [1]


def test_task_comes_from_the_environment(project: Project) -> None:
    project.write("train.py", TRAIN)
    project.run("train.py", env={"FLOR_TASK": "train", "FLOR_PIPELINE_ID": "p1"})
    frame = flor.dataframe("val_acc")
    assert set(frame["task"]) == {"train"}
    assert rows(project, "SELECT pipeline_id FROM runs") == [("p1",)]


def test_outside_git_warns_once_and_records(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    plain = Project(tmp_path / "plain")
    plain.root.mkdir()
    monkeypatch.chdir(plain.root)
    plain.write("train.py", TRAIN)
    proc = plain.run("train.py")
    assert proc.stderr.count("not inside a git repository") == 1
    assert len(flor.dataframe("loss")) == 6
    (snapshot,) = rows(plain, "SELECT snapshot FROM runs")[0]
    assert snapshot is None


def test_journal_holds_every_logged_row(project: Project) -> None:
    project.write("train.py", TRAIN)
    project.run("train.py")
    (journal,) = (project.root / ".flor" / "runs").glob("*.jsonl")
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    assert "run" in entries[0] and "end" in entries[-1]
    logged = [log for entry in entries if "loops" in entry for log in batch_line_rows(entry)]
    assert len(logged) == 3 + 6 + 2 + 1  # args, losses, val_accs, accuracy
    assert any("cols" in entry for entry in entries)  # the floats went packed


def test_kwargs_mistakes_are_named(project: Project) -> None:
    project.write("train.py", "import flordb_build as flor\nprint(flor.arg('lr', 0.1), flor.arg('epochs', 3))\n")
    no_equals = project.run("train.py", "--kwargs", "lr", "0.5")
    assert "'lr' lacks '='" in no_equals.stderr and "--kwargs lr=VALUE" in no_equals.stderr
    typo = project.run("train.py", "--kwargs", "lrr=0.5", "epochs=2")
    assert typo.stdout.split() == ["0.1", "2"]
    assert "'lrr' (did you mean 'lr'?) was never read" in typo.stderr and "epochs" not in typo.stderr
    assert typo.stderr.count("FlorBuildWarning") == 1 and len(typo.stderr.strip().splitlines()) == 1, typo.stderr
    assert "never read" not in project.run("train.py", "--kwargs", "lr=0.5").stderr


def test_a_bad_kwargs_value_is_recorded_with_the_exit_code_it_exits_with(project: Project) -> None:
    project.write("bad.py", "import flordb_build as flor\nflor.arg('epochs', 3)\n")
    proc = project.run("bad.py", "--kwargs", "epochs=many", check=False)
    assert proc.returncode == 1
    assert rows(project, "SELECT status, exit_code FROM runs") == [("failed", 1)]


def test_a_loop_name_of_one_script_and_a_value_name_of_another_are_never_mixed(project: Project) -> None:
    project.write("a.py", "import flordb_build as flor\nfor epoch in flor.loop('epoch', range(3)):\n"
                  "    flor.log('loss', 1.0 / (epoch + 1))\n")
    project.write("b.py", "import flordb_build as flor\nflor.log('epoch', 7)\nflor.log('loss', 0.1)\n")
    project.run("a.py")
    project.run("b.py")
    assert flor.dataframe("loss")["epoch"].tolist()[:3] == [0, 1, 2]
    with pytest.raises(QueryError) as refused:
        flor.dataframe("loss", "epoch")  # used to show <NA> for a.py's epochs: silently wrong
    assert "'epoch' is a loop dimension in runs of a.py" in str(refused.value) and "b.py" in str(refused.value)
    apart = flor.dataframe("loss", "epoch", where="filename = 'b.py'")
    assert apart["epoch"].tolist() == [7]


def test_asking_for_a_loop_name_that_no_run_logs_gives_its_dimension_column(project: Project) -> None:
    # Used to raise IndexError while it built the refusal above (no run logs 'epoch' here).
    project.write("a.py", "import flordb_build as flor\nfor epoch in flor.loop('epoch', range(3)):\n"
                  "    flor.log('loss', 1.0 / (epoch + 1))\n")
    project.run("a.py")
    frame = flor.dataframe("loss", "epoch")
    assert frame["epoch"].tolist() == [0, 1, 2]
    assert frame["loss"].tolist() == [1.0, 0.5, 1.0 / 3]
    assert list(frame.columns).count("epoch") == 1


IN_LOOP_FLUSH = """
import itertools, threading, time
import flordb_build as flor
from flordb_build.store import Store

writers = []
write_batch = Store.write_batch

def noting_writer(self, *args, **kwargs):
    writers.append(threading.current_thread() is threading.main_thread())
    return write_batch(self, *args, **kwargs)

Store.write_batch = noting_writer
flor.arg("lr", 0.1)
deadline = time.monotonic() + 30  # main (before issue 14) never writes here: it ends by this
for epoch in flor.loop("epoch", range(1)):
    for step in flor.loop("step", itertools.count()):  # a tight loop with no end of its own
        flor.log("loss", step * 0.5)
        if any(writers) or time.monotonic() > deadline:
            break
print("main thread wrote in the loop:", any(writers))
"""


def test_a_tight_loop_flushes_on_its_own_thread_when_the_interval_passes(project: Project) -> None:
    """A tight loop holds the GIL, so the flusher thread asks the loop to write (issue 14): the
    batches then land during the loop, written by the recording thread between two iterations."""
    project.write("pyproject.toml", "[tool.flordb_build]\nflush_seconds = 0.05\n")
    project.write("tight.py", IN_LOOP_FLUSH)
    proc = project.run("tight.py")
    assert "main thread wrote in the loop: True" in proc.stdout, proc.stdout + proc.stderr
    frame = flor.dataframe("loss")
    assert frame["loss"].tolist() == [s * 0.5 for s in range(len(frame))] and len(frame) > 1


def test_the_flusher_offers_each_unwoken_tick_to_the_recording_thread_first() -> None:
    """An unwoken tick asks the recording thread (``handoff`` True: it will flush); the flusher
    writes itself only at a tick where the request went untaken (``handoff`` False)."""
    import threading

    from flordb_build.recorder import Flusher

    answers = iter([True, True, False])
    asked: list[bool] = []
    flushed = threading.Event()

    def handoff() -> bool:
        answer = next(answers, False)
        asked.append(answer)
        return answer

    asked_at_first_flush: list[bool] = []

    def flush() -> None:
        if not flushed.is_set():
            asked_at_first_flush.extend(asked)
        flushed.set()

    flusher = Flusher(flush, 0.01, lambda exc: None, handoff)
    flusher.start()
    try:
        assert flushed.wait(60)
    finally:
        flusher.stop()
    assert asked_at_first_flush == [True, True, False]  # never before a request went untaken


def test_nested_loop_contexts_over_containers_and_generators(project: Project) -> None:
    # A nested loop over a builtin container leaves its context set between iterations (nothing
    # can log there); over a generator it restores the parent's, as the generator's own logs
    # belong to the enclosing iteration. Either way break, exceptions and manual next() give
    # the contexts the loop structure says.
    project.write(
        "nested.py",
        """
        import flordb_build as flor

        def batches():
            for b in range(2):
                flor.log("made", b)  # runs while flor.loop asks for the next element
                yield b

        for epoch in flor.loop("epoch", range(2)):
            for step in flor.loop("step", batches()):
                flor.log("gen_step", step)
            for step in flor.loop("step2", [10, 20, 30]):
                flor.log("list_step", step)
                if step == 20:
                    break
            flor.log("after_break", epoch)
            try:
                for step in flor.loop("step3", range(3)):
                    flor.log("range_step", step)
                    raise RuntimeError("boom")
            except RuntimeError:
                pass
            flor.log("after_error", epoch)
            it = flor.loop("manual", (5, 6))
            next(it)
            flor.log("manual_a", 1)
            next(it)
            flor.log("manual_b", 2)
            it.close()
            flor.log("after_manual", epoch)
        """,
    )
    project.run("nested.py")
    made = flor.dataframe("made")
    assert "step" not in made.columns and made["epoch"].tolist() == [0, 1]  # one row per epoch context
    assert flor.dataframe("gen_step")["step"].tolist() == [0, 1, 0, 1]
    listed = flor.dataframe("list_step")
    assert listed["step2"].tolist() == [0, 1, 0, 1] and listed["step2_value"].tolist() == [10, 20, 10, 20]
    assert flor.dataframe("range_step")["step3"].tolist() == [0, 0]
    assert flor.dataframe("manual_a")["manual"].tolist() == [0, 0]
    assert flor.dataframe("manual_b")["manual"].tolist() == [1, 1]
    for name in ("after_break", "after_error", "after_manual"):
        frame = flor.dataframe(name)
        assert frame[name].tolist() == [0, 1] and frame["epoch"].tolist() == [0, 1], name
        assert not {"step", "step2", "step3", "manual"} & set(frame.columns), (name, list(frame.columns))
