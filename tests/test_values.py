"""Typed values round-trip through encode/decode."""

from __future__ import annotations

import numpy as np
import pytest

from flordb_build.values import ValueKind, decode_value, encode_value, simple_loop_value


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (None, None),
        (np.float64(0.5), 0.5),
        (np.int32(3), 3),
        (np.bool_(False), False),
        (np.array(2.5), 2.5),
        (np.arange(3), [0, 1, 2]),
        ([1, {"a": np.float32(0.5)}], [1, {"a": 0.5}]),
        ((1, 2), [1, 2]),
    ],
)
def test_round_trip(value: object, expected: object) -> None:
    stored, kind = encode_value(value)
    decoded = decode_value(stored, kind)
    assert decoded == expected and type(decoded) is type(expected)


def test_unknown_objects_become_text() -> None:
    class Thing:
        def __str__(self) -> str:
            return "thing"

    assert encode_value(Thing()) == ("thing", ValueKind.NATIVE)


def test_loop_values_are_kept_only_when_informative() -> None:
    assert simple_loop_value(3, 3) is None
    assert simple_loop_value("doc.pdf", 0) == "doc.pdf"
    assert simple_loop_value(0.01, 0) == 0.01
    assert simple_loop_value(np.zeros(3), 0) is None
