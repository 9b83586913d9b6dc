"""``flordb-build init``: configure a project so plain ``doit`` records, and/or copy the Makefile.

Only what the user asked for is written:

- doit: two entries in ``[tool.doit.plugins.command]`` of pyproject.toml, or in ``[COMMAND]``
  of doit.cfg: doit's ``run`` command becomes :class:`~flordb_build.dag.RecordingRun` and a
  ``replay`` command is added (``flordb_build.hindsight``). The file is edited as text (comments
  and layout stay), re-parsed, and only then replaced.
- Make: the template ``templates/Makefile`` (package data ``flordb_build.templates``) copied to the
  project, never over an existing file. As copied it runs (``make`` has nothing to do yet) and has a
  ``replay`` target; the example pipeline is in it, commented out.
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
    """The Makefile template: the top-level ``templates/Makefile``, installed as ``flordb_build.templates``.

    pyproject.toml maps the source folder ``templates/`` to the package ``flordb_build.templates``,
    so a wheel (or an editable install) finds it by import name.
    """
    from importlib.resources import files

    try:
        template = Path(str(files("flordb_build.templates") / "Makefile"))
    except ModuleNotFoundError as exc:
        raise InitError(
            "Could not find the Makefile template (package data 'flordb_build.templates'); reinstall flordb_build."
        ) from exc
    if template.is_file():
        return template
    raise InitError(f"Could not find the Makefile template at '{template}'; reinstall flordb_build.")


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
        fmt = PYPROJECT if choice == "pyproject.toml" else DOIT_CFG
        run = add_command_entry(path, fmt, "run", PLUGIN_LOCATION)
        replay = add_command_entry(path, fmt, "replay", REPLAY_PLUGIN_LOCATION)
        steps.append(run if run.action != "unchanged" else replay)  # one step per file
    if make:
        steps.append(copy_makefile(root / makefile))
    return steps


@dataclass(frozen=True)
class ConfigFormat:
    """How doit's command-plugin table looks in one kind of config file."""

    header: re.Pattern[str]  # the table's header line
    new_table: str  # what to append when the file has no such table
    parse: Callable[[str, Path], dict[str, Any]]
    table_of: Callable[[dict[str, Any]], Any]  # the command table of a parsed file
    entry: Callable[[str, str], str]  # the line for ``key = location``


PYPROJECT = ConfigFormat(
    header=_TOML_HEADER,
    new_table="[tool.doit.plugins.command]\n",
    parse=lambda text, path: _parse_toml(text, path),
    table_of=lambda data: data.get("tool", {}).get("doit", {}).get("plugins", {}).get("command", {}),
    entry=lambda key, location: f'{key} = "{location}"  # flordb_build (flordb-build init)\n',
)
DOIT_CFG = ConfigFormat(
    header=_INI_HEADER,
    new_table="# flordb_build records build context (flordb-build init)\n[COMMAND]\n",
    parse=lambda text, path: _parse_ini(text, path),
    table_of=lambda data: data.get("COMMAND", {}),
    entry=lambda key, location: f"{key} = {location}\n",
)


def add_command_entry(path: Path, fmt: ConfigFormat, key: str, location: str) -> InitStep:
    """Make doit's ``key`` command ``location`` in ``path``, editing it as text (comments stay).

    The new text is re-parsed and written only when it holds every entry the old one had plus
    this one, so a file we cannot edit safely (an inline table) is left untouched.
    """
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    old_table = fmt.table_of(fmt.parse(text, path))
    current = old_table.get(key) if isinstance(old_table, dict) else None
    if current == location:
        return InitStep(path, "unchanged")
    if current is not None:
        raise InitError(
            f"'{path}' already makes doit's {key} command '{current}'; remove that entry or set it to "
            f"'{location}' yourself."
        )
    entry = fmt.entry(key, location)
    header = fmt.header.search(text)
    if header is not None:
        new_text = text[: header.end()] + "\n" + entry + text[header.end() + 1 :]
    else:
        new_text = text + ("\n" if text and not text.endswith("\n") else "") + ("\n" if text else "")
        new_text += fmt.new_table + entry
    try:
        new_table = fmt.table_of(fmt.parse(new_text, path))
        ok = isinstance(new_table, dict) and new_table == {**(old_table if isinstance(old_table, dict) else {}), key: location}
    except InitError:
        ok = False
    if not ok:
        raise InitError(
            f"Could not add the doit plugin entry to '{path}' without breaking it (is the table defined "
            f"inline?); add it by hand:\n{fmt.new_table}{entry}"
        )
    tmp = path.with_name(path.name + ".flor-tmp")
    tmp.write_text(new_text, encoding="utf-8")
    os.replace(tmp, path)
    return InitStep(path, "updated" if text else "created")


def copy_makefile(destination: Path) -> InitStep:
    """Copy the template to ``destination``; refuse to overwrite a file that is there."""
    if destination.exists():
        raise InitError(
            f"'{destination}' already exists; pass another name with --makefile, or merge "
            f"'{template_makefile()}' into it by hand."
        )
    shutil.copyfile(template_makefile(), destination)
    return InitStep(destination, "copied")


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
