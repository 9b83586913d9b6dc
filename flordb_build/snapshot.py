"""Change context: one snapshot commit per run on the shadow branch ``flor.shadow``.

Nothing here touches the user's HEAD, branch, index or work tree. The trick is a private index:

    user's .git/index --copy--> tmp index --add -u, allowed untracked--> code tree   (at run start)
    code tree + run journal --read-tree/update-index--> snapshot tree             (at run end)
    commit-tree(snapshot tree, parent = shadow tip) --update-ref CAS--> refs/heads/flor.shadow

Copying the user's index keeps its stat cache, so ``git add -u`` re-hashes only changed files.
The ref update is a compare-and-swap: when a concurrent run moved the tip first, we rebuild the
commit on the new tip and try again, so parallel tasks never lose a snapshot. A commit of one
file (a pipeline's or a replay's journal) writes its blob, then one ``git fast-import`` does the rest.

Plumbing runs through ``git`` itself rather than GitPython: every call needs its own
environment (``GIT_INDEX_FILE``), which is plain subprocess work, and importing GitPython would
add its import time to every recorded run. Every call runs with the user's hooks and fsmonitor
off: a ``post-index-change`` or ``reference-transaction`` hook is written for the user's own git
commands, and one that edits the work tree must not run because a script logged a value.

Which untracked files go in is untracked.py's business (no secrets, no huge data files). A ref
lock that a killed git left behind (``refs/heads/flor.shadow.lock``) is removed once it is
clearly stale; one that a live git process holds is never touched (see
:func:`clear_stale_lock`).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .config import Config, config_of_root
from .errors import FlorBuildWarning, SnapshotError
from .redaction import redact_mapping
from .store import ignore_flor_dir
from .untracked import (
    UNTRACKED_CACHE_NAME,
    SnapshotPolicy,
    UntrackedFile,
    UntrackedHashCache,
    left_out_message,
    select_untracked_stats,
)

SHADOW_BRANCH = "flor.shadow"
SHADOW_REF = "refs/heads/" + SHADOW_BRANCH
ZERO_SHA = "0" * 40
RUN_TRAILER = "Flor-Run"
#: Options of every git call: no user hooks, no fsmonitor daemon/hook (see the module docstring).
#: ``core.hooksPath=/dev/null`` makes every hook path ``/dev/null/<name>``, which cannot exist.
GIT_OPTIONS = ("-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false")
#: git holds a ref lock for milliseconds; an older one that no git process could hold was left
#: behind by a git that was killed (e.g. with its process group) and blocks every later update.
STALE_LOCK_SECONDS = 5.0
_LOCK_IN_MESSAGE = re.compile(r"Unable to create '([^']+\.lock)': File exists")
IDENTITY = {
    "GIT_AUTHOR_NAME": "flordb_build",
    "GIT_AUTHOR_EMAIL": "flordb_build@localhost",
    "GIT_COMMITTER_NAME": "flordb_build",
    "GIT_COMMITTER_EMAIL": "flordb_build@localhost",
}


@dataclass(frozen=True)
class CodeState:
    """The git facts of a run, taken when it starts."""

    head: str | None
    branch: str | None
    code_tree: str
    dirty: bool


def _git(
    root: Path, args: tuple[str, ...], env: Mapping[str, str] | None = None, input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """``git args`` in ``root`` with :data:`GIT_OPTIONS`; the finished process, whatever its status.

    ``GIT_OPTIONAL_LOCKS=0`` stops git from refreshing the user's index as a side effect.
    """
    full_env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", **(env or {})}
    # Its own process group: a Ctrl-C at the terminal signals the whole foreground group, and
    # must not kill a snapshot half-way (the recording process decides when to stop).
    return subprocess.run(
        ["git", *GIT_OPTIONS, *args], cwd=root, env=full_env, input=input, capture_output=True, check=False,
        process_group=0,
    )


def _failure(root: Path, args: tuple[str, ...], proc: subprocess.CompletedProcess[bytes]) -> SnapshotError:
    message = proc.stderr.decode(errors="replace").strip() or f"exit status {proc.returncode}"
    return SnapshotError(f"'git {' '.join(args[:2])}' failed in '{root}': {message}")


def run_git_bytes(root: Path, *args: str, env: Mapping[str, str] | None = None, input: bytes | None = None) -> bytes:
    """Run ``git args`` in ``root`` and return its stdout as bytes (``-z`` listings); raise :class:`SnapshotError`."""
    proc = _git(root, args, env, input)
    if proc.returncode != 0:
        raise _failure(root, args, proc)
    return proc.stdout


def run_git(root: Path, *args: str, env: Mapping[str, str] | None = None, input: bytes | None = None) -> str:
    """Run ``git args`` in ``root`` and return stdout as text; raise :class:`SnapshotError` on failure."""
    return run_git_bytes(root, *args, env=env, input=input).decode(errors="replace").strip()


def git_dir(root: Path) -> Path:
    """The repository's git directory (``.git``, or what a ``.git`` file points at)."""
    return Path(run_git(root, "rev-parse", "--absolute-git-dir"))


