"""The state a :class:`~cvseg_ros.model.segmenter.CompressedSegmenter` carries from frame to frame
of a group of pictures, batched along dim 0 (one stream per row)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True, eq=False)
class PFrameState:
    """Made by ``i_frame``, replaced by each ``p_frame``. Which fields are set depends on the
    configuration: ``hidden`` and ``cell`` always; ``logits`` unless the state is the logits
    (``logits_state``); ``motion`` with ``accumulate``; ``i_frame_luma`` when the configuration
    matches luma and the I-frame's luma cells were given."""

    hidden: torch.Tensor                        #: the ConvLSTM's h [B,D,H/s,W/s], s = state_stride
    cell: torch.Tensor                          #: the ConvLSTM's c, as ``hidden``
    #: [B,K,H/4,W/4] the logits the correction head corrects next: the I-frame's (``accumulate``)
    #: or the previous frame's
    logits: torch.Tensor | None = None
    #: [B,2,H/4,W/4] the motion accumulated since the I-frame, in input pixels: content at p came
    #: from p + motion(p) in the I-frame
    motion: torch.Tensor | None = None
    #: [B,1,H/4,W/4] the I-frame's luma cells (0..255)
    i_frame_luma: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields that are set, by name, in field order."""
        return {f.name: t for f in dataclasses.fields(self) if (t := getattr(self, f.name)) is not None}

    @property
    def shapes(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """(name, shape) of each set field: states with equal shapes concatenate."""
        return tuple((name, tuple(t.shape)) for name, t in self.tensors().items())

    def replace(self, **changes: torch.Tensor | None) -> PFrameState:
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PFrameState:
        return PFrameState(**{name: t.to(device, non_blocking=non_blocking) for name, t in self.tensors().items()})

    @staticmethod
    def cat(states: Sequence[PFrameState]) -> PFrameState:
        """One state of the streams of ``states``, in order (their fields must be the same ones)."""
        if len(states) == 1:
            return states[0]
        parts = [s.tensors() for s in states]
        if any(p.keys() != parts[0].keys() for p in parts):
            raise ValueError(f"states with different fields do not concatenate: {[list(p) for p in parts]}")
        return PFrameState(**{name: torch.cat([p[name] for p in parts], dim=0) for name in parts[0]})

    def split(self, sizes: Sequence[int]) -> list[PFrameState]:
        """The states of consecutive groups of ``sizes`` streams."""
        if len(sizes) == 1:
            return [self]
        parts = {name: t.split(list(sizes), dim=0) for name, t in self.tensors().items()}
        return [PFrameState(**{name: p[i] for name, p in parts.items()}) for i in range(len(sizes))]
