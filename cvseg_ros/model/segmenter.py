"""CompressedSegmenter: the paper's model, composed from the I-frame network and the P-frame branch.

I-frame: ``IFrameNet`` gives the segmentation and z(I). P-frame: ``MotionVectorCNN`` and
``ResidualCNN`` features are concatenated as the ``ConvLSTM`` input; h(0) is made from z(I);
each step's hidden state is decoded to the P-frame's segmentation. The state resets at I-frames.

Configurations (``CONFIGS``):

* ``paper`` -- faithful: z(I) and the ConvLSTM state at H/32 with as many channels as classes
  (z(I) = the I-frame logits pooled to H/32); P-frame logits = the hidden state, upsampled.
* ``improved`` -- ours: the I-frame's H/4 logits, warped once along the motion accumulated since
  the I-frame (no resampling blur building up), then corrected per pixel by a residual-guided head
  (:class:`CorrectionHead`) that also sees a coarse ConvLSTM state (H/16, warped along the motion
  vectors before each update, as TapLab's feature flow warping) and which cells are intra-coded
  (new content). Output at H/4. Nothing but the warp, one per-pixel layer and the output layer
  runs at H/4. With ``luma_matching`` the accumulated motion is first checked against the pixels
  (each frame's luma cells against the I-frame's, :mod:`.luma_matching`) and corrected along
  outlines, where block vectors drag labels off moving objects.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cvseg_ros.common.jit import compiled
from cvseg_ros.model.conv_lstm import ConvLSTM
from cvseg_ros.model.i_frame import IFrameNet
from cvseg_ros.model.luma_matching import refine_accumulated_motion
from cvseg_ros.model.p_frame import FusedBranches, MotionVectorCNN, ResidualCNN

State = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class ModelConfig:
    name: str
    num_classes: int = 11
    state_stride: int = 8          # ConvLSTM resolution (paper: 32)
    hidden_channels: int = 24      # ConvLSTM channels (paper: num_classes)
    branch_channels: int = 16      # per P-frame CNN output channels
    branch_width: int = 16         # inner width of the two P-frame CNNs
    warp: bool = True              # warp state along the motion vectors before the update
    accumulate: bool = False       # warp the I-frame logits once along the motion accumulated since
                                   # the I-frame (no repeated resampling blur) instead of step by step
    output_stride: int = 4         # P-frame logits resolution
    intra: bool = False            # the intra-coded cells (new content) are an input of the
                                   # motion-vector CNN and of the correction head
    head_channels: int = 32        # correction head width (improved)
    residual_stride: int = 1       # the residual image comes at H / residual_stride (1, 2 or 4;
                                   # the model pools it to H/4 cells either way)
    deblock_p_frames: bool = True  # the inputs come from P-frames decoded with H.264's deblocking
                                   # filter (False: without, see H264StreamDecoder)
    luma_matching: bool = False    # correct the accumulated motion at outlines by matching each
                                   # frame's luma cells against the I-frame's (model.luma_matching;
                                   # needs ``accumulate``)
    match_guide: bool = False      # the head also sees how well each cell's luma matches the
                                   # I-frame's where the (corrected) accumulated motion points

    def __post_init__(self) -> None:
        if self.residual_stride not in (1, 2, 4):
            raise ValueError(f"residual_stride must be 1, 2 or 4 (the residual pooled to H/4 cells), "
                             f"got {self.residual_stride}")
        if (self.luma_matching or self.match_guide) and not (self.accumulate and self.name != "paper"):
            raise ValueError("luma_matching and match_guide need the improved model's accumulated motion "
                             "(accumulate=True)")

    @property
    def uses_luma(self) -> bool:
        """The model takes the frames' luma cells (``luma=`` of i_frame and p_frame)."""
        return self.luma_matching or self.match_guide

    def to_dict(self) -> dict:
        return asdict(self)


CONFIGS = {
    "paper": dict(state_stride=32, warp=False, output_stride=32, residual_stride=2, deblock_p_frames=False),
    "improved": dict(state_stride=16, hidden_channels=24, warp=True, accumulate=True, output_stride=4,
                     head_channels=16, intra=True, residual_stride=2, deblock_p_frames=False, luma_matching=True),
}


def make_config(name: str, num_classes: int = 11, **overrides) -> ModelConfig:
    if name not in CONFIGS:
        raise ValueError(f"unknown model configuration {name!r}; choose from {sorted(CONFIGS)}")
    values = dict(CONFIGS[name], **overrides)
    if name == "paper":
        values["hidden_channels"] = num_classes
    return ModelConfig(name=name, num_classes=num_classes, **values)


