"""``import flordb_build`` loads only what binding its API needs (issue 14: <= 50 ms, bench_record).

A training script imports the package on every run: the store, the readers, pandas and the team
protocol load on the first call that needs them, never at import. Measured in a fresh interpreter
(a subprocess), as a script sees it; the speed itself is bench/bench_record.py's to measure.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

#: Modules `import flordb_build` must not load: optional extras, the data stack, and this
#: project's recording and reading machinery (each loads at its first use).
NOT_AT_IMPORT = (
    "pandas", "numpy", "torch", "ray", "psycopg", "fsspec", "libcst",
    "sqlite3", "socket", "dataclasses", "tomllib", "json",
    "flordb_build.config", "flordb_build.store", "flordb_build.storefile", "flordb_build.reader",
    "flordb_build.recording", "flordb_build.recorder", "flordb_build.journalfile", "flordb_build.asof",
    "flordb_build.expression", "flordb_build.values", "flordb_build.runtable",
    "flordb_build.team", "flordb_build.team._protocol", "flordb_build.team._connect",
    "flordb_build.checkpoints", "flordb_build.hindsight",
)


def _modules_after(code: str, cwd: Path) -> dict[str, bool]:
    check = (
        f"import sys\n{code}\nloaded = {{m: m in sys.modules for m in {list(NOT_AT_IMPORT)!r}}}\n"
        "import json\nprint(json.dumps(loaded))"  # json after the check: it is one of the modules checked
    )
    out = subprocess.run(
        [sys.executable, "-c", check], cwd=cwd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr
    loaded: dict[str, bool] = json.loads(out.stdout.strip().splitlines()[-1])
    return loaded


def test_import_flordb_build_loads_none_of_the_store_the_readers_or_the_extras(tmp_path: Path) -> None:
    loaded = _modules_after("import flordb_build as flor\nflor.log, flor.dataframe, flor.query, flor.utils.latest", tmp_path)
    assert [name for name, present in loaded.items() if present] == []


@pytest.mark.parametrize("call", ["flor.dataframe('loss')", "flor.query('SELECT COUNT(*) AS n FROM runs')"])
def test_the_first_read_loads_what_it_needs(tmp_path: Path, call: str) -> None:
    # No store here: the read still needs its machinery (and pandas) to answer with an empty frame / an error.
    code = f"import flordb_build as flor\ntry:\n    {call}\nexcept flor.FlorBuildError:\n    pass"
    loaded = _modules_after(code, tmp_path)
    assert loaded["pandas"] and loaded["flordb_build.config"] and loaded["flordb_build.reader"]


def test_the_query_timeout_default_is_sqlguards() -> None:
    import importlib

    from flordb_build import sqlguard

    query_module = importlib.import_module("flordb_build.query")  # flordb_build.query is the function

    assert query_module.DEFAULT_TIMEOUT_S == sqlguard.DEFAULT_TIMEOUT_S
