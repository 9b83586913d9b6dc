"""journalfile.batch_entry: the spliced batch line is exactly json.dumps of the documented object."""

from __future__ import annotations

import base64
import json
import random
from array import array

from flordb_build.journalfile import batch_entry, column_rows, parse_run_journal
from flordb_build.recorder import LogColumn


def documented_line(loops, logs, timings=(), checkpoints=(), columns=()) -> bytes:
    """The batch line as journalfile's docstring describes it, through the json encoder."""

    def ints(values):
        n = len(values)
        if n and list(values) == list(range(values[0], values[0] + n)):
            return values[0]
        return base64.b64encode(values.tobytes()).decode()

    entry = {"loops": loops, "logs": logs}
    if columns:
        entry["cols"] = [
            [c.name, c.typecode, ints(c.seqs), ints(c.ctxs), base64.b64encode(c.vals.tobytes()).decode()]
            for c in columns
        ]
    if timings:
        entry["timings"] = timings
    if checkpoints:
        entry["checkpoints"] = checkpoints
    return json.dumps(entry).encode()


def random_column(rng: random.Random, k: int) -> LogColumn:
    n = rng.randrange(1, 50)
    s0 = rng.randrange(0, 1000)
    seqs = array("q", range(s0, s0 + n)) if rng.random() < 0.5 else array("q", sorted(rng.sample(range(10**6), n)))
    ctxs = array("q", range(s0, s0 + n)) if rng.random() < 0.5 else array("q", [rng.randrange(0, 2**62) for _ in range(n)])
    typecode = rng.choice("dq")
    if typecode == "d":
        vals = array("d", [rng.random() * 1e300 * rng.choice([1, -1]) for _ in range(n)])
    else:
        vals = array("q", [rng.randrange(-(2**63), 2**63) for _ in range(n)])
    name = rng.choice(["loss", "\u00e9\ud800x", 'a"b\\c', f"acc{k}"])
    return LogColumn(name, typecode, seqs, ctxs, vals)


def test_batch_line_is_the_documented_json_and_reads_back_exactly():
    rng = random.Random(3)
    for _ in range(300):
        cols = [random_column(rng, k) for k in range(rng.randrange(0, 4))]
        loops = [[1, 0, "epoch", 0, 3, None]] if rng.random() < 0.5 else []
        logs = [[5, 1, "msg", 'h\u00e9"\n', 1]] if rng.random() < 0.5 else []
        timings = [[0, "prefix", 0.5]] if rng.random() < 0.5 else []
        checkpoints = [[1, "epoch", 0, "m", "abc", 3, 0.1, 0.2, "pt", None]] if rng.random() < 0.5 else []
        line = batch_entry(loops, logs, timings, checkpoints, cols)
        assert line == documented_line(loops, logs, timings, checkpoints, cols)
        for column, item in zip(cols, json.loads(line).get("cols", []), strict=True):
            expected = [[s, x, column.name, v, 0] for s, x, v in zip(column.seqs, column.ctxs, column.vals.tolist(), strict=True)]
            assert column_rows(item) == expected
        journal = parse_run_journal('{"run": {"run_id": "r"}}\n' + line.decode() + "\n", tolerant=False)
        assert journal.timings == timings and journal.checkpoints == checkpoints and journal.loops == loops
