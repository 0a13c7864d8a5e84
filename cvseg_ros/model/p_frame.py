"""The P-frame branch's two small CNNs: one on the motion-vector image, one on the residual image."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def h4_encoder(out_channels: int, out_stride: int, width: int, in_channels: int = 2) -> nn.Sequential:
    """Image at H/4 -> ``out_channels`` features at ``H / out_stride`` (stride-2 steps)."""
    # the first convolution already strides (nothing runs at H/4: the inputs are smooth there)
    layers = [conv_bn_relu(in_channels, width, stride=2 if out_stride > 4 else 1)]
    stride = 8 if out_stride > 4 else 4
    while stride < out_stride:
        layers.append(conv_bn_relu(width, width, stride=2))
        stride *= 2
    layers.append(nn.Conv2d(width, out_channels, 1))
    return nn.Sequential(*layers)


class MotionVectorCNN(nn.Module):
    """Motion-vector image (2 channels, pixels, at H/4; with ``intra``, a third channel: 1 on the
    intra-coded cells) -> features at ``H / out_stride``.

    Vectors are divided by ``scale`` px so typical motion is O(1).
    """

    def __init__(self, out_channels: int, out_stride: int = 8, width: int = 16, scale: float = 8.0,
                 intra: bool = False) -> None:
        super().__init__()
        self.scale = scale
        self.intra = intra
        self.net = h4_encoder(out_channels, out_stride, width, in_channels=3 if intra else 2)

    def forward(self, motion_vectors: torch.Tensor, intra: torch.Tensor | None = None) -> torch.Tensor:
        x = motion_vectors / self.scale
        if self.intra:
            x = torch.cat([x, intra.to(x.dtype)], dim=1)
        return self.net(x)


class ResidualCNN(nn.Module):
    """Residual image (1 channel luma /255, at full or half resolution) -> features at ``H / out_stride``.

    The residual is first reduced to H/4 cells by mean r and mean |r| pooling (cheap), so no
    convolution runs above H/4.
    """

    def __init__(self, out_channels: int, out_stride: int = 8, width: int = 16) -> None:
        super().__init__()
        self.net = h4_encoder(out_channels, out_stride, width)

    #: the pooled statistics are multiplied by this (residuals are small)
    STATS_SCALE = 8.0

    @staticmethod
    def pool(residual: torch.Tensor, cell: int = 4) -> torch.Tensor:
        """[B,1,h,w] -> [B,2,h/cell,w/cell]: mean residual and mean absolute residual per cell
        (times :attr:`STATS_SCALE`); ``cell`` = 4 for a full-resolution residual, 2 at half."""
        return torch.cat([F.avg_pool2d(residual, cell, ceil_mode=True),
                          F.avg_pool2d(residual.abs(), cell, ceil_mode=True)], dim=1) * ResidualCNN.STATS_SCALE

    def forward(self, residual: torch.Tensor, cell: int = 4) -> torch.Tensor:
        return self.net(self.pool(residual, cell))
