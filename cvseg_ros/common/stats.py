"""Summary statistics of measured values (latencies, times): percentiles, mean, median, ratios.

Percentiles are numpy's (linear interpolation between the closest ranks). The functions of a
sequence of numbers give ``None`` for an empty one.
"""
from __future__ import annotations

import math
import statistics
from typing import Iterable, Sequence

import numpy as np

#: the percentiles of a latency summary
SUMMARY_PERCENTILES = (50, 90, 99)


def _round(value: float, ndigits: int | None) -> float:
    return float(value) if ndigits is None else round(float(value), ndigits)


def percentiles(values: Sequence[float], qs: Iterable[float], ndigits: int | None = None) -> list[float] | None:
    """The ``qs`` percentiles (0..100) of ``values``, rounded to ``ndigits`` when given."""
    if len(values) == 0:
        return None
    return [_round(v, ndigits) for v in np.percentile(np.asarray(values, dtype=np.float64), list(qs))]


def percentile(values: Sequence[float], q: float, ndigits: int | None = None) -> float | None:
    """The ``q`` percentile (0..100) of ``values``, rounded to ``ndigits`` when given."""
    out = percentiles(values, (q,), ndigits)
    return None if out is None else out[0]


def mean(values: Sequence[float], ndigits: int | None = None) -> float | None:
    """The arithmetic mean, rounded to ``ndigits`` when given."""
    return _round(np.mean(np.asarray(values, dtype=np.float64)), ndigits) if len(values) else None


def median(values: Iterable[float]) -> float | None:
    """The median (the mean of the two middle values for an even count)."""
    values = list(values)
    return float(statistics.median(values)) if values else None


def summary(values: Sequence[float], prefix: str = "", ndigits: int | None = 2,
            qs: Iterable[float] = SUMMARY_PERCENTILES) -> dict[str, float | None]:
    """``{prefix}p50``, ``{prefix}p90``, ``{prefix}p99`` (the ``qs``), ``{prefix}max`` and
    ``{prefix}mean`` of ``values``; every entry ``None`` when there are none."""
    qs = list(qs)
    pcts = percentiles(values, qs + [100], ndigits) or [None] * (len(qs) + 1)
    out = {f"{prefix}p{q:g}": v for q, v in zip(qs, pcts)}
    out[f"{prefix}max"] = pcts[-1]
    out[f"{prefix}mean"] = mean(values, ndigits)
    return out


def ratio(num: float | None, den: float | None, ndigits: int | None = None) -> float | None:
    """``num / den`` (rounded to ``ndigits`` when given); ``None`` when either is missing or not
    finite, or ``den`` is 0."""
    if num is None or den is None or not math.isfinite(num) or not math.isfinite(den) or den == 0:
        return None
    return _round(num / den, ndigits)