_GRIDS: dict = {}

#: the match guide (absolute luma difference, grey levels) is multiplied by this
MATCH_SCALE = 1.0 / 32.0


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
def _bilinear_cell(i, j, dy, dx, h, w):
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
                y0, y1, x0, x1, w00, w01, w10, w11 = _bilinear_cell(
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
    if (x.device.type == "cpu" and channels >= COMPILED_WARP_CHANNELS and x.dtype == torch.float32
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
        if (seg.device.type == "cpu" and seg.dtype == torch.float32 and seg.permute(0, 2, 3, 1).is_contiguous()
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
                    y0, y1, x0, x1, w00, w01, w10, w11 = _bilinear_cell(
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


class CompressedSegmenter(nn.Module):
    """``i_frame(rgb) -> (logits, state)``; ``p_frame(mv, residual, state) -> (logits, state)``.

    ``rgb`` [B,3,H,W] in 0..1; ``mv`` [B,2,H/4,W/4] pixels; ``residual`` [B,1,H/s,W/s] luma / 255
    with s = ``config.residual_stride``.
    I-frame logits are at H; P-frame logits at H / ``config.output_stride``. State tensors are
    batched along dim 0.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.i_frame_net = IFrameNet(c.num_classes)
        self.mv_cnn = MotionVectorCNN(c.branch_channels, out_stride=c.state_stride, width=c.branch_width,
                                      intra=c.intra)
        self.residual_cnn = ResidualCNN(c.branch_channels, out_stride=c.state_stride, width=c.branch_width)
        self.conv_lstm = ConvLSTM(2 * c.branch_channels, c.hidden_channels)
        #: both CNNs as one grouped stack, set by the inference copy (``None``: run them one by one)
        self.fused_branches: FusedBranches | None = None
        if c.name == "paper":
            self.init_state = None      # h(0) = z(I) = I-frame logits pooled to H/32
            self.head = None
        else:
            self.init_state = nn.Conv2d(IFrameNet.feature_channels, c.hidden_channels, 1)
            # residual-guided correction of the warped H/4 logits
            self.head = CorrectionHead(c.hidden_channels, c.num_classes, c.head_channels,
                                       guide_channels=2 + int(c.intra) + int(c.match_guide))

    # -- I-frames ---------------------------------------------------------------------------
    def i_frame(self, rgb: torch.Tensor, luma: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        """``luma``: the frame's luma cells [B,1,H/4,W/4] (0..255) as the decoder gave them; a
        configuration that matches luma keeps them in the state (without them, this GOP's
        P-frames are not matched)."""
        z, logits, quarter = self.i_frame_net(rgb, quarter=True)
        return logits, self.state_from_i_frame(z, quarter, luma)

    def state_from_i_frame(self, z: torch.Tensor, logits: torch.Tensor, luma: torch.Tensor | None = None) -> State:
        """``logits``: the I-frame's, at full resolution or already averaged over 4x4 pixels (as
        :meth:`i_frame` and training give them; ``paper`` pools those further to H/32); ``luma``: the
        I-frame's luma cells (see :meth:`i_frame`)."""
        c = self.config
        zh, zw = z.shape[-2:]
        if c.name == "paper":   # H/8 -> H/32
            h = F.adaptive_avg_pool2d(logits, (-(-zh // 4), -(-zw // 4)))
            return h, torch.zeros_like(h)
        quarter = (2 * zh, 2 * zw)   # H/4
        seg = logits if logits.shape[-2:] == quarter else F.adaptive_avg_pool2d(logits, quarter)
        if c.state_stride > 8:   # z(I) is at H/8
            f = c.state_stride // 8
            z = F.adaptive_avg_pool2d(z, (-(-zh // f), -(-zw // f)))
        h = self.init_state(z)
        if c.accumulate:   # + the I-frame's logits and the motion accumulated since (none yet)
            acc = seg.new_zeros(seg.shape[0], 2, *seg.shape[-2:])
            if c.uses_luma and luma is not None:   # + the I-frame's luma cells
                return h, torch.zeros_like(h), seg, acc, luma.float()[..., : seg.shape[-2], : seg.shape[-1]]
            return h, torch.zeros_like(h), seg, acc
        return h, torch.zeros_like(h), seg

    # -- P-frames ---------------------------------------------------------------------------
    def p_frame(self, motion_vectors: torch.Tensor, residual: torch.Tensor | None, state: State,
                residual_stats: torch.Tensor | None = None, intra: torch.Tensor | None = None,
                luma: torch.Tensor | None = None, branch: bool = True) -> tuple[torch.Tensor, State]:
        """``residual_stats``: optionally, what the model reduces ``residual`` to first, made by the
        caller ([B,2,H/4,W/4]: mean and mean absolute value of the residual per H/4 cell, see
        :func:`cvseg_ros.codec.residual.residual_stats`); then ``residual`` is not used (may be None).
        ``intra``: [B,1,H/4,W/4], 1 on intra-coded cells (used when ``config.intra``; None = none).
        ``luma``: [B,1,H/4,W/4], the frame's luma cells (0..255; used when the configuration
        matches luma and the state holds the I-frame's; else the accumulated motion is not corrected
        and the match guide is 0). ``branch=False`` (configurations that accumulate the motion): no
        CNN, ConvLSTM or correction head runs; the logits are the I-frame's warped along the
        accumulated motion (an ablation: what the P-frame branch adds), the ConvLSTM state is kept."""
        c = self.config
        if not branch:
            if not c.accumulate:
                raise ValueError(f"branch=False needs a configuration that accumulates the motion, not {c.name!r}")
            acc, _ = self._accumulated_motion(motion_vectors, state, luma)
            return warp(state[2], acc), (*state[:3], acc, *state[4:])
        # once: the residual CNN's input and the head's guide
        pooled = ResidualCNN.pool(residual, cell=4 // c.residual_stride) if residual_stats is None \
            else residual_stats * ResidualCNN.STATS_SCALE
        if c.intra and intra is None:   # no intra map given: no intra cells
            intra = motion_vectors.new_zeros(motion_vectors.shape[0], 1, *motion_vectors.shape[-2:])
        if self.fused_branches is not None:
            x = self.fused_branches(motion_vectors, intra, pooled)
        else:
            x = torch.cat([self.mv_cnn(motion_vectors, intra), self.residual_cnn.net(pooled)], dim=1)
        if c.name == "paper":
            h, cell = self.conv_lstm(x, state)
            return h, (h, cell)
        h, cell, seg = state[:3]
        if c.warp:   # h and c share their size: one grid_sample for both
            hc = warp(torch.cat([h, cell], dim=1), motion_vectors)
            h, cell = hc[:, : h.shape[1]], hc[:, h.shape[1]:]
        match = None
        if c.accumulate:
            i_frame_seg = seg
            acc, match = self._accumulated_motion(motion_vectors, state, luma)
        # the logits to correct are warped by the head: along acc (the I-frame's) or the vectors
        seg_motion = acc if c.accumulate else motion_vectors if c.warp else None
        h, cell = self.conv_lstm(x, (h, cell))
        guides = [pooled, intra] if c.intra else [pooled]
        if match is not None:
            guides.append(match)
        seg = self.head(h, seg, [g[..., : seg.shape[-2], : seg.shape[-1]] for g in guides], seg_motion)
        if c.accumulate:
            return seg, (h, cell, i_frame_seg, acc, *state[4:])
        return seg, (h, cell, seg)

    def _accumulated_motion(self, motion_vectors: torch.Tensor, state: State, luma: torch.Tensor | None
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the motion accumulated since the I-frame: content at p came from p + acc(p) in the
        I-frame, corrected against the luma where the configuration matches luma; the match
        guide, or None)."""
        c = self.config
        match = None
        acc = motion_vectors + warp(state[3], motion_vectors)
        if c.uses_luma:
            i_frame_luma = state[4] if len(state) > 4 else None
            if luma is not None and i_frame_luma is not None:
                luma = luma.float()[..., : acc.shape[-2], : acc.shape[-1]]
                if c.luma_matching:
                    acc = refine_accumulated_motion(acc, luma, i_frame_luma)
                if c.match_guide:   # how far this cell's luma is from the I-frame's where acc points
                    match = (luma - warp(i_frame_luma, acc)).abs_() * MATCH_SCALE
            if c.match_guide and match is None:
                match = acc.new_zeros(acc.shape[0], 1, *acc.shape[-2:])
        return acc, match

    def p_frame_parameters(self):
        """Parameters of everything but the I-frame network (the P-frame branch)."""
        return [p for n, p in self.named_parameters() if not n.startswith("i_frame_net.")]


def split_state(state: State, sizes: list[int]) -> list[State]:
    """Split a batched state into per-stream states along dim 0."""
    parts = [t.split(sizes, dim=0) for t in state]
    return [tuple(p[i] for p in parts) for i in range(len(sizes))]


def cat_states(states: list[State]) -> State:
    return tuple(torch.cat(ts, dim=0) for ts in zip(*states))
