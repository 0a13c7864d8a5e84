"""Motion vectors: FFmpeg's exported H.264 blocks -> a dense field on a regular grid.

The field has 2 channels (x, y) in pixels on a grid of ``GRID`` px cells and follows FFmpeg's
convention for P-frames: the content at pixel ``p`` of the current frame was predicted from
``p + mv`` in the previous frame (``src = dst + motion / motion_scale``).
"""
from __future__ import annotations

import numpy as np

GRID = 4  # pixels per field cell: the smallest H.264 partition FFmpeg reports is 4x4 / 8x8


def field_shape(height: int, width: int, grid: int = GRID) -> tuple[int, int]:
    """Rows and columns of the field for a frame of the given size."""
    return -(-height // grid), -(-width // grid)


def dense_field(blocks: np.ndarray | None, height: int, width: int,
                grid: int = GRID) -> tuple[np.ndarray, np.ndarray]:
    """Paint exported motion-vector blocks onto a grid.

    ``blocks`` is ``side_data["MOTION_VECTORS"].to_ndarray()`` (fields dst_x, dst_y (block centre),
    w, h, motion_x, motion_y, motion_scale, source). Returns ``(field, intra)``: ``field`` is
    ``(2, rows, cols) float32`` in pixels with sub-pixel precision, ``intra`` is ``(rows, cols) bool``,
    true for cells no inter block covers (intra-coded blocks carry no vector; their field is 0).
    Only past-reference (``source < 0``) vectors are used.
    """
    rows, cols = field_shape(height, width, grid)
    field = np.zeros((2, rows, cols), np.float32)
    intra = np.ones((rows, cols), bool)
    if blocks is None or len(blocks) == 0:
        return field, intra
    blocks = blocks[blocks["source"] < 0]
    scale = np.maximum(blocks["motion_scale"].astype(np.float32), 1.0)
    mvx = blocks["motion_x"].astype(np.float32) / scale
    mvy = blocks["motion_y"].astype(np.float32) / scale
    bw = blocks["w"].astype(np.int32)
    bh = blocks["h"].astype(np.int32)
    # top-left cell of each block (dst is the block centre)
    cx0 = (blocks["dst_x"].astype(np.int32) - bw // 2) // grid
    cy0 = (blocks["dst_y"].astype(np.int32) - bh // 2) // grid
    ncx = np.maximum(bw // grid, 1)
    ncy = np.maximum(bh // grid, 1)
    for dy in range(int(ncy.max())):
        for dx in range(int(ncx.max())):
            sel = (dy < ncy) & (dx < ncx)
            y = cy0[sel] + dy
            x = cx0[sel] + dx
            inside = (y >= 0) & (y < rows) & (x >= 0) & (x < cols)
            y, x = y[inside], x[inside]
            field[0, y, x] = mvx[sel][inside]
            field[1, y, x] = mvy[sel][inside]
            intra[y, x] = False
    return field, intra


def upsample_field(field: np.ndarray, height: int, width: int, grid: int = GRID) -> np.ndarray:
    """Nearest (block-constant) upsampling of a field to ``(2, height, width)``."""
    return np.repeat(np.repeat(field, grid, axis=1), grid, axis=2)[:, :height, :width]
