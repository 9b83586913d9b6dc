"""recorder.ColumnRecorder: values staged in plain lists, packed into arrays when taken."""

from __future__ import annotations

import sys
import threading

from flordb_build.recorder import LOOP_CONTEXT, ColumnRecorder
from flordb_build.values import INT64_MAX


def test_a_take_while_log_appends_loses_and_splits_nothing() -> None:
    recorder = ColumnRecorder()
    n = 200_000
    done = threading.Event()

    def produce() -> None:
        token = LOOP_CONTEXT.set(7)
        try:
            for i in range(n):
                recorder.log("loss", i * 0.5)
                recorder.log("step", i)
        finally:
            LOOP_CONTEXT.reset(token)
            done.set()

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: takes land between appends
    try:
        producer = threading.Thread(target=produce)
        producer.start()
        taken = []
        while not done.is_set():
            taken.extend(recorder.take_columns())
        producer.join()
        taken.extend(recorder.take_columns())
    finally:
        sys.setswitchinterval(old)
    assert len(taken) > 2, "the takes should have raced the appends"
    by_name: dict[str, list[tuple[int, int, object]]] = {"loss": [], "step": []}
    for column in taken:
        assert column.typecode == ("d" if column.name == "loss" else "q")
        assert len(column.seqs) == len(column.ctxs) == len(column.vals)
        by_name[column.name].extend(zip(column.seqs, column.ctxs, column.vals, strict=True))
    for name, rows in by_name.items():
        assert len(rows) == n, name
        for i, (seq, ctx, value) in enumerate(rows):
            assert ctx == 7
            # seqs alternate loss/step: the i-th value of each name has seq 2i (loss) or 2i + 1 (step)
            assert seq == 2 * i + (name == "step")
            assert value == (i * 0.5 if name == "loss" else i)
    assert recorder.queued_values() == 0


def test_values_a_column_does_not_take_go_to_the_rows_exactly() -> None:
    recorder = ColumnRecorder()
    big = INT64_MAX + 1
    for value in (3, big, True, 2.5, -4, "x"):
        assert recorder.log("n", value) is value
    recorder.log("f", 1.5)
    recorder.log("f", 2)  # an int in a float column: a row, kept an int
    columns = {column.name: column for column in recorder.take_columns()}
    assert list(columns["n"].vals) == [3, -4] and columns["n"].typecode == "q"
    assert list(columns["f"].vals) == [1.5] and columns["f"].typecode == "d"
    _loops, rows = recorder.take()
    assert [(row[2], row[3]) for row in rows if row[2] == "f"] == [("f", 2)]
    assert type(next(row[3] for row in rows if row[2] == "f")) is int
    n_rows = [row for row in rows if row[2] == "n"]
    assert [row[0] for row in n_rows] == [1, 2, 3, 5]  # seqs: the log order, columns and rows together
    assert recorder.queued_values() == 0
