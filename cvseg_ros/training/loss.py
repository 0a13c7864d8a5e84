"""The paper's loss (Eq. 1) over groups of frames, and the class weights of the cross-entropy."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cvseg_ros.model.classes import CAMVID_CLASSES
from cvseg_ros.model.segmenter import CompressedSegmenter
from cvseg_ros.training.data import IGNORE

NUM_CLASSES = len(CAMVID_CLASSES)


def class_weights(labels: np.ndarray) -> torch.Tensor:
    """~ 1/sqrt(frequency), normalised to mean 1."""
    counts = np.bincount(labels[labels != IGNORE].ravel(), minlength=NUM_CLASSES)[:NUM_CLASSES].astype(np.float64)
    w = 1.0 / np.sqrt(np.maximum(counts / counts.sum(), 1e-4))
    return torch.tensor(w / w.mean(), dtype=torch.float32)


class GroupLoss(nn.Module):
    """Eq. 1 over a batch of groups: mean cross-entropy of the P-frame predictions (the I-frame
    network is frozen in this stage, so its term is a constant and left out of the sum)."""

    def __init__(self, model: CompressedSegmenter, weights: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("weights", weights)

    def forward(self, z, seg, mvs, residuals, labels, intra, luma):
        uses_luma = self.model.config.uses_luma
        state = self.model.state_from_i_frame(z, seg, luma[:, 0] if uses_luma else None)
        total = 0.0
        steps = mvs.shape[1]
        size = labels.shape[-2:]
        for t in range(steps):
            logits, state = self.model.p_frame(mvs[:, t], residuals[:, t], state, intra=intra[:, t],
                                               luma=luma[:, t + 1] if uses_luma else None)
            logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
            total = total + F.cross_entropy(logits, labels[:, t + 1], weight=self.weights, ignore_index=IGNORE)
        return total / steps
