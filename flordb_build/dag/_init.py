"""``flordb-build init``: configure a project so plain ``doit`` records, and/or copy the Makefile.

Only what the user asked for is written:

- doit: one entry in ``[tool.doit.plugins.command]`` of pyproject.toml, or in ``[COMMAND]`` of
  doit.cfg, that makes doit's ``run`` command :class:`~flordb_build.dag.RecordingRun`. The
  file is edited as text (comments and layout stay), re-parsed, and only then replaced.
- Make: ``templates/Makefile`` copied to the project (never over an existing file).
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InitError

PLUGIN_LOCATION = "flordb_build.dag:RecordingRun"
REPLAY_PLUGIN_LOCATION = "flordb_build.hindsight:ReplayCommand"
DOIT_CONFIG_FILES = ("pyproject.toml", "doit.cfg")
_TOML_HEADER = re.compile(r"^[ \t]*\[[ \t]*tool[ \t]*\.[ \t]*doit[ \t]*\.[ \t]*plugins[ \t]*\.[ \t]*command[ \t]*\][ \t]*(#.*)?$", re.M)
_INI_HEADER = re.compile(r"^\[COMMAND\][ \t]*$", re.M)


@dataclass(frozen=True)
class InitStep:
    """One thing ``init`` did (or found already done) to one file."""

    path: Path
    action: str  # "created" | "updated" | "unchanged" | "copied"


def template_makefile() -> Path:
    """The Makefile template shipped with flordb_build (``templates/Makefile``)."""
    candidates = [
        Path(__file__).resolve().parents[2] / "templates" / "Makefile",  # source checkout / editable install
        Path(__file__).resolve().parents[1] / "templates" / "Makefile",  # packaged as package data
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise InitError(
        f"Could not find the Makefile template (looked in {', '.join(repr(str(c)) for c in candidates)}); "
        "reinstall flordb_build."
    )


def init_project(root: Path, doit_config: str | None = None, make: bool = False, makefile: str = "Makefile") -> list[InitStep]:
    """Configure ``root``: doit (``doit_config`` file name, or auto) unless only ``make`` was asked.

    :param doit_config: ``"pyproject.toml"``, ``"doit.cfg"``, ``"auto"`` (pyproject.toml when it
        exists, else doit.cfg) or None (auto, unless ``make`` is set and nothing else was asked).
    :raises InitError: on a conflicting entry, an unparsable file, or an existing Makefile.
    """
    steps = []
    if doit_config is not None or not make:
        choice = doit_config if doit_config not in (None, "auto") else None
        if choice is None:
            choice = "pyproject.toml" if (root / "pyproject.toml").is_file() else "doit.cfg"
        if choice not in DOIT_CONFIG_FILES:
            raise InitError(f"Unknown doit config file '{choice}'; use 'pyproject.toml' or 'doit.cfg'.")
        path = root / choice
        step = configure_pyproject(path) if choice == "pyproject.toml" else configure_doit_cfg(path)
        steps.append(_combine(step, configure_replay_command(path, toml=choice == "pyproject.toml")))
    if make:
        steps.append(copy_makefile(root / makefile))
    return steps


def configure_pyproject(path: Path) -> InitStep:
    """Add ``run = "flordb_build.dag:RecordingRun"`` under ``[tool.doit.plugins.command]``."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    data = _parse_toml(text, path)
    command = data.get("tool", {}).get("doit", {}).get("plugins", {}).get("command", {})
    current = command.get("run") if isinstance(command, dict) else None
    if current == PLUGIN_LOCATION:
        return InitStep(path, "unchanged")
    if current is not None:
        raise InitError(
            f"'{path}' already makes doit's run command '{current}'; remove that entry or set it to "
            f"'{PLUGIN_LOCATION}' yourself."
        )
    entry = f'run = "{PLUGIN_LOCATION}"  # flordb_build records build context (flordb-build init)\n'
    header = _TOML_HEADER.search(text)
    if header is not None:
        new_text = text[: header.end()] + "\n" + entry + text[header.end() + 1 :]
    else:
        new_text = text + ("\n" if text and not text.endswith("\n") else "") + ("\n" if text else "")
        new_text += "[tool.doit.plugins.command]\n" + entry
    return _replace(path, text, new_text, lambda t: _parse_toml(t, path), _toml_has_entry)


