"""The pipeline: H.264 access units of several cameras in, class-id masks out.

One :class:`SegmentationEngine` serves the node, the CLI, evaluation and benchmarks. Per camera it
keeps an :class:`~cvseg_ros.codec.decoder.H264StreamDecoder` and the model state (on the device); frames
that arrive in one :meth:`SegmentationEngine.process` call are run as one batch per kind, the
P-frames first (an I-frame's network costs about ten P-frames).

Modes (how P-frames are segmented; the same decode path for all):
``compressed`` (the paper's method), ``per_frame`` (the I-frame network on every frame) and
``iframe_copy`` (the I-frame's mask repeated on the P-frames: the paper's baseline).

The engine's parts: :mod:`.runtime` (device, precision, threads, allocator, warm-up of the compiled
loops), :mod:`.inputs` (the model's input tensors from decoded frames), :mod:`.labels` (class-id
masks from logits); this module keeps the cameras, batches their frames and runs the model.
"""
from __future__ import annotations

import collections
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import torch

from cvseg_ros.codec.decoder import CompressedFrame, H264StreamDecoder
from cvseg_ros.codec.limits import StreamLimits
from cvseg_ros.common.sizes import round8 as _round8
from cvseg_ros.engine.decoding import DecodePool
from cvseg_ros.engine.inputs import ModelInputs
from cvseg_ros.engine.labels import frame_masks
from cvseg_ros.engine.runtime import (PRECISIONS, autocast_dtypes, resolve_device, resolve_precision, set_threads,
                                      tune_allocator, warm_up_compiled)
from cvseg_ros.model.checkpoint import inference_defaults, load_checkpoint
from cvseg_ros.model.inference import inference_copy
from cvseg_ros.model.segmenter import CompressedSegmenter
from cvseg_ros.model.state import PFrameState

__all__ = ["MODES", "PRECISIONS", "SegmentationEngine", "SegmentationResult", "resolve_device", "resolve_precision"]

log = logging.getLogger(__name__)

MODES = ("compressed", "per_frame", "iframe_copy")
UNKNOWN = 255
#: the most frames one network call takes (more cameras' frames of a round: several calls), so
#: that many cameras with an IDR in the same round cannot make one batch of unbounded memory
MAX_BATCH = 8


@dataclass
class SegmentationResult:
    camera: str
    stamp: Any
    mask: np.ndarray          # HxW uint8 class ids at the frame's size, 255 = unknown
    kind: str                 # "I" / "P" / "B"
    gop_index: int
    reset: bool
    width: int
    height: int
    network: str              # which network made it: "i_frame", "p_frame" or "copy"


@dataclass
class _Camera:
    decoder: H264StreamDecoder
    state: PFrameState | None = None   # the model state (compressed mode)
    last_mask_small: np.ndarray | None = None   # the last I-frame's mask; None until the first one
    masks_out: int = 0
    discontinuities: int = 0


@dataclass
class _Work:
    """A decoded frame: its place among the call's frames, its camera, and its work size."""
    index: int
    camera: str
    frame: CompressedFrame
    work_size: tuple[int, int]


def _batches(works: list[_Work], key) -> list[list[_Work]]:
    """``works`` grouped by ``key``, each group cut into batches of at most :data:`MAX_BATCH`."""
    groups: dict = {}
    for w in works:
        groups.setdefault(key(w), []).append(w)
    return [g[i:i + MAX_BATCH] for g in groups.values() for i in range(0, len(g), MAX_BATCH)]


def _masks(logits: torch.Tensor, works: list[_Work]) -> list[np.ndarray]:
    """Class ids at each frame's size (:func:`~cvseg_ros.engine.labels.frame_masks`)."""
    return frame_masks(logits, [(wk.frame.height, wk.frame.width) for wk in works])


