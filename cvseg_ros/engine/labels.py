"""Class-id masks from logits: the arg-max over the classes, and the arg-max of the logits resized
bilinearly to the frame, computed without resizing them (compiled loops on the CPU; tensor
operations on a GPU, where only the ids come to the host)."""
from __future__ import annotations

import functools
from typing import Sequence

import cv2
import numpy as np
import torch

from cvseg_ros.common.jit import compiled
from cvseg_ros.common.kernels import cpu_kernels
from cvseg_ros.model.warping import resize_tap


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
    a constant of the loop it unrolls."""
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


def to_host(ids: torch.Tensor) -> np.ndarray:
    """The one device-to-host copy of a group's class ids (uint8)."""
    return ids.cpu().numpy()


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
    (NCHW or channels-last), far cheaper there than ``argmax(1)`` or the tensor formulation. On a
    GPU the tensor formulation, and only the ids come to the host."""
    logits = logits.detach()
    if not cpu_kernels(logits):
        return to_host(_class_ids_on_device(logits))
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
    if not cpu_kernels(logits):
        return to_host(_upsampled_class_ids_on_device(logits, height, width)[0])
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


def frame_masks(logits: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """[B,C,h,w] logits -> per frame the class ids at its ``(height, width)``: the arg-max, and
    where the size differs that of the bilinearly resized logits (:func:`upsampled_class_ids`).
    On a GPU the ids of the whole batch come to the host in one copy."""
    sizes = [tuple(size) for size in sizes]
    if not cpu_kernels(logits):
        return _frame_masks_on_device(logits.detach(), sizes)
    ids = class_ids(logits)
    return [small if small.shape == size else upsampled_class_ids(logits[i: i + 1], *size, ids=small)
            for i, (small, size) in enumerate(zip(ids, sizes))]


def _frame_masks_on_device(logits: torch.Tensor, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """:func:`frame_masks` as tensor operations: the frames of one size at once, every id in one
    copy to the host."""
    parts: list[torch.Tensor | None] = [None] * len(sizes)
    for size in dict.fromkeys(sizes):
        index = [i for i, s in enumerate(sizes) if s == size]
        group = logits if len(index) == len(sizes) else logits[index]
        ids = (_class_ids_on_device(group) if size == tuple(logits.shape[2:])
               else _upsampled_class_ids_on_device(group, *size))
        for i, frame_ids in zip(index, ids):
            parts[i] = frame_ids.flatten()
    flat = to_host(parts[0] if len(parts) == 1 else torch.cat(parts))
    out, start = [], 0
    for h, w in sizes:
        out.append(flat[start: start + h * w].reshape(h, w))
        start += h * w
    return out
