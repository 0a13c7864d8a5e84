"""Backward warping of maps along motion vectors (bilinear, border-clamped), and the bilinear taps
shared by the compiled loops of the model and the engine."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cvseg_ros.common.jit import compiled
from cvseg_ros.common.kernels import cpu_kernels

_GRIDS: dict = {}


def _base_grid(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[1,h,w,2] normalised (x, y) coordinates of the pixel centres of an h x w map (cached)."""
    key = (h, w, device, dtype)
    grid = _GRIDS.get(key)
    if grid is None:
        with torch.inference_mode(False), torch.no_grad():   # usable by training and inference alike
            ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=device, dtype=dtype)
            xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=device, dtype=dtype)
            grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
            grid = torch.stack([grid_x, grid_y], dim=-1)[None]
        if len(_GRIDS) > 64:
            _GRIDS.clear()
        _GRIDS[key] = grid
    return grid


def _pixel_scale(height: int, width: int, device: torch.device) -> torch.Tensor:
    """[2] factors from input pixels (x, y) of a height x width image to normalised [-1, 1] units
    (cached)."""
    key = ("scale", height, width, device)
    scale = _GRIDS.get(key)
    if scale is None:
        with torch.inference_mode(False), torch.no_grad():
            scale = torch.tensor([2.0 / width, 2.0 / height], device=device, dtype=torch.float32)
        _GRIDS[key] = scale
    return scale


@compiled(inline="always", fastmath=True)
def bilinear_cell(i, j, dy, dx, h, w):
    """The four cells and weights (rows y0, y1; columns x0, x1; w00, w01, w10, w11) of a bilinear,
    border-clamped sample of an h x w map at (i + dy, j + dx)."""
    zero, one = np.float32(0), np.float32(1)
    py = min(max(np.float32(i) + dy, zero), np.float32(h - 1))
    px = min(max(np.float32(j) + dx, zero), np.float32(w - 1))
    y0, x0 = int(py), int(px)
    fy, fx = py - np.float32(y0), px - np.float32(x0)
    return (y0, min(y0 + 1, h - 1), x0, min(x0 + 1, w - 1),
            (one - fy) * (one - fx), (one - fy) * fx, fy * (one - fx), fy * fx)


@compiled(inline="always", fastmath=True)
def resize_tap(i, scale, n):
    """The two source indices and the second's weight of output index ``i`` of a bilinear resize
    (``align_corners=False``, as ``F.interpolate``) from ``n`` samples, ``scale`` = n / output size."""
    source = max((np.float32(i) + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0))
    first = min(int(source), n - 1)
    return first, min(first + 1, n - 1), source - np.float32(first)


@compiled(fastmath=True)
def _warp_channels_last(x, mv, scale_x, scale_y, out):
    """:func:`warp` for x [B,h,w,C] (channels last) and mv [B,2,h,w] (input pixels, times
    ``scale_*`` in cells): bilinear, border-clamped, the same weights for all channels of a pixel."""
    batch, h, w, channels = x.shape
    for b in range(batch):
        for i in range(h):
            for j in range(w):
                y0, y1, x0, x1, w00, w01, w10, w11 = bilinear_cell(
                    i, j, mv[b, 1, i, j] * scale_y, mv[b, 0, i, j] * scale_x, h, w)
                for c in range(channels):
                    out[b, i, j, c] = (w00 * x[b, y0, x0, c] + w01 * x[b, y0, x1, c]
                                       + w10 * x[b, y1, x0, c] + w11 * x[b, y1, x1, c])


#: maps with at least this many channels, channels-last, are warped by the compiled loop on the
#: CPU (grid_sample's channels-last path is slower there; with few channels its NCHW path wins)
COMPILED_WARP_CHANNELS = 8


def warm_up_warp() -> None:
    """Compile (or load from Numba's cache) the channels-last warp now."""
    x = torch.zeros(1, COMPILED_WARP_CHANNELS, 2, 2).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        warp(x, torch.zeros(1, 2, 2, 2))


def warp(x: torch.Tensor, motion_vectors: torch.Tensor) -> torch.Tensor:
    """Backward-warp ``x`` [B,C,h,w] along a field given in input pixels at H/4 [B,2,H/4,W/4].

    Output at p samples ``x`` at p + mv (the previous frame's content that moved to p).
    """
    b, channels, h, w = x.shape
    mv = motion_vectors
    if mv.shape[-2:] != (h, w):
        mv = F.adaptive_avg_pool2d(mv, (h, w))
    full_h, full_w = motion_vectors.shape[-2] * 4, motion_vectors.shape[-1] * 4
    if (cpu_kernels(x) and channels >= COMPILED_WARP_CHANNELS and x.dtype == torch.float32
            and x.permute(0, 2, 3, 1).is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or mv.requires_grad))):
        out = torch.empty_like(x)   # channels-last, as x
        _warp_channels_last(x.permute(0, 2, 3, 1).numpy(), mv.float().contiguous().numpy(),
                            np.float32(w / full_w), np.float32(h / full_h), out.permute(0, 2, 3, 1).numpy())
        return out
    # pixels of the input image -> normalised [-1, 1] coordinates of this map
    grid = torch.addcmul(_base_grid(h, w, x.device, torch.float32), mv.float().permute(0, 2, 3, 1),
                         _pixel_scale(full_h, full_w, x.device))
    # sampling positions always in fp32: in bf16 (8-bit mantissa) a normalised coordinate near the
    # border is off by up to half a cell of a 120-wide map
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out if out.dtype == x.dtype else out.to(x.dtype)
