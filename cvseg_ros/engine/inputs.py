"""The model's input tensors, batched, from decoded frames (:class:`~cvseg_ros.codec.decoder.CompressedFrame`)
of one work size: the I-frame network's RGB, and the P-frame step's motion vectors, residual
statistics, intra cells and luma cells."""
from __future__ import annotations

from dataclasses import dataclass, field
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


class Uploads:
    """Host buffers reused per role, shape and dtype for the uploads to a GPU: page-locked
    (pinned) where CUDA is, so that a copy with ``non_blocking`` overlaps the work queued before
    it; a buffer is rewritten only once its last copy has finished (a CUDA event). At most
    ``limit`` buffers (the cameras' work sizes); then the oldest goes."""

    def __init__(self, device: torch.device, limit: int = 24) -> None:
        self.device = device
        self.pinned = device.type == "cuda" and torch.cuda.is_available()
        self.limit = limit
        self._buffers: dict[tuple, tuple[torch.Tensor, object]] = {}

    def __call__(self, role: str, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        """The arrays, stacked, on the device (the copy may still be in flight: the device's
        stream orders it before the work that reads it)."""
        first = arrays[0]
        key = (role, len(arrays), first.shape, first.dtype.str)
        entry = self._buffers.pop(key, None)
        if entry is None:
            if len(self._buffers) >= self.limit:
                self._buffers.pop(next(iter(self._buffers)))
            host = torch.empty((len(arrays), *first.shape), dtype=torch.from_numpy(first[:0]).dtype,
                               pin_memory=self.pinned)
            entry = (host, torch.cuda.Event() if self.pinned else None)
        host, copied = entry
        if copied is not None:
            copied.synchronize()   # the buffer's previous upload has been read (at once if never recorded)
        np.stack(arrays, out=host.numpy())
        out = host.to(self.device, non_blocking=self.pinned)
        if copied is not None:
            copied.record()
        self._buffers[key] = entry
        return out


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

    uploads: Uploads | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.device.type != "cpu" and self.uploads is None:
            object.__setattr__(self, "uploads", Uploads(self.device))

    def _to_device(self, arrays: Sequence[np.ndarray], role: str) -> torch.Tensor:
        """On the CPU the arrays themselves (stacked; no copy for one); elsewhere through :class:`Uploads`."""
        if self.uploads is None:
            return batch(arrays)
        return self.uploads(role, arrays)

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
        return self._to_device(arrays, "rgb").permute(0, 3, 1, 2).float().div_(255.0)

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
        return self._to_device(cells, "luma").unsqueeze(1).float()

    def motion_vectors(self, frames: Sequence[CompressedFrame], size: tuple[int, int]) -> torch.Tensor:
        """[B,2,h/4,w/4] the frames' motion fields at the work size's cells, in its pixels."""
        h, w = size
        mvs = []
        for f in frames:
            mv = f.motion_vectors
            mvs.append(mv if mv.shape[1:] == (h // 4, w // 4) else
                       resize_field(mv, h // 4, w // 4, w / f.width, h / f.height))
        return self._to_device(mvs, "motion_vectors")

    def p_frame(self, frames: Sequence[CompressedFrame], size: tuple[int, int]) -> dict[str, torch.Tensor | None]:
        """The inputs of :meth:`~cvseg_ros.model.segmenter.CompressedSegmenter.p_frame`
        (``motion_vectors``, ``residual``, ``residual_stats``, ``intra``, with ``luma`` the
        ``luma``): the model only uses the residual's per-cell mean and mean |r|; they are computed
        here (OpenCV, from the int16 residual) and the full-resolution residual tensor is not made."""
        h, w = size
        rh, rw = h // self.residual_stride, w // self.residual_stride
        residuals, intras = [], []
        for f in frames if self.p_frame_branch else ():   # without it: the vectors (and luma) only
            mv = f.motion_vectors
            resized = mv.shape[1:] != (h // 4, w // 4)
            intra = f.intra if f.intra is not None else np.zeros(mv.shape[1:], bool)
            if resized and self.intra:
                intra = cv2.resize(intra.view(np.uint8), (w // 4, h // 4), interpolation=cv2.INTER_NEAREST) > 0
            intras.append(intra)
            # the reader computes the residual at the model's size already (residual_size)
            res = f.residual if f.residual is not None else np.zeros((rh, rw), np.int16)
            residuals.append(res if res.shape == (rh, rw) else cv2.resize(res, (rw, rh), interpolation=cv2.INTER_AREA))
        tensors = {"motion_vectors": self.motion_vectors(frames, size), "residual": None,
                   "residual_stats": None, "intra": None}
        if self.luma:
            tensors["luma"] = self.luma_cells(frames, size)
        if not self.p_frame_branch:
            return tensors
        if self.intra:
            tensors["intra"] = self._to_device(intras, "intra").unsqueeze(1).float()
        stats = [residual_stats(r, cell=4 // self.residual_stride) for r in residuals]
        if all(s is not None for s in stats):
            tensors["residual_stats"] = self._to_device(stats, "residual_stats")
        else:
            tensors["residual"] = self._to_device(residuals, "residual").unsqueeze(1).float().div_(255.0)
        return tensors
