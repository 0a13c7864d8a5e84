"""CompressedSegmenter: the paper's model, composed from the I-frame network and the P-frame branch.

I-frame: ``IFrameNet`` gives the segmentation and z(I). P-frame: ``MotionVectorCNN`` and
``ResidualCNN`` features are concatenated as the ``ConvLSTM`` input; h(0) is made from z(I);
each step's hidden state is decoded to the P-frame's segmentation. The state resets at I-frames.

Configurations (``CONFIGS``; the model's form follows the :class:`ModelConfig` fields):

* ``paper`` -- faithful (``logits_state``): z(I) and the ConvLSTM state at H/32 with as many
  channels as classes (z(I) = the I-frame logits pooled to H/32); P-frame logits = the hidden
  state, upsampled.
* ``improved`` -- ours (``accumulate``): the I-frame's H/4 logits, warped once along the motion
  accumulated since the I-frame (no resampling blur building up), then corrected per pixel by a
  residual-guided head (:class:`~cvseg_ros.model.correction_head.CorrectionHead`) that also sees a
  coarse ConvLSTM state (H/16, warped along the motion vectors before each update, as TapLab's
  feature flow warping) and which cells are intra-coded (new content). Output at H/4. Nothing but
  the warp, one per-pixel layer and the output layer runs at H/4. With ``luma_matching`` the
  accumulated motion is first checked against the pixels (each frame's luma cells against the
  I-frame's, :mod:`.luma_matching`) and corrected along outlines, where block vectors drag labels
  off moving objects.

The state between frames is a :class:`~cvseg_ros.model.state.PFrameState`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cvseg_ros.model.conv_lstm import ConvLSTM
from cvseg_ros.model.correction_head import CorrectionHead
from cvseg_ros.model.i_frame import I_FRAME_NETWORKS, IFrameNet
from cvseg_ros.model.luma_matching import refine_accumulated_motion
from cvseg_ros.model.p_frame import FusedBranches, MotionVectorCNN, ResidualCNN
from cvseg_ros.model.state import PFrameState
from cvseg_ros.model.warping import warp


@dataclass(frozen=True)
class ModelConfig:
    name: str
    num_classes: int = 11
    i_frame_network: str = "enet"  # the I-frame network (model.i_frame): "enet" (fast) or "espnetv2"
                                   # (accurate)
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
    logits_state: bool = False     # the ConvLSTM state is the logits (paper): h(0) = the I-frame's
                                   # logits pooled to H / state_stride, the P-frame logits = h
                                   # (hidden_channels = num_classes); no correction head

    def __post_init__(self) -> None:
        if self.i_frame_network not in I_FRAME_NETWORKS:
            raise ValueError(f"unknown i_frame_network {self.i_frame_network!r}; choose from "
                             f"{', '.join(I_FRAME_NETWORKS)}")
        if self.residual_stride not in (1, 2, 4):
            raise ValueError(f"residual_stride must be 1, 2 or 4 (the residual pooled to H/4 cells), "
                             f"got {self.residual_stride}")
        if (self.luma_matching or self.match_guide) and not (self.accumulate and not self.logits_state):
            raise ValueError("luma_matching and match_guide need the improved model's accumulated motion "
                             "(accumulate=True)")
        if self.logits_state and self.accumulate:
            raise ValueError("accumulate warps the I-frame's H/4 logits, which a logits_state model does not keep")
        if self.logits_state and self.hidden_channels != self.num_classes:
            raise ValueError(f"a logits_state model has as many hidden channels as classes ({self.num_classes}), "
                             f"got hidden_channels={self.hidden_channels}")

    @property
    def uses_luma(self) -> bool:
        """The model takes the frames' luma cells (``luma=`` of i_frame and p_frame)."""
        return self.luma_matching or self.match_guide

    def to_dict(self) -> dict:
        return asdict(self)


CONFIGS = {
    "paper": dict(state_stride=32, warp=False, output_stride=32, residual_stride=2, deblock_p_frames=False,
                  logits_state=True),
    "improved": dict(state_stride=16, hidden_channels=24, warp=True, accumulate=True, output_stride=4,
                     head_channels=16, intra=True, residual_stride=2, deblock_p_frames=False, luma_matching=True),
}