def resolve(root: Path, rev: str) -> str | None:
    """The commit a revision names, or None when it does not exist (e.g. no commits yet)."""
    try:
        return run_git(root, "rev-parse", "--verify", "--quiet", rev + "^{commit}") or None
    except SnapshotError:
        return None


def capture_code(root: Path, policy: SnapshotPolicy | None = None) -> CodeState:
    """Write the tree of the work tree as it is now: tracked files, and the untracked, not ignored
    files that ``policy`` allows (default: ``[tool.flordb_build]`` of ``root``).

    Warns once (:class:`FlorBuildWarning`) naming the untracked files it left out.
    Three git processes when anything changed (``status``, ``update-index``, ``write-tree``),
    two when nothing did::

        user's index --copy--> private index --status--> HEAD, branch, changed and untracked paths
        changed tracked paths + allowed untracked files --update-index--> --write-tree--> code tree

    ``status`` reports the same tracked changes ``git add --update`` would stage and the same
    untracked files as ``ls-files --others --exclude-standard``; untracked files the hash
    cache knows go in by blob id, the others are hashed (:func:`_update_index`).
    """
    config = config_of_root(root, True)
    if policy is None:
        policy = SnapshotPolicy.from_config(config)
    started_ns = time.time_ns()  # before any stat: what changed after it is "racy" (untracked.py)
    git = _plain_git_dir(root) or git_dir(root)
    with tempfile.TemporaryDirectory(prefix="flor-index-") as tmp:
        index = Path(tmp) / "index"
        user_index = git / "index"
        if user_index.exists():
            shutil.copyfile(user_index, index)
        env = {"GIT_INDEX_FILE": str(index)}
        status = _read_status(run_git_bytes(root, *STATUS_ARGS, env=env))
        cache_path = config.flor_dir / UNTRACKED_CACHE_NAME
        own = os.fsencode(cache_path.relative_to(root).as_posix()) if cache_path.is_relative_to(root) else b""
        taken, left_out = select_untracked_stats(os.fsencode(root), (p for p in status.untracked if p != own), policy)
        if taken or status.changed:
            _update_index(root, env, status.changed, taken, cache_path, started_ns, config, git)
        tree = run_git(root, "write-tree", env=env)
        _remember_index(root, tree, index)
    if left_out:
        # stacklevel 4: capture_code <- Session.start <- flor.log <- the user's line
        warnings.warn(left_out_message(left_out), FlorBuildWarning, stacklevel=4)
    if status.head is None:
        dirty = True  # no commit yet: everything is new
    elif status.staged:
        # A staged change the work tree undid leaves the tree equal to HEAD's: only git can tell.
        dirty = tree != run_git(root, "rev-parse", status.head + "^{tree}")
    else:
        # The index is HEAD's tree; any work-tree change or untracked file taken makes it differ.
        dirty = bool(status.changed or taken)
    return CodeState(head=status.head, branch=status.branch, code_tree=tree, dirty=dirty)


