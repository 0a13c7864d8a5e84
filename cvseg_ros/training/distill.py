"""Distillation from the Cityscapes teachers, so that the I-frame network keeps what they know about
streets it has never seen while it learns CamVid (learning without forgetting).

The teachers' ensemble (:mod:`cvseg_ros.training.ensemble`) labels every training frame once, on
the clean frame: the mean CamVid probabilities at a quarter of the frame size, cached as float16
beside the training state. The student then learns from the H.264-decoded copies of the same
frames: the KL divergence from the teachers' distribution (renormalised over the CamVid classes)
to its own, each pixel weighted by the teachers' mass on CamVid classes (nothing where they see
none of them). On CamVid stills this term is added to the cross-entropy with the human labels;
on unlabelled driving frames it is the only term.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from cvseg_ros.training.ensemble import CamvidProbabilities, cache_key

SOFT_FORMAT = 1     # part of the cache key: bump when the targets change
SOFT_STRIDE = 4     # targets at 1/4 of the frame


def soft_targets(frames: Sequence[np.ndarray], teachers: Sequence[CamvidProbabilities], cache_dir: Path,
                 progress: bool = True) -> list[np.ndarray]:
    """Per frame: the teachers' mean CamVid probabilities [11, h/4, w/4] float16 (cached)."""
    from tqdm import tqdm

    key = cache_key(f"v{SOFT_FORMAT}|{SOFT_STRIDE}|", teachers, frames)
    path = Path(cache_dir) / f"soft_targets_{key[:16]}.npz"
    if path.is_file():
        with np.load(path) as z:
            return [z[f"t{i}"] for i in range(len(frames))]
    targets = []
    for rgb in tqdm(frames, desc="teachers' soft targets", unit="frame", disable=not progress):
        mean = np.mean([t(rgb) for t in teachers], axis=0)
        h, w = rgb.shape[0] // SOFT_STRIDE, rgb.shape[1] // SOFT_STRIDE
        small = cv2.resize(np.ascontiguousarray(mean.transpose(1, 2, 0)), (w, h), interpolation=cv2.INTER_AREA)
        targets.append(np.ascontiguousarray(small.transpose(2, 0, 1)).astype(np.float16))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")   # one per process: DDP ranks may both write
    np.savez(tmp, **{f"t{i}": t for i, t in enumerate(targets)})
    tmp.replace(path)
    return targets


def planes_last(target: np.ndarray) -> np.ndarray:
    """A cached [11, h, w] target as hxwx11 float32, the layout :func:`~cvseg_ros.training.data.random_crop`
    resizes with its frame (straight from the quarter size to the crop's scale)."""
    return np.ascontiguousarray(target.astype(np.float32).transpose(1, 2, 0))


def full_size(target: np.ndarray, height: int, width: int) -> np.ndarray:
    """A [11, h, w] target resized bilinearly to HxWx11 float32 (to be cropped with its frame)."""
    return cv2.resize(target.astype(np.float32).transpose(1, 2, 0), (width, height), interpolation=cv2.INTER_LINEAR)


def distillation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(teachers || student) per pixel, weighted by the teachers' CamVid mass; ``logits``
    [B, 11, H, W], ``target`` [B, 11, H, W] (the teachers' probabilities, summing to <= 1)."""
    mass = target.sum(dim=1)
    p = target / mass.clamp_min(1e-6).unsqueeze(1)
    log_q = F.log_softmax(logits.float(), dim=1)
    kl = (p * (torch.log(p.clamp_min(1e-8)) - log_q)).sum(dim=1)
    return (kl * mass).sum() / mass.sum().clamp_min(1e-6)


def driving_frames(paths: Sequence[Path], step: int, height: int) -> list[np.ndarray]:
    """Every ``step``-th frame of each video, resized to ``height`` rows (aspect kept, width even)."""
    from cvseg_ros.codec.video import read_frames
    frames = []
    for path in paths:
        for i, rgb in enumerate(read_frames(path)):
            if i % step == 0:
                width = round(rgb.shape[1] * height / rgb.shape[0] / 2) * 2
                frames.append(cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA))
    return frames
