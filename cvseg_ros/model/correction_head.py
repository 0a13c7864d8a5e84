"""The improved model's correction head: the warped logits corrected per pixel, guided by the
residual, the intra cells and a coarse ConvLSTM state; on the CPU without gradients, one compiled
loop."""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cvseg_ros.common.jit import compiled
from cvseg_ros.common.kernels import cpu_kernels
from cvseg_ros.model.warping import bilinear_cell, resize_tap, warp


class CorrectionHead(nn.Module):
    """Residual-guided correction of the warped logits, per pixel at the output resolution.

    ``head(h, seg, guides)`` = seg + conv1x1(relu(up(P_h h) + P_s [seg, *guides])): the same as a
    1x1 network on the concatenation of the upsampled state, the logits and the guides (residual
    statistics, intra cells), but the state's projection runs at the state's (coarse) resolution
    and no wide map is built at H/4. ``head(h, seg, guides, motion)``: seg is first warped along
    ``motion`` (:func:`warp`).
    """

    def __init__(self, hidden_channels: int, num_classes: int, width: int, guide_channels: int = 2) -> None:
        super().__init__()
        self.state_proj = nn.Conv2d(hidden_channels, width, 1, bias=False)
        self.pixel_proj = nn.Conv2d(num_classes + guide_channels, width, 1)
        self.out = nn.Conv2d(width, num_classes, 1)

    def forward(self, h: torch.Tensor, seg: torch.Tensor, guides: list[torch.Tensor],
                motion: torch.Tensor | None = None) -> torch.Tensor:
        """The corrected logits, in seg's dtype (from the CPU's compiled loop: fp32, NCHW)."""
        if (cpu_kernels(seg) and seg.dtype == torch.float32 and seg.permute(0, 2, 3, 1).is_contiguous()
                and not (torch.is_grad_enabled() and any(t.requires_grad for t in (h, seg, *self.parameters())))):
            return self._compiled(h, seg, guides, motion)
        if motion is not None:
            seg = warp(seg, motion)
        state = F.interpolate(self.state_proj(h), size=seg.shape[-2:], mode="bilinear", align_corners=False)
        x = self.pixel_proj(torch.cat([seg, *(g.to(seg.dtype) for g in guides)], dim=1)) + state
        # in seg's dtype (fp32 under autocast): mixed-dtype arithmetic is slower than the cast
        return seg + self.out(torch.relu_(x)).to(seg.dtype)

    def warm_up(self) -> None:
        """Compile (or load from Numba's disk cache) the loop of :meth:`_compiled` for this head."""
        classes = self.out.out_channels
        seg = torch.zeros(1, classes, 2, 2).contiguous(memory_format=torch.channels_last)
        guides = [torch.zeros(1, self.pixel_proj.in_channels - classes, 2, 2)]
        with torch.no_grad():
            self._compiled(torch.zeros(1, self.state_proj.in_channels, 1, 1), seg, guides, None)

    def _compiled(self, h: torch.Tensor, seg: torch.Tensor, guides: list[torch.Tensor],
                  motion: torch.Tensor | None) -> torch.Tensor:
        """:meth:`forward` on the CPU without gradients, for channels-last fp32 logits (the
        inference copy's), in fp32: the state's projection is one matrix product over its pixels
        (PyTorch); its resize, the warp and both 1x1 layers run in one compiled loop, row by row of
        the output, which keeps a row's maps in the cache (PyTorch's operations on whole H/4 maps
        cost about twice as much)."""
        b, k, height, width = seg.shape
        if motion is None:
            motion = seg.new_zeros(b, 2, height, width)
        mv = motion if motion.shape[-2:] == (height, width) else F.adaptive_avg_pool2d(motion, (height, width))
        with torch.autocast(h.device.type, enabled=False):   # fp32: bf16 costs more at this size
            state = F.linear(h.permute(0, 2, 3, 1).float(), self.state_proj.weight.flatten(1).float(),
                             self.pixel_proj.bias.float()).contiguous()   # [B, rows, cols, D]
        guide = torch.cat([g.float() for g in guides], dim=1).contiguous()
        out = torch.empty(b, k, height, width)
        kernel = _correction_kernel(k, guide.shape[1], state.shape[-1])
        kernel(seg.permute(0, 2, 3, 1).numpy(), mv.float().contiguous().numpy(),
               np.float32(width / (motion.shape[-1] * 4)), np.float32(height / (motion.shape[-2] * 4)),
               state.numpy(), guide.numpy(), _weights(self.pixel_proj.weight), _weights(self.out.weight),
               _weights(self.out.bias), out.numpy())
        return out


def _weights(weight: torch.Tensor) -> np.ndarray:
    return weight.detach().flatten(1).float().contiguous().numpy() if weight.dim() > 1 else \
        weight.detach().float().contiguous().numpy()


@functools.lru_cache(maxsize=None)
def _correction_kernel(classes: int, guide_channels: int, width: int):
    """The compiled loop of :meth:`CorrectionHead._compiled` for these channel counts: constants of
    the loop (compiled once per combination, cached on disk), so that the loops over the channels
    unroll and the loops over a row's pixels vectorise."""
    K, G, D = classes, guide_channels, width

    def correct(source, motion, scale_x, scale_y, state, guide, w_pixel, w_out, b_out, out):
        """source [B,h,w,K] logits (channels last) warped along motion [B,2,h,w] (input pixels,
        times ``scale_*`` in cells: bilinear, border-clamped, as :func:`warp`); state [B,rows,cols,D]:
        the projected state (with the first layer's bias), resized bilinearly to h x w here (as
        ``F.interpolate``); guide [B,G,h,w]; w_pixel [D,K+G], w_out [K,D], b_out [K]; out [B,K,h,w]."""
        batch, h, w, _ = source.shape
        rows, cols = state.shape[1], state.shape[2]
        seg = np.empty((K, w), np.float32)
        hidden = np.empty((D, w), np.float32)
        wide = np.empty((rows, D, w), np.float32)   # the state resized along its rows
        zero = np.float32(0)
        row_scale, col_scale = np.float32(rows / h), np.float32(cols / w)
        for b in range(batch):
            for j in range(w):
                c0, c1, lx = resize_tap(j, col_scale, cols)
                for r in range(rows):
                    for d in range(D):
                        wide[r, d, j] = state[b, r, c0, d] + lx * (state[b, r, c1, d] - state[b, r, c0, d])
            for y in range(h):
                for j in range(w):
                    y0, y1, x0, x1, w00, w01, w10, w11 = bilinear_cell(
                        y, j, motion[b, 1, y, j] * scale_y, motion[b, 0, y, j] * scale_x, h, w)
                    for c in range(K):
                        seg[c, j] = (w00 * source[b, y0, x0, c] + w01 * source[b, y0, x1, c]
                                     + w10 * source[b, y1, x0, c] + w11 * source[b, y1, x1, c])
                r0, r1, ly = resize_tap(y, row_scale, rows)
                for d in range(D):
                    for j in range(w):
                        a = wide[r0, d, j] + ly * (wide[r1, d, j] - wide[r0, d, j])
                        for c in range(K):
                            a += w_pixel[d, c] * seg[c, j]
                        for g in range(G):
                            a += w_pixel[d, K + g] * guide[b, g, y, j]
                        hidden[d, j] = max(a, zero)
                for c in range(K):
                    for j in range(w):
                        a = seg[c, j] + b_out[c]
                        for d in range(D):
                            a += w_out[c, d] * hidden[d, j]
                        out[b, c, y, j] = a

    return compiled(fastmath=True)(correct)