#: ``status`` as capture_code reads it: porcelain v2 with the branch header, every untracked
#: file, no rename pairs, submodules compared by commit only (their own dirt is not the
#: superproject's code, and checking it would start a git per submodule), no ahead/behind count.
STATUS_ARGS = (
    "status",
    "--porcelain=v2",
    "-z",
    "--branch",
    "--no-ahead-behind",
    "--untracked-files=all",
    "--no-renames",
    "--ignore-submodules=dirty",
)


@dataclass(frozen=True)
class _Status:
    head: str | None  # None: no commit yet
    branch: str | None  # None: detached HEAD
    changed: list[bytes]  # tracked paths whose work-tree file differs from the index (or is gone)
    staged: bool  # some index entry differs from HEAD (or is unmerged)
    untracked: list[bytes]


def _read_status(out: bytes) -> _Status:
    """The fields of ``git status --porcelain=v2 -z --branch`` that a capture needs."""
    head: str | None = None
    branch: str | None = None
    changed: list[bytes] = []
    untracked: list[bytes] = []
    staged = False
    records = iter(out.split(b"\0"))
    for record in records:
        if record.startswith(b"# branch.oid "):
            oid = record[len(b"# branch.oid ") :].decode()
            head = None if oid == "(initial)" else oid
        elif record.startswith(b"# branch.head "):
            name = os.fsdecode(record[len(b"# branch.head ") :])
            branch = None if name == "(detached)" else name
        elif record.startswith(b"? "):
            untracked.append(record[2:])
        elif record.startswith(b"1 "):  # "1 XY sub mH mI mW hH hI path"
            fields = record.split(b" ", 8)
            staged = staged or fields[1][:1] != b"."
            if fields[1][1:2] != b".":
                changed.append(fields[8])
        elif record.startswith(b"2 "):  # "2 XY sub mH mI mW hH hI Xscore path" NUL origPath: not with
            fields = record.split(b" ", 9)  # --no-renames, but read right should a config bring it back
            next(records, None)
            staged = staged or fields[1][:1] != b"."
            if fields[1][1:2] != b".":
                changed.append(fields[9])
        elif record.startswith(b"u "):  # "u XY sub m1 m2 m3 mW h1 h2 h3 path": add --update resolves it
            staged = True
            changed.append(record.split(b" ", 10)[10])
    return _Status(head, branch, changed, staged, untracked)


def _plain_git_dir(root: Path) -> Path | None:
    """``root/.git`` when it is the repository's directory (no ``GIT_DIR`` set); None: ask git."""
    if "GIT_DIR" in os.environ:
        return None
    git = root / ".git"
    return git if git.is_dir() else None


