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
    if len(blocks) == 0:
        return field, intra
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
    # every cell of every block at once (no Python loop over blocks or cells): block b covers
    # cells k = 0 .. ncx*ncy-1, row k // ncx, column k % ncx (blocks of a P-frame do not overlap)
    cells = ncx * ncy
    owner = np.repeat(np.arange(len(blocks), dtype=np.int32), cells)
    k = np.arange(owner.size, dtype=np.int32) - np.repeat(np.cumsum(cells, dtype=np.int32) - cells, cells)
    width_of = ncx[owner]
    y = cy0[owner] + k // width_of
    x = cx0[owner] + k % width_of
    inside = (y >= 0) & (y < rows) & (x >= 0) & (x < cols)
    if not inside.all():
        y, x, owner = y[inside], x[inside], owner[inside]
    flat = y * cols + x
    field[0].reshape(-1)[flat] = mvx[owner]
    field[1].reshape(-1)[flat] = mvy[owner]
    intra.reshape(-1)[flat] = False
    return field, intra


def fill_intra(field: np.ndarray, intra: np.ndarray, sizes: tuple[int, ...] = (5, 23)) -> np.ndarray:
    """Vectors for the intra cells, which carry none: the mean of the inter cells' vectors around
    each (windows of ``sizes`` cells, the smallest one with any inter cell; cells with none in the
    largest window keep 0). Inter cells are unchanged. In a moving camera's P-frames about a sixth
    of the cells are intra-coded; as zero motion they would pin content in place while the rest
    of the picture moves. Returns a new field (or ``field`` when there is nothing to fill)."""
    import cv2

    if not intra.any() or intra.all():
        return field
    # vx, vy and 1 on inter cells, 0 on intra ones: box sums give sum(v) and the count per window
    inter = (~intra).astype(np.float32)
    planes = (field[0] * inter, field[1] * inter, inter)
    fill_x = fill_y = None
    for size in reversed(sizes):   # larger windows first, smaller ones overwrite where they see any
        sum_x, sum_y, count = (cv2.blur(p, (size, size), borderType=cv2.BORDER_CONSTANT) for p in planes)
        inverse = 1.0 / np.maximum(count, 1e-6)     # means ~0 where the window has no inter cell
        if fill_x is None:
            fill_x, fill_y = sum_x * inverse, sum_y * inverse
        else:
            seen = count > 1e-6
            fill_x = np.where(seen, sum_x * inverse, fill_x)
            fill_y = np.where(seen, sum_y * inverse, fill_y)
    return np.stack([np.where(intra, fill_x, field[0]), np.where(intra, fill_y, field[1])])


def resize_field(field: np.ndarray, rows: int, cols: int, scale_x: float, scale_y: float) -> np.ndarray:
    """A field for another image size: nearest resampling of the cells to ``(rows, cols)``, vectors
    scaled by ``scale_x`` / ``scale_y`` (new image size / old image size)."""
    import cv2

    if field.shape[1:] == (rows, cols) and scale_x == 1.0 and scale_y == 1.0:
        return field
    return np.stack([cv2.resize(field[0], (cols, rows), interpolation=cv2.INTER_NEAREST) * np.float32(scale_x),
                     cv2.resize(field[1], (cols, rows), interpolation=cv2.INTER_NEAREST) * np.float32(scale_y)])


def upsample_field(field: np.ndarray, height: int, width: int, grid: int = GRID) -> np.ndarray:
    """Nearest (block-constant) upsampling of a field to ``(2, height, width)``."""
    return np.repeat(np.repeat(field, grid, axis=1), grid, axis=2)[:, :height, :width]
