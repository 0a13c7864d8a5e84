"""ENet Cityscapes teacher (OpenCV DNN) for pseudo-labels.

The teacher is the e-Lab Torch7 ENet run by ``cv2.dnn.readNetFromTorch``
(needs opencv < 5). Input RGB/255, no mean; H and W multiples of 8; 20 outputs
(0 Unlabeled + 19 Cityscapes classes, :data:`cvseg_ros.model.classes.TEACHER_CLASSES`).
The PyTorch port of the same network lives in :mod:`cvseg_ros.model.enet`.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from cvseg_ros.common.paths import shared_data_dir
from cvseg_ros.common.sizes import round8
from cvseg_ros.model.classes import teacher_to_camvid

__all__ = ["Teacher", "default_teacher_path", "TEACHER_FILE"]

TEACHER_FILE = Path("teacher") / "enet-cityscapes.net"


def default_teacher_path() -> Path | None:
    """``teacher/enet-cityscapes.net`` in the shared data (:func:`shared_data_dir`) if it exists."""
    path = shared_data_dir() / TEACHER_FILE
    return path if path.is_file() else None


class Teacher:
    """ENet Cityscapes teacher on OpenCV DNN.

    ``input_size``: ``(height, width)`` the frame is resized to (multiples of 8;
    default ``(512, 1024)``, the training resolution), or ``None`` to keep the
    frame size rounded to the nearest multiple of 8. ``threads``: if given,
    ``cv2.setNumThreads(threads)`` (a process-wide OpenCV setting).

    An OpenCV net imported from Torch gives garbage when reused at another input
    size after its first forward, so one net is kept per input size. Calls are
    serialised by a lock (an OpenCV net is not safe to share between threads).
    """

    def __init__(self, path: str | Path | None = None, input_size: tuple[int, int] | None = (512, 1024),
                 threads: int | None = None):
        import cv2

        if path is None:
            path = default_teacher_path()
            if path is None:
                raise FileNotFoundError(f"teacher weights not found (looked for ../{TEACHER_FILE})")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"teacher weights not found: {self.path}")
        if input_size is not None:
            h, w = (int(v) for v in input_size)
            if h <= 0 or w <= 0 or h % 8 or w % 8:
                raise ValueError(f"input_size must be positive multiples of 8 (height, width), got {input_size}")
            input_size = (h, w)
        self.input_size = input_size
        if threads is not None:
            cv2.setNumThreads(int(threads))
        self._nets: dict[tuple[int, int], object] = {}
        self._lock = threading.Lock()
        # Load once now so a bad file (or OpenCV >= 5) fails here; the net is
        # kept for the first input size actually used (it has not run yet).
        self._spare = self._read_net()

    def _read_net(self):
        import cv2

        net = cv2.dnn.readNetFromTorch(str(self.path))
        net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
        return net

    def _net_for(self, size: tuple[int, int]):
        net = self._nets.get(size)
        if net is None:
            net, self._spare = (self._spare, None) if self._spare is not None else (self._read_net(), None)
            self._nets[size] = net
        return net

    def net_size(self, frame_hw: tuple[int, int]) -> tuple[int, int]:
        """The ``(height, width)`` the network runs at for a frame of ``frame_hw``."""
        if self.input_size is not None:
            return self.input_size
        return round8(frame_hw[0]), round8(frame_hw[1])

    def scores(self, rgb: np.ndarray) -> np.ndarray:
        """Raw teacher scores ``[20, h, w]`` float32 at the network size."""
        import cv2

        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected HxWx3 uint8 RGB, got {rgb.shape} {rgb.dtype}")
        h, w = self.net_size(rgb.shape[:2])
        blob = cv2.dnn.blobFromImage(rgb, scalefactor=1.0 / 255.0, size=(w, h), swapRB=False, crop=False)
        with self._lock:
            net = self._net_for((h, w))
            net.setInput(blob)
            out = net.forward()
        return out[0]

    def predict20(self, rgb: np.ndarray) -> np.ndarray:
        """Teacher ids (0..19) ``HxW`` uint8 at the frame size (nearest resize)."""
        import cv2

        labels = self.scores(rgb).argmax(axis=0).astype(np.uint8)
        H, W = rgb.shape[:2]
        if labels.shape != (H, W):
            labels = cv2.resize(labels, (W, H), interpolation=cv2.INTER_NEAREST)
        return labels

    def predict_camvid(self, rgb: np.ndarray) -> np.ndarray:
        """CamVid ids ``HxW`` uint8; 255 where the teacher says Unlabeled."""
        return teacher_to_camvid(self.predict20(rgb))
