"""One table of replay options feeds ``flordb-build replay`` and ``doit replay`` alike.

Every option of the table, given a value other than its default, must reach the replay entry
(:func:`flordb_build.hindsight._command.run_replay_command`) with that value from both front
ends, before the names and after them; and a real ``doit replay`` passes ``--rel-tol`` on.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from flordb_build import cli
from flordb_build.config import config_of_root
from flordb_build.errors import ReplayError
from flordb_build.hindsight import _command
from flordb_build.hindsight._doit import ReplayCommand
from flordb_build.replay_options import REPLAY_OPTIONS, ReplayOptions, executor_of


def _other_value(row: dict[str, Any]) -> Any:
    """A value of the row's type that is not its default."""
    if "choices" in row:
        return next(value for value, _ in row["choices"] if value != row["default"])
    if row["type"] is bool:
        return True
    if row["type"] is int:
        return row["default"] + 2
    if row["type"] is float:
        return 0.25
    return f"value of {row['name']}"


def _flag(row: dict[str, Any], value: Any) -> list[str]:
    return [f"--{row['long']}"] if row["type"] is bool else [f"--{row['long']}", str(value)]


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[str], ReplayOptions]]:
    """The (names, options) each front end hands the replay entry; nothing is replayed."""
    seen: list[tuple[list[str], ReplayOptions]] = []

    def record(names: Any, options: ReplayOptions, **_: Any) -> int:
        seen.append((list(names), options))
        return 0

    monkeypatch.setattr(_command, "run_replay_command", record)
    monkeypatch.setattr(sys, "argv", ["pytest"])  # no `replay` in argv: doit's own parse is what counts
    return seen


def test_the_table_is_the_options_dataclass() -> None:
    """Each row sets one ReplayOptions field, with that field's default."""
    defaults = ReplayOptions()
    assert [row["name"] for row in REPLAY_OPTIONS] == list(vars(defaults))
    for row in REPLAY_OPTIONS:
        assert getattr(defaults, row["name"]) == row["default"], row["name"]


@pytest.mark.parametrize("row", REPLAY_OPTIONS, ids=[row["long"] for row in REPLAY_OPTIONS])
def test_every_option_reaches_the_replay_from_both_front_ends(
    row: dict[str, Any], calls: list[tuple[list[str], ReplayOptions]]
) -> None:
    value = _other_value(row)
    expected = (["w2"], ReplayOptions(**{row["name"]: value}))
    assert cli.main(["replay", "w2", *_flag(row, value)]) == 0
    assert ReplayCommand().parse_execute([*_flag(row, value), "w2"]) == 0  # doit's getopt reads it
    assert ReplayCommand().parse_execute(["w2", *_flag(row, value)]) == 0  # after the name: our parser
    assert calls == [expected] * 3


def test_doit_replay_passes_rel_tol_on(project: Any) -> None:
    """A real ``doit replay`` (the plugin ``init`` registers): an invalid --rel-tol is refused, so it arrived."""
    project.cli("init", "--doit-config", "pyproject.toml")
    project.commit_all("configure doit")
    for arguments in (["--rel-tol=-1", "x", "--yes"], ["x", "--yes", "--rel-tol", "-1"]):
        out = subprocess.run(
            [sys.executable, "-m", "doit", "replay", *arguments], cwd=project.root, capture_output=True,
            text=True, timeout=300, stdin=subprocess.DEVNULL,
        )
        assert out.returncode == 1, (out.stdout, out.stderr)
        assert "--rel-tol must be a number >= 0, got '-1.0'" in out.stderr, out.stderr


@pytest.mark.slow
def test_doit_replay_compares_with_the_given_tolerance(project: Any) -> None:
    """``doit replay half --rel-tol 1``: the noisy value that differs by < 100 % is no longer reported."""
    project.write(
        "noisy.py",
        """\
        import random
        import flordb_build as flor

        state = {"w": 0.0}
        with flor.checkpointing(state=state):
            for epoch in flor.loop("epoch", range(2)):
                for step in flor.loop("step", range(2)):
                    state["w"] += 1.0
                flor.log("val", state["w"] + random.random())
        """,
    )
    project.cli("init", "--doit-config", "pyproject.toml")
    project.commit_all("noisy")
    project.run("noisy.py")
    text = (project.root / "noisy.py").read_text().replace(
        '        flor.log("val"', '        flor.log("half", state["w"] / 2)\n        flor.log("val"'
    )
    project.write("noisy.py", text)
    out = subprocess.run(
        [sys.executable, "-m", "doit", "replay", "half", "--yes", "--rel-tol", "1", "--cold"], cwd=project.root,
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout and "nondeterminism" not in out.stdout, out.stdout


def test_building_the_cli_parser_imports_nothing_of_hindsight() -> None:
    """Every command builds the parser: the replay options must not pull in the planner and executor."""
    code = (
        "import sys; from flordb_build.cli import build_parser; build_parser(); "
        "print(sorted(m for m in sys.modules if m.startswith('flordb_build.hindsight')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("section", "options", "expected"),
    [
        ("", ReplayOptions(), ("local", None)),
        ("", ReplayOptions(executor="ray"), ("ray", None)),
        ("", ReplayOptions(address="10.0.0.5:6379"), ("ray", "10.0.0.5:6379")),
        ('replay_executor = "ray"\nray_address = "head:6379"\n', ReplayOptions(), ("ray", "head:6379")),
        ('replay_executor = "ray"\nray_address = "head:6379"\n', ReplayOptions(address="other:1"), ("ray", "other:1")),
        ('replay_executor = "ray"\nray_address = "head:6379"\n', ReplayOptions(executor="local"), ("local", None)),
    ],
)
def test_the_executor_is_the_command_lines_over_the_configs(
    tmp_path: Any, section: str, options: ReplayOptions, expected: tuple[str, str | None]
) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.flordb_build]\n" + section)
    assert executor_of(options, config_of_root(tmp_path, False)) == expected


def test_an_address_with_the_local_executor_is_refused(tmp_path: Any) -> None:
    with pytest.raises(ReplayError, match="'--address h:1' names a Ray cluster, but '--executor local'"):
        executor_of(ReplayOptions(executor="local", address="h:1"), config_of_root(tmp_path, False))
