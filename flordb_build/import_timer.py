"""Seconds a recorded run's prefix spends importing modules after the run's first flor call.

A run's ``startup`` timing covers the interpreter and the imports before its first flor call; a
script can import much more after it, lazily: ``torch.optim.SGD(...)`` imports ``torch._dynamo``
(800 modules, seconds) inside the prefix. A replay forked from a warm server that has learned
those imports skips them, so the plan must know how much of the recorded prefix they were
(``timings`` kind ``imports``, hindsight/_plan.py); nothing else in the record can tell imports
from the prefix's own work.

The timer wraps ``builtins.__import__`` from the first flor call to the end of the prefix only
(the first outermost loop, or the run's close), so ``log()`` and the loops never pass through it;
only the outermost import of a thread is timed (nested ones are inside it), and only when it
loaded a module: flor's own function-level imports of loaded modules are look-ups, not imports.
"""

from __future__ import annotations

import builtins
import sys
import threading
import time
from typing import Any


class ImportTimer:
    """Times the ``import`` statements run between :meth:`install` and :meth:`stop`."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._active = False
        self._local = threading.local()
        self._original: Any = None
        self._wrapper: Any = None

    def install(self) -> None:
        """Start timing imports (once)."""
        if self._wrapper is not None:
            return
        original = builtins.__import__
        local = self._local
        perf = time.perf_counter
        modules = sys.modules

        def timed_import(name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0) -> Any:
            if not self._active or getattr(local, "inside", False):
                return original(name, globals, locals, fromlist, level)
            local.inside = True
            loaded = len(modules)
            began = perf()
            try:
                return original(name, globals, locals, fromlist, level)
            finally:
                local.inside = False
                if len(modules) > loaded:  # it loaded a module (not a look-up of one already there)
                    self.seconds += perf() - began

        self._original, self._wrapper, self._active = original, timed_import, True
        builtins.__import__ = timed_import

    def stop(self) -> float:
        """Stop timing; the seconds measured. The wrapper is removed unless another one was put over it
        since (then it stays, passing every import straight through)."""
        self._active = False
        if self._wrapper is not None and builtins.__import__ is self._wrapper:
            builtins.__import__ = self._original
        return self.seconds