class SegmentationEngine:
    """Access units -> masks for any number of cameras. See the module docstring."""

    def __init__(self, checkpoint: str | Path | None = None, device: str = "auto", mode: str = "compressed",
                 model: CompressedSegmenter | None = None, metadata: dict | None = None,
                 precision: str = "auto", threads: int | None = None, optimize: bool = True,
                 luma_matching: bool = True, p_frame_branch: bool | None = None, decode_threads: int | None = 1) -> None:
        """``checkpoint``: a file or a name (``fast``, ``accurate``, ``auto``; see
        :func:`~cvseg_ros.model.checkpoint.resolve_checkpoint`). ``precision``: see :data:`PRECISIONS`.
        ``decode_threads``: how many cameras' access units of one :meth:`process` call are decoded
        and analysed at once (each camera's in order; decoding and the compiled analysis release the
        GIL); 1 (the default): one after the other; None or 0: one per core, at most
        :data:`~cvseg_ros.engine.decoding.MAX_DECODE_THREADS`. ``optimize``: run an inference copy of the model
        (batch norms folded into the convolutions, channels-last): same outputs up to float
        rounding, less time. ``luma_matching=False``: do not correct the accumulated motion
        against the frames' luma even where the checkpoint's model does (less time per P-frame,
        less accuracy; see README). ``p_frame_branch=False`` (for models that accumulate the
        motion): P-frames get the I-frame's logits warped along the accumulated motion, without the
        CNNs, the ConvLSTM and the correction head; None: the checkpoint's choice
        (:func:`~cvseg_ros.model.checkpoint.inference_defaults`)."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
        self._decoding = DecodePool(decode_threads)
        self.device = resolve_device(device)
        tune_allocator()
        set_threads(threads)
        if model is None:
            model, metadata = load_checkpoint(checkpoint, self.device)
        model = model.to(self.device).eval()
        self.model = inference_copy(model) if optimize else model
        self.metadata = metadata or {}
        self.class_names: list[str] = list(self.metadata["classes"])
        self.palette = np.asarray(self.metadata["palette"], dtype=np.uint8)
        self.work_height = int(inference_defaults(self.metadata)["work_height"] or self.metadata["input_size"][0])
        self.mode = mode
        config = self.model.config
        if p_frame_branch is None:
            p_frame_branch = inference_defaults(self.metadata)["p_frame_branch"]
        if not p_frame_branch and not getattr(config, "accumulate", False):
            raise ValueError(f"p_frame_branch=False needs a model that accumulates the motion, not "
                             f"{getattr(config, 'name', '?')!r}")
        self._inputs = ModelInputs(
            self.device, residual_stride=int(getattr(config, "residual_stride", 1)),
            intra=bool(getattr(config, "intra", False)),
            # the frames' luma cells, for the compressed mode's P-frames (without them the model uses
            # the accumulated motion as it is)
            luma=bool(getattr(config, "uses_luma", False)) and luma_matching and mode == "compressed",
            p_frame_branch=p_frame_branch)
        self.p_frame_branch = p_frame_branch
        #: what each camera's stream may ask of its decoder (refused beyond: ``over_limits``)
        self.limits = StreamLimits()
        #: whether :meth:`skim` carries a camera's state through a frame without a mask
        self._carries = mode == "compressed" and bool(getattr(config, "accumulate", False))
        self._deblock_p_frames = bool(getattr(config, "deblock_p_frames", True))
        self.precision = resolve_precision(precision, self.device)
        self._i_dtype, self._p_dtype = autocast_dtypes(self.precision)
        self._cameras: dict[str, _Camera] = {}
        warm_up_compiled(motion=mode == "compressed", model=self.model)
        self._color_lut = np.zeros((256, 3), np.uint8)
        self._color_lut[: len(self.palette)] = self.palette
        if self.device.type == "cuda":
            self.warm_up_device()

    # -- cameras --------------------------------------------------------------------------------
    def add_camera(self, camera: str) -> None:
        if camera not in self._cameras:
            # only the compressed mode needs the vectors and the residual (at the model's size; not
            # without the P-frame branch), and only it may skip the P-frames' deblocking (the other
            # modes' networks see their pixels)
            compressed = self.mode == "compressed"
            self._cameras[camera] = _Camera(H264StreamDecoder(
                camera, rgb_for_p_frames=self.mode == "per_frame", motion=compressed,
                residual_size=self.residual_size, deblock_p_frames=self._deblock_p_frames or not compressed,
                residual=self._inputs.p_frame_branch, limits=self.limits))

    @property
    def cameras(self) -> list[str]:
        return list(self._cameras)

    def mark_discontinuity(self, camera: str, reason: str = "gap") -> None:
        """Input was lost or reordered: the camera's next frame restarts the model state."""
        self.add_camera(camera)
        cam = self._cameras[camera]
        cam.discontinuities += 1
        cam.decoder.mark_discontinuity(reason)

    def decode_only(self, camera: str, data: bytes, stamp: Any = None) -> int:
        """Decode an access unit without segmenting it (the caller is behind): the decoder keeps
        its reference pictures; the caller marks a discontinuity before the camera's next
        :meth:`process`. Returns the frames decoded. Never raises on bad data."""
        self.add_camera(camera)
        # no image, vectors or residual for a frame that gets no mask (the next one restarts)
        return len(self._cameras[camera].decoder.feed(data, stamp, analyse=False))

    def skim(self, camera: str, data: bytes, stamp: Any = None) -> bool:
        """Decode an access unit that gets no mask (the caller is behind), carrying the camera's
        state through it where the model can (:meth:`CompressedSegmenter.carry`; the compressed
        mode, a P-frame continuing the state): True, the next frame needs no restart. Otherwise
        as :meth:`decode_only` (False: the caller marks a discontinuity). Never raises on bad data."""
        self.add_camera(camera)
        cam = self._cameras[camera]
        if not self._carries or cam.state is None:
            self.decode_only(camera, data, stamp)
            return False
        frames = cam.decoder.feed(data, stamp, residual=False)
        for f in frames:
            if f.kind == "B":           # nothing to carry: a B-frame's step is never kept
                continue
            if f.kind != "P" or f.reset or f.motion_vectors is None:
                cam.state = None        # an I-frame or a broken chain: the next frame restarts
                cam.decoder.mark_discontinuity("a frame without a mask could not carry the state")
                return False
            with torch.inference_mode(), self._autocast(self._p_dtype):
                cam.state = self.model.carry(self._inputs.motion_vectors([f], self.work_size(f.height, f.width)), cam.state)
        return bool(frames)

    def held_stamps(self, camera: str) -> list:
        """Stamps of the camera's units whose pictures its decoder holds back (B-frame streams)."""
        cam = self._cameras.get(camera)
        return cam.decoder.held_stamps() if cam is not None else []

    def stats(self, camera: str) -> dict:
        self.add_camera(camera)
        cam = self._cameras[camera]
        d = cam.decoder.stats.as_dict()
        d["masks_out"] = cam.masks_out
        d["discontinuities"] = cam.discontinuities
        return d

    def set_palette(self, palette: np.ndarray) -> None:
        """Colours of the classes (one RGB row each) for :meth:`colorize`, instead of the checkpoint's."""
        palette = np.asarray(palette, dtype=np.uint8)
        if palette.shape != self.palette.shape:
            raise ValueError(f"a palette of {len(self.class_names)} RGB colours is needed, got shape {palette.shape}")
        self.palette = palette
        self._color_lut[: len(palette)] = palette

    def colorize(self, mask: np.ndarray) -> np.ndarray:
        """Class-id mask -> RGB image with the palette (the checkpoint's unless set; unknown = black)."""
        mask = np.asarray(mask)
        if mask.ndim == 2 and mask.dtype == np.uint8:   # OpenCV table look-up: ~8x numpy's fancy indexing
            return cv2.LUT(cv2.merge([mask, mask, mask]), self._color_lut.reshape(256, 1, 3))
        return self._color_lut[mask]

    def warm_up_device(self, size: tuple[int, int] | None = None) -> list[tuple[int, int]]:
        """One I-frame and two P-frames of zeros through the model as the cameras' frames go, at
        ``size``, default at the work height in 16:9 and 4:3 (the work sizes of 1280x720, 960x540,
        640x480 cameras), so that no camera's first frames pay for the device's start-up (CUDA
        context, cuDNN's choice of kernels; on a CPU oneDNN's packed weights per input size: a
        first 720p I-frame of 0.46 s instead of 0.04 s, measured). Run at start-up by the engine
        on CUDA and by the node everywhere; touches no camera. Returns the sizes warmed up."""
        sizes = [size] if size else [(self.work_height, _round8(self.work_height * r)) for r in (16 / 9, 4 / 3)]
        for each in sizes:
            _warm_up(self, each)
        return sizes

    # -- the pipeline -----------------------------------------------------------------------------
    def work_size(self, height: int, width: int) -> tuple[int, int]:
        """Network input size: the frame scaled to the checkpoint's work height (never up), multiples of 8."""
        scale = min(1.0, self.work_height / height)
        return _round8(height * scale), _round8(width * scale)

    @property
    def restart_is_costly(self) -> bool:
        """Whether restarting a camera's state on a P-frame costs more than the P-frame would: it
        runs the I-frame network, which the ``compressed`` and ``iframe_copy`` modes run only on
        I-frames and ``per_frame`` runs on every frame."""
        return self.mode != "per_frame"

    def residual_size(self, height: int, width: int) -> tuple[int, int]:
        """Size of the residual image the model takes: the work size / the model's residual stride."""
        h, w = self.work_size(height, width)
        return h // self._inputs.residual_stride, w // self._inputs.residual_stride

    def process(self, units: Sequence[tuple[str, bytes, Any]],
                on_camera_done: Callable[[str, list[SegmentationResult]], None] | None = None
                ) -> list[SegmentationResult]:
        """Decode and segment a batch of ``(camera, access_unit, stamp)``; results in input order.
        ``on_camera_done(camera, results)`` is called as soon as all of a camera's decoded frames
        in this batch are done (before the other cameras' may be): P-frames run before I-frames,
        so a camera's P-frame mask need not wait for another camera's I-frame network. Cameras
        whose units decoded to no frame are not called back.

        Never raises on bad data: what cannot be decoded is counted in :meth:`stats`.
        A stream with B-frames gives its pictures in display order, some units later, each result
        under its own unit's stamp (:meth:`flush` gives the last ones at the end of a stream).
        """
        return self._segment(self._decode(units), on_camera_done)

    def flush(self, camera: str) -> list[SegmentationResult]:
        """End of ``camera``'s stream: the masks of the pictures its decoder holds back (a stream
        with B-frames), in display order; the camera then waits for an IDR."""
        if camera not in self._cameras:
            return []
        return self._segment([(camera, self._cameras[camera].decoder.flush())])

    def _segment(self, decoded_units: list[tuple[str, list[CompressedFrame]]],
                 on_camera_done: Callable[[str, list[SegmentationResult]], None] | None = None
                 ) -> list[SegmentationResult]:
        decoded: list[_Work] = []
        for camera, frames in decoded_units:
            for frame in frames:
                decoded.append(_Work(len(decoded), camera, frame, self.work_size(frame.height, frame.width)))
        results: list[SegmentationResult | None] = [None] * len(decoded)
        left = collections.Counter(w.camera for w in decoded)
        done: dict[str, list[SegmentationResult]] = collections.defaultdict(list)

        def finished(pairs: list[tuple[_Work, SegmentationResult | None]]) -> None:
            for w, res in pairs:
                if res is not None:
                    results[w.index] = res
                    done[w.camera].append(res)
                left[w.camera] -= 1
                if not left[w.camera] and on_camera_done is not None:
                    on_camera_done(w.camera, done[w.camera])

        # a camera with several frames in one call: run them in rounds, in order
        pending = decoded
        while pending:
            seen, this_round, later = set(), [], []
            for w in pending:
                (later if w.camera in seen else this_round).append(w)
                seen.add(w.camera)
            self._run_round(this_round, finished)
            pending = later
        return [r for r in results if r is not None]

    def _decode(self, units: Sequence[tuple[str, bytes, Any]]) -> list[tuple[str, list[CompressedFrame]]]:
        """(camera, frames) of every unit, in input order (:class:`~.decoding.DecodePool`)."""
        for camera, _, _ in units:
            self.add_camera(camera)
        return self._decoding.decode(units, lambda camera: self._cameras[camera].decoder)

    @property
    def decode_threads(self) -> int:
        return self._decoding.threads

    def close(self) -> None:
        """Stop the decoding threads (the engine decodes on the calling thread afterwards)."""
        self._decoding.close()

    @torch.inference_mode()
    def _run_round(self, works: list[_Work], finished: Callable) -> None:
        """One frame per camera: ``finished(pairs of (work, result or None))`` after each group
        (P-frames first: they are cheap, an I-frame is not)."""
        i_works, p_works = [], []
        for w in works:
            cam = self._cameras[w.camera]
            if w.frame.kind == "B" and self.mode != "per_frame" and (
                    cam.last_mask_small is None or (self.mode == "compressed" and (
                        cam.state is None or w.frame.motion_vectors is None))):
                finished([(w, None)])           # no state to step from: no mask (counted by the caller)
                continue
            needs_i = w.frame.reset or cam.last_mask_small is None or self.mode == "per_frame"
            if needs_i and w.frame.rgb is None:   # cannot restart without pixels: wait for a reset
                cam.decoder.mark_discontinuity("no image to restart the state from")
                finished([(w, None)])
                continue
            (i_works if needs_i else p_works).append(w)
        for group in _batches(p_works, key=lambda w: (w.work_size, self._state_shape(w.camera))):
            finished(self._run_p(group))
        for group in _batches(i_works, key=lambda w: w.work_size):
            finished(self._run_i(group))

    def _state_shape(self, camera: str):
        state = self._cameras[camera].state
        return None if state is None else state.shapes

    def _autocast(self, dtype: torch.dtype | None):
        if dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=dtype)

    def _result(self, wk: _Work, mask: np.ndarray, network: str) -> tuple[_Work, SegmentationResult]:
        cam = self._cameras[wk.camera]
        cam.masks_out += 1
        f = wk.frame
        return wk, SegmentationResult(wk.camera, f.stamp, mask, f.kind, f.gop_index, f.reset,
                                      f.width, f.height, network)

    def _run_i(self, works: list[_Work]):
        frames, size = [wk.frame for wk in works], works[0].work_size
        with self._autocast(self._i_dtype):
            rgb = self._inputs.rgb(frames, size)
            if self.mode == "compressed":
                luma = self._inputs.luma_cells(frames, size) if self._inputs.luma else None
                logits, state = self.model.i_frame(rgb, luma=luma)
            else:   # no P-frame ever uses a model state: the I-frame network's logits only
                logits, state = self.model.i_frame_net(rgb)[1], None
        masks = _masks(logits, works)
        states = [None] * len(works) if state is None else state.split([1] * len(works))
        out = []
        for wk, mask, st in zip(works, masks, states):
            cam = self._cameras[wk.camera]
            if wk.frame.kind != "B":
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
        inputs = self._inputs.p_frame([wk.frame for wk in works], works[0].work_size)
        state = PFrameState.cat([self._cameras[wk.camera].state for wk in works])
        with self._autocast(self._p_dtype):
            logits, state = self.model.p_frame(state=state, branch=self._inputs.p_frame_branch, **inputs)
        masks = _masks(logits, works)
        out = []
        for wk, mask, st in zip(works, masks, state.split([1] * len(works))):
            if wk.frame.kind != "B":    # a B-frame's step is not kept: no later frame refers to it
                self._cameras[wk.camera].state = st
            out.append(self._result(wk, mask, "p_frame"))
        return out