def make_config(name: str, num_classes: int = 11, **overrides) -> ModelConfig:
    if name not in CONFIGS:
        raise ValueError(f"unknown model configuration {name!r}; choose from {sorted(CONFIGS)}")
    values = dict(CONFIGS[name], **overrides)
    if values.get("logits_state"):
        values["hidden_channels"] = num_classes
    return ModelConfig(name=name, num_classes=num_classes, **values)


#: the match guide (absolute luma difference, grey levels) is multiplied by this
MATCH_SCALE = 1.0 / 32.0


class CompressedSegmenter(nn.Module):
    """``i_frame(rgb) -> (logits, state)``; ``p_frame(mv, residual, state) -> (logits, state)``.

    ``rgb`` [B,3,H,W] in 0..1; ``mv`` [B,2,H/4,W/4] pixels; ``residual`` [B,1,H/s,W/s] luma / 255
    with s = ``config.residual_stride``.
    I-frame logits are at H; P-frame logits at H / ``config.output_stride``. The state
    (:class:`PFrameState`) is batched along dim 0.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.i_frame_net = IFrameNet(c.num_classes, c.i_frame_network)
        self.mv_cnn = MotionVectorCNN(c.branch_channels, out_stride=c.state_stride, width=c.branch_width,
                                      intra=c.intra)
        self.residual_cnn = ResidualCNN(c.branch_channels, out_stride=c.state_stride, width=c.branch_width)
        self.conv_lstm = ConvLSTM(2 * c.branch_channels, c.hidden_channels)
        #: both CNNs as one grouped stack, set by the inference copy (``None``: run them one by one)
        self.fused_branches: FusedBranches | None = None
        if c.logits_state:
            self.init_state = None      # h(0) = z(I) = I-frame logits pooled to H / state_stride
            self.head = None
        else:
            self.init_state = nn.Conv2d(self.i_frame_net.feature_channels, c.hidden_channels, 1)
            # residual-guided correction of the warped H/4 logits
            self.head = CorrectionHead(c.hidden_channels, c.num_classes, c.head_channels,
                                       guide_channels=2 + int(c.intra) + int(c.match_guide))

    # -- I-frames ---------------------------------------------------------------------------
    def i_frame(self, rgb: torch.Tensor, luma: torch.Tensor | None = None) -> tuple[torch.Tensor, PFrameState]:
        """``luma``: the frame's luma cells [B,1,H/4,W/4] (0..255) as the decoder gave them; a
        configuration that matches luma keeps them in the state (without them, this GOP's
        P-frames are not matched)."""
        z, logits, quarter = self.i_frame_net(rgb, quarter=True)
        return logits, self.state_from_i_frame(z, quarter, luma)

    def state_from_i_frame(self, z: torch.Tensor, logits: torch.Tensor, luma: torch.Tensor | None = None
                           ) -> PFrameState:
        """``logits``: the I-frame's, at full resolution or already averaged over 4x4 pixels (as
        :meth:`i_frame` and training give them; ``logits_state`` pools those further to
        H / state_stride); ``luma``: the I-frame's luma cells (see :meth:`i_frame`)."""
        c = self.config
        zh, zw = z.shape[-2:]   # z(I) is at H/8
        state_size = (-(-zh * 8 // c.state_stride), -(-zw * 8 // c.state_stride))
        if c.logits_state:
            h = F.adaptive_avg_pool2d(logits, state_size)
            return PFrameState(h, torch.zeros_like(h))
        quarter = (2 * zh, 2 * zw)   # H/4
        seg = logits if logits.shape[-2:] == quarter else F.adaptive_avg_pool2d(logits, quarter)
        if c.state_stride > 8:
            z = F.adaptive_avg_pool2d(z, state_size)
        h = self.init_state(z)
        if not c.accumulate:
            return PFrameState(h, torch.zeros_like(h), seg)
        # + the motion accumulated since the I-frame (none yet) and the I-frame's luma cells
        i_frame_luma = luma.float()[..., : seg.shape[-2], : seg.shape[-1]] \
            if c.uses_luma and luma is not None else None
        return PFrameState(h, torch.zeros_like(h), seg, seg.new_zeros(seg.shape[0], 2, *seg.shape[-2:]),
                           i_frame_luma)

    # -- P-frames ---------------------------------------------------------------------------
    def p_frame(self, motion_vectors: torch.Tensor, residual: torch.Tensor | None, state: PFrameState,
                residual_stats: torch.Tensor | None = None, intra: torch.Tensor | None = None,
                luma: torch.Tensor | None = None, branch: bool = True) -> tuple[torch.Tensor, PFrameState]:
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
            return warp(state.logits, acc), state.replace(motion=acc)
        # once: the residual CNN's input and the head's guide
        pooled = ResidualCNN.pool(residual, cell=4 // c.residual_stride) if residual_stats is None \
            else residual_stats * ResidualCNN.STATS_SCALE
        if c.intra and intra is None:   # no intra map given: no intra cells
            intra = motion_vectors.new_zeros(motion_vectors.shape[0], 1, *motion_vectors.shape[-2:])
        if self.fused_branches is not None:
            x = self.fused_branches(motion_vectors, intra, pooled)
        else:
            x = torch.cat([self.mv_cnn(motion_vectors, intra), self.residual_cnn.net(pooled)], dim=1)
        h, cell = state.hidden, state.cell
        if c.warp:   # h and c share their size: one grid_sample for both
            hc = warp(torch.cat([h, cell], dim=1), motion_vectors)
            h, cell = hc[:, : h.shape[1]], hc[:, h.shape[1]:]
        if c.logits_state:
            h, cell = self.conv_lstm(x, (h, cell))
            return h, PFrameState(h, cell)
        acc = match = None
        if c.accumulate:
            acc, match = self._accumulated_motion(motion_vectors, state, luma)
        # the logits to correct are warped by the head: along acc (the I-frame's) or the vectors
        seg_motion = acc if c.accumulate else motion_vectors if c.warp else None
        h, cell = self.conv_lstm(x, (h, cell))
        seg = state.logits
        guides = [pooled, intra] if c.intra else [pooled]
        if match is not None:
            guides.append(match)
        out = self.head(h, seg, [g[..., : seg.shape[-2], : seg.shape[-1]] for g in guides], seg_motion)
        if c.accumulate:   # the I-frame's logits (and luma) stay
            return out, state.replace(hidden=h, cell=cell, motion=acc)
        return out, state.replace(hidden=h, cell=cell, logits=out)

    def carry(self, motion_vectors: torch.Tensor, state: PFrameState) -> PFrameState:
        """A P-frame that gets no mask (the caller is behind; configurations that accumulate the
        motion): its vectors are added to the motion accumulated since the I-frame and the
        ConvLSTM state is warped along them; nothing else runs. The next P-frame's luma matching
        corrects the accumulated motion against its own luma, as it would have here."""
        c = self.config
        if not c.accumulate:
            raise ValueError(f"carry needs a configuration that accumulates the motion, not {c.name!r}")
        h, cell = state.hidden, state.cell
        if c.warp:
            hc = warp(torch.cat([h, cell], dim=1), motion_vectors)
            h, cell = hc[:, : h.shape[1]], hc[:, h.shape[1]:]
        acc = motion_vectors + warp(state.motion, motion_vectors)
        return state.replace(hidden=h, cell=cell, motion=acc)

    def _accumulated_motion(self, motion_vectors: torch.Tensor, state: PFrameState, luma: torch.Tensor | None
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the motion accumulated since the I-frame: content at p came from p + acc(p) in the
        I-frame, corrected against the luma where the configuration matches luma; the match
        guide, or None)."""
        c = self.config
        match = None
        acc = motion_vectors + warp(state.motion, motion_vectors)
        if c.uses_luma:
            i_frame_luma = state.i_frame_luma
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
