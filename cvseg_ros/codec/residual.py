"""Residual in the pixel domain: the decoded frame minus the motion-compensated previous frame.

Stock FFmpeg does not export the coded residual, so (as CoViAR and TapLab do) we rebuild it from
the decoded luma: ``residual = Y_t - warp(Y_{t-1}, mv)`` with the block motion vectors.
"""
from __future__ import annotations

import cv2
import numpy as np

from cvseg_ros.codec.motion_vectors import GRID, field_shape, resize_field


class MotionCompensator:
    """Warps a previous luma plane along a motion field.

    One ``cv2.remap`` with a relative map (``WARP_RELATIVE_MAP``: the per-pixel vectors themselves,
    no absolute sampling grid to build) made by one nearest resize of the 2-channel field.
    """

    def warp(self, previous: np.ndarray, field: np.ndarray, grid: int = GRID) -> np.ndarray:
        """Sample ``previous`` (HxW) at ``p + mv(p)``: the encoder's prediction of the current frame."""
        height, width = previous.shape[:2]
        rows, cols = field.shape[1:]
        # block-constant vectors: nearest upsampling of the small (rows, cols, 2) field
        # (interleaved by cv2.merge: several times faster than NumPy's transposing copy)
        small = cv2.merge([np.ascontiguousarray(field[0]), np.ascontiguousarray(field[1])])
        offsets = cv2.resize(small, (cols * grid, rows * grid), interpolation=cv2.INTER_NEAREST)
        if offsets.shape[:2] != (height, width):
            offsets = np.ascontiguousarray(offsets[:height, :width])
        return cv2.remap(previous, offsets, None, interpolation=cv2.INTER_LINEAR | cv2.WARP_RELATIVE_MAP,
                         borderMode=cv2.BORDER_REPLICATE)

    def residual(self, current: np.ndarray, previous: np.ndarray, field: np.ndarray,
                 grid: int = GRID) -> np.ndarray:
        """``current - warp(previous, field)`` as int16 (HxW)."""
        predicted = self.warp(previous, field, grid)
        return cv2.subtract(current, predicted, dtype=cv2.CV_16S)


    def residual_of_frame(self, luma: np.ndarray, previous: np.ndarray, field: np.ndarray,
                          height: int, width: int) -> np.ndarray:
        """``luma`` minus ``previous`` warped along ``field`` (the vector field of a ``height`` x
        ``width`` frame), at the luma's size: at exactly half size each field cell covers 2x2
        pixels, at another size the field is resampled."""
        grid = GRID
        if luma.shape != (height, width):
            if luma.shape == field_shape(height, width, GRID // 2):
                grid, field = GRID // 2, field * np.float32(0.5)
            else:
                rows, cols = field_shape(*luma.shape)
                field = resize_field(field, rows, cols, luma.shape[1] / width, luma.shape[0] / height)
        return self.residual(luma, previous, field, grid)


def residual_stats(residual: np.ndarray, cell: int = 4) -> np.ndarray | None:
    """``(2, H/cell, W/cell) float32``: the mean and the mean absolute value of ``residual / 255``
    per ``cell`` x ``cell`` block -- what the model reduces the residual image to first
    (:meth:`cvseg_ros.model.p_frame.ResidualCNN.pool`, there times a constant), computed here
    with OpenCV's area resampling (an exact block mean for a whole number of blocks) instead of
    two full-resolution tensor poolings. None when the size is not a whole number of blocks."""
    height, width = residual.shape
    if height % cell or width % cell:
        return None
    r = residual.astype(np.float32)
    r /= 255.0
    size = (width // cell, height // cell)
    out = np.empty((2, size[1], size[0]), np.float32)
    out[0] = cv2.resize(r, size, interpolation=cv2.INTER_AREA)
    out[1] = cv2.resize(np.abs(r, out=r), size, interpolation=cv2.INTER_AREA)
    return out