def _update_index(
    root: Path,
    env: Mapping[str, str],
    changed: list[bytes],
    taken: list[UntrackedFile],
    cache_path: Path,
    started_ns: int,
    config: Config,
    git: Path,
) -> None:
    """Bring the private index at ``env``'s ``GIT_INDEX_FILE`` to the work tree: one ``update-index``.

    ``changed`` tracked paths are re-hashed or removed (what ``git add --update`` does). Of the
    ``taken`` untracked files, one whose stat data the cache knows goes in by its blob id
    (``--cacheinfo``: nothing is read); the others are hashed, and those that have settled are
    read back from the index (``ls-files -s``) into the cache, so an unchanged 200 MB data file
    is hashed once, not on every run. Same tree as hashing them all: the cache only skips work.
    """
    cache = UntrackedHashCache.load(cache_path, _cache_fingerprint(root, git)) if taken else None
    known: list[tuple[str, str, str]] = []
    unknown: list[UntrackedFile] = []
    for item in taken:
        entry = cache.lookup(item) if cache is not None else None
        if entry is None:
            unknown.append(item)
        else:
            known.append((entry.mode, entry.oid, os.fsdecode(item.path)))
    options = ["--add", "--remove"]
    if sum(len(p) + 60 for _, _, p in known) <= _MAX_CACHEINFO_BYTES:
        options += [arg for mode, oid, path in known for arg in ("--cacheinfo", f"{mode},{oid},{path}")]
    else:  # too long for one command line: the blob ids go through stdin, in a call of their own
        lines = "".join(f"{mode} {oid}\t{path}\0" for mode, oid, path in known)
        run_git_bytes(root, "update-index", "-z", "--index-info", env=env, input=os.fsencode(lines))
    paths = [*changed, *(item.path for item in unknown)]
    run_git(root, "update-index", *options, "-z", "--stdin", env=env, input=b"".join(p + b"\0" for p in paths))
    if cache is None:
        return
    settled = [item for item in unknown if item.settled_before(started_ns)]
    for item, (mode, oid) in zip(settled, _index_entries(root, env, [i.path for i in settled]), strict=True):
        cache.keep(item, mode, oid)
    cache.retain(item.path for item in taken)
    if cache.changed:
        ignore_flor_dir(config)  # the cache must never show up as an untracked file itself
        cache.save()


#: Blob ids of cached untracked files go as ``--cacheinfo`` arguments up to this many bytes.
_MAX_CACHEINFO_BYTES = 64 * 1024


def _index_entries(root: Path, env: Mapping[str, str], paths: list[bytes]) -> list[tuple[str, str]]:
    """``(mode, blob id)`` of each of ``paths`` in the index at ``env``, in the order given."""
    found: dict[bytes, tuple[str, str]] = {}
    for chunk in _chunks(paths, 64 * 1024):
        # ``--literal-pathspecs``: a file named ``a[1].py`` is that file, never a glob.
        out = run_git_bytes(root, "--literal-pathspecs", "ls-files", "-s", "-z", "--", *map(os.fsdecode, chunk), env=env)
        for record in out.split(b"\0"):
            if record:
                meta, path = record.split(b"\t", 1)
                mode, oid, _stage = meta.split(b" ")
                found[path] = (mode.decode(), oid.decode())
    return [found[path] for path in paths]


def _chunks(paths: list[bytes], max_bytes: int) -> list[list[bytes]]:
    """``paths`` in runs of at most ``max_bytes`` of names (a command line has a length limit)."""
    chunks: list[list[bytes]] = []
    size = max_bytes
    for path in paths:
        if size + len(path) > max_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(path)
        size += len(path) + 1
    return chunks


def _cache_fingerprint(root: Path, git: Path) -> list[list[int]]:
    """Stat data of the files that decide which blob git makes of a file's bytes (config, attributes).

    When one changes (``core.autocrlf``, a filter, ``.gitattributes`` at the root), every cached
    blob id is dropped. A ``.gitattributes`` deeper in the tree is not watched: git's own stat
    cache of tracked files does not re-hash on attribute changes either.
    """
    places = [root / ".gitattributes", Path.home() / ".gitconfig", Path.home() / ".config" / "git" / "config"]
    places += [git / "config", git / "info" / "attributes"]
    prints = []
    for place in places:
        try:
            st = os.stat(place)
            prints.append([st.st_size, st.st_mtime_ns, st.st_ino])
        except OSError:
            prints.append([])
    return prints


#: Index bytes of the last few captures, by tree: the run's snapshot commit starts from them
#: instead of reading the tree into a new index (one git process less per run). A run that
#: finds none (another process captured, or it was evicted) reads the tree as before.
_CAPTURED_INDEXES: OrderedDict[tuple[Path, str], bytes] = OrderedDict()
_CAPTURED_KEEP = 2  # one run at a time per process; an index is ~100 bytes per tracked file


