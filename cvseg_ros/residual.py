"""Residual in the pixel domain: the decoded frame minus the motion-compensated previous frame.

Stock FFmpeg does not export the coded residual, so (as CoViAR and TapLab do) we rebuild it from
the decoded luma: ``residual = Y_t - warp(Y_{t-1}, mv)`` with the block motion vectors.
"""
from __future__ import annotations

import cv2
import numpy as np

from .motion_vectors import GRID


class MotionCompensator:
    """Warps a previous luma plane along a motion field; keeps its sampling grids between frames."""

    def __init__(self) -> None:
        self._size: tuple[int, int] | None = None
        self._base_x: np.ndarray | None = None
        self._base_y: np.ndarray | None = None

    def _grids(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        if self._size != (height, width):
            self._base_x = np.tile(np.arange(width, dtype=np.float32), (height, 1))
            self._base_y = np.tile(np.arange(height, dtype=np.float32)[:, None], (1, width))
            self._size = (height, width)
        return self._base_x, self._base_y

    def warp(self, previous: np.ndarray, field: np.ndarray, grid: int = GRID) -> np.ndarray:
        """Sample ``previous`` (HxW) at ``p + mv(p)``: the encoder's prediction of the current frame."""
        height, width = previous.shape[:2]
        base_x, base_y = self._grids(height, width)
        rows, cols = field.shape[1:]
        # block-constant vectors: upsample the small field with nearest neighbour (cheap in cv2)
        mv_x = cv2.resize(field[0], (cols * grid, rows * grid), interpolation=cv2.INTER_NEAREST)
        mv_y = cv2.resize(field[1], (cols * grid, rows * grid), interpolation=cv2.INTER_NEAREST)
        map_x = base_x + mv_x[:height, :width]
        map_y = base_y + mv_y[:height, :width]
        return cv2.remap(previous, map_x, map_y, interpolation=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)

    def residual(self, current: np.ndarray, previous: np.ndarray, field: np.ndarray,
                 grid: int = GRID) -> np.ndarray:
        """``current - warp(previous, field)`` as int16 (HxW)."""
        predicted = self.warp(previous, field, grid)
        return cv2.subtract(current, predicted, dtype=cv2.CV_16S)
