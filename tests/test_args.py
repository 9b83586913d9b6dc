"""--kwargs and --params parsing and casting (pure functions), and params files in real runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flordb_build.args import cast_arg, consume_kwargs, infer_value
from flordb_build.errors import ArgError
from tests.conftest import Project


def test_consume_kwargs_removes_only_its_tokens() -> None:
    argv = ["train.py", "--data", "x.csv", "--kwargs", "lr=0.1", "epochs=3", "--verbose", "--kwargs", "b=1", "pos"]
    assert consume_kwargs(argv) == {"lr": "0.1", "epochs": "3", "b": "1"}
    assert argv == ["train.py", "--data", "x.csv", "--verbose", "pos"]


def test_values_may_contain_equals_signs_and_be_empty() -> None:
    argv = ["s.py", "--kwargs", "query=a=b", "empty="]
    assert consume_kwargs(argv) == {"query": "a=b", "empty": ""}
    assert argv == ["s.py"]


@pytest.mark.parametrize(
    ("raw", "default", "expected"),
    [
        ("yes", False, True),
        ("No", True, False),
        ("TRUE", False, True),
        ("0", True, False),
        ("1", False, True),
        ("7", 1, 7),
        ("2", 1.0, 2.0),
        ("1e-3", 0.1, 0.001),
        ("abc", "x", "abc"),
        ("[1, 2]", [0], [1, 2]),
        ('{"a": 1}', {}, {"a": 1}),
    ],
)
def test_cast_to_the_default_type(raw: str, default: object, expected: object) -> None:
    value = cast_arg("name", raw, default)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(("raw", "default"), [("maybe", False), ("1.5", 1), ("x", 0.1), ("5", [1])])
def test_uncastable_values_name_the_arg(raw: str, default: object) -> None:
    with pytest.raises(ArgError, match=f"'epochs' = '{raw}'"):
        cast_arg("epochs", raw, default)


def test_values_without_default_are_inferred() -> None:
    assert infer_value("3") == 3 and infer_value("0.5") == 0.5 and infer_value("[1]") == [1]
    assert infer_value("adam") == "adam" and infer_value("") == ""


# -- params files (DVC-style params.yaml, read with pyyaml) ------------------------------------


def test_consume_params_removes_only_its_tokens() -> None:
    from flordb_build.args import consume_params

    argv = ["train.py", "--params", "a.yaml", "--data", "x", "--params=b.yaml", "pos"]
    assert consume_params(argv) == "b.yaml"  # the last one wins, as with argparse
    assert argv == ["train.py", "--data", "x", "pos"]
    assert consume_params(["t.py", "--paramsx"]) is None


def test_read_params_flattens_and_refuses_what_is_not_a_mapping(tmp_path: Path) -> None:
    from flordb_build.args import param_value, read_params

    path = tmp_path / "params.yaml"
    path.write_text("lr: 0.1\ntrain:\n  epochs: 3\n  layers: [8, 4]\n  opt: {name: adam}\nflag: true\n")
    assert read_params(path) == {"lr": 0.1, "train.epochs": 3, "train.layers": [8, 4], "train.opt.name": "adam",
                                 "flag": True}
    assert param_value("e", 3, 1.0) == 3.0 and isinstance(param_value("e", 3, 1.0), float)
    assert param_value("s", 5, "x") == "5" and param_value("b", "yes", False) is True
    assert param_value("l", [8, 4], (1,)) == (8, 4) and param_value("n", 0.5, None) == 0.5
    with pytest.raises(ArgError, match="Could not read arg 'i'"):
        param_value("i", "many", 1)
    path.write_text("- a\n- b\n")
    with pytest.raises(ArgError, match="must hold a mapping"):
        read_params(path)
    path.write_text("a: [unclosed\n")
    with pytest.raises(ArgError, match="is not YAML"):
        read_params(path)
    with pytest.raises(ArgError, match="Could not read the params file"):
        read_params(tmp_path / "missing.yaml")


PARAMS_SCRIPT = """\
import flordb_build as flor
print(flor.arg("lr", 0.5), flor.arg("train.epochs", 1), flor.arg("name", "base"))
"""


def test_flor_arg_reads_the_params_file_kwargs_first(project: Project) -> None:
    """--kwargs > params file (--params FILE, else [tool.flordb_build] params) > default; recorded as args."""
    import flordb_build as flor

    project.write("train.py", PARAMS_SCRIPT)
    project.write("params.yaml", "lr: 0.01\ntrain:\n  epochs: 3\n")
    project.write("other.yaml", "lr: 0.2\n")
    project.write("pyproject.toml", '[tool.flordb_build]\nparams = "params.yaml"\n')
    project.commit_all("params")
    assert project.run("train.py").stdout.split() == ["0.01", "3", "base"]
    assert project.run("train.py", "--kwargs", "lr=0.7").stdout.split() == ["0.7", "3", "base"]
    assert project.run("train.py", "--params", "other.yaml").stdout.split() == ["0.2", "1", "base"]
    args = [json.loads(a) for a in flor.query("SELECT args FROM runs ORDER BY tstamp")["args"]]
    assert args == [
        {"lr": 0.01, "train.epochs": 3, "name": "base"},
        {"lr": 0.7, "train.epochs": 3, "name": "base"},
        {"lr": 0.2, "train.epochs": 1, "name": "base"},
    ]
    frame = flor.dataframe("lr", "train.epochs")
    assert frame["lr"].tolist() == [0.01, 0.7, 0.2] and frame["train.epochs"].tolist() == [3, 3, 1]
    missing = project.run("train.py", "--params", "nope.yaml", check=False)
    assert missing.returncode != 0 and "Could not read the params file" in missing.stderr


def test_a_kwargs_group_starting_with_a_bare_name_is_reported() -> None:
    argv, malformed = ["s.py", "--kwargs", "lr", "0.5", "--kwargs", "b=1", "c"], []
    assert consume_kwargs(argv, malformed) == {"b": "1"}
    assert malformed == ["lr"] and argv == ["s.py", "lr", "0.5", "c"]  # the script's own args stay
