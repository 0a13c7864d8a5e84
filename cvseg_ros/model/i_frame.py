"""The I-frame network: an encoder-decoder that segments the decoded RGB I-frame.

Two networks, chosen by the model configuration's ``i_frame_network``:

* ``enet`` (``enet.py``, the *fast* checkpoint): initialised at training time from the Cityscapes
  ENet teacher's weights converted by our own code; z(I) = its encoder features at H/8 (128).
* ``espnetv2`` (``espnetv2.py``, the *accurate* checkpoint): initialised from the Cityscapes
  ESPNetv2 weights; about 2.5x ENet's time per frame on a CPU; z(I) = its decoder features at H/8 (48). It
  takes multiples of 16: frames of multiples of 8 are padded (edge pixels repeated) and the
  outputs cropped.

Both have their classifier remapped to the CamVid classes at initialisation
(:func:`i_frame_net_from_teacher`). ``forward`` returns z(I) and the full-resolution logits (and,
with ``quarter``, the logits averaged over 4x4 pixels).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cvseg_ros.model.enet import ENet
from cvseg_ros.model.espnetv2 import ESPNetv2Seg

I_FRAME_NETWORKS = ("enet", "espnetv2")

# ImageNet statistics, as the ESPNetv2 weights were trained with
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
#: the Cityscapes network's decoder pyramid width, kept for any class count (its weights fit)
_ESPNET_PROJ = 10


class _ESPNetv2Frames(nn.Module):
    """ESPNetv2 on RGB in 0..1 of any multiple-of-8 size: ``forward(rgb) -> logits [B,C,H,W]``,
    ``forward_features(rgb, quarter)`` as :meth:`ENet.forward_features`."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.net = ESPNetv2Seg(num_classes, proj=_ESPNET_PROJ)
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def forward_features(self, rgb: torch.Tensor, quarter: bool = False):
        h, w = rgb.shape[-2:]
        x = (rgb - self.mean.to(rgb.dtype)) / self.std.to(rgb.dtype)
        ph, pw = -h % 16, -w % 16
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        features, half = self.net.decode(x)
        logits = F.interpolate(half, size=x.shape[-2:], mode="bilinear", align_corners=True)[..., :h, :w]
        features = features[..., : h // 8, : w // 8]
        if not quarter:
            return features, logits
        return features, logits, F.avg_pool2d(half, 2)[..., : h // 4, : w // 4]

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.forward_features(rgb)[1]


class IFrameNet(nn.Module):
    """``forward(rgb [B,3,H,W] in 0..1) -> (z [B,feature_channels,H/8,W/8], logits [B,C,H,W])``;
    H, W multiples of 8. ``network``: one of :data:`I_FRAME_NETWORKS`."""

    feature_stride = 8

    def __init__(self, num_classes: int, network: str = "enet") -> None:
        super().__init__()
        if network not in I_FRAME_NETWORKS:
            raise ValueError(f"unknown I-frame network {network!r}; choose from {', '.join(I_FRAME_NETWORKS)}")
        self.network = network
        if network == "enet":
            self.enet = ENet(num_classes=num_classes)
            self.feature_channels = 128
        else:
            self.espnetv2 = _ESPNetv2Frames(num_classes)
            self.feature_channels = ESPNetv2Seg.feature_channels

    @property
    def segmentation(self) -> nn.Module:
        """The network as a module whose ``forward(rgb)`` gives the logits only (training)."""
        return self.enet if self.network == "enet" else self.espnetv2

    def forward(self, rgb: torch.Tensor, quarter: bool = False):
        """With ``quarter``, also the logits averaged over 4x4 pixels [B,C,H/4,W/4]."""
        return self.segmentation.forward_features(rgb, quarter=quarter)


def i_frame_net_from_teacher(network: str, num_classes: int, class_map: Sequence[Sequence[int]],
                             path: str | Path) -> IFrameNet:
    """An :class:`IFrameNet` initialised from a Cityscapes teacher's weights at ``path`` (the
    Torch7 ENet file, or the ESPNetv2 state_dict), its classifier remapped: class ``c`` copies
    the teacher class ``class_map[c][0]`` (ENet's ids: 0 Unlabeled, then the 19 classes)."""
    net = IFrameNet(num_classes, network)
    if network == "enet":
        from cvseg_ros.model.enet_torch7 import enet_from_torch7
        net.enet.load_state_dict(enet_from_torch7(path, num_classes=num_classes, class_map=class_map).state_dict())
        return net
    from cvseg_ros.model.enet_torch7 import remap_classifier
    from cvseg_ros.model.espnetv2 import espnetv2_cityscapes
    state = espnetv2_cityscapes(path).state_dict()
    espnet_ids = [[t - 1 for t in g] for g in class_map]   # ESPNetv2 has no Unlabeled class first
    net.espnetv2.net.load_state_dict(remap_classifier(state, espnet_ids, prefix="bu_dec_l4.merge_layer.3",
                                                      class_dim=0))
    return net
