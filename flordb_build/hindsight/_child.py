"""The entry point of a replay child: ``python -m flordb_build.hindsight._child SCRIPT [ARG ...]``.

``flordb-build replay`` starts every process that replays a recorded version this way (a warm
start calls :func:`install_replay_mode` in its forked child, then runs the script the same way).
It installs replay mode, the session's run starter (``runtime.Session.use_run_starter`` with
``_mode.start_replay_run``, which reads the replay spec from :data:`REPLAY_ENV`), and then runs
the script as ``python SCRIPT ARG ...`` would: as ``__main__``, with ``sys.argv`` the script and
its arguments and the script's directory first on ``sys.path``. An ordinary ``import
flordb_build`` never looks at replay; only a process started here replays.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
import time
from collections.abc import Sequence

from ..errors import ReplayError
from ..replaying import REPLAY_ENV

#: ``python -m`` this module to start a replay child (not ``__name__``: that is ``__main__`` then).
MODULE = "flordb_build.hindsight._child"
#: What a warm server calls in its forked child before it runs the script (``module:function``).
PREPARE = f"{MODULE}:prepare_warm_child"
#: What a warm server imports before it forks (``_warm.WarmPool``): flordb_build and its replay
#: mode, imported once instead of in every child. Its command line is taken in the child
#: (:func:`prepare_warm_child`), the replay spec when the script's first ``flor`` call starts the run.
WARM_PRELOAD = ("flordb_build", MODULE, "flordb_build.hindsight._mode", "flordb_build.objects")
#: How often the child looks whether the process that started it is still there.
PARENT_POLL_SECONDS = 0.1


def install_replay_mode() -> None:
    """Make this process's run a replay of the run :data:`REPLAY_ENV` describes.

    :raises ReplayError: the variable is not set (this process was not started by a replay).
    """
    if not os.environ.get(REPLAY_ENV):
        raise ReplayError(f"{REPLAY_ENV} is not set: a replay child is started by 'flordb-build replay'")
    from ..runtime import SESSION
    from ._mode import start_replay_run

    SESSION.use_run_starter(start_replay_run)


def prepare_warm_child() -> None:
    """In a child forked from a warm server, with its ``sys.argv`` set: take the command line
    (``--kwargs``, ``--params``) the server's import of flordb_build could not see, then
    :func:`install_replay_mode`."""
    from ..cmdline import retake

    end_with_server()
    retake()
    install_replay_mode()


def run_as_main(argv: Sequence[str]) -> None:
    """Run ``argv[0]`` as ``python argv[0] argv[1:]`` would (its exceptions and SystemExit propagate)."""
    script = argv[0]
    # In place: runtime took the --kwargs tokens out of this very list object at import.
    sys.argv[:] = list(argv)
    # `python -m` put the working directory first; `python script.py` puts the script's directory.
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")


def end_with_parent() -> None:
    """End this process's group (the script and all it started) when this process or the one that
    started it dies, however it dies.

    The job that starts a replay child (``_executors.run_job``, in a session of its own, so that
    the group is the replay's processes and nothing else) may die without running a line of
    Python: a Ray worker killed by a forced cancel, by its driver's death or with its node.
    Ray then SIGKILLs the worker's direct children (this process), but not what the script
    started (a data loader, a server): they would run on, holding a GPU, for a replay whose
    reply nobody reads. So, in the group:

    - a guard process, forked here before the script runs, waits for this process to die
      (it is reparented: ``getppid`` changes) and kills the group, itself last;
    - a thread here waits for the parent to die and kills the group (a parent that dies alone).

    Polling ``getppid``, not ``PR_SET_PDEATHSIG`` (Linux-only; it fires when the parent *thread*
    ends) nor a pipe (a process the script forks would hold its end open).
    """
    if not hasattr(os, "fork") or os.getpgrp() != os.getpid():
        return  # the group is our parent's (not started by a job): not ours to end
    child = os.getpid()
    if os.fork() == 0:  # the guard: before any thread starts here, so the fork is safe
        try:
            os.closerange(0, os.sysconf("SC_OPEN_MAX"))  # hold no pipe of the job open
            while os.getppid() == child:
                time.sleep(PARENT_POLL_SECONDS)
            os.killpg(child, signal.SIGKILL)
        finally:
            os._exit(0)
    _end_group_with_parent(child)


def end_with_server() -> None:
    """In a child forked from a warm server: end this process's group when the server dies.

    The server kills the group when the child ends (``_warm_server.Server.reap``), so no guard
    process is needed; what is left is the server's own death (SIGKILL, or the OOM killer, whose
    first pick it is, holding every preload): its children would run on for a replay whose reply
    nobody reads, and their job has already failed (``_warm.WarmProcess.wait``).
    """
    if os.getpgrp() == os.getpid():  # the server made the child its own group's leader
        _end_group_with_parent(os.getpid())


def _end_group_with_parent(group: int) -> None:
    """A thread that kills ``group`` once this process's parent is gone (it is reparented)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        os.killpg(group, signal.SIGKILL)

    threading.Thread(target=watch, name="flor-replay-parent-watch", daemon=True).start()


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m flordb_build.hindsight._child SCRIPT [ARG ...]")
    end_with_parent()
    install_replay_mode()
    run_as_main(sys.argv[1:])


if __name__ == "__main__":
    main()
