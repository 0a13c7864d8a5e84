"""The pipeline: H.264 access units of several cameras in, class-id masks out.

One :class:`SegmentationEngine` serves the node, the CLI, evaluation and benchmarks. Per camera it
keeps an :class:`~cvseg_ros.stream.H264StreamDecoder` and the model state (on the device); frames
that arrive in one :meth:`SegmentationEngine.process` call are run as one batch per kind.

Modes (how P-frames are segmented; the same decode path for all):
``compressed`` (the paper's method), ``per_frame`` (the I-frame network on every frame) and
``iframe_copy`` (the I-frame's mask repeated on the P-frames: the paper's baseline).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch

from .checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from .model.segmenter import CompressedSegmenter, cat_states, split_state
from .stream import CompressedFrame, H264StreamDecoder

log = logging.getLogger(__name__)

MODES = ("compressed", "per_frame", "iframe_copy")
UNKNOWN = 255


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; a clear error for anything unusable."""
    device = (device or "auto").strip().lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available "
                             f"(torch {torch.__version__}); use 'cpu' or 'auto'")
        return torch.device(device)
    if device == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu' or 'cuda[:N]'")


def _round8(n: float) -> int:
    return max(8, int(round(n / 8.0)) * 8)


@dataclass
class SegmentationResult:
    camera: str
    stamp: Any
    mask: np.ndarray          # HxW uint8 class ids at the frame's size, 255 = unknown
    kind: str                 # "I" / "P"
    gop_index: int
    reset: bool
    width: int
    height: int
    network: str              # which network made it: "i_frame", "p_frame" or "copy"


@dataclass
class _Camera:
    decoder: H264StreamDecoder
    state: tuple | None = None
    last_mask_small: np.ndarray | None = None   # iframe_copy mode
    masks_out: int = 0
    discontinuities: int = 0


@dataclass
class _Work:
    """A decoded frame with the tensors the model needs, at the work size."""
    index: int
    camera: str
    frame: CompressedFrame
    work_size: tuple[int, int]
    tensors: dict = field(default_factory=dict)


