"""The one definition of "milliseconds per frame" of ``cvseg bench`` and ``cvseg eval``.

A method is timed per access unit: the wall time (``time.perf_counter``) of one call from the
unit's bytes to the method's output, with the kind of frame it output (``"I"``, ``"P"``; a unit
with no output has a kind of its own, ``None`` or ``"-"``). Then:

* per pass over a stream, **ms/frame** = the sum over the frame kinds of the kind's median time
  times the kind's share of the pass's frames (:func:`ms_per_frame`): robust to outliers, and it
  counts the I-frames at the rate the stream has them. For a stream of whole GOPs of ``g``
  frames it is ``(median I + (g - 1) * median P) / g``;
* over several passes, the median of the per-pass figures (:func:`median_over_passes`), so that a
  drift of the machine's speed during a run does not favour one method.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Hashable, Iterable, Sequence

from cvseg_ros.common.stats import median

#: the definition above, as the tools write it into their results
MS_PER_FRAME_IS = ("per pass: the median wall time of each frame kind (I, P; units with no output a kind "
                   "of their own) weighted by that kind's share of the pass's frames, i.e. "
                   "(ms_i + (gop - 1) * ms_p) / gop for whole GOPs; over passes: the median of the "
                   "per-pass figures")


def timed(function: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """``function(*args)`` and its wall time in milliseconds."""
    start = time.perf_counter()
    out = function(*args)
    return out, 1000.0 * (time.perf_counter() - start)


def kind_medians(times_ms: Sequence[float], kinds: Sequence[Hashable]) -> dict[Hashable, float]:
    """The median time of each frame kind (in the order of ``sorted(kinds, key=str)``)."""
    if len(times_ms) != len(kinds):
        raise ValueError(f"{len(times_ms)} times for {len(kinds)} frame kinds")
    groups: dict[Hashable, list[float]] = {}
    for ms, kind in zip(times_ms, kinds):
        groups.setdefault(kind, []).append(ms)
    return {kind: median(groups[kind]) for kind in sorted(groups, key=str)}


def ms_per_frame(times_ms: Sequence[float], kinds: Sequence[Hashable]) -> float | None:
    """ms/frame of one pass (see the module docstring); ``None`` for no frames."""
    if not times_ms:
        return None
    counts: dict[Hashable, int] = {}
    for kind in kinds:
        counts[kind] = counts.get(kind, 0) + 1
    return sum(m * counts[kind] / len(times_ms) for kind, m in kind_medians(times_ms, kinds).items())


def median_over_passes(values: Iterable[float | None]) -> float | None:
    """The median of the per-pass figures that exist (``None`` when none does)."""
    return median(v for v in values if v is not None)
