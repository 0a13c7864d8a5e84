"""ENet (Paszke et al. 2016) laid out like the e-Lab Torch7 Cityscapes model.

The module tree mirrors ``enet-cityscapes.net`` (e-Lab ENet-training) so the
Torch7 weights load one to one:

* initial block: ``cat(conv3x3/2 (3->13, bias), maxpool2x2)`` -> BN -> PReLU
* bottleneck: extension ``1x1 (no bias) -> BN -> PReLU -> {3x3 | dilated 3x3 |
  1x5 (no bias) + 5x1} (bias) -> BN -> PReLU -> 1x1 (no bias) -> BN ->
  SpatialDropout``; main branch identity; ``PReLU(ext + main)``.
* downsampling bottleneck: first conv 2x2 stride 2; main branch
  ``maxpool2x2`` (indices kept for the decoder) then zero channels appended.
* upsampling bottleneck (decoder): middle conv is a 3x3 stride-2 transposed
  conv; main branch ``1x1 (no bias) -> BN -> max-unpool`` with the indices of
  the matching encoder pooling. Decoder bottlenecks use PReLU (as in the file)
  and have no dropout.
* classifier: 2x2 stride-2 transposed conv 16 -> ``num_classes``.

All BatchNorms use ``eps=1e-3`` like the file. Internal width is
``out_channels // 4`` everywhere.

Dropout: Torch7 ``SpatialDropout`` is "old style" (no rescaling in training,
multiply by ``1 - p`` at inference). Here dropout is PyTorch's ``Dropout2d``
(inverted: identity at inference), and the conversion
(:mod:`cvseg_ros.model.enet_torch7`) folds the ``1 - p`` factor into the
BatchNorm right before each dropout, so inference output is exactly the Torch7
(and OpenCV DNN) output.

Input: ``[B,3,H,W]`` RGB in 0..1 (no mean/std), ``H`` and ``W`` multiples of 8.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cvseg_ros.common.jit import compiled
from cvseg_ros.common.kernels import cpu_kernels

__all__ = ["ENet", "TEACHER_NUM_CLASSES"]

TEACHER_NUM_CLASSES = 20
BN_EPS = 1e-3


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS)


class InitialBlock(nn.Module):
    def __init__(self, in_channels: int = 3, out_channels: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels - in_channels, 3, stride=2, padding=1, bias=True)
        self.pool = nn.MaxPool2d(2, 2)
        self.bn = _bn(out_channels)
        self.act = nn.PReLU(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(x) if x.requires_grad else _max_pool_2x2(x)
        return self.act(self.bn(torch.cat([self.conv(x), pooled], dim=1)))


def _max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """``MaxPool2d(2, 2)(x)`` as the maximum of the four 2x2 phases: the same values, much faster
    on a channels-last RGB image (PyTorch's pooling of a 3-channel channels-last map is slow)."""
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    return torch.maximum(torch.maximum(x[..., 0:h:2, 0:w:2], x[..., 0:h:2, 1:w:2]),
                         torch.maximum(x[..., 1:h:2, 0:w:2], x[..., 1:h:2, 1:w:2]))


def _add_prelu(y: torch.Tensor, main: torch.Tensor, act: nn.PReLU) -> torch.Tensor:
    """``act(y + main)``, the end of every bottleneck. On the CPU without gradients, for float32
    channels-last maps, one compiled pass that writes into ``y`` (the block's own new map), where
    the sum and the PReLU each read and write the whole map: the same values, in less time."""
    channels = y.shape[1]
    if (cpu_kernels(y) and y.dtype == main.dtype == torch.float32 and y.shape == main.shape
            and act.weight.numel() == channels and y.is_contiguous(memory_format=torch.channels_last)
            and main.is_contiguous(memory_format=torch.channels_last) and y.data_ptr() != main.data_ptr()
            and not (torch.is_grad_enabled() and (y.requires_grad or main.requires_grad or act.weight.requires_grad))):
        _add_prelu_channels_last_(y.permute(0, 2, 3, 1).reshape(-1, channels).numpy(),
                                  main.permute(0, 2, 3, 1).reshape(-1, channels).numpy(),
                                  act.weight.detach().float().contiguous().numpy())
        return y
    return act(y + main)


@compiled(fastmath=True)
def _add_prelu_channels_last_(y, main, slope):
    """y[p, c] = prelu(y[p, c] + main[p, c]) with the channel's slope (y, main [pixels, channels])."""
    for p in range(y.shape[0]):
        for c in range(y.shape[1]):
            v = y[p, c] + main[p, c]
            y[p, c] = v if v > 0 else v * slope[c]


def warm_up() -> None:
    """Compile (or load from Numba's disk cache) the block ends' loop now."""
    y = torch.zeros(1, 2, 2, 2).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        _add_prelu(y, y.clone(), nn.PReLU(2))


class Bottleneck(nn.Module):
    """Regular / dilated / asymmetric bottleneck (same channels in and out)."""

    def __init__(self, channels: int, *, dilation: int = 1, asymmetric: int = 0, dropout: float = 0.0):
        super().__init__()
        mid = channels // 4
        self.conv1 = nn.Conv2d(channels, mid, 1, bias=False)
        self.bn1 = _bn(mid)
        self.act1 = nn.PReLU(mid)
        if asymmetric:
            k = asymmetric
            self.conv2 = nn.Sequential(
                nn.Conv2d(mid, mid, (1, k), padding=(0, k // 2), bias=False),
                nn.Conv2d(mid, mid, (k, 1), padding=(k // 2, 0), bias=True),
            )
        else:
            self.conv2 = nn.Conv2d(mid, mid, 3, padding=dilation, dilation=dilation, bias=True)
        self.bn2 = _bn(mid)
        self.act2 = nn.PReLU(mid)
        self.conv3 = nn.Conv2d(mid, channels, 1, bias=False)
        self.bn3 = _bn(channels)
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.act_out = nn.PReLU(channels)

    def t7_layout(self) -> tuple[list[str], list[str]]:
        """Parametrised layers of the (extension, main) branches, in Torch7 order."""
        conv2 = ["conv2.0", "conv2.1"] if isinstance(self.conv2, nn.Sequential) else ["conv2"]
        return ["conv1", "bn1", "act1", *conv2, "bn2", "act2", "conv3", "bn3"], []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.bn1(self.conv1(x)))
        y = self.act2(self.bn2(self.conv2(y)))
        y = self.drop(self.bn3(self.conv3(y)))
        return _add_prelu(y, x, self.act_out)


class DownsamplingBottleneck(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, *, dropout: float = 0.0):
        super().__init__()
        mid = out_channels // 4
        self.extra_channels = out_channels - in_channels
        self.conv1 = nn.Conv2d(in_channels, mid, 2, stride=2, bias=False)
        self.bn1 = _bn(mid)
        self.act1 = nn.PReLU(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=True)
        self.bn2 = _bn(mid)
        self.act2 = nn.PReLU(mid)
        self.conv3 = nn.Conv2d(mid, out_channels, 1, bias=False)
        self.bn3 = _bn(out_channels)
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.pool = nn.MaxPool2d(2, 2, return_indices=True)
        self.act_out = nn.PReLU(out_channels)

    def t7_layout(self) -> tuple[list[str], list[str]]:
        return ["conv1", "bn1", "act1", "conv2", "bn2", "act2", "conv3", "bn3"], []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.act1(self.bn1(self.conv1(x)))
        y = self.act2(self.bn2(self.conv2(y)))
        y = self.drop(self.bn3(self.conv3(y)))
        main, indices = self.pool(x)
        main = F.pad(main, (0, 0, 0, 0, 0, self.extra_channels))
        return _add_prelu(y, main, self.act_out), indices


class UpsamplingBottleneck(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 4
        self.conv1 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn1 = _bn(mid)
        self.act1 = nn.PReLU(mid)
        self.conv2 = nn.ConvTranspose2d(mid, mid, 3, stride=2, padding=1, output_padding=1, bias=True)
        self.bn2 = _bn(mid)
        self.act2 = nn.PReLU(mid)
        self.conv3 = nn.Conv2d(mid, out_channels, 1, bias=False)
        self.bn3 = _bn(out_channels)
        self.main_conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.main_bn = _bn(out_channels)
        self.act_out = nn.PReLU(out_channels)

    def t7_layout(self) -> tuple[list[str], list[str]]:
        return (["conv1", "bn1", "act1", "conv2", "bn2", "act2", "conv3", "bn3"], ["main_conv", "main_bn"])

    def forward(self, x: torch.Tensor, indices: torch.Tensor, output_size: Sequence[int]) -> torch.Tensor:
        y = self.act1(self.bn1(self.conv1(x)))
        y = self.act2(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        main = F.max_unpool2d(self.main_bn(self.main_conv(x)), indices, 2, 2, output_size=output_size)
        return _add_prelu(y, main, self.act_out)


def _stage23() -> nn.Sequential:
    p = 0.1
    return nn.Sequential(
        Bottleneck(128, dropout=p),
        Bottleneck(128, dilation=2, dropout=p),
        Bottleneck(128, asymmetric=5, dropout=p),
        Bottleneck(128, dilation=4, dropout=p),
        Bottleneck(128, dropout=p),
        Bottleneck(128, dilation=8, dropout=p),
        Bottleneck(128, asymmetric=5, dropout=p),
        Bottleneck(128, dilation=16, dropout=p),
    )


class ENet(nn.Module):
    """ENet matching the e-Lab Torch7 Cityscapes model (``num_classes`` outputs).

    ``forward(x) -> logits [B,num_classes,H,W]``;
    ``forward_features(x) -> (features [B,128,H/8,W/8], logits)`` where
    ``features`` is the output of the last encoder stage (stage 3); ``forward_features(x, quarter=True)``
    adds the logits averaged over 4x4 pixels (:meth:`quarter_logits`).
    """

    feature_channels = 128
    feature_stride = 8

    def __init__(self, num_classes: int = TEACHER_NUM_CLASSES):
        super().__init__()
        self.num_classes = num_classes
        self.initial = InitialBlock(3, 16)
        self.down1 = DownsamplingBottleneck(16, 64, dropout=0.01)
        self.stage1 = nn.Sequential(*[Bottleneck(64, dropout=0.01) for _ in range(4)])
        self.down2 = DownsamplingBottleneck(64, 128, dropout=0.1)
        self.stage2 = _stage23()
        self.stage3 = _stage23()
        self.up1 = UpsamplingBottleneck(128, 64)
        self.stage4 = nn.Sequential(Bottleneck(64), Bottleneck(64))
        self.up2 = UpsamplingBottleneck(64, 16)
        self.stage5 = nn.Sequential(Bottleneck(16))
        self.classifier = nn.ConvTranspose2d(16, num_classes, 2, stride=2, bias=True)

    def encode(self, x: torch.Tensor):
        """Encoder only: ``(features, skip)`` where ``skip`` holds the pooling
        indices and sizes the decoder needs."""
        if x.shape[-2] % 8 or x.shape[-1] % 8:
            raise ValueError(f"ENet input H and W must be multiples of 8, got {tuple(x.shape[-2:])}")
        x0 = self.initial(x)
        x1, idx1 = self.down1(x0)
        x1 = self.stage1(x1)
        x2, idx2 = self.down2(x1)
        x3 = self.stage3(self.stage2(x2))
        return x3, (idx1, x0.shape[-2:], idx2, x1.shape[-2:])

    def decode(self, features: torch.Tensor, skip) -> torch.Tensor:
        return self.classifier(self._classifier_input(features, skip))

    def _classifier_input(self, features: torch.Tensor, skip) -> torch.Tensor:
        idx1, size1, idx2, size2 = skip
        y = self.stage4(self.up1(features, idx2, size2))
        return self.stage5(self.up2(y, idx1, size1))

    def quarter_logits(self, y: torch.Tensor) -> torch.Tensor:
        """The logits averaged over 4x4 pixels (``avg_pool2d(classifier(y), 4)``) from the
        classifier's input ``y`` [B,16,H/2,W/2]. The classifier is a 2x2 stride-2 transposed
        convolution: each output pixel applies one of its 4 kernel taps to one input pixel, so a
        4x4 output cell averages the mean tap over a 2x2 input cell. A 2x2 pooling of ``y`` and a
        1x1 convolution instead of pooling the full-resolution logits (about 6x cheaper)."""
        mean_tap = self.classifier.weight.mean(dim=(2, 3)).t()[:, :, None, None]
        return F.conv2d(F.avg_pool2d(y, 2), mean_tap.to(y.dtype), self.classifier.bias.to(y.dtype))

    def forward_features(self, x: torch.Tensor, quarter: bool = False):
        """``(features, logits)``; with ``quarter``, ``(features, logits, quarter_logits)``."""
        feats, skip = self.encode(x)
        y = self._classifier_input(feats, skip)
        logits = self.classifier(y)
        return (feats, logits, self.quarter_logits(y)) if quarter else (feats, logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[1]

    def blocks_in_torch7_order(self) -> list[nn.Module]:
        """Bottleneck blocks in the order of the Torch7 top-level container."""
        return [
            self.down1, *self.stage1, self.down2, *self.stage2, *self.stage3,
            self.up1, *self.stage4, self.up2, *self.stage5,
        ]
