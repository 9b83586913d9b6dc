"""``--kwargs name=value ...`` and ``--params FILE`` on a script's command line, params files, and
casting values to a default's type.

Taking these tokens out of ``sys.argv`` is the one thing ``import flordb_build`` does, so that a
script's own argparse, run after the import, never sees them.

Where ``flor.arg(name, default)`` finds its value, first match wins:

1. ``--kwargs name=value`` on the command line;
2. the params file: ``--params FILE`` on the command line, else ``params = "params.yaml"`` in
   ``[tool.flordb_build]`` (DVC-style YAML; nested keys are dotted names, ``train: {lr: 0.1}``
   is ``flor.arg("train.lr")``), read with pyyaml on the first arg it is asked for;
3. the default.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ArgError

KWARGS_FLAG = "--kwargs"
PARAMS_FLAG = "--params"
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


def consume_params(argv: list[str]) -> str | None:
    """Remove every ``--params FILE`` (or ``--params=FILE``) from ``argv`` in place; return the last FILE."""
    found: str | None = None
    kept: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == PARAMS_FLAG and i + 1 < len(argv):
            found = argv[i + 1]
            i += 2
            continue
        if token.startswith(PARAMS_FLAG + "="):
            found = token[len(PARAMS_FLAG) + 1 :]
        else:
            kept.append(token)
        i += 1
    argv[:] = kept
    return found


def read_params(path: Path) -> dict[str, Any]:
    """The values of a YAML params file, nested mappings flattened to dotted names.

    :raises ArgError: when the file is missing, is not YAML, or is not a mapping at the top.
    """
    import yaml  # lazily: a script that never reads a params file never imports it

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ArgError(f"Could not read the params file '{path}': {exc}.") from exc
    except yaml.YAMLError as exc:
        raise ArgError(f"The params file '{path}' is not YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ArgError(f"The params file '{path}' must hold a mapping of names to values, got {type(data).__name__}.")
    return _flatten(data, "")


def _flatten(data: dict[Any, Any], prefix: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def param_value(name: str, value: Any, default: Any) -> Any:
    """A params-file value as ``flor.arg`` returns it: kept when it has the default's type, else cast to it."""
    if default is None or type(value) is type(default):
        return value
    if isinstance(default, float) and type(value) is int:
        return float(value)
    if isinstance(value, list | dict):
        import json

        return cast_arg(name, json.dumps(value), default)
    return cast_arg(name, "" if value is None else str(value), default)


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
            import json  # here, not at `import flordb_build` (issue 14)

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
        import json

        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            pass
    return raw


def resolve_arg(name: str, default: Any, kwargs: dict[str, str], params: Callable[[], dict[str, Any]]) -> Any:
    """``flor.arg(name, default)``: ``--kwargs name=...``, else the params file's value (``params()``
    reads it, only when needed), each cast to ``default``'s type; else ``default``.

    :raises ArgError: no value and no default, or a value that does not fit the default's type.
    """
    if name in kwargs:
        return cast_arg(name, kwargs[name], default)
    values = params()
    if name in values:
        return param_value(name, values[name], default)
    if default is not None:
        return default
    raise ArgError(f"arg '{name}' has no default and no value; pass one with: --kwargs {name}=VALUE")
