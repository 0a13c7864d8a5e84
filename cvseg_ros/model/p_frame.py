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


class FusedBranches(nn.Module):
    """Both P-frame CNNs as one stack of grouped convolutions (group 1: the motion-vector CNN,
    group 2: the residual CNN): the same features, concatenated, in half the operations. Built
    from trained CNNs with their batch norms folded (:func:`cvseg_ros.model.inference.inference_copy`);
    ``forward(motion_vectors, intra, pooled)`` = ``cat([mv_cnn(motion_vectors, intra), residual_cnn.net(pooled)])``.
    """

    def __init__(self, mv_cnn: MotionVectorCNN, residual_cnn: ResidualCNN) -> None:
        super().__init__()
        self.intra = mv_cnn.intra
        mv_layers, res_layers = _conv_layers(mv_cnn.net), _conv_layers(residual_cnn.net)
        if len(mv_layers) != len(res_layers):
            raise ValueError("the two P-frame CNNs differ in depth")
        self.input_channels = (mv_layers[0][0].in_channels, res_layers[0][0].in_channels)
        layers: list[nn.Module] = []
        for index, ((a, relu_a), (b, relu_b)) in enumerate(zip(mv_layers, res_layers)):
            geometry = (a.kernel_size, a.stride, a.padding, a.out_channels, relu_a)
            if geometry != (b.kernel_size, b.stride, b.padding, b.out_channels, relu_b) or a.dilation != (1, 1):
                raise ValueError(f"the two P-frame CNNs differ at layer {index}")
            group_in = max(a.in_channels, b.in_channels)
            fused = nn.Conv2d(2 * group_in, 2 * a.out_channels, a.kernel_size, a.stride, a.padding, groups=2,
                              device=a.weight.device, dtype=a.weight.dtype)   # beside the trained layers
            with torch.no_grad():
                fused.weight.zero_()
                scale = 1.0 / mv_cnn.scale if index == 0 else 1.0   # the vectors' division, folded in
                fused.weight[: a.out_channels, : a.in_channels] = a.weight * scale
                if index == 0 and mv_cnn.intra:                      # the intra channel is not divided
                    fused.weight[: a.out_channels, 2] = a.weight[:, 2]
                fused.weight[a.out_channels:, : b.in_channels] = b.weight
                fused.bias.copy_(torch.cat([_bias(a), _bias(b)]))
            layers.append(fused)
            if relu_a:
                layers.append(nn.ReLU(inplace=True))
        self.net = nn.Sequential(*layers)

    def forward(self, motion_vectors: torch.Tensor, intra: torch.Tensor | None, pooled: torch.Tensor) -> torch.Tensor:
        mv_in = [motion_vectors, intra.to(motion_vectors.dtype)] if self.intra else [motion_vectors]
        res_in = [pooled]
        # the narrower group is padded with copies of its first channel, which have zero weights
        (n_mv, n_res) = self.input_channels
        mv_in += [motion_vectors[:, :1]] * (n_res - n_mv)
        res_in += [pooled[:, :1]] * (n_mv - n_res)
        return self.net(torch.cat(mv_in + res_in, dim=1))


def _conv_layers(net: nn.Sequential) -> list[tuple[nn.Conv2d, bool]]:
    """(convolution, followed by a ReLU) per layer of an :func:`h4_encoder` whose batch norms
    are folded (Identity)."""
    layers = []
    for child in net:
        if isinstance(child, nn.Conv2d):
            layers.append((child, False))
        elif (isinstance(child, nn.Sequential) and len(child) == 3 and isinstance(child[0], nn.Conv2d)
              and isinstance(child[1], nn.Identity) and isinstance(child[2], nn.ReLU)):
            layers.append((child[0], True))
        else:
            raise ValueError(f"cannot fuse a P-frame CNN layer {child}: fold its batch norms first")
    return layers


def _bias(conv: nn.Conv2d) -> torch.Tensor:
    return conv.bias if conv.bias is not None else conv.weight.new_zeros(conv.out_channels)
