"""An up-to-date doit run looks up its tasks' file hashes in one query, with the facts unchanged."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from flordb_build.config import load_config
from flordb_build.dag import BuildRecorder, FileRole, TaskRecord, TaskStatus
from flordb_build.dag._record import FileFact
from flordb_build.store import Store
from tests.conftest import Project

OLD = 1_600_000_000  # an mtime long past: not racy


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def settled_files(project: Project, n: int) -> list[str]:
    paths = []
    for i in range(n):
        path = project.write(f"src/{i}.txt", f"input {i}\n")
        os.utime(path, (OLD, OLD))
        paths.append(f"src/{i}.txt")
    return paths


def test_skipped_tasks_hashes_come_from_one_query_for_all_of_them(project: Project) -> None:
    paths = settled_files(project, 50)
    store = Store.open(load_config())
    first = BuildRecorder(store, "p1")
    first.start_pipeline("test", ["t"], {"tasks": []})
    for i, path in enumerate(paths):
        first.record_task(TaskRecord(f"t{i}", TaskStatus.EXECUTED, 1.0, 2.0), first.hasher.facts([path], []))

    second = BuildRecorder(store, "p2")  # a new invocation: an empty memo
    second.start_pipeline("test", ["t"], {"tasks": []})
    statements: list[str] = []
    store.conn.set_trace_callback(statements.append)
    for i, path in enumerate(paths):
        second.queue_task(
            TaskRecord(f"t{i}", TaskStatus.UP_TO_DATE, 3.0, 3.0), second.hasher.observe([path], [])
        )
    assert statements == []  # nothing is asked of the store while doit checks the tasks
    second.flush()
    store.conn.set_trace_callback(None)

    lookups = [s for s in statements if s.lstrip().upper().startswith("SELECT") and "FROM file_sets f WHERE f.path" in s]
    assert len(lookups) == 1
    rows = store.conn.execute(
        "SELECT path, role, sha256, size, mtime_ns FROM files WHERE pipeline_id = 'p2' ORDER BY path"
    ).fetchall()
    expected = sorted(
        (p, "dep", sha256(project.root / p), len(f"input {i}\n"), OLD * 10**9) for i, p in enumerate(paths)
    )
    assert sorted(rows) == expected
    store.close()


def test_a_file_changed_after_its_task_was_checked_is_never_given_the_old_key(project: Project) -> None:
    (path,) = settled_files(project, 1)
    store = Store.open(load_config())
    recorder = BuildRecorder(store, "p1")
    recorder.start_pipeline("test", ["t"], {"tasks": []})
    observed = recorder.hasher.observe([path], ["missing.txt"])
    (project.root / path).write_text("changed later, longer\n")  # a later task rewrote it before the flush
    (fact, missing) = recorder.hasher.resolve([observed])[0]
    assert fact == FileFact(
        path, FileRole.DEP, sha256(project.root / path), len("changed later, longer\n"), None
    )
    assert (missing.sha256, missing.size, missing.role) == (None, None, FileRole.TARGET)
    store.close()


def test_a_target_stat_ed_when_its_task_was_checked_is_recorded_as_checked_and_never_trusted_if_changed(
    project: Project,
) -> None:
    (dep,) = settled_files(project, 1)
    target = project.write("out/0.txt", "built\n")
    os.utime(target, (OLD, OLD))
    checked = os.stat("out/0.txt")  # what the doit reporter's get_status saw
    store = Store.open(load_config())
    recorder = BuildRecorder(store, "p1")
    recorder.start_pipeline("test", ["t"], {"tasks": []})
    target.write_text("rebuilt by a later task, longer\n")  # after the check, before the skip
    observed = recorder.hasher.observe([dep], ["out/0.txt"], {"out/0.txt": checked})
    assert [(o.size, o.mtime_ns) for o in observed] == [
        (len("input 0\n"), OLD * 10**9),
        (checked.st_size, checked.st_mtime_ns),  # the stat of the check, not a second one
    ]
    (_, fact) = recorder.hasher.resolve([observed])[0]
    # The content changed since that stat: hashed as it is now, and never given the old key.
    assert fact == FileFact(
        "out/0.txt", FileRole.TARGET, sha256(target), len("rebuilt by a later task, longer\n"), None
    )
    store.close()


def test_an_up_to_date_invocation_reuses_the_previous_ones_hashes_and_sets(project: Project) -> None:
    paths = settled_files(project, 20)
    store = Store.open(load_config())
    first = BuildRecorder(store, "p1")
    first.start_pipeline("doit", ["doit"], {"tasks": []})
    for i, path in enumerate(paths):
        first.record_task(TaskRecord(f"t{i}", TaskStatus.EXECUTED, 1.0, 2.0), first.hasher.facts([path], []))
    first.finish_pipeline("ok", 0)
    changed = project.write("src/3.txt", "changed input\n")  # t3 is no longer what p1 saw
    os.utime(changed, (OLD + 5, OLD + 5))

    second = BuildRecorder(store, "p2")
    second.start_pipeline("doit", ["doit"], {"tasks": []})
    second.remember_previous("doit")
    statements: list[str] = []
    store.conn.set_trace_callback(statements.append)
    for i, path in enumerate(paths):
        second.queue_task(TaskRecord(f"t{i}", TaskStatus.UP_TO_DATE, 3.0, 3.0), second.hasher.observe([path], []))
    second.flush()
    store.conn.set_trace_callback(None)

    # Only the changed file is looked up; the rest came from p1's facts, read before the checks.
    (lookup,) = [s for s in statements if "FROM file_sets f WHERE f.path" in s]
    assert "src/3.txt" in lookup and "src/4.txt" not in lookup  # the trace shows the bound keys
    sets = dict(store.conn.execute("SELECT pipeline_id || ' ' || task, set_id FROM task_files"))
    assert all(sets[f"p2 t{i}"] == sets[f"p1 t{i}"] for i in range(20) if i != 3)
    assert sets["p2 t3"] != sets["p1 t3"]
    rows = store.conn.execute(
        "SELECT task, path, role, sha256, size, mtime_ns FROM files WHERE pipeline_id = 'p2' ORDER BY path"
    ).fetchall()
    expected = sorted(
        (f"t{i}", p, "dep", sha256(project.root / p), (project.root / p).stat().st_size,
         (OLD + 5 if i == 3 else OLD) * 10**9)
        for i, p in enumerate(paths)
    )
    assert sorted(rows, key=lambda r: r[1]) == sorted(expected, key=lambda r: r[1])
    store.close()
