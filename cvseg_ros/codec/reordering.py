"""The stamps of the access units whose pictures a decoder has not given out yet.

A stream whose SPS declares reordering (B-frames) gives its pictures in display order, some units
after the unit that coded them. Each unit is numbered (its packet's ``pts``) and its stamp kept
here until a picture with that number comes out, so every picture gets its own unit's stamp.
"""
from __future__ import annotations

from typing import Any

#: the most units whose pictures a reordering stream may hold back: H.264's largest picture buffer
MAX_HELD_UNITS = 16


class PictureStamps:
    """Unit number -> stamp, for the units whose pictures are not out yet."""

    def __init__(self) -> None:
        self._stamps: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self._stamps)

    def __contains__(self, number: int) -> bool:
        return number in self._stamps

    def add(self, number: int, stamp: Any) -> None:
        self._stamps[number] = stamp

    def discard(self, number: int) -> bool:
        """Forget unit ``number`` (its outcome is counted elsewhere); whether it was held."""
        return self._stamps.pop(number, _MISSING) is not _MISSING

    def claim(self, frames) -> list[tuple[Any, Any]]:
        """``(frame, stamp)`` of the frames whose units are held (the others' units were counted
        already); those units are no longer held. Several pictures of one unit (a message that
        holds more than one access unit) share its stamp."""
        out = [(f, self._stamps[f.pts]) for f in frames if f.pts in self._stamps]
        for f in frames:
            self._stamps.pop(f.pts, None)
        return out

    def expire(self, newest: int) -> int:
        """Forget the units held longer than any picture buffer holds a picture; how many."""
        old = [n for n in self._stamps if n <= newest - MAX_HELD_UNITS]
        for n in old:
            del self._stamps[n]
        return len(old)

    def clear(self) -> int:
        """Forget every unit (their pictures will not come); how many."""
        count = len(self._stamps)
        self._stamps.clear()
        return count

    def stamps(self) -> list:
        return list(self._stamps.values())


_MISSING = object()
