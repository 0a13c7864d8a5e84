"""An inference copy of a trained :class:`CompressedSegmenter`: batch norms folded into the
convolutions before them, the two P-frame CNNs run as one grouped stack, optionally channels-last
weights. Same architecture, same weights (up to float rounding), same outputs; the checkpoint on
disk is untouched.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .enet import Bottleneck, DownsamplingBottleneck, UpsamplingBottleneck
from .p_frame import FusedBranches

# (conv, batch norm) attribute pairs where the norm directly follows the convolution in forward()
_ENET_PAIRS = {
    Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    DownsamplingBottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    UpsamplingBottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"), ("main_conv", "main_bn")),
}


def _fold(conv: nn.Module, bn: nn.BatchNorm2d) -> nn.Module:
    if isinstance(conv, nn.Sequential):   # asymmetric 1xk then kx1: the norm follows the last one
        conv[-1] = _fold(conv[-1], bn)
        return conv
    return fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, nn.ConvTranspose2d))


def fold_batchnorms_(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d that directly follows a convolution into it (in place).
    Returns the number folded."""
    folded = 0
    for module in model.modules():
        for conv_name, bn_name in _ENET_PAIRS.get(type(module), ()):
            bn = getattr(module, bn_name)
            if isinstance(bn, nn.BatchNorm2d):
                setattr(module, conv_name, _fold(getattr(module, conv_name), bn))
                setattr(module, bn_name, nn.Identity())
                folded += 1
        if isinstance(module, nn.Sequential):   # conv_bn_relu blocks of the P-frame branch
            for i in range(len(module) - 1):
                if isinstance(module[i], nn.Conv2d) and isinstance(module[i + 1], nn.BatchNorm2d):
                    module[i] = fuse_conv_bn_eval(module[i], module[i + 1])
                    module[i + 1] = nn.Identity()
                    folded += 1
    return folded


def inference_copy(model: nn.Module, channels_last: bool = True) -> nn.Module:
    """A deep copy in eval mode with batch norms folded, the P-frame CNNs fused (for a
    :class:`CompressedSegmenter`) and channels-last weights."""
    fast = copy.deepcopy(model).eval()
    with torch.no_grad():
        fold_batchnorms_(fast)
        if hasattr(fast, "mv_cnn") and hasattr(fast, "residual_cnn"):
            # both CNNs come from one h4_encoder geometry (ModelConfig): they always fuse
            fast.fused_branches = FusedBranches(fast.mv_cnn, fast.residual_cnn)
    for p in fast.parameters():
        p.requires_grad_(False)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    return fast
