"""Runs started in a Jupyter notebook: which notebook, and whether code runs in a kernel at all.

A kernel's ``__main__`` has no ``__file__`` and its ``sys.argv[0]`` is ipykernel's launcher, so
neither names the user's code. The notebook server tells the kernel which notebook it serves:
jupyter_server sets ``JPY_SESSION_NAME`` (the notebook's path) in the kernel's environment and
ipykernel copies it into the user namespace as ``__session__``; VS Code sets
``__vsc_ipynb_file__`` instead. Nothing here imports IPython: it is looked up only if loaded.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def in_notebook() -> bool:
    """True when this code runs in a Jupyter kernel (an ipykernel ``ZMQInteractiveShell``)."""
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    shell = get_ipython() if callable(get_ipython) else None
    return shell is not None and any(c.__name__ == "ZMQInteractiveShell" for c in type(shell).__mro__)


def notebook_path() -> Path | None:
    """The notebook file the running kernel serves, if the notebook server said which."""
    if not in_notebook():
        return None
    main = sys.modules.get("__main__")
    for name in ("__vsc_ipynb_file__", "__session__"):
        value = getattr(main, name, None)
        if isinstance(value, str) and value:
            return _resolve(value)
    value = os.environ.get("JPY_SESSION_NAME")
    return _resolve(value) if value else None


def _resolve(name: str) -> Path:
    # Absolute in jupyter_server 2; older servers gave a path relative to their root, which the
    # kernel's working directory (the notebook's folder) may already contain.
    path = Path(name)
    if path.is_absolute():
        return path
    here = Path.cwd()
    return (here / path) if (here / path).exists() else (here / path.name)
