"""Segmentation metrics: confusion matrix, per-class IoU, mIoU, pixel accuracy, mIoU by GOP position.

Conventions (CamVid, 11 classes):

* label pixels outside ``0..num_classes-1`` (CamVid void = 11) are ignored;
* a *predicted* id outside ``0..num_classes-1`` (e.g. 255 = no class) counts as wrong: it adds to
  the false negatives of the true class and to no class's false positives. The confusion matrix
  has one extra column for these predictions;
* IoU = TP / (TP + FP + FN); mIoU = the mean over the classes with TP + FP + FN > 0 (present in
  the labels or predicted on a non-void pixel); NaN when there is none;
* pixel accuracy = correct pixels / non-void pixels.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from cvseg_ros.model.classes import CAMVID_CLASSES

NUM_CLASSES = len(CAMVID_CLASSES)
MIOU_CLASSES = "classes with TP+FP+FN > 0 (present in the labels or predicted on a non-void pixel)"


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """``(num_classes, num_classes + 1)`` int64 counts: row = true class, column = predicted class,
    last column = predictions outside ``0..num_classes-1``. Void labels are not counted."""
    labels = np.asarray(labels)
    predictions = np.asarray(predictions)
    if labels.shape != predictions.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ in shape")
    lab = labels.astype(np.int64, copy=False).ravel()
    pred = predictions.astype(np.int64, copy=False).ravel()
    keep = (lab >= 0) & (lab < num_classes)
    lab, pred = lab[keep], pred[keep]
    pred = np.where((pred >= 0) & (pred < num_classes), pred, num_classes)
    counts = np.bincount(lab * (num_classes + 1) + pred, minlength=num_classes * (num_classes + 1))
    return counts.reshape(num_classes, num_classes + 1)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU of every class from a confusion matrix; NaN for a class with TP + FP + FN = 0."""
    conf = np.asarray(conf, dtype=np.float64)
    n = conf.shape[0]
    tp = np.diag(conf[:, :n])
    fn = conf.sum(axis=1) - tp              # includes the "no class" column
    fp = conf[:, :n].sum(axis=0) - tp       # "no class" predictions are nobody's false positive
    union = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)


def mean_iou(conf: np.ndarray) -> float:
    """Mean IoU over the classes with TP + FP + FN > 0; NaN when there is none."""
    ious = iou_per_class(conf)
    valid = ~np.isnan(ious)
    return float(ious[valid].mean()) if valid.any() else math.nan


def pixel_accuracy(conf: np.ndarray) -> float:
    """Correct / non-void pixels; NaN when there is no non-void pixel."""
    conf = np.asarray(conf)
    n = conf.shape[0]
    total = conf.sum()
    return float(np.trace(conf[:, :n]) / total) if total else math.nan


class SegmentationMetrics:
    """Accumulates the confusion matrix of a sequence, overall and per GOP position."""

    def __init__(self, num_classes: int = NUM_CLASSES, gop: int = 1,
                 class_names: Sequence[str] | None = None) -> None:
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else (
            list(CAMVID_CLASSES) if num_classes == NUM_CLASSES else [str(i) for i in range(num_classes)])
        self.confusion = np.zeros((num_classes, num_classes + 1), np.int64)
        self.by_position: list[np.ndarray] = [np.zeros_like(self.confusion) for _ in range(max(1, gop))]
        self.frames_by_position: list[int] = [0] * max(1, gop)
        self.frames = 0

    def update(self, labels: np.ndarray, predictions: np.ndarray, gop_position: int = 0) -> np.ndarray:
        """Add one frame; returns its confusion matrix."""
        if gop_position < 0:
            raise ValueError(f"negative GOP position {gop_position}")
        conf = confusion_matrix(labels, predictions, self.num_classes)
        while gop_position >= len(self.by_position):   # a longer GOP than announced
            self.by_position.append(np.zeros_like(self.confusion))
            self.frames_by_position.append(0)
        self.confusion += conf
        self.by_position[gop_position] += conf
        self.frames_by_position[gop_position] += 1
        self.frames += 1
        return conf

    def miou(self) -> float:
        return mean_iou(self.confusion)

    def pixel_accuracy(self) -> float:
        return pixel_accuracy(self.confusion)

    def per_class_iou(self) -> dict[str, float]:
        return dict(zip(self.class_names, (float(v) for v in iou_per_class(self.confusion))))

    def miou_by_gop_position(self) -> list[float]:
        """mIoU of the frames at each GOP position (confusion accumulated per position); NaN where
        no frame was seen."""
        return [mean_iou(c) if n else math.nan for c, n in zip(self.by_position, self.frames_by_position)]


def miou_by_gop_position(labels: Iterable[np.ndarray], predictions: Iterable[np.ndarray],
                         positions: Iterable[int], gop: int, num_classes: int = NUM_CLASSES) -> list[float]:
    """mIoU at each GOP position ``0..gop-1`` of a sequence of (label, prediction, position)."""
    acc = SegmentationMetrics(num_classes, gop)
    for lab, pred, pos in zip(labels, predictions, positions):
        acc.update(lab, pred, pos)
    return acc.miou_by_gop_position()


def nan_to_none(value):
    """NaN -> None (JSON null), recursively through lists and dicts."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [nan_to_none(v) for v in value]
    return value
