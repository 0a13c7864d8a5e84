"""The pipeline: H.264 access units of several cameras in, class-id masks out.

One :class:`SegmentationEngine` serves the node, the CLI, evaluation and benchmarks. Per camera it
keeps an :class:`~cvseg_ros.codec.decoder.H264StreamDecoder` and the model state (on the device); frames
that arrive in one :meth:`SegmentationEngine.process` call are run as one batch per kind, the
P-frames first (an I-frame's network costs about ten P-frames).

Modes (how P-frames are segmented; the same decode path for all):
``compressed`` (the paper's method), ``per_frame`` (the I-frame network on every frame) and
``iframe_copy`` (the I-frame's mask repeated on the P-frames: the paper's baseline).
"""
from __future__ import annotations

import collections
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import torch

from cvseg_ros.model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from cvseg_ros.common.jit import compiled
from cvseg_ros.model import enet, luma_matching
from cvseg_ros.model.inference import inference_copy
from cvseg_ros.model.segmenter import CompressedSegmenter, cat_states, resize_tap, split_state, warm_up_warp
from cvseg_ros.codec.motion_vectors import resize_field
from cvseg_ros.codec.residual import residual_stats
from cvseg_ros.codec.decoder import CompressedFrame, H264StreamDecoder, warm_up_motion_analysis

log = logging.getLogger(__name__)

MODES = ("compressed", "per_frame", "iframe_copy")
#: ``fp32``; ``bf16``: both networks under bf16 autocast; ``mixed``: the I-frame network in fp32,
#: the P-frame branch in bf16; ``auto``: ``mixed`` on a CPU with native bf16 (AVX512-BF16 or AMX),
#: else ``fp32``.
PRECISIONS = ("auto", "fp32", "bf16", "mixed")
UNKNOWN = 255


def native_bf16_cpu() -> bool:
    """True when this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16)."""
    from cvseg_ros.common.procfs import cpu_flags
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


_ALLOCATOR_TUNED = False


