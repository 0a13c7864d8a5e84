"""Luma matching: correct the motion accumulated since the I-frame where it has carried an outline
off its object, by checking it against the pixels.

The accumulated motion ``acc`` (at H/4 cells, in input pixels) says where each cell's content was
in the I-frame. Built from block vectors and resampled frame after frame, it blends the motions
of an object and its background along their outline, and the I-frame's labels then trail behind
moving objects (cars, cyclists) or spread over the background. The decoder gives us the luma of
both pictures, so each cell can check its vector: the mean luma of the 3x3 cells around it in this
frame against the I-frame's luma where the vector points. Where the vector field bends (an
outline between two motions) and that check fails, the cell takes the vector of the neighbour
(3x3) that matches best, by a margin. The state keeps the corrected motion, so a correction carries on.

On the CPU a compiled loop (a few thousand cells of a 90x120 map are checked, fewer searched); elsewhere
(CUDA) the same decisions as tensor operations.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from cvseg_ros.common.jit import compiled
from cvseg_ros.common.kernels import cpu_kernels

#: the acc maps are at H/CELL; vectors are in input pixels. A cell tries its 3x3 neighbours'
#: vectors, each judged on the 3x3 cells around it.
CELL = 4
#: the 3x3 neighbourhood: the cell itself first (it wins ties), then row by row (the compiled
#: loop's order)
NEIGHBOURS = [(0, 0)] + [(di, dj) for di in (-1, 0, 1) for dj in (-1, 0, 1) if (di, dj) != (0, 0)]
#: a cell is searched only where the field bends by more than this (input pixels, |dx| + |dy|):
#: along a line through the cell (a row, a column or a diagonal), the vectors on either side sum
#: to more than this away from twice its own. At an outline between two motions the field steps
#: and bends on both sides of the step; inside a moving region it is smooth, even where it is
#: steep (driving forward, the vectors grow steadily towards the frame's edges), and every vector
#: is as good as its neighbours'
SPREAD = 2.5
#: the lines (row, column, diagonals) along which the bend is measured, each as one direction
BENDS = ((0, 1), (1, 0), (1, 1), (1, -1))
#: ... and only where its own vector matches worse than this (sum of |luma difference| over the
#: 3x3 cells, grey levels): about 4.5 per cell
GOOD = 40.0
#: a neighbour's vector must match better than the cell's own by this much (grey levels, summed)
MARGIN = 9.0
#: a neighbour's vector within this of one tried already is not tried (input pixels, |dx| + |dy|)
SAME = 1.5


@compiled(inline="always", fastmath=True)
def _patch_cost(luma, ref, i, j, vx, vy, limit):
    """Sum over the 3x3 cells around (i, j) of |luma - ref sampled at the cell + (vy, vx)| (cells;
    bilinear, border-clamped); may stop early once it reaches ``limit``."""
    h, w = luma.shape
    fy0, fx0 = np.floor(vy), np.floor(vx)
    fy, fx = np.float32(vy - fy0), np.float32(vx - fx0)
    oy, ox = int(fy0), int(fx0)
    one = np.float32(1)
    w00, w01, w10, w11 = (one - fx) * (one - fy), fx * (one - fy), (one - fx) * fy, fx * fy
    cost = np.float32(0)
    if 1 <= i < h - 1 and 1 <= j < w - 1 and 0 <= i - 1 + oy and i + 2 + oy < h and 0 <= j - 1 + ox and j + 2 + ox < w:
        for ii in range(i - 1, i + 2):   # inside the map: no clamping
            y0 = ii + oy
            for jj in range(j - 1, j + 2):
                x0 = jj + ox
                sample = w00 * ref[y0, x0] + w01 * ref[y0, x0 + 1] + w10 * ref[y0 + 1, x0] + w11 * ref[y0 + 1, x0 + 1]
                cost += abs(luma[ii, jj] - sample)
        return cost
    for ii in range(i - 1, i + 2):
        ii = min(max(ii, 0), h - 1)
        y0, y1 = min(max(ii + oy, 0), h - 1), min(max(ii + oy + 1, 0), h - 1)
        for jj in range(j - 1, j + 2):
            jj = min(max(jj, 0), w - 1)
            x0, x1 = min(max(jj + ox, 0), w - 1), min(max(jj + ox + 1, 0), w - 1)
            sample = w00 * ref[y0, x0] + w01 * ref[y0, x1] + w10 * ref[y1, x0] + w11 * ref[y1, x1]
            cost += abs(luma[ii, jj] - sample)
        if cost >= limit:
            break
    return cost


@compiled
def _mark_outlines(ax, ay, spread, outline):
    """outline[i, j] = the field (ax, ay) bends at (i, j) by more than ``spread`` in some direction
    (see :data:`BENDS`); cells on the map's border are not outlines."""
    h, w = ax.shape
    outline[:] = False
    for i in range(1, h - 1):
        for j in range(1, w - 1):
            for di, dj in BENDS:
                bend = (abs(ax[i + di, j + dj] + ax[i - di, j - dj] - 2 * ax[i, j])
                        + abs(ay[i + di, j + dj] + ay[i - di, j - dj] - 2 * ay[i, j]))
                if bend > spread:
                    outline[i, j] = True
                    break


