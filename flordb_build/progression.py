"""Whether an int64 array is ``first, first + 1, ...`` (a column's seqs and ctx ids), checked in C.

Each flush asks it of every packed column: the journal then writes one int for its seqs (and ctx
ids), the ``log_columns`` chunk one step. ``array("q", range(...)) == values`` made an int object
per value (~0.03-0.1 us) and was asked three times per value, a third of the flush. Here the
array's bytes are compared as byte streams, with memcmp and strided slices only:

* bytes 0 and 1 of every value (the low 16 bits) against a cached pattern of ``0, 1, ..., 65535``
  repeated, sliced at ``first % 65536``;
* bytes 2-7 (the high 48 bits) are constant between the points where the low 16 bits wrap, and
  equal to those of ``first + i`` there: one compare per byte per 65,536 values.

Together every value equals ``first + i``: exact, no sampling. Values outside [0, 2**63) take
the element-wise compare.
"""

from __future__ import annotations

import sys
from array import array

_LITTLE = sys.byteorder == "little"
_SPAN = 1 << 16
_INT64_MAX = 2**63 - 1

#: Byte 0 and byte 1 of ``0, 1, 2, ...`` for ``i`` in ``range(len)``: periods 256 and 65,536.
_patterns: list[bytes] = [b"", b""]


def _low_patterns(n: int) -> tuple[bytes, bytes]:
    """The byte-0 and byte-1 streams of ``0, 1, ..., n - 1 + 65535`` (grown by doubling, kept)."""
    low0, low1 = _patterns
    need = n + _SPAN
    if len(low0) < need:
        periods = -(-max(need, 2 * len(low0)) // _SPAN)
        low0 = bytes(range(256)) * (256 * periods)
        low1 = b"".join(bytes((j,)) * 256 for j in range(256)) * periods
        _patterns[:] = [low0, low1]
    return low0, low1


def is_consecutive(values: array[int]) -> bool:
    """True when ``values`` go up by one from their first (an empty array too)."""
    n = len(values)
    if n < 2:
        return True
    first = values[0]
    last = first + n - 1
    if values[-1] != last:
        return False
    if first < 0 or last > _INT64_MAX or not _LITTLE or n < 64:
        return array("q", range(first, last + 1)).tobytes() == values.tobytes()
    data = values.tobytes()
    low0, low1 = _low_patterns(n)
    offset = first % _SPAN
    if data[0::8] != low0[offset : offset + n] or data[1::8] != low1[offset : offset + n]:
        return False
    # Segments of equal high 48 bits: [start, end) between the wraps of the low 16 bits.
    high = [data[k::8] for k in range(2, 8)]
    start = 0
    while start < n:
        end = min(start + _SPAN - (first + start) % _SPAN, n)
        top = (first + start) >> 16
        for k, stream in enumerate(high):
            if stream[start:end] != bytes(((top >> (8 * k)) & 0xFF,)) * (end - start):
                return False
        start = end
    return True


def arithmetic_step(values: array[int]) -> int | None:
    """The step of ``values`` when they are ``first, first + step, ...`` (step >= 1); None otherwise."""
    n = len(values)
    if n == 1:
        return 1
    if not n:
        return None
    span = values[-1] - values[0]
    if span <= 0 or span % (n - 1):
        return None
    step = span // (n - 1)
    if step == 1:
        return 1 if is_consecutive(values) else None
    expected = array("q", range(values[0], values[-1] + 1, step))
    return step if expected.tobytes() == values.tobytes() else None
