"""What the stream reader gives: :class:`CompressedFrame` (one decoded frame in the form the model
consumes) and :class:`StreamStats` (a stream's counters, every access unit in one outcome)."""
from __future__ import annotations

from dataclasses import dataclass, field as dc_field
from typing import Any

import numpy as np


@dataclass
class CompressedFrame:
    """One decoded frame in the form the paper's model consumes (see docs/ARCHITECTURE.md)."""

    kind: str                      # "I", "P" or "B" (a B-frame leaves the model state as it is)
    key_frame: bool
    width: int
    height: int
    stamp: Any
    index: int                     # decode order in the stream (successful frames)
    gop_index: int                 # 0 at an I-frame, then 1, 2, ... for the P-frames after it (a
                                   # B-frame: one more than the frame before it in display order)
    reset: bool                    # restart the model state here with the I-frame network
    rgb: np.ndarray | None = None                  # HxWx3 uint8
    motion_vectors: np.ndarray | None = None       # (2, H/4, W/4) float32, pixels (intra cells filled)
    intra: np.ndarray | None = None                # (H/4, W/4) bool
    residual: np.ndarray | None = None             # (h, w) int16, luma, at the decoder's residual size
                                                   # (default the frame's size H, W)
    luma_cells: np.ndarray | None = None           # (H/4, W/4) uint8, the mean luma of each cell of the
                                                   # motion-vector field (I- and P-frames)


#: the counters of :class:`StreamStats` that together count every access unit once
UNIT_OUTCOMES = ("frames", "skipped_before_keyframe", "over_limits", "corrupt", "no_output")


def accounted_units(stats: dict) -> int:
    """Access units a :meth:`StreamStats.as_dict` accounts for (equal to its ``access_units``):
    the outcomes, and the units whose pictures the decoder still holds back (``held``)."""
    return sum(stats[k] for k in UNIT_OUTCOMES) + stats.get("held", 0)


@dataclass
class StreamStats:
    """Counters of one stream; every dropped access unit is in exactly one of the drop counters."""

    access_units: int = 0
    frames: int = 0
    i_frames: int = 0
    p_frames: int = 0
    b_frames: int = 0                 # decoded B-frames (of ``frames``)
    frames_with_mvs: int = 0
    skipped_before_keyframe: int = 0  # access units before the first IDR (joined mid-GOP)
    over_limits: int = 0              # units beyond the stream limits, and the units after one up to
                                      # the next IDR within them (never given to FFmpeg)
    corrupt: int = 0                  # decode errors, empty / garbage / concealed-corrupt units
    no_output: int = 0                # units that decoded to no picture (parameter sets only, ...)
    held: int = 0                     # units whose pictures the decoder holds back (reordering), now
    resets: int = 0                   # frames where the state restarts (I-frames and resyncs)
    resyncs: int = 0                  # resets on a P-frame after an error or gap
    resolution_changes: int = 0
    decoder_restarts: int = 0         # the decoder held pictures back after damaged input: reopened
    last_error: str = ""
    errors: list[str] = dc_field(default_factory=list, repr=False)

    def note_error(self, message: str) -> None:
        self.last_error = message
        self.errors.append(message)
        del self.errors[:-20]

    def accounted(self) -> int:
        """Access units the counters account for (each unit lands in exactly one of them)."""
        return accounted_units(self.as_dict())

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d.pop("errors")
        return d
