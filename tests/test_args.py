"""--kwargs parsing and casting, in process (pure functions)."""

from __future__ import annotations

import pytest

from flordb_build.args import cast_arg, consume_kwargs, infer_value
from flordb_build.errors import ArgError


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


def test_a_kwargs_group_starting_with_a_bare_name_is_reported() -> None:
    argv, malformed = ["s.py", "--kwargs", "lr", "0.5", "--kwargs", "b=1", "c"], []
    assert consume_kwargs(argv, malformed) == {"b": "1"}
    assert malformed == ["lr"] and argv == ["s.py", "lr", "0.5", "c"]  # the script's own args stay
