"""The I-frame network: an encoder-decoder that segments the decoded RGB I-frame.

It is ENet (``enet.py``), initialised at training time from the Cityscapes teacher's weights
converted by our own code, with its classifier remapped to the CamVid classes. It returns both the
full-resolution logits (the I-frame's segmentation) and the encoder features z(I) at H/8.
"""
from __future__ import annotations

import torch
from torch import nn

from cvseg_ros.model.enet import ENet


class IFrameNet(nn.Module):
    """``forward(rgb [B,3,H,W] in 0..1) -> (z [B,128,H/8,W/8], logits [B,C,H,W])``; H, W multiples of 8."""

    feature_channels = 128
    feature_stride = 8

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.enet = ENet(num_classes=num_classes)

    def forward(self, rgb: torch.Tensor, quarter: bool = False):
        """With ``quarter``, also the logits averaged over 4x4 pixels [B,C,H/4,W/4] (made from the
        classifier's input: :meth:`ENet.quarter_logits`)."""
        return self.enet.forward_features(rgb, quarter=quarter)
