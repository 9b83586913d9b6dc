"""``--kwargs name=value ...`` on a script's command line, and casting values to a default's type.

Taking these tokens out of ``sys.argv`` is the one thing ``import flordb_build`` does, so that a
script's own argparse, run after the import, never sees them.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .errors import ArgError

KWARGS_FLAG = "--kwargs"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_TRUE = {"1", "true", "yes", "y", "on"}
_FALSE = {"0", "false", "no", "n", "off"}


def consume_kwargs(argv: list[str], malformed: list[str] | None = None) -> dict[str, str]:
    """Remove every ``--kwargs k=v ...`` group from ``argv`` in place; return the pairs.

    A group runs from ``--kwargs`` up to the first token that is not ``name=value``. A group
    whose first token is a bare name (``--kwargs lr 0.5``) takes nothing; that name is appended
    to ``malformed`` so the run can say it lacks ``=`` (it stays in ``argv`` for the script).
    """
    found: dict[str, str] = {}
    kept: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token != KWARGS_FLAG:
            kept.append(token)
            i += 1
            continue
        i += 1
        first = i
        while i < len(argv) and "=" in argv[i] and _NAME.match(argv[i].split("=", 1)[0]):
            name, value = argv[i].split("=", 1)
            found[name] = value
            i += 1
        if i == first and i < len(argv) and malformed is not None and _NAME.match(argv[i]):
            malformed.append(argv[i])
    argv[:] = kept
    return found


def kwargs_never_read(kwargs: dict[str, str], read: set[str]) -> str | None:
    """A sentence naming the ``--kwargs`` that no ``flor.arg`` read, with a did-you-mean; None if all were."""
    import difflib

    unread = [name for name in kwargs if name not in read]
    if not unread:
        return None
    parts = []
    for name in unread:
        close = difflib.get_close_matches(name, sorted(read), n=1)
        parts.append(f"'{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    return (
        f"--kwargs {', '.join(parts)} {'was' if len(unread) == 1 else 'were'} never read by the script "
        "(no flor.arg asked for it), so the run used its defaults."
    )


def cast_arg(name: str, raw: str, default: Any) -> Any:
    """Cast the text ``raw`` to the type of ``default``; infer int/float/JSON when there is none."""
    try:
        if default is None:
            return infer_value(raw)
        if isinstance(default, bool):
            return parse_bool(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, str):
            return raw
        if isinstance(default, list | dict | tuple):
            value = json.loads(raw)
            if not isinstance(value, list | dict):
                raise ValueError("not a JSON list or object")
            return tuple(value) if isinstance(default, tuple) else value
        return type(default)(raw)
    except (ValueError, TypeError) as exc:
        raise ArgError(
            f"Could not read arg '{name}' = '{raw}' as {type(default).__name__} "
            f"(the type of its default {default!r}): {exc}."
        ) from exc


def parse_bool(raw: str) -> bool:
    """yes/no, true/false, on/off, 1/0 in any case."""
    lowered = raw.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("expected one of yes/no, true/false, 1/0")


def infer_value(raw: str) -> Any:
    """Best reading of a value with no default: int, float, JSON list/object, else the text."""
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    if raw[:1] in "[{":
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            pass
    return raw