@compiled(fastmath=True)
def _refine(acc, luma, ref, scale, spread, good, margin, same, out):
    """acc, out [B,2,h,w] (input pixels); luma, ref [B,h,w]. See the module docstring. Returns the
    number of cells searched."""
    batch, _, h, w = acc.shape
    searched = 0
    tried_x, tried_y = np.empty(9, np.float32), np.empty(9, np.float32)
    outline = np.empty((h, w), np.bool_)
    out[:] = acc
    for b in range(batch):
        frame_luma, i_frame_luma = luma[b], ref[b]
        _mark_outlines(acc[b, 0], acc[b, 1], spread, outline)
        for i in range(h):
            for j in range(w):
                if not outline[i, j]:
                    continue
                ax, ay = acc[b, 0, i, j], acc[b, 1, i, j]
                own = _patch_cost(frame_luma, i_frame_luma, i, j, ax * scale, ay * scale, np.float32(np.inf))
                if own <= good:
                    continue
                searched += 1
                best = own - margin
                tried_x[0], tried_y[0], tried = ax, ay, 1
                for qi in range(max(i - 1, 0), min(i + 2, h)):
                    for qj in range(max(j - 1, 0), min(j + 2, w)):
                        vx, vy = acc[b, 0, qi, qj], acc[b, 1, qi, qj]
                        seen = False
                        for k in range(tried):   # a vector (nearly) tried already
                            if abs(vx - tried_x[k]) + abs(vy - tried_y[k]) <= same:
                                seen = True
                                break
                        if seen:
                            continue
                        tried_x[tried], tried_y[tried], tried = vx, vy, tried + 1
                        cost = _patch_cost(frame_luma, i_frame_luma, i, j, vx * scale, vy * scale, best)
                        if cost < best:
                            best = cost
                            out[b, 0, i, j], out[b, 1, i, j] = vx, vy
    return searched


def neighbourhood(x: torch.Tensor, offsets=NEIGHBOURS) -> torch.Tensor:
    """[B,C,h,w] -> [B,len(offsets),C,h,w]: ``x[..., i + di, j + dj]`` for each ``(di, dj)`` of
    ``offsets`` (at most one cell away), indices clamped to the map. One border-replicating pad,
    views of it and one stack, however many offsets: on a GPU the launches do not grow with them."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return torch.stack([padded[..., 1 + di: 1 + di + h, 1 + dj: 1 + dj + w] for di, dj in offsets], dim=1)


@functools.lru_cache(maxsize=16)
def _constants(h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per map size and device, made once: the inner cells (the border cells are never outlines),
    and the normalised x and y coordinates of each patch cell (:data:`NEIGHBOURS` around each
    cell, clamped to the map) [1,1,9,h,w], as ``grid_sample`` reads them."""
    inside = torch.zeros(h, w, dtype=torch.bool, device=device)
    inside[1:-1, 1:-1] = True
    ys = torch.arange(h, dtype=torch.float32, device=device).view(1, h, 1).expand(1, h, w)
    xs = torch.arange(w, dtype=torch.float32, device=device).view(1, 1, w).expand(1, h, w)
    cells = neighbourhood(torch.stack([xs, ys], dim=1))[0]                       # [9,2,h,w], clamped
    gx = (2 * cells[:, 0] + 1) / w - 1
    gy = (2 * cells[:, 1] + 1) / h - 1
    return inside, gx[None, None], gy[None, None]


def outlines(acc: torch.Tensor, around: torch.Tensor | None = None) -> torch.Tensor:
    """[B,h,w] bool: where the field ``acc`` [B,2,h,w] bends by more than :data:`SPREAD` (as the
    compiled loop decides; the map's border cells are not outlines). ``around``:
    ``neighbourhood(acc)`` when the caller has it."""
    h, w = acc.shape[-2:]
    if around is None:
        around = neighbourhood(acc)
    # NEIGHBOURS 1..4 are (-1,-1), (-1,0), (-1,1), (0,-1); 8..5 the opposite cells: the four BENDS
    bends = (around[:, 1:5] + around[:, 5:].flip(1) - 2 * acc[:, None]).abs().sum(dim=2)
    return (bends > SPREAD).any(dim=1) & _constants(h, w, acc.device)[0]


