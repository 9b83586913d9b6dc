"""The process's command line as flordb_build reads it, taken at ``import flordb_build``.

``--kwargs name=value ...`` (FlorDB's hyperparameter flags) and ``--params FILE`` are taken out
of ``sys.argv`` in place at import, so the script's own argument parser never sees them.
"""

from __future__ import annotations

import os
import sys

from .args import consume_kwargs, consume_params

#: ``sys.argv`` before and after the import took the ``--kwargs`` tokens out. The flordb-build
#: CLI reads the tokens back: ``flordb-build exec -- python train.py --kwargs lr=0.1`` must hand
#: them to the command it runs.
_ARGV: list[str] = sys.argv if isinstance(getattr(sys, "argv", None), list) else []  # embedded: none
ARGV_BEFORE_KWARGS: list[str] = list(_ARGV)
#: ``--kwargs lr 0.5``: tokens that lack '=' (warned about when a run starts).
MALFORMED_KWARGS: list[str] = []
#: ``--kwargs`` name -> text, as given (flor.arg casts it to its default's type).
KWARGS: dict[str, str] = consume_kwargs(_ARGV, MALFORMED_KWARGS)  # edits sys.argv in place
_GIVEN_PARAMS = consume_params(_ARGV)  # --params FILE, also taken out of sys.argv
#: The params file of the command line, as an absolute path (the script may chdir later).
PARAMS_FILE: str | None = os.path.abspath(_GIVEN_PARAMS) if _GIVEN_PARAMS else None
ARGV_AFTER_KWARGS: list[str] = list(_ARGV)


def given_params_file() -> str | None:
    """:data:`PARAMS_FILE` now (read at call time: :func:`retake` may replace it)."""
    return PARAMS_FILE



def retake() -> None:
    """Take the command line again if ``sys.argv`` is no longer the list the import took it from.

    For a process that imported flordb_build before it had its command line: a child forked
    from a warm replay server (``hindsight/_warm_server.py`` preloads flordb_build; the child's
    ``sys.argv`` is set after the fork). Values are updated in place, so what other modules took
    from here sees the new command line; a process whose import read its own argv is left alone.
    """
    global _ARGV, PARAMS_FILE
    argv = sys.argv if isinstance(getattr(sys, "argv", None), list) else []
    if argv is _ARGV:
        return
    _ARGV = argv
    ARGV_BEFORE_KWARGS[:] = argv
    MALFORMED_KWARGS.clear()
    KWARGS.clear()
    KWARGS.update(consume_kwargs(argv, MALFORMED_KWARGS))
    given = consume_params(argv)
    PARAMS_FILE = os.path.abspath(given) if given else None
    ARGV_AFTER_KWARGS[:] = argv