class SegmentationEngine:
    """Access units -> masks for any number of cameras. See the module docstring."""

    def __init__(self, checkpoint: str | Path | None = None, device: str = "auto", mode: str = "compressed",
                 model: CompressedSegmenter | None = None, metadata: dict | None = None,
                 precision: str = "fp32", threads: int | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
        self.device = resolve_device(device)
        if threads:
            torch.set_num_threads(threads)
        if model is None:
            model, metadata = load_checkpoint(checkpoint or DEFAULT_CHECKPOINT, self.device)
        self.model = model.to(self.device).eval()
        self.metadata = metadata or {}
        self.class_names: list[str] = list(self.metadata["classes"])
        self.palette = np.asarray(self.metadata["palette"], dtype=np.uint8)
        self.reference_height = int(self.metadata["input_size"][0])
        self.mode = mode
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"unknown precision {precision!r}: 'fp32' or 'bf16'")
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        self._cameras: dict[str, _Camera] = {}
        self._color_lut = np.zeros((256, 3), np.uint8)
        self._color_lut[: len(self.palette)] = self.palette

    # -- cameras --------------------------------------------------------------------------------
    def add_camera(self, camera: str) -> None:
        if camera not in self._cameras:
            rgb_p = self.mode == "per_frame"
            self._cameras[camera] = _Camera(H264StreamDecoder(camera, rgb_for_p_frames=rgb_p))

    @property
    def cameras(self) -> list[str]:
        return list(self._cameras)

    def mark_discontinuity(self, camera: str, reason: str = "gap") -> None:
        """Input was lost or reordered: the camera's next frame restarts the model state."""
        self.add_camera(camera)
        cam = self._cameras[camera]
        cam.discontinuities += 1
        cam.decoder.mark_discontinuity(reason)

    def stats(self, camera: str) -> dict:
        self.add_camera(camera)
        cam = self._cameras[camera]
        d = cam.decoder.stats.as_dict()
        d["masks_out"] = cam.masks_out
        d["discontinuities"] = cam.discontinuities
        return d

    def colorize(self, mask: np.ndarray) -> np.ndarray:
        """Class-id mask -> RGB image with the checkpoint's palette (unknown = black)."""
        return self._color_lut[mask]

    # -- the pipeline -----------------------------------------------------------------------------
    def work_size(self, height: int, width: int) -> tuple[int, int]:
        """Network input size: the frame scaled to the checkpoint's height, multiples of 8."""
        scale = min(1.0, self.reference_height / height)
        return _round8(height * scale), _round8(width * scale)

    def process(self, units: Sequence[tuple[str, bytes, Any]]) -> list[SegmentationResult]:
        """Decode and segment a batch of ``(camera, access_unit, stamp)``; results in input order.

        Never raises on bad data: what cannot be decoded is counted in :meth:`stats`.
        """
        decoded: list[_Work] = []
        for camera, data, stamp in units:
            self.add_camera(camera)
            for frame in self._cameras[camera].decoder.feed(data, stamp):
                decoded.append(_Work(len(decoded), camera, frame, self.work_size(frame.height, frame.width)))
        results: list[SegmentationResult | None] = [None] * len(decoded)
        # a camera with several frames in one call: run them in rounds, in order
        pending = decoded
        while pending:
            seen, this_round, later = set(), [], []
            for w in pending:
                (later if w.camera in seen else this_round).append(w)
                seen.add(w.camera)
            for w, res in self._run_round(this_round):
                results[w.index] = res
            pending = later
        return [r for r in results if r is not None]

    @torch.inference_mode()
    def _run_round(self, works: list[_Work]) -> list[tuple[_Work, SegmentationResult]]:
        i_works, p_works = [], []
        for w in works:
            cam = self._cameras[w.camera]
            needs_i = w.frame.reset or cam.state is None or self.mode == "per_frame"
            if needs_i and w.frame.rgb is None:   # cannot restart without pixels: wait for a reset
                cam.decoder.mark_discontinuity("no image to restart the state from")
                continue
            (i_works if needs_i else p_works).append(w)
        out = []
        for group in self._group(i_works, key=lambda w: w.work_size):
            out.extend(self._run_i(group))
        for group in self._group(p_works, key=lambda w: (w.work_size, self._state_shape(w.camera))):
            out.extend(self._run_p(group))
        return out

    @staticmethod
    def _group(works, key):
        groups: dict = {}
        for w in works:
            groups.setdefault(key(w), []).append(w)
        return groups.values()

    def _state_shape(self, camera: str):
        state = self._cameras[camera].state
        return None if state is None else tuple(tuple(t.shape) for t in state)

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _rgb_tensor(self, works: list[_Work]) -> torch.Tensor:
        h, w = works[0].work_size
        arrays = []
        for wk in works:
            rgb = wk.frame.rgb
            if rgb.shape[:2] != (h, w):
                rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
            arrays.append(rgb)
        batch = torch.from_numpy(np.stack(arrays)).to(self.device, non_blocking=True)
        return batch.permute(0, 3, 1, 2).float().div_(255.0)

    def _p_tensors(self, works: list[_Work]) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = works[0].work_size
        mvs, residuals = [], []
        for wk in works:
            f = wk.frame
            mv = f.motion_vectors
            if mv.shape[1:] != (h // 4, w // 4):
                sx, sy = w / f.width, h / f.height
                mv = np.stack([cv2.resize(mv[0], (w // 4, h // 4), interpolation=cv2.INTER_NEAREST) * sx,
                               cv2.resize(mv[1], (w // 4, h // 4), interpolation=cv2.INTER_NEAREST) * sy])
            res = f.residual if f.residual is not None else np.zeros((f.height, f.width), np.int16)
            if res.shape != (h, w):
                res = cv2.resize(res, (w, h), interpolation=cv2.INTER_AREA)
            mvs.append(mv)
            residuals.append(res)
        mv_t = torch.from_numpy(np.stack(mvs)).to(self.device, non_blocking=True)
        res_t = torch.from_numpy(np.stack(residuals)).to(self.device, non_blocking=True)
        return mv_t, res_t.unsqueeze(1).float().div_(255.0)

    def _masks(self, logits: torch.Tensor, works: list[_Work]) -> list[np.ndarray]:
        """Decide labels at the logits' resolution, then nearest-resize the uint8 ids to the frame."""
        ids = logits.argmax(dim=1).to(torch.uint8).cpu().numpy()
        masks = []
        for small, wk in zip(ids, works):
            f = wk.frame
            if small.shape != (f.height, f.width):
                small = cv2.resize(small, (f.width, f.height), interpolation=cv2.INTER_NEAREST)
            masks.append(small)
        return masks

    def _result(self, wk: _Work, mask: np.ndarray, network: str) -> tuple[_Work, SegmentationResult]:
        cam = self._cameras[wk.camera]
        cam.masks_out += 1
        f = wk.frame
        return wk, SegmentationResult(wk.camera, f.stamp, mask, f.kind, f.gop_index, f.reset,
                                      f.width, f.height, network)

    def _run_i(self, works: list[_Work]):
        with self._autocast():
            logits, state = self.model.i_frame(self._rgb_tensor(works))
        masks = self._masks(logits, works)
        states = split_state(state, [1] * len(works))
        out = []
        for wk, mask, st in zip(works, masks, states):
            cam = self._cameras[wk.camera]
            cam.state = st
            cam.last_mask_small = mask
            out.append(self._result(wk, mask, "i_frame"))
        return out

    def _run_p(self, works: list[_Work]):
        if self.mode == "iframe_copy":
            out = []
            for wk in works:
                mask = self._cameras[wk.camera].last_mask_small
                if mask.shape != (wk.frame.height, wk.frame.width):
                    mask = cv2.resize(mask, (wk.frame.width, wk.frame.height), interpolation=cv2.INTER_NEAREST)
                out.append(self._result(wk, mask, "copy"))
            return out
        mv, residual = self._p_tensors(works)
        state = cat_states([self._cameras[wk.camera].state for wk in works])
        with self._autocast():
            logits, state = self.model.p_frame(mv, residual, state)
        masks = self._masks(logits, works)
        out = []
        for wk, mask, st in zip(works, masks, split_state(state, [1] * len(works))):
            self._cameras[wk.camera].state = st
            out.append(self._result(wk, mask, "p_frame"))
        return out