def patch_costs(vectors: torch.Tensor, luma: torch.Tensor, ref: torch.Tensor, scale: float) -> torch.Tensor:
    """For each cell and candidate vector, the sum over the 3x3 cells around it of |luma - ref
    sampled at the cell + the vector| (``vectors`` [B,K,2,h,w] or [B,2,h,w], in input pixels,
    times ``scale`` in cells; bilinear, border-clamped) -> [B,K,h,w] or [B,h,w]. Tensor
    operations: one sampling call for all candidates and patch cells, their count independent of K."""
    single = vectors.dim() == 4
    if single:
        vectors = vectors[:, None]
    b, k, _, h, w = vectors.shape
    _, gx0, gy0 = _constants(h, w, vectors.device)
    v = vectors.float()
    # each patch cell displaced by the candidate vector (normalised coordinates): [B,K,9,h,w]
    gx = torch.add(gx0, v[:, :, 0:1], alpha=2 * scale / w)
    gy = torch.add(gy0, v[:, :, 1:2], alpha=2 * scale / h)
    grid = torch.stack([gx, gy], dim=-1).view(b, k * len(NEIGHBOURS) * h, w, 2)
    samples = F.grid_sample(ref.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    around = neighbourhood(luma.float())[:, None, :, 0]                                    # [B,1,9,h,w]
    costs = (around - samples.view(b, k, len(NEIGHBOURS), h, w)).abs().sum(dim=2)
    return costs[:, 0] if single else costs


def _refine_tensors(acc: torch.Tensor, luma: torch.Tensor, ref: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`_refine` as tensor operations (any device): the same decisions, all cells at once."""
    b, _, h, w = acc.shape
    candidates = neighbourhood(acc)                                          # [B,9,2,h,w]
    outline = outlines(acc, candidates)
    costs = patch_costs(candidates, luma, ref, scale)                        # [B,9,h,w]
    own = costs[:, 0]
    # the own vector comes first (it wins ties) and needs no margin; a neighbour within SAME of a
    # vector tried before it is not tried
    close = (candidates[:, :, None] - candidates[:, None]).abs().sum(dim=3) <= SAME   # [B,9,9,h,w]
    tried = [torch.ones_like(own, dtype=torch.bool)]
    for k in range(1, len(NEIGHBOURS)):
        tried.append(~(close[:, :k, k] & torch.stack(tried, dim=1)).any(dim=1))
    costs = torch.where(torch.stack(tried, dim=1), costs, float("inf"))
    costs[:, 0] = own - MARGIN
    choice = costs.argmin(dim=1, keepdim=True)                               # first minimum
    chosen = candidates.gather(1, choice[:, :, None].expand(b, 1, 2, h, w))[:, 0]
    keep = ~outline | (own <= GOOD)
    return torch.where(keep[:, None], acc, chosen)


def refine_accumulated_motion(acc: torch.Tensor, luma: torch.Tensor, i_frame_luma: torch.Tensor) -> torch.Tensor:
    """``acc`` [B,2,h,w] (input pixels, at H/4) checked against the pixels: ``luma`` and
    ``i_frame_luma`` [B,1,h,w] are the mean luma (0..255) of this frame's and the I-frame's
    H/4 cells. Returns the corrected motion (no gradient flows through the choice)."""
    if luma.shape[-2:] != acc.shape[-2:] or i_frame_luma.shape[-2:] != acc.shape[-2:]:
        raise ValueError(f"luma cells {tuple(luma.shape)} and I-frame luma cells {tuple(i_frame_luma.shape)} "
                         f"must cover the motion's {tuple(acc.shape[-2:])} cells")
    scale = 1.0 / CELL
    if not cpu_kernels(acc):
        with torch.no_grad():
            return _refine_tensors(acc.float(), luma.float(), i_frame_luma.float(), scale)
    a = acc.detach().float().contiguous().numpy()
    out = np.empty_like(a)
    _refine(a, luma.detach().float()[:, 0].contiguous().numpy(), i_frame_luma.detach().float()[:, 0].contiguous().numpy(),
            np.float32(scale), np.float32(SPREAD), np.float32(GOOD), np.float32(MARGIN), np.float32(SAME), out)
    return torch.from_numpy(out)


def warm_up() -> None:
    """Compile (or load from Numba's cache) the loop now, so no camera's first P-frame waits."""
    acc = torch.zeros(1, 2, 3, 3)
    acc[0, 0, 1, 1] = 8.0
    luma = torch.arange(9, dtype=torch.float32).view(1, 1, 3, 3) * 20
    refine_accumulated_motion(acc, luma, luma.flip(-1))