def _remember_index(root: Path, tree: str, index: Path) -> None:
    try:
        _CAPTURED_INDEXES[(root, tree)] = index.read_bytes()
    except OSError:
        return
    _CAPTURED_INDEXES.move_to_end((root, tree))
    while len(_CAPTURED_INDEXES) > _CAPTURED_KEEP:
        _CAPTURED_INDEXES.popitem(last=False)


def commit_snapshot(root: Path, code_tree: str, journal: Path, journal_path_in_tree: str, message: str) -> str:
    """Commit ``code_tree`` plus the run's journal onto the shadow branch; return the commit sha."""
    return _append_to_shadow(root, _tree_with_file(root, code_tree, journal, journal_path_in_tree), message)


def commit_file(root: Path, content: bytes, path_in_tree: str, message: str) -> str:
    """Commit a tree holding only ``content`` at ``path_in_tree`` onto the shadow branch (a replay journal)."""
    return _commit_blob(root, run_git(root, "hash-object", "-w", "--stdin", input=content), path_in_tree, message)


def commit_path(root: Path, path_in_tree: str, message: str) -> str:
    """Commit a tree holding only the work-tree file at ``path_in_tree`` (a pipeline journal) onto the shadow branch."""
    # As update-index --add would hash it: the path's attributes apply.
    blob = run_git(root, "hash-object", "-w", "--", path_in_tree)
    return _commit_blob(root, blob, path_in_tree, message)


def _commit_blob(root: Path, blob: str, path_in_tree: str, message: str) -> str:
    """Commit a tree holding only ``blob`` at ``path_in_tree`` on the shadow tip; the commit sha.

    The blob is written first (``hash-object -w``: a loose object, compressed once, as
    ``update-index`` did); then one ``git fast-import`` writes the tree and the commit and moves
    the branch, where ``write-tree``, ``commit-tree`` and ``update-ref`` took three processes.
    (The blob goes in loose rather than inline in the import: fast-import would compress a
    1 MB journal at pack level and then unpack it again, more CPU than the processes it saves.)
    fast-import moves the ref in a transaction that expects the value it read, and only to a
    commit that contains it: when a concurrent run moved the tip after our read, it refuses
    ("Not updating"), and we commit again on the new tip, as :func:`_append_to_shadow` does.
    """
    encoded = message.encode()
    for attempt in range(100):
        guessed, parent = _read_shadow_tip(root) if attempt == 0 else (False, None)
        if not guessed:
            parent = resolve(root, SHADOW_REF)
        stream = b"".join((
            b"commit " + SHADOW_REF.encode() + b"\nmark :1\n",
            b"author %s <%s> now\n" % (IDENTITY["GIT_AUTHOR_NAME"].encode(), IDENTITY["GIT_AUTHOR_EMAIL"].encode()),
            b"committer %s <%s> now\n"
            % (IDENTITY["GIT_COMMITTER_NAME"].encode(), IDENTITY["GIT_COMMITTER_EMAIL"].encode()),
            b"data %d\n%s\n" % (len(encoded), encoded),
            b"from %s\n" % parent.encode() if parent else b"",
            b"deleteall\n",  # the tree holds this one file, not the parent's files
            b"M 100644 %s %s\n\n" % (blob.encode(), _quote_fast_import_path(path_in_tree)),
            b"get-mark :1\ndone\n",
        ))
        args = ("fast-import", "--quiet", "--done", "--date-format=now")
        proc = _git(root, args, env={"LC_ALL": "C", "LANGUAGE": "C"}, input=stream)  # English messages to read below
        stderr = proc.stderr.decode(errors="replace")
        if proc.returncode == 0:
            return proc.stdout.decode().strip()
        lock = _LOCK_IN_MESSAGE.search(stderr)
        if lock is not None:
            clear_stale_lock(root, Path(lock.group(1)))
        elif guessed:
            continue  # the ref file was out of date or named no commit: ask git at once, no back-off
        elif "Not updating" not in stderr and "but expected" not in stderr and "reference already exists" not in stderr:
            raise _failure(root, args, proc)
        time.sleep(random.uniform(0.001, 0.02) * (attempt + 1))
    raise SnapshotError(f"Could not update '{SHADOW_BRANCH}' after 100 attempts; is another tool rewriting it?")


