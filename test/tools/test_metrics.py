"""Metrics against a confusion matrix computed by hand (void pixels and a 255 prediction included)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cvseg_ros.tools.metrics import (
    NUM_CLASSES,
    SegmentationMetrics,
    confusion_matrix,
    iou_per_class,
    mean_iou,
    miou_by_gop_position,
    nan_to_none,
    pixel_accuracy,
)

# 11 = void (ignored, whatever is predicted there); 255 = "no class" prediction (wrong)
LABEL = np.array([[0, 0, 1, 1],
                  [2, 2, 11, 11],
                  [0, 1, 2, 11]], dtype=np.uint8)
PRED = np.array([[0, 1, 1, 1],
                 [2, 0, 5, 255],
                 [255, 1, 2, 3]], dtype=np.uint8)


def test_confusion_matrix_by_hand():
    conf = confusion_matrix(LABEL, PRED)
    assert conf.shape == (NUM_CLASSES, NUM_CLASSES + 1)
    expected = np.zeros((NUM_CLASSES, NUM_CLASSES + 1), np.int64)
    expected[0, 0] = 1            # (0,0)
    expected[0, 1] = 1            # (0,1) Sky predicted Building
    expected[0, NUM_CLASSES] = 1  # (2,0) Sky predicted 255: nobody's false positive
    expected[1, 1] = 3            # (0,2) (0,3) (2,1)
    expected[2, 2] = 2            # (1,0) (2,2)
    expected[2, 0] = 1            # (1,1) Pole predicted Sky
    np.testing.assert_array_equal(conf, expected)   # the 5, 255 and 3 on void pixels are ignored
    assert conf.sum() == 9                          # non-void pixels


def test_iou_miou_accuracy_by_hand():
    conf = confusion_matrix(LABEL, PRED)
    iou = iou_per_class(conf)
    # Sky: TP 1, FP 1 (the Pole pixel), FN 2 (a Building and a 255 prediction) -> 1/4
    assert iou[0] == pytest.approx(1 / 4)
    # Building: TP 3, FP 1, FN 0 -> 3/4 ; Pole: TP 2, FP 0, FN 1 -> 2/3
    assert iou[1] == pytest.approx(3 / 4)
    assert iou[2] == pytest.approx(2 / 3)
    # classes 3 and 5 are predicted only on void pixels: absent, like every other class
    assert np.isnan(iou[3:]).all()
    assert mean_iou(conf) == pytest.approx((1 / 4 + 3 / 4 + 2 / 3) / 3)
    assert pixel_accuracy(conf) == pytest.approx(6 / 9)


def test_accumulator_and_gop_positions():
    m = SegmentationMetrics(gop=3)
    perfect = LABEL.copy()
    m.update(LABEL, PRED, 0)
    m.update(LABEL, perfect, 1)
    m.update(LABEL, PRED, 0)
    assert m.frames == 3 and m.frames_by_position == [2, 1, 0]
    # sums of identical frames: same ratios
    assert m.miou_by_gop_position()[0] == pytest.approx((1 / 4 + 3 / 4 + 2 / 3) / 3)
    assert m.miou_by_gop_position()[1] == pytest.approx(1.0)
    assert math.isnan(m.miou_by_gop_position()[2])
    # overall (3 pixels of each class per frame): Sky TP 1+1+3, FP 2, FN 4 -> 5/11 ;
    # Building TP 9, FP 2 -> 9/11 ; Pole TP 2+2+3, FN 2 -> 7/9
    assert m.per_class_iou()["Sky"] == pytest.approx(5 / 11)
    assert m.per_class_iou()["Building"] == pytest.approx(9 / 11)
    assert m.per_class_iou()["Pole"] == pytest.approx(7 / 9)
    assert m.miou() == pytest.approx((5 / 11 + 9 / 11 + 7 / 9) / 3)
    assert m.pixel_accuracy() == pytest.approx((6 + 9 + 6) / 27)
    assert miou_by_gop_position([LABEL, LABEL], [PRED, perfect], [0, 1], gop=2) == pytest.approx(
        [(1 / 4 + 3 / 4 + 2 / 3) / 3, 1.0])
    assert nan_to_none({"a": [math.nan, 1.0]}) == {"a": [None, 1.0]}


def test_edge_cases():
    void = np.full((2, 2), 11, np.uint8)
    conf = confusion_matrix(void, np.zeros((2, 2), np.uint8))
    assert conf.sum() == 0 and math.isnan(mean_iou(conf)) and math.isnan(pixel_accuracy(conf))
    # all wrong with 255: IoU 0 for the labelled class, no other class appears
    conf = confusion_matrix(np.zeros((2, 2), np.uint8), np.full((2, 2), 255, np.uint8))
    assert mean_iou(conf) == 0.0 and pixel_accuracy(conf) == 0.0
    with pytest.raises(ValueError):
        confusion_matrix(LABEL, PRED[:2])
