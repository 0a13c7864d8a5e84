"""ESPNetv2 (width scale s=2.0) for Cityscapes semantic segmentation, in PyTorch.

The parameter names follow the EdgeNets segmentation layout, so the published
``espnetv2_s_2.0_city_1024x512.pth`` state_dict loads one to one
(:func:`espnetv2_cityscapes`, ``weights_only`` and ``strict``).

Structure:

* encoder (``base_net``): a 3x3/2 conv (3->32), then four stride-2 stages
  (``level2_0``, ``level3_0``, ``level4_0``: avg-pool branch concatenated with a
  strided EESP block, plus a projection of the average-pooled input image)
  followed by 3 and 7 EESP blocks at 1/8 and 1/16; channels 32/128/256/512.
* EESP block: grouped 1x1 reduce (4 groups) -> 4 depth-wise 3x3 branches with
  dilations rising with the branch, summed hierarchically -> BN+PReLU ->
  grouped 1x1 expand + BN -> residual add (stride 1) -> PReLU.
* decoder: four efficient pyramid-pooling blocks (scales 2, 1.5, 1, 0.5, 0.1)
  going 512->64->48->32->20 channels, each of the first three followed by a 2x
  bilinear upsampling and the sum with a gated projection of the matching
  encoder feature; the result (1/2 resolution) is resized to the input.

Input: ``[B,3,H,W]`` RGB/255 normalised with the ImageNet mean/std, H and W
multiples of 16 (trained at 1024x512). Output: ``[B,20,H,W]`` logits, the 19
Cityscapes train classes in their usual order, index 19 the background.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ESPNetv2Seg", "espnetv2_cityscapes", "NUM_CLASSES"]

NUM_CLASSES = 20
_BRANCHES = 4
_REINF = 3            # channels of the image shortcut's hidden layer


# -- encoder pieces (attribute names conv / bn / act) -----------------------------------------------

class _Unit(nn.Module):
    """conv, then optionally BatchNorm and PReLU (registered as ``conv``, ``bn``, ``act``)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, dilation: int = 1,
                 bn: bool = True, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding=(k // 2) * dilation, dilation=dilation,
                              groups=groups, bias=False)
        if bn:
            self.bn = nn.BatchNorm2d(cout)
        if act:
            self.act = nn.PReLU(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if hasattr(self, "bn"):
            x = self.bn(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


class _NormAct(nn.Module):
    """BatchNorm + PReLU as ``bn`` / ``act``."""

    def __init__(self, channels: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.PReLU(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(x))


def _dilations(branches: int, field_limit: int) -> list[int]:
    """Dilation of each depth-wise 3x3 branch: branch i would see 3+2i pixels; past ``field_limit``
    it falls back to a plain 3x3; sorted by receptive field."""
    fields = sorted(3 + 2 * i if 3 + 2 * i <= field_limit else 3 for i in range(branches))
    return [(f - 1) // 2 for f in fields]


class _EESP(nn.Module):
    """Extremely efficient spatial pyramid block (see the module doc). With ``stride=2`` it returns
    the expanded features before the residual and activation (the down-sampler finishes them)."""

    def __init__(self, cin: int, cout: int, stride: int, field_limit: int, branches: int = _BRANCHES):
        super().__init__()
        width = cout // branches
        if width * branches != cout:
            raise ValueError(f"EESP output {cout} is not a multiple of {branches} branches")
        self.stride = stride
        self.proj_1x1 = _Unit(cin, width, 1, groups=branches)
        self.spp_dw = nn.ModuleList(
            _Unit(width, width, 3, stride=stride, groups=width, dilation=d, bn=False, act=False)
            for d in _dilations(branches, field_limit))
        self.conv_1x1_exp = _Unit(cout, cout, 1, groups=branches, act=False)
        self.br_after_cat = _NormAct(cout)
        self.module_act = nn.PReLU(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduced = self.proj_1x1(x)
        outs, running = [], None
        for branch in self.spp_dw:
            y = branch(reduced)
            running = y if running is None else running + y
            outs.append(running)
        y = self.conv_1x1_exp(self.br_after_cat(torch.cat(outs, 1)))
        if self.stride == 2:
            return y
        if y.shape == x.shape:
            y = y + x
        return self.module_act(y)


class _Down(nn.Module):
    """Halves the resolution: ``cat(avgpool(x), EESP/2(x)) + shortcut(image at this size)``, PReLU."""

    def __init__(self, cin: int, cout: int, field_limit: int):
        super().__init__()
        self.eesp = _EESP(cin, cout - cin, stride=2, field_limit=field_limit)
        self.inp_reinf = nn.Sequential(_Unit(3, _REINF, 3), _Unit(_REINF, cout, 1, act=False))
        self.act = nn.PReLU(cout)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        y = torch.cat([F.avg_pool2d(x, 3, 2, 1), self.eesp(x)], 1)
        return self.act(y + self.inp_reinf(image))


class _Encoder(nn.Module):
    """ESPNetv2 s=2.0 without its classification stage: features at 1/2, 1/4, 1/8, 1/16."""

    def __init__(self, widths=(32, 128, 256, 512), repeats=(3, 7), field_limits=(13, 11, 9, 7)):
        super().__init__()
        c1, c2, c3, c4 = widths
        self.level1 = _Unit(3, c1, 3, stride=2)
        self.level2_0 = _Down(c1, c2, field_limits[0])
        self.level3_0 = _Down(c2, c3, field_limits[1])
        self.level3 = nn.ModuleList(_EESP(c3, c3, 1, field_limits[2]) for _ in range(repeats[0]))
        self.level4_0 = _Down(c3, c4, field_limits[2])
        self.level4 = nn.ModuleList(_EESP(c4, c4, 1, field_limits[3]) for _ in range(repeats[1]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f1 = self.level1(x)
        image = F.avg_pool2d(x, 3, 2, 1)            # the image at 1/2, then halved per stage
        feats = [f1]
        y = f1
        for down, blocks in ((self.level2_0, ()), (self.level3_0, self.level3), (self.level4_0, self.level4)):
            image = F.avg_pool2d(image, 3, 2, 1)
            y = down(y, image)
            for block in blocks:
                y = block(y)
            feats.append(y)
        return feats


# -- decoder pieces (Sequential-style names: cbr.N / br.N) ------------------------------------------

class _SeqCBR(nn.Module):
    """conv (no bias) + BN + PReLU held in ``self.cbr``."""

    def __init__(self, cin: int, cout: int, k: int, groups: int = 1):
        super().__init__()
        self.cbr = nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
                                 nn.BatchNorm2d(cout), nn.PReLU(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cbr(x)


class _SeqBR(nn.Module):
    """BN + PReLU held in ``self.br``."""

    def __init__(self, channels: int):
        super().__init__()
        self.br = nn.Sequential(nn.BatchNorm2d(channels), nn.PReLU(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.br(x)


class _ChannelShuffle(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class _PyramidPool(nn.Module):
    """Project to ``proj`` channels, run one depth-wise 3x3 per scale on the map resampled to that
    scale (at least 5x5) and back, fuse with BN+PReLU, shuffle, grouped 3x3 and a 1x1 to ``cout``."""

    SCALES = (2.0, 1.5, 1.0, 0.5, 0.1)

    def __init__(self, cin: int, proj: int, cout: int, final_norm: bool = True):
        super().__init__()
        n = len(self.SCALES)
        self.projection_layer = _SeqCBR(cin, proj, 1)
        self.stages = nn.ModuleList(nn.Conv2d(proj, proj, 3, padding=1, groups=proj, bias=False)
                                    for _ in self.SCALES)
        self.merge_layer = nn.Sequential(_SeqBR(proj * n), _ChannelShuffle(n),
                                         _SeqCBR(proj * n, proj, 3, groups=proj),
                                         nn.Conv2d(proj, cout, 1, bias=not final_norm))
        if final_norm:
            self.br = _SeqBR(cout)
        #: the stages' maps are concatenated already in the shuffled order, the merge norm's
        #: parameters permuted to match (:meth:`interleave_`, for inference)
        self.interleaved = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.projection_layer(x)
        h, w = x.shape[2:]
        outs = []
        for scale, conv in zip(self.SCALES, self.stages):
            size = (max(5, math.ceil(h * scale)), max(5, math.ceil(w * scale)))
            if scale > 1.0:
                y = F.adaptive_avg_pool2d(conv(F.interpolate(x, size, mode="bilinear", align_corners=True)), (h, w))
            elif scale < 1.0:
                y = F.interpolate(conv(F.adaptive_avg_pool2d(x, size)), (h, w), mode="bilinear", align_corners=True)
            else:
                y = conv(x)
            outs.append(y)
        if self.interleaved:   # channel j * n + i = stage i's channel j: the shuffle's order, one copy
            b, c = x.shape[:2]
            slots = x.new_empty(b, h, w, c, len(outs))       # channels-last, stage-minor
            for i, y in enumerate(outs):
                slots[..., i].copy_(y.permute(0, 2, 3, 1))
            y = self.merge_layer(slots.flatten(3).permute(0, 3, 1, 2))
        else:
            y = self.merge_layer(torch.cat(outs, 1))
        return self.br(y) if hasattr(self, "br") else y

    @torch.no_grad()
    def interleave_(self) -> None:
        """Concatenate the stages' maps in the channel shuffle's order (one copy instead of a
        concatenation and a shuffle), the norm and PReLU before the shuffle permuted to match."""
        if self.interleaved:
            return
        norm, shuffle = self.merge_layer[0], self.merge_layer[1]
        n, proj = shuffle.groups, self.stages[0].out_channels
        order = torch.tensor([i * proj + j for j in range(proj) for i in range(n)])
        for module in norm.br:
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if tensor.dim() == 1 and tensor.numel() == n * proj:
                    tensor.copy_(tensor[order].clone())
        self.merge_layer[1] = nn.Identity()
        self.interleaved = True


class _GatedProjection(nn.Module):
    """Encoder feature -> decoder width: grouped 3x3 CBR scaled by a per-channel sigmoid gate
    computed from the globally pooled input."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.wt_layer = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.Sigmoid())
        self.expansion_layer = _SeqCBR(cin, cout, 3, groups=math.gcd(cin, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expansion_layer(x) * self.wt_layer(x)


def _bn_prelu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.PReLU(channels))


class ESPNetv2Seg(nn.Module):
    """ESPNetv2 s=2.0 segmentation network (see the module doc); ``forward(x) -> [B, classes, H, W]``."""

    #: channels of the decoder's features at 1/8 (what :meth:`decode` returns)
    feature_channels = 48

    def __init__(self, classes: int = NUM_CLASSES, dec_base: int = 16, proj: int | None = None):
        """``proj``: the decoder's pyramid width (default as the Cityscapes network: half the
        classes, at most ``dec_base``; keep 10 to reuse its weights with another class count)."""
        super().__init__()
        self.base_net = _Encoder()
        enc = (32, 128, 256, 512)
        dec = (4 * dec_base, 3 * dec_base, 2 * dec_base)
        if dec[1] != self.feature_channels:
            raise ValueError(f"dec_base={dec_base}: the 1/8 features have {dec[1]} channels, not "
                             f"{self.feature_channels}")
        proj = min(classes // 2, dec_base) if proj is None else proj
        self.bu_dec_l1 = _PyramidPool(enc[3], proj, dec[0])
        self.bu_dec_l2 = _PyramidPool(dec[0], proj, dec[1])
        self.bu_dec_l3 = _PyramidPool(dec[1], proj, dec[2])
        self.bu_dec_l4 = _PyramidPool(dec[2], proj, classes, final_norm=False)
        self.merge_enc_dec_l2 = _GatedProjection(enc[2], dec[0])
        self.merge_enc_dec_l3 = _GatedProjection(enc[1], dec[1])
        self.merge_enc_dec_l4 = _GatedProjection(enc[0], dec[2])
        self.bu_br_l2 = _bn_prelu(dec[0])
        self.bu_br_l3 = _bn_prelu(dec[1])
        self.bu_br_l4 = _bn_prelu(dec[2])

    def decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the decoder's features at 1/8 [B,48,H/8,W/8], the logits at 1/2 [B,classes,H/2,W/2])."""
        h, w = x.shape[2:]
        if h % 16 or w % 16:
            raise ValueError(f"ESPNetv2 input height and width must be multiples of 16, got {h}x{w}")
        f1, f2, f3, f4 = self.base_net(x)
        y = self.bu_dec_l1(f4)
        features = None
        for skip, merge, norm, dec in ((f3, self.merge_enc_dec_l2, self.bu_br_l2, self.bu_dec_l2),
                                       (f2, self.merge_enc_dec_l3, self.bu_br_l3, self.bu_dec_l3),
                                       (f1, self.merge_enc_dec_l4, self.bu_br_l4, self.bu_dec_l4)):
            y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=True)
            y = dec(norm(y + merge(skip)))
            if features is None:
                features = y
        return features, y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.decode(x)[1]
        return F.interpolate(half, size=x.shape[2:], mode="bilinear", align_corners=True)


def _check_state_dict(net: nn.Module, state: object, path: Path) -> None:
    """Raise ``ValueError`` naming ``path`` unless ``state`` has exactly ``net``'s keys and shapes."""
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state_dict of tensors (got {type(state).__name__})")
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and state[k].shape != v.shape]
    problems = [f"{label} {items[:5]}{' ...' if len(items) > 5 else ''}"
                for label, items in (("missing", missing), ("unexpected", unexpected),
                                     ("wrong shape", mismatched)) if items]
    if problems:
        raise ValueError(f"{path} does not match ESPNetv2 s=2.0 (Cityscapes): " + "; ".join(problems))


def espnetv2_cityscapes(path: str | Path) -> ESPNetv2Seg:
    """The network with the Cityscapes weights of ``path`` (a plain state_dict, read with
    ``weights_only=True``), in eval mode. ``ValueError`` if its keys or shapes do not match."""
    path = Path(path)
    net = ESPNetv2Seg()
    state = torch.load(path, map_location="cpu", weights_only=True)
    _check_state_dict(net, state, path)
    net.load_state_dict(state, strict=True)
    return net.eval()