def _quote_fast_import_path(path: str) -> bytes:
    """``path`` as a fast-import path: C-style quoted when it starts with a quote or holds a newline."""
    if not path.startswith('"') and "\n" not in path:
        return path.encode()
    escaped = path.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return b'"' + escaped.encode() + b'"'


#: The journal blob goes in as a loose object zlib level 0 (stored) for this one git process, never
#: in the user's config: it is base64 of packed values (random mantissas) that git's default
#: level 1 shrinks by only a quarter (~8 instead of ~10.7 bytes a float) for 0.3-0.4 us of CPU a
#: value, more than the whole flush of that value (bench/README.md, profile_write.py). A later
#: ``git gc`` packs it at the user's ``core.compression`` as usual.
_STORED_UNCOMPRESSED = ("-c", "core.loosecompression=0")


def _tree_with_file(root: Path, base_tree: str | None, file: Path, path_in_tree: str) -> str:
    """``base_tree`` (or an empty tree) plus the content of ``file`` at ``path_in_tree``.

    When ``file`` is the work-tree file at ``path_in_tree`` (a run's journal is), ``update-index
    --add`` hashes it and adds it in one process; otherwise its blob is written first.
    """
    if os.path.abspath(file) != os.path.abspath(root / path_in_tree):
        blob = run_git(root, *_STORED_UNCOMPRESSED, "hash-object", "-w", "--", str(file))
        return _tree_with(root, base_tree, blob, path_in_tree)
    with tempfile.TemporaryDirectory(prefix="flor-index-") as tmp:
        index = Path(tmp) / "index"
        env = {"GIT_INDEX_FILE": str(index)}
        _start_index(root, base_tree, index, env)
        run_git(
            root, *_STORED_UNCOMPRESSED, "--literal-pathspecs", "update-index", "--add", "--", path_in_tree, env=env
        )
        return run_git(root, "write-tree", env=env)


def _start_index(root: Path, base_tree: str | None, index: Path, env: Mapping[str, str]) -> None:
    """Fill the private ``index`` with ``base_tree``: from a capture's index when this process has it."""
    if base_tree is None:
        return
    captured = _CAPTURED_INDEXES.get((root, base_tree))
    if captured is not None:
        index.write_bytes(captured)
    else:
        run_git(root, "read-tree", base_tree, env=env)


def _tree_with(root: Path, base_tree: str | None, blob: str, path_in_tree: str) -> str:
    """``base_tree`` (or an empty tree) plus ``blob`` at ``path_in_tree``, written with a private index."""
    with tempfile.TemporaryDirectory(prefix="flor-index-") as tmp:
        index = Path(tmp) / "index"
        env = {"GIT_INDEX_FILE": str(index)}
        _start_index(root, base_tree, index, env)
        run_git(root, "update-index", "--add", "--cacheinfo", f"100644,{blob},{path_in_tree}", env=env)
        return run_git(root, "write-tree", env=env)