@torch.inference_mode()
def _warm_up(engine: SegmentationEngine, size: tuple[int, int]) -> None:
    """:meth:`SegmentationEngine.warm_up_device` at one size."""
    h, w = size
    zeros = functools.partial(torch.zeros, device=engine.device)
    cells = (h // 4, w // 4)
    luma = zeros(1, 1, *cells) if engine._inputs.luma else None
    with engine._autocast(engine._i_dtype):
        rgb = zeros(1, h, w, 3).permute(0, 3, 1, 2)   # channels-last, as ModelInputs.rgb
        if engine.mode == "compressed":
            logits, state = engine.model.i_frame(rgb, luma=luma)
        else:
            logits, state = engine.model.i_frame_net(rgb)[1], None
    frame_masks(logits, [(h, w)])
    if state is None:
        return
    branch = engine._inputs.p_frame_branch
    for _ in range(2):
        inputs = {"motion_vectors": zeros(1, 2, *cells), "residual": None, "luma": luma,
                  "residual_stats": zeros(1, 2, *cells) if branch else None,
                  "intra": zeros(1, 1, *cells) if branch and engine._inputs.intra else None}
        with engine._autocast(engine._p_dtype):
            logits, state = engine.model.p_frame(state=state, branch=branch, **inputs)
        frame_masks(logits, [(h, w)])
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