def configure_doit_cfg(path: Path) -> InitStep:
    """Add ``run = flordb_build.dag:RecordingRun`` under ``[COMMAND]`` of doit.cfg."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    current = _parse_ini(text, path).get("COMMAND", {}).get("run")
    if current == PLUGIN_LOCATION:
        return InitStep(path, "unchanged")
    if current is not None:
        raise InitError(
            f"'{path}' already makes doit's run command '{current}'; remove that entry or set it to "
            f"'{PLUGIN_LOCATION}' yourself."
        )
    entry = f"run = {PLUGIN_LOCATION}\n"
    header = _INI_HEADER.search(text)
    if header is not None:
        new_text = text[: header.end()] + "\n" + entry + text[header.end() + 1 :]
    else:
        new_text = text + ("\n" if text and not text.endswith("\n") else "") + ("\n" if text else "")
        new_text += "# flordb_build records build context (flordb-build init)\n[COMMAND]\n" + entry
    return _replace(path, text, new_text, lambda t: _parse_ini(t, path), _ini_has_entry)


def copy_makefile(destination: Path) -> InitStep:
    """Copy the template to ``destination``; refuse to overwrite a file that is there."""
    if destination.exists():
        raise InitError(
            f"'{destination}' already exists; pass another name with --makefile, or merge "
            f"'{template_makefile()}' into it by hand."
        )
    shutil.copyfile(template_makefile(), destination)
    return InitStep(destination, "copied")


def _toml_has_entry(data: dict[str, Any]) -> bool:
    return bool(data.get("tool", {}).get("doit", {}).get("plugins", {}).get("command", {}).get("run") == PLUGIN_LOCATION)


def _ini_has_entry(data: dict[str, Any]) -> bool:
    return bool(data.get("COMMAND", {}).get("run") == PLUGIN_LOCATION)


def _parse_toml(text: str, path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InitError(f"Could not parse '{path}': {exc}. Fix the file, then run init again.") from exc


def _parse_ini(text: str, path: Path) -> dict[str, Any]:
    # Parsed the way doit parses it (doit_cmd.DoitConfig.load_config_ini).
    parser = configparser.ConfigParser(allow_no_value=True, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as exc:
        raise InitError(f"Could not parse '{path}': {exc}. Fix the file, then run init again.") from exc
    return {section: dict(parser[section]) for section in parser.sections()}


def _replace(
    path: Path,
    old_text: str,
    new_text: str,
    parse: Callable[[str], dict[str, Any]],
    has_entry: Callable[[dict[str, Any]], bool],
) -> InitStep:
    """Write ``new_text`` over ``path`` atomically, after checking it parses to what we meant."""
    try:
        ok = has_entry(parse(new_text))
    except InitError:
        ok = False
    if not ok:
        raise InitError(
            f"Could not add the doit plugin entry to '{path}' without breaking it (is the table defined "
            f"inline?); add it by hand:\n[tool.doit.plugins.command]\nrun = \"{PLUGIN_LOCATION}\""
        )
    tmp = path.with_name(path.name + ".flor-tmp")
    tmp.write_text(new_text, encoding="utf-8")
    os.replace(tmp, path)
    return InitStep(path, "updated" if old_text else "created")


# -- `doit replay` (hindsight logging, flordb_build/hindsight) ---------------------------------------


def configure_replay_command(path: Path, *, toml: bool) -> InitStep:
    """Add ``replay = "flordb_build.hindsight:ReplayCommand"`` beside the ``run`` entry (after it was added)."""
    text = path.read_text(encoding="utf-8")
    data = _parse_toml(text, path) if toml else _parse_ini(text, path)
    table = data.get("tool", {}).get("doit", {}).get("plugins", {}).get("command", {}) if toml else data.get("COMMAND", {})
    current = table.get("replay") if isinstance(table, dict) else None
    if current == REPLAY_PLUGIN_LOCATION:
        return InitStep(path, "unchanged")
    if current is not None:
        raise InitError(
            f"'{path}' already makes doit's replay command '{current}'; remove that entry or set it to "
            f"'{REPLAY_PLUGIN_LOCATION}' yourself."
        )
    header = (_TOML_HEADER if toml else _INI_HEADER).search(text)
    if header is None:  # the run entry was just written under this header, so this means an inline table
        raise InitError(
            f"Could not find the doit command table in '{path}'; add replay = \"{REPLAY_PLUGIN_LOCATION}\" to it by hand."
        )
    entry = f'replay = "{REPLAY_PLUGIN_LOCATION}"\n' if toml else f"replay = {REPLAY_PLUGIN_LOCATION}\n"
    new_text = text[: header.end()] + "\n" + entry + text[header.end() + 1 :]

    def has_entry(parsed: dict[str, Any]) -> bool:
        if toml:
            return bool(parsed.get("tool", {}).get("doit", {}).get("plugins", {}).get("command", {}).get("replay")
                        == REPLAY_PLUGIN_LOCATION and _toml_has_entry(parsed))
        return bool(parsed.get("COMMAND", {}).get("replay") == REPLAY_PLUGIN_LOCATION and _ini_has_entry(parsed))

    parse: Callable[[str], dict[str, Any]] = (lambda t: _parse_toml(t, path)) if toml else (lambda t: _parse_ini(t, path))
    return _replace(path, text, new_text, parse, has_entry)


def _combine(first: InitStep, second: InitStep) -> InitStep:
    """One step per file: 'created' or 'updated' if either edit changed it."""
    if first.action != "unchanged":
        return first
    return second