def tune_allocator() -> bool:
    """Keep the large, short-lived buffers of the networks in the heap (glibc ``mallopt``: no
    ``mmap`` for blocks below 32 MiB, no trimming below 512 MiB). Otherwise every I-frame, run
    between P-frames, maps its multi-megabyte activations afresh and page-faults them in
    (measured: about 10-15 % of an I-frame on the 2-core CPU). Process-wide, once; opt out with
    ``CVSEG_MALLOC_TUNING=0``. Returns whether it applied."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    import os
    import sys
    if not sys.platform.startswith("linux") or os.environ.get("CVSEG_MALLOC_TUNING", "1") == "0":
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 32 << 20) == 1 and libc.mallopt(m_trim_threshold, 512 << 20) == 1
    except (OSError, AttributeError):   # not glibc
        return False
    _ALLOCATOR_TUNED = bool(ok)
    return _ALLOCATOR_TUNED


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "mixed" if device.type == "cpu" and native_bf16_cpu() else "fp32"
    return precision


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


@compiled
def _arg_max_planes(x, out):
    """NCHW: class by class over whole planes (contiguous rows), keeping the running maximum."""
    best = np.empty(x.shape[2:], x.dtype)
    for b in range(x.shape[0]):
        best[:] = x[b, 0]
        out[b] = 0
        for c in range(1, x.shape[1]):
            plane = x[b, c]
            for y in range(x.shape[2]):
                for i in range(x.shape[3]):
                    if plane[y, i] > best[y, i]:
                        best[y, i] = plane[y, i]
                        out[b, y, i] = c


@functools.lru_cache(maxsize=None)
def _arg_max_last_kernel(classes: int):
    """NHWC: pixel by pixel over its classes (contiguous), compiled for this number of classes: as
    a constant of the loop it unrolls (0.74 -> 0.48 ms for a 360x480 I-frame's 11 classes)."""
    def arg_max_last(x, out):
        for b in range(x.shape[0]):
            for y in range(x.shape[1]):
                for i in range(x.shape[2]):
                    best, k = x[b, y, i, 0], 0
                    for c in range(1, classes):
                        if x[b, y, i, c] > best:
                            best, k = x[b, y, i, c], c
                    out[b, y, i] = k
    return compiled(arg_max_last)


def _class_ids_on_device(logits: torch.Tensor) -> torch.Tensor:
    """:func:`class_ids` as tensor operations (for a GPU): the class maximum, then the lowest
    class index reaching it."""
    num_classes = logits.shape[1]
    at_max = logits == logits.amax(dim=1, keepdim=True)
    # class c scores C-1-c where it reaches the maximum: the largest score is the lowest such class
    reverse = torch.arange(num_classes - 1, -1, -1, dtype=torch.uint8, device=logits.device).view(1, -1, 1, 1)
    return (num_classes - 1) - (at_max.to(torch.uint8) * reverse).amax(dim=1)


def class_ids(logits: torch.Tensor) -> np.ndarray:
    """[B,C,H,W] logits -> [B,H,W] uint8 arg-max over the classes (the first on ties; C <= 255),
    as ``logits.argmax(1)``. On the CPU a compiled loop over the logits in their memory layout
    (NCHW or channels-last): 11x360x480 in 0.2 ms, where ``argmax(1)`` takes 27 ms and the
    tensor formulation 4 ms. On a GPU the tensor formulation, and only the ids come to the host."""
    logits = logits.detach()
    if logits.device.type != "cpu":
        return _class_ids_on_device(logits).cpu().numpy()
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()   # NumPy has no bfloat16
    out = np.empty((logits.shape[0], *logits.shape[2:]), np.uint8)
    if logits.is_contiguous():
        _arg_max_planes(logits.numpy(), out)
    else:   # channels-last (the inference copy's I-frame logits), or any other strides
        _arg_max_last_kernel(logits.shape[1])(logits.permute(0, 2, 3, 1).numpy(), out)
    return out


@functools.lru_cache(maxsize=64)
def _bilinear_taps(n_out: int, n_in: int) -> tuple[np.ndarray, ...]:
    """Per output index of a bilinear resize from ``n_in`` to ``n_out`` (``align_corners=False``,
    border-clamped, as ``F.interpolate``): the two input indices, the second one's weight, and the
    starts of the runs of outputs that share their input indices (with ``n_out`` appended). Cached:
    the callers only read them."""
    first, second, weight = np.empty(n_out, np.int64), np.empty(n_out, np.int64), np.empty(n_out, np.float32)
    _fill_taps(n_in, first, second, weight)
    runs = np.flatnonzero(np.diff(first, prepend=-1)).astype(np.int64)
    return first, second, weight, np.append(runs, n_out)


@compiled
def _fill_taps(n_in, first, second, weight):
    """:func:`resize_tap` for every output index (``len(first)`` outputs from ``n_in`` samples)."""
    scale = np.float32(n_in / len(first))
    for i in range(len(first)):
        first[i], second[i], weight[i] = resize_tap(i, scale, n_in)


@compiled(fastmath=True)
def _mend_upsampled_ids(logits, ids, y0s, y1s, wys, y_runs, x0s, x1s, wxs, x_runs, out):
    """``out`` [H,W] holds, for each pixel, the class of one of its four bilinear cells in ``ids``
    [h,w] (the arg-max of ``logits`` [h,w,C]); rewrite each pixel whose four cells do not all rank
    the same class first: the class among theirs whose interpolated logit is largest (the lowest on
    ties)."""
    classes = np.empty(4, np.int64)
    corners = np.empty((4, 4), np.float32)
    one = np.float32(1)
    for ry in range(len(y_runs) - 1):
        ya, yb = y_runs[ry], y_runs[ry + 1]
        r0, r1 = y0s[ya], y1s[ya]
        for rx in range(len(x_runs) - 1):
            xa, xb = x_runs[rx], x_runs[rx + 1]
            c0, c1 = x0s[xa], x1s[xa]
            k00, k01, k10, k11 = ids[r0, c0], ids[r0, c1], ids[r1, c0], ids[r1, c1]
            if k00 == k01 and k00 == k10 and k00 == k11:
                continue   # an average of logits that all rank k first ranks k first: nearest is right
            n = 0   # the distinct classes, ascending
            for k in (k00, k01, k10, k11):
                t = n
                while t > 0 and classes[t - 1] > k:
                    t -= 1
                if t > 0 and classes[t - 1] == k:
                    continue
                for s in range(n, t, -1):
                    classes[s] = classes[s - 1]
                classes[t] = k
                n += 1
            for t in range(n):
                c = classes[t]
                corners[t, 0], corners[t, 1] = logits[r0, c0, c], logits[r0, c1, c]
                corners[t, 2], corners[t, 3] = logits[r1, c0, c], logits[r1, c1, c]
            for y in range(ya, yb):
                wy = wys[y]
                for x in range(xa, xb):
                    wx = wxs[x]
                    w00, w01, w10, w11 = (one - wy) * (one - wx), (one - wy) * wx, wy * (one - wx), wy * wx
                    best = w00 * corners[0, 0] + w01 * corners[0, 1] + w10 * corners[0, 2] + w11 * corners[0, 3]
                    label = classes[0]
                    for t in range(1, n):
                        v = w00 * corners[t, 0] + w01 * corners[t, 1] + w10 * corners[t, 2] + w11 * corners[t, 3]
                        if v > best:
                            best, label = v, classes[t]
                    out[y, x] = label


def upsampled_class_ids(logits: torch.Tensor, height: int, width: int, ids: np.ndarray | None = None) -> np.ndarray:
    """[1,C,h,w] logits -> [height, width] uint8 class ids of the logits resized bilinearly
    (``F.interpolate(..., mode="bilinear")``) to ``height`` x ``width``: smoother outlines than
    resizing the ids, at a fraction of the cost of resizing the logits. ``ids``: ``class_ids(logits)[0]``
    when the caller has it.

    On the CPU, pixels whose four bilinear cells all rank the same class first get it (exactly the
    resized logits' arg-max there); each other pixel gets, among the classes ranked first at its
    four cells, the one with the largest interpolated logit (in the tests, the full arg-max differs
    on about 0.02 % of the pixels, where a fifth class wins). On a GPU the exact arg-max
    (:func:`_upsampled_class_ids_on_device`), and only the ids come to the host."""
    logits = logits.detach()
    if logits.device.type != "cpu":
        return _upsampled_class_ids_on_device(logits, height, width)[0].cpu().numpy()
    if ids is None:
        ids = class_ids(logits)[0]
    rows, cols = _bilinear_taps(height, logits.shape[2]), _bilinear_taps(width, logits.shape[3])
    if height >= ids.shape[0] and width >= ids.shape[1]:
        # enlarging: a pixel's nearest cell is one of its four bilinear cells
        out = cv2.resize(ids, (width, height), interpolation=cv2.INTER_NEAREST)
    else:
        out = np.ascontiguousarray(ids[np.ix_(rows[0], cols[0])])   # the first of its four cells
    if logits.shape[1] < 2:
        return out
    # [h,w,C] in the logits' memory layout (compiled for both: the I-frames' channels-last, the
    # P-frames' NCHW); the loop reads only the cells of disagreeing pixels
    pixels = logits[0].permute(1, 2, 0).float().numpy()
    _mend_upsampled_ids(pixels, ids, *rows, *cols, out)
    return out


def _upsampled_class_ids_on_device(logits: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """:func:`upsampled_class_ids` as tensor operations (for a GPU): [B,C,h,w] -> [B,height,width]
    uint8, the arg-max of the bilinearly resized logits."""
    resized = torch.nn.functional.interpolate(logits.float(), size=(height, width), mode="bilinear",
                                              align_corners=False)
    return _class_ids_on_device(resized)


def warm_up_compiled(motion: bool, model: CompressedSegmenter | None = None) -> None:
    """Compile (or load from Numba's disk cache) the compiled loops now, so that no camera's
    first frame waits for them (about 1 s each without the cache): the labels' (for ``model``'s
    number of classes) and ENet's block ends'; with ``motion``, also the motion-vector field's,
    the luma matching's, the warp's and ``model``'s correction head's (compressed mode)."""
    config = getattr(model, "config", None)
    logits = torch.zeros(1, getattr(config, "num_classes", 2), 4, 4)
    for layout in (torch.contiguous_format, torch.channels_last):
        class_ids(logits.contiguous(memory_format=layout))
        upsampled_class_ids(logits.contiguous(memory_format=layout), 8, 8)
    enet.warm_up()
    if motion:
        warm_up_motion_analysis()
        luma_matching.warm_up()
        warm_up_warp()
        head = getattr(model, "head", None)
        if head is not None and next(head.parameters()).device.type == "cpu":
            head.warm_up()


from cvseg_ros.common.sizes import round8 as _round8  # noqa: E402


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
    state: tuple | None = None   # the model state (compressed mode)
    last_mask_small: np.ndarray | None = None   # the last I-frame's mask; None until the first one
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
                 precision: str = "auto", threads: int | None = None, optimize: bool = True,
                 luma_matching: bool = True, p_frame_branch: bool = True) -> None:
        """``precision``: see :data:`PRECISIONS`. ``optimize``: run an inference copy of the model
        (batch norms folded into the convolutions, channels-last): same outputs up to float
        rounding, less time. ``luma_matching=False``: do not correct the accumulated motion
        against the frames' luma even where the checkpoint's model does (less time per P-frame,
        less accuracy; see README). ``p_frame_branch=False`` (an ablation, for models that
        accumulate the motion): P-frames get the I-frame's logits warped along the accumulated
        motion, without the CNNs, the ConvLSTM and the correction head."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
        self.device = resolve_device(device)
        tune_allocator()
        if threads:
            torch.set_num_threads(threads)
        if model is None:
            model, metadata = load_checkpoint(checkpoint or DEFAULT_CHECKPOINT, self.device)
        model = model.to(self.device).eval()
        self.model = inference_copy(model) if optimize else model
        self.metadata = metadata or {}
        self.class_names: list[str] = list(self.metadata["classes"])
        self.palette = np.asarray(self.metadata["palette"], dtype=np.uint8)
        self.reference_height = int(self.metadata["input_size"][0])
        self.mode = mode
        self._uses_intra = bool(getattr(self.model.config, "intra", False))
        # the frames' luma cells, for the compressed mode's P-frames (without them the model uses the
        # accumulated motion as it is)
        self._uses_luma = bool(getattr(self.model.config, "uses_luma", False)) and luma_matching \
            and mode == "compressed"
        self._p_frame_branch = p_frame_branch
        if not p_frame_branch and not getattr(self.model.config, "accumulate", False):
            raise ValueError(f"p_frame_branch=False needs a model that accumulates the motion, not "
                             f"{getattr(self.model.config, 'name', '?')!r}")
        self._residual_stride = int(getattr(self.model.config, "residual_stride", 1))
        self._deblock_p_frames = bool(getattr(self.model.config, "deblock_p_frames", True))
        self.precision = resolve_precision(precision, self.device)
        self._i_dtype = torch.bfloat16 if self.precision == "bf16" else None
        self._p_dtype = torch.bfloat16 if self.precision in ("bf16", "mixed") else None
        self._cameras: dict[str, _Camera] = {}
        warm_up_compiled(motion=mode == "compressed", model=self.model)
        self._color_lut = np.zeros((256, 3), np.uint8)
        self._color_lut[: len(self.palette)] = self.palette

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
                residual=self._p_frame_branch))

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

    def stats(self, camera: str) -> dict:
        self.add_camera(camera)
        cam = self._cameras[camera]
        d = cam.decoder.stats.as_dict()
        d["masks_out"] = cam.masks_out
        d["discontinuities"] = cam.discontinuities
        return d

    def colorize(self, mask: np.ndarray) -> np.ndarray:
        """Class-id mask -> RGB image with the checkpoint's palette (unknown = black)."""
        mask = np.asarray(mask)
        if mask.ndim == 2 and mask.dtype == np.uint8:   # OpenCV table look-up: ~8x numpy's fancy indexing
            return cv2.LUT(cv2.merge([mask, mask, mask]), self._color_lut.reshape(256, 1, 3))
        return self._color_lut[mask]

    # -- the pipeline -----------------------------------------------------------------------------
    def work_size(self, height: int, width: int) -> tuple[int, int]:
        """Network input size: the frame scaled to the checkpoint's height, multiples of 8."""
        scale = min(1.0, self.reference_height / height)
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
        return h // self._residual_stride, w // self._residual_stride

    def process(self, units: Sequence[tuple[str, bytes, Any]],
                on_camera_done: Callable[[str, list[SegmentationResult]], None] | None = None
                ) -> list[SegmentationResult]:
        """Decode and segment a batch of ``(camera, access_unit, stamp)``; results in input order.
        ``on_camera_done(camera, results)`` is called as soon as all of a camera's decoded frames
        in this batch are done (before the other cameras' may be): P-frames run before I-frames,
        so a camera's P-frame mask need not wait for another camera's I-frame network. Cameras
        whose units decoded to no frame are not called back.

        Never raises on bad data: what cannot be decoded is counted in :meth:`stats`.
        """
        decoded: list[_Work] = []
        for camera, data, stamp in units:
            self.add_camera(camera)
            for frame in self._cameras[camera].decoder.feed(data, stamp):
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

    @torch.inference_mode()
    def _run_round(self, works: list[_Work], finished: Callable) -> None:
        """One frame per camera: ``finished(pairs of (work, result or None))`` after each group
        (P-frames first: they are cheap, an I-frame is not)."""
        i_works, p_works = [], []
        for w in works:
            cam = self._cameras[w.camera]
            needs_i = w.frame.reset or cam.last_mask_small is None or self.mode == "per_frame"
            if needs_i and w.frame.rgb is None:   # cannot restart without pixels: wait for a reset
                cam.decoder.mark_discontinuity("no image to restart the state from")
                finished([(w, None)])
                continue
            (i_works if needs_i else p_works).append(w)
        for group in self._group(p_works, key=lambda w: (w.work_size, self._state_shape(w.camera))):
            finished(self._run_p(group))
        for group in self._group(i_works, key=lambda w: w.work_size):
            finished(self._run_i(group))

    @staticmethod
    def _group(works, key):
        groups: dict = {}
        for w in works:
            groups.setdefault(key(w), []).append(w)
        return groups.values()

    def _state_shape(self, camera: str):
        state = self._cameras[camera].state
        return None if state is None else tuple(tuple(t.shape) for t in state)

    def _autocast(self, dtype: torch.dtype | None):
        if dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=dtype)

    @staticmethod
    def _batch(arrays: list[np.ndarray]) -> torch.Tensor:
        """[B, ...] tensor of same-shaped arrays (no copy for one array)."""
        if len(arrays) == 1:
            return torch.from_numpy(arrays[0]).unsqueeze(0)
        return torch.from_numpy(np.stack(arrays))

    def _rgb_tensor(self, works: list[_Work]) -> torch.Tensor:
        h, w = works[0].work_size
        arrays = []
        for wk in works:
            rgb = wk.frame.rgb
            if rgb.shape[:2] != (h, w):
                rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
            arrays.append(rgb)
        batch = self._batch(arrays).to(self.device, non_blocking=True)
        # NHWC memory seen as NCHW: channels-last strides, what the inference copy wants
        return batch.permute(0, 3, 1, 2).float().div_(255.0)

    def _p_tensors(self, works: list[_Work]) -> dict[str, torch.Tensor | None]:
        """The inputs of :meth:`CompressedSegmenter.p_frame` (``motion_vectors``, ``residual``,
        ``residual_stats``, ``intra``): the model only uses the residual's per-cell mean and mean
        |r|; they are computed here (OpenCV, from the int16 residual) and the full-resolution
        residual tensor is not made."""
        h, w = works[0].work_size
        rh, rw = h // self._residual_stride, w // self._residual_stride
        mvs, residuals, intras = [], [], []
        for wk in works:
            f = wk.frame
            mv = f.motion_vectors
            resized = mv.shape[1:] != (h // 4, w // 4)
            mvs.append(resize_field(mv, h // 4, w // 4, w / f.width, h / f.height) if resized else mv)
            if not self._p_frame_branch:   # the warp reads the vectors (and the luma) only
                continue
            intra = f.intra if f.intra is not None else np.zeros(mv.shape[1:], bool)
            if resized and self._uses_intra:
                intra = cv2.resize(intra.view(np.uint8), (w // 4, h // 4), interpolation=cv2.INTER_NEAREST) > 0
            intras.append(intra)
            # the reader computes the residual at the model's size already (residual_size)
            res = f.residual if f.residual is not None else np.zeros((rh, rw), np.int16)
            residuals.append(res if res.shape == (rh, rw) else cv2.resize(res, (rw, rh), interpolation=cv2.INTER_AREA))
        tensors = {"motion_vectors": self._batch(mvs).to(self.device, non_blocking=True),
                   "residual": None, "residual_stats": None, "intra": None}
        if self._uses_luma:
            tensors["luma"] = self._luma_tensor(works)
        if not self._p_frame_branch:
            return tensors
        if self._uses_intra:
            tensors["intra"] = self._batch(intras).to(self.device, non_blocking=True).unsqueeze(1).float()
        stats = [residual_stats(r, cell=4 // self._residual_stride) for r in residuals]
        if all(s is not None for s in stats):
            tensors["residual_stats"] = self._batch(stats).to(self.device, non_blocking=True)
        else:
            res_t = self._batch(residuals).to(self.device, non_blocking=True)
            tensors["residual"] = res_t.unsqueeze(1).float().div_(255.0)
        return tensors

    def _luma_tensor(self, works: list[_Work]) -> torch.Tensor | None:
        """[B,1,h/4,w/4] the frames' luma cells at the work size (None if a frame has none)."""
        h, w = works[0].work_size
        cells = []
        for wk in works:
            c = wk.frame.luma_cells
            if c is None:
                return None
            if c.shape != (h // 4, w // 4):
                c = cv2.resize(c, (w // 4, h // 4), interpolation=cv2.INTER_AREA)
            cells.append(c)
        return self._batch(cells).to(self.device, non_blocking=True).unsqueeze(1).float()

    def _masks(self, logits: torch.Tensor, works: list[_Work]) -> list[np.ndarray]:
        """Class ids at each frame's size: the arg-max of the logits, bilinearly resized where
        their size differs (P-frames at H/4, frames larger than the work size)."""
        ids = class_ids(logits)
        sizes = [(wk.frame.height, wk.frame.width) for wk in works]
        return [small if small.shape == size else upsampled_class_ids(logits[i: i + 1], *size, ids=small)
                for i, (small, size) in enumerate(zip(ids, sizes))]

    def _result(self, wk: _Work, mask: np.ndarray, network: str) -> tuple[_Work, SegmentationResult]:
        cam = self._cameras[wk.camera]
        cam.masks_out += 1
        f = wk.frame
        return wk, SegmentationResult(wk.camera, f.stamp, mask, f.kind, f.gop_index, f.reset,
                                      f.width, f.height, network)

    def _run_i(self, works: list[_Work]):
        with self._autocast(self._i_dtype):
            rgb = self._rgb_tensor(works)
            if self.mode == "compressed":
                logits, state = self.model.i_frame(rgb, luma=self._luma_tensor(works) if self._uses_luma else None)
            else:   # no P-frame ever uses a model state: the I-frame network's logits only
                logits, state = self.model.i_frame_net(rgb)[1], None
        masks = self._masks(logits, works)
        if state is None:
            states = [None] * len(works)
        else:
            states = [state] if len(works) == 1 else split_state(state, [1] * len(works))
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
        inputs = self._p_tensors(works)
        states = [self._cameras[wk.camera].state for wk in works]
        state = states[0] if len(works) == 1 else cat_states(states)
        with self._autocast(self._p_dtype):
            logits, state = self.model.p_frame(state=state, branch=self._p_frame_branch, **inputs)
        masks = self._masks(logits, works)
        out = []
        for wk, mask, st in zip(works, masks, [state] if len(works) == 1 else split_state(state, [1] * len(works))):
            self._cameras[wk.camera].state = st
            out.append(self._result(wk, mask, "p_frame"))
        return out
