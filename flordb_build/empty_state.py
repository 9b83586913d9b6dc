"""Checkpointed objects that hold no state: a warning at record time (issue 12, cause 7).

A torch module that keeps its layers in a plain Python list registers none of them, so its
``state_dict()`` is empty and every checkpoint of it saves nothing: a replay that restores it
leaves the freshly initialised layers in place and computes other values than the record did.
The user can only fix that in the script, so the warning names the object, its class and, where
it can be seen, the attribute that hides the layers. Replay planning refuses depths that would
restore such a checkpoint (``hindsight/_carried.py``, from the ``checkpoints`` rows).
"""

from __future__ import annotations

import sys
from typing import Any

from .recorder import warn
from .state import is_stateful

#: A ``json`` checkpoint this many bytes long or shorter is ``{}`` or ``[]``: no state at all.
EMPTY_JSON_BYTES = 2


def _hidden_modules(obj: object, torch: Any) -> list[str]:
    """Attributes of ``obj`` that are plain lists, tuples or dicts holding torch modules."""
    found = []
    for attr, value in vars(obj).items():
        items = (
            value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else ()
        )
        if any(isinstance(item, torch.nn.Module) for item in items):
            found.append(attr)
    return found


def empty_state_reason(obj: object) -> str | None:
    """Why checkpointing ``obj`` saves no state a restore could use; None when it holds some.

    Only objects saved through ``state_dict`` are judged: an empty dict or list given to
    ``flor.checkpointing`` is a legitimate accumulator that fills up during the loop.
    """
    if not is_stateful(obj):
        return None
    try:
        state = obj.state_dict()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a state_dict that fails is reported when a checkpoint is taken
        return None
    if not isinstance(state, dict) or state:
        return None
    torch = sys.modules.get("torch")
    hidden = _hidden_modules(obj, torch) if torch is not None and isinstance(obj, torch.nn.Module) else []
    if hidden:
        where = ", ".join(f"'{attr}'" for attr in hidden)
        return (
            f"has an empty state_dict: the modules in {where} sit in a plain Python container, which torch does "
            "not register; use torch.nn.ModuleList (or ModuleDict) so that checkpoints hold their parameters"
        )
    return "has an empty state_dict, so its checkpoints hold nothing to restore"


def warn_empty_state(name: str, obj: object) -> None:
    """One FlorBuildWarning when the object checkpointed as ``name`` holds no state (never raises)."""
    reason = empty_state_reason(obj)
    if reason is not None:
        warn(
            f"flor.checkpointing: '{name}' ({type(obj).__name__}) {reason}. A replay cannot restore it, so "
            "replays that skip part of the main loop will be refused.",
            stacklevel=5,  # the user's `with flor.checkpointing(...)` line, past contextlib
        )
