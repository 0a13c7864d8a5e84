"""Sizes that networks accept."""
from __future__ import annotations


def round8(n: float) -> int:
    """``n`` rounded to the nearest multiple of 8, at least 8."""
    return max(8, int(round(n / 8.0)) * 8)