def _append_to_shadow(root: Path, tree: str, message: str) -> str:
    """Commit ``tree`` on the shadow tip and move the branch to it (compare-and-swap); the commit sha.

    The first attempt takes the tip from the ref file itself (:func:`_read_shadow_tip`, no
    process); a wrong or stale read only makes the compare-and-swap fail, and every retry asks git.
    Two failures are retried: another run moved the tip between our read and our write (rebuild
    on the new tip), and a ref lock that exists (wait while it is young, remove it once stale).
    Anything else fails at once.
    """
    for attempt in range(100):
        guessed, parent = _read_shadow_tip(root) if attempt == 0 else (False, None)
        if not guessed:
            parent = resolve(root, SHADOW_REF)
        parent_args = ["-p", parent] if parent else []
        made = _git(root, ("commit-tree", tree, *parent_args), env=IDENTITY, input=message.encode())
        if made.returncode != 0:
            if guessed:
                continue  # the ref file named no commit: ask git
            raise _failure(root, ("commit-tree", tree), made)
        commit = made.stdout.decode().strip()
        args = ("update-ref", "-m", "flordb_build snapshot", SHADOW_REF, commit, parent or ZERO_SHA)
        proc = _git(root, args, env={"LC_ALL": "C", "LANGUAGE": "C"})  # English messages to read below
        if proc.returncode == 0:
            return commit
        stderr = proc.stderr.decode(errors="replace")
        lock = _LOCK_IN_MESSAGE.search(stderr)
        if lock is not None:
            clear_stale_lock(root, Path(lock.group(1)))
        elif "but expected" not in stderr and "reference already exists" not in stderr:
            raise _failure(root, args, proc)
        if guessed:
            continue  # perhaps only the ref file was out of date: ask git at once, no back-off
        time.sleep(random.uniform(0.001, 0.02) * (attempt + 1))
    raise SnapshotError(f"Could not update '{SHADOW_BRANCH}' after 100 attempts; is another tool rewriting it?")


_OID = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")


def _read_shadow_tip(root: Path) -> tuple[bool, str | None]:
    """``(True, tip)`` as the shadow ref's files say (tip None: no branch yet), or ``(False, None)``.

    Only for a plain ``.git`` directory with files-backend refs: a loose ref wins over
    ``packed-refs``; a worktree's ``.git`` file, a reftable store or anything unexpected says
    ``(False, None)`` and the caller asks git.
    """
    unknown = (False, None)
    git = root / ".git"
    if not git.is_dir() or (git / "reftable").exists():
        return unknown
    try:
        loose = (git / SHADOW_REF).read_text().strip()
        return (True, loose) if _OID.match(loose) else unknown
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError):  # a directory where the ref would be, unreadable: let git say
        return unknown
    try:
        packed = (git / "packed-refs").read_text(errors="replace")
    except FileNotFoundError:
        return (True, None)
    except OSError:
        return unknown
    for line in packed.splitlines():
        oid, _, name = line.partition(" ")
        if name == SHADOW_REF:
            return (True, oid) if _OID.match(oid) else unknown
    return (True, None)


def clear_stale_lock(root: Path, lock: Path) -> None:
    """Remove ``lock`` when it is stale; return to retry, or raise :class:`SnapshotError` naming it.

    Stale means older than :data:`STALE_LOCK_SECONDS` with no live git process that could hold it
    (one with the lock file open, or working in this repository). A younger lock is left alone so
    the caller retries. Only the file examined is removed (:func:`_remove_examined`).

    :raises SnapshotError: when a live git process may hold the lock, or holders cannot be told.
    """
    try:
        examined = os.lstat(lock)
    except FileNotFoundError:
        return  # released meanwhile: retry
    age = time.time() - examined.st_mtime
    if age < STALE_LOCK_SECONDS:
        return
    holders = live_git_processes(root, lock)
    if holders is None or holders:
        who = "a process that cannot be inspected here" if holders is None else f"running git process(es) {holders}"
        raise SnapshotError(
            f"'{lock}' is locked ({age:.0f} s old) and {who} may hold it, so this run's snapshot was not "
            "committed. Let that git command finish; if no git command is running in this repository, "
            "delete the lock file. Later runs snapshot as usual."
        )
    if _remove_examined(lock, examined):
        warnings.warn(
            f"Removed the stale git lock '{lock}' ({age:.0f} s old, no git process holds it), left by a git "
            "command that was killed; the snapshot went ahead.",
            FlorBuildWarning,
            stacklevel=2,
        )


