"""The model's input tensors, batched, from decoded frames (:class:`~cvseg_ros.codec.decoder.CompressedFrame`)
of one work size: the I-frame network's RGB, and the P-frame step's motion vectors, residual
statistics, intra cells and luma cells."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch

from cvseg_ros.codec.decoder import CompressedFrame
from cvseg_ros.codec.motion_vectors import resize_field
from cvseg_ros.codec.residual import residual_stats


def batch(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """[B, ...] tensor of same-shaped arrays (no copy for one array)."""
    if len(arrays) == 1:
        return torch.from_numpy(arrays[0]).unsqueeze(0)
    return torch.from_numpy(np.stack(arrays))


@dataclass(frozen=True)
class ModelInputs:
    """What the model takes, on ``device``, for frames brought to a work size ``(h, w)``:
    ``residual_stride`` and ``intra`` as the model's configuration; ``luma``: hand the P-frame step
    the frames' luma cells; ``p_frame_branch=False``: the P-frame step reads the vectors (and the
    luma) only."""

    device: torch.device
    residual_stride: int = 1
    intra: bool = False
    luma: bool = False
    p_frame_branch: bool = True

    def _to_device(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        return batch(arrays).to(self.device, non_blocking=True)

    def rgb(self, frames: Sequence[CompressedFrame], size: tuple[int, int]) -> torch.Tensor:
        """[B,3,h,w] RGB in 0..1 with channels-last strides (what the inference copy wants)."""
        h, w = size
        arrays = []
        for f in frames:
            rgb = f.rgb
            if rgb.shape[:2] != (h, w):
                rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
            arrays.append(rgb)
        # NHWC memory seen as NCHW: channels-last strides
        return self._to_device(arrays).permute(0, 3, 1, 2).float().div_(255.0)

    def luma_cells(self, frames: Sequence[CompressedFrame], size: tuple[int, int]) -> torch.Tensor | None:
        """[B,1,h/4,w/4] the frames' luma cells (None if a frame has none)."""
        h, w = size
        cells = []
        for f in frames:
            c = f.luma_cells
            if c is None:
                return None
            if c.shape != (h // 4, w // 4):
                c = cv2.resize(c, (w // 4, h // 4), interpolation=cv2.INTER_AREA)
            cells.append(c)
        return self._to_device(cells).unsqueeze(1).float()

    def p_frame(self, frames: Sequence[CompressedFrame], size: tuple[int, int]) -> dict[str, torch.Tensor | None]:
        """The inputs of :meth:`~cvseg_ros.model.segmenter.CompressedSegmenter.p_frame`
        (``motion_vectors``, ``residual``, ``residual_stats``, ``intra``, with ``luma`` the
        ``luma``): the model only uses the residual's per-cell mean and mean |r|; they are computed
        here (OpenCV, from the int16 residual) and the full-resolution residual tensor is not made."""
        h, w = size
        rh, rw = h // self.residual_stride, w // self.residual_stride
        mvs, residuals, intras = [], [], []
        for f in frames:
            mv = f.motion_vectors
            resized = mv.shape[1:] != (h // 4, w // 4)
            mvs.append(resize_field(mv, h // 4, w // 4, w / f.width, h / f.height) if resized else mv)
            if not self.p_frame_branch:   # the warp reads the vectors (and the luma) only
                continue
            intra = f.intra if f.intra is not None else np.zeros(mv.shape[1:], bool)
            if resized and self.intra:
                intra = cv2.resize(intra.view(np.uint8), (w // 4, h // 4), interpolation=cv2.INTER_NEAREST) > 0
            intras.append(intra)
            # the reader computes the residual at the model's size already (residual_size)
            res = f.residual if f.residual is not None else np.zeros((rh, rw), np.int16)
            residuals.append(res if res.shape == (rh, rw) else cv2.resize(res, (rw, rh), interpolation=cv2.INTER_AREA))
        tensors = {"motion_vectors": self._to_device(mvs), "residual": None, "residual_stats": None, "intra": None}
        if self.luma:
            tensors["luma"] = self.luma_cells(frames, size)
        if not self.p_frame_branch:
            return tensors
        if self.intra:
            tensors["intra"] = self._to_device(intras).unsqueeze(1).float()
        stats = [residual_stats(r, cell=4 // self.residual_stride) for r in residuals]
        if all(s is not None for s in stats):
            tensors["residual_stats"] = self._to_device(stats)
        else:
            tensors["residual"] = self._to_device(residuals).unsqueeze(1).float().div_(255.0)
        return tensors
