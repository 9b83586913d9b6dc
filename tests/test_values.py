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


@pytest.mark.parametrize(
    "value",
    [2**63, -(2**63) - 1, 2**64, -(2**200), np.uint64(2**64 - 1), "a\udc80b", "\ud800", ["x\udfff", 2**70]],
)
def test_values_sqlite_cannot_hold_are_stored_losslessly(value: object) -> None:
    import sqlite3

    stored, kind = encode_value(value)
    sqlite3.connect(":memory:").execute("SELECT ?", (stored,)).fetchone()  # SQLite takes it as is
    expected = int(value) if isinstance(value, np.integer) else value
    decoded = decode_value(stored, kind)
    assert decoded == expected and type(decoded) is type(expected)


def test_values_without_a_lossless_form_are_stored_as_repr_with_a_note() -> None:
    from flordb_build.values import encode_value_noting

    circular: list[object] = [1]
    circular.append(circular)

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no str")

        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    assert encode_value_noting({(1, 2): 3})[0] == "{(1, 2): 3}"
    assert encode_value_noting(circular)[0] == "[1, [...]]"
    stored, kind, note = encode_value_noting(Unprintable())
    assert stored == "<unprintable test_values_without_a_lossless_form_are_stored_as_repr_with_a_note.<locals>.Unprintable>"
    assert kind is ValueKind.NATIVE and note is not None and "RuntimeError" in note
    assert encode_value_noting(2**64)[2] is None  # lossless: nothing to note