def _remove_examined(lock: Path, examined: os.stat_result) -> bool:
    """Unlink ``lock`` only if it is still the file examined; True when removed.

    The lock is first renamed aside (atomic), so a lock git created after the examination is
    never unlinked: it is put back under its name instead.
    """
    aside = lock.with_name(f"{lock.name}.stale-{os.getpid()}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return False
    moved = os.lstat(aside)
    if (moved.st_dev, moved.st_ino) != (examined.st_dev, examined.st_ino):
        try:
            os.link(aside, lock)  # a new lock took the name meanwhile: give it back
        except FileExistsError:
            pass  # yet another lock holds the name now; the one we moved was never committed
        aside.unlink()
        return False
    aside.unlink()
    return True


def live_git_processes(root: Path, lock: Path) -> list[int] | None:
    """Pids of live processes that may hold ``lock``: any with it open, and git processes working in
    this repository (git keeps no pid in its lock files). None where ``/proc`` cannot tell."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    common = run_git(root, "rev-parse", "--path-format=absolute", "--git-common-dir")
    places = {root.resolve(), git_dir(root).resolve(), Path(common).resolve()}
    lock_text = str(lock.resolve())
    holders = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        is_git = False
        try:
            is_git = (entry / "comm").read_text(errors="replace").startswith("git")
            if _has_open(entry, lock_text) or (is_git and _works_in(entry, places)):
                holders.append(int(entry.name))
        except PermissionError:
            if is_git:
                return None  # another user's git: it might hold the lock
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
            continue  # it exited while we looked
    return sorted(holders)


def _has_open(process: Path, path: str) -> bool:
    for fd in (process / "fd").iterdir():
        try:
            if os.readlink(fd) == path:
                return True
        except FileNotFoundError:
            continue
    return False


def _works_in(process: Path, places: set[Path]) -> bool:
    """True when the process's working directory or ``GIT_DIR`` is in the repository."""
    cwd = Path(os.readlink(process / "cwd"))
    if any(cwd == place or place in cwd.parents for place in places):
        return True
    environ = (process / "environ").read_bytes().split(b"\0")
    git_dirs = [Path(os.fsdecode(v.split(b"=", 1)[1])) for v in environ if v.startswith(b"GIT_DIR=")]
    return any(Path(cwd, d).resolve() in places for d in git_dirs)


def snapshot_message(run_id: str, filename: str, task: str | None, args: Mapping[str, object]) -> str:
    """A commit message naming the run, its script, its task and its args (secrets masked), with a trailer."""
    arg_text = " ".join(f"{k}={v}" for k, v in redact_mapping(args).items()) or "(no args)"
    task_text = f" task {task}" if task else ""
    return f"flor run {run_id}: {filename}{task_text} {arg_text}\n\n{RUN_TRAILER}: {run_id}\n"


def archive_snapshot(root: Path, commit: str) -> bytes:
    """The ``git archive`` (tar) of a snapshot commit: its files, to ship to a replay worker."""
    archive = subprocess.run(
        ["git", *GIT_OPTIONS, "archive", "--format=tar", commit], cwd=root, capture_output=True, check=False
    )
    if archive.returncode != 0:
        raise SnapshotError(
            f"Snapshot '{commit}' is not in '{root}': {archive.stderr.decode(errors='replace').strip()}"
        )
    return archive.stdout


def extract_snapshot(archive: bytes, destination: Path) -> None:
    """Write the files of an :func:`archive_snapshot` tar into ``destination``."""
    destination.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(destination)], input=archive, check=True)


def export_snapshot(root: Path, commit: str, destination: Path) -> None:
    """Write the files of a snapshot commit into ``destination`` (never the user's work tree)."""
    extract_snapshot(archive_snapshot(root, commit), destination)
