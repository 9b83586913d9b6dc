"""progression.py: the byte-stream progression check answers exactly what the element-wise one does."""

from __future__ import annotations

import random
from array import array

import pytest

from flordb_build.progression import arithmetic_step, is_consecutive

INT64_MAX = 2**63 - 1


def reference_step(values: array) -> int | None:
    n = len(values)
    if n == 1:
        return 1
    if not n:
        return None
    span = values[-1] - values[0]
    if span <= 0 or span % (n - 1):
        return None
    step = span // (n - 1)
    return step if list(values) == [values[0] + step * i for i in range(n)] else None


def arrays(seed: int, count: int):
    """Progressions (some across a 2**16 or 2**24 wrap, near the int64 bounds), most with one value
    changed: by one, by a high byte's worth, or swapped with its neighbour."""
    rng = random.Random(seed)
    for _ in range(count):
        n = rng.choice([0, 1, 2, 3, 63, 64, 1025, 70_000, 140_000])
        first = rng.choice([
            0, 1, 65_536 - n // 2, 2**24 - n // 3, 2**40 + 7, INT64_MAX - n + 1, -5, rng.randrange(0, 2**62),
        ])
        step = rng.choice([1, 1, 1, 2, 3])
        try:
            values = array("q", range(first, first + step * n, step))
        except OverflowError:
            continue
        if n > 1 and rng.random() < 0.7:
            j = rng.randrange(n)
            how = rng.choice(["up", "down", "high", "swap"])
            try:
                if how == "swap" and j + 1 < n:
                    values[j], values[j + 1] = values[j + 1], values[j]
                else:
                    values[j] += {"up": 1, "down": -1, "high": rng.choice([2**16, 2**24, 2**48, -(2**16)])}.get(how, 1)
            except OverflowError:
                values[j] = 0
        yield values


@pytest.mark.parametrize("seed", range(4))
def test_arithmetic_step_and_is_consecutive_match_the_element_wise_check(seed):
    for values in arrays(seed, 120):
        expected = reference_step(values)
        assert arithmetic_step(values) == expected, (len(values), list(values[:3]))
        assert is_consecutive(values) == (len(values) < 2 or expected == 1)


def test_one_value_off_anywhere_in_a_long_run_is_seen():
    n = 200_000
    values = array("q", range(2**32 - 70_000, 2**32 - 70_000 + n))  # wraps of 16 and 32 bits inside
    assert is_consecutive(values) and arithmetic_step(values) == 1
    for j in (1, 65_535, 70_000, 70_001, 131_072, n - 2):
        for delta in (1, -1, 2**16, 2**32, -(2**40)):
            broken = array("q", values)
            broken[j] += delta
            assert not is_consecutive(broken), (j, delta)
            assert arithmetic_step(broken) is None, (j, delta)
