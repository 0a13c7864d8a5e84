"""ENet teacher: Torch7 -> PyTorch conversion against OpenCV DNN, CamVid remap."""
from __future__ import annotations

import numpy as np
import pytest

from cvseg_ros.common.paths import shared_data_dir

from cvseg_ros.model.classes import (
    CAMVID_CLASSES,
    CAMVID_PALETTE,
    CITYSCAPES_TO_CAMVID,
    NO_CLASS,
    camvid_class_map,
    teacher_to_camvid,
)

DATA = shared_data_dir()
TEACHER = DATA / "teacher" / "enet-cityscapes.net"
FRAME = DATA / "camvid" / "val" / "0016E5_07959.png"

needs_data = pytest.mark.skipif(
    not (TEACHER.is_file() and FRAME.is_file()),
    reason=f"real data absent: needs {TEACHER} and {FRAME} (../shared/data next to the repo)",
)


def test_teacher_to_camvid_by_hand():
    labels = np.array([[0, 1, 2, 3], [4, 11, 14, 17], [19, 12, 9, 20]], dtype=np.uint8)
    expected = np.array([[255, 3, 4, 1], [1, 0, 8, 8], [10, 9, 5, 255]], dtype=np.uint8)
    out = teacher_to_camvid(labels)
    assert out.dtype == np.uint8 and out.shape == labels.shape
    np.testing.assert_array_equal(out, expected)
    # other integer dtypes, out-of-range ids -> no class
    np.testing.assert_array_equal(
        teacher_to_camvid(np.array([-1, 0, 5, 13, 18, 300], dtype=np.int64)),
        np.array([255, 255, 7, 10, 10, 255], dtype=np.uint8),
    )
    # every mapped teacher id lands in its group of the class map
    groups = camvid_class_map()
    assert len(groups) == len(CAMVID_CLASSES) == CAMVID_PALETTE.shape[0]
    for t, c in CITYSCAPES_TO_CAMVID.items():
        assert t in groups[c] and teacher_to_camvid(np.uint8([t]))[0] == c
    assert NO_CLASS == 255 and CAMVID_PALETTE.dtype == np.uint8 and CAMVID_PALETTE.shape == (11, 3)


@pytest.fixture(scope="module")
def frame():
    import cv2

    rgb = cv2.cvtColor(cv2.imread(str(FRAME)), cv2.COLOR_BGR2RGB)
    assert rgb.shape == (360, 480, 3)
    return rgb


@pytest.fixture(scope="module")
def torch_labels20(frame):
    import torch

    from cvseg_ros.model.enet_torch7 import enet_from_torch7

    model = enet_from_torch7(TEACHER)
    x = torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255.0
    with torch.inference_mode():
        feats, logits = model.forward_features(x)
    assert feats.shape == (1, 128, 45, 60)
    assert logits.shape == (1, 20, 360, 480)
    return logits[0].argmax(0).numpy().astype(np.uint8), x


@needs_data
def test_torch_enet_matches_opencv_teacher(frame, torch_labels20):
    from cvseg_ros.training.teacher import Teacher, default_teacher_path

    assert default_teacher_path() is not None and default_teacher_path().samefile(TEACHER)
    teacher = Teacher(TEACHER, input_size=None, threads=2)
    ref = teacher.predict20(frame)
    assert ref.shape == frame.shape[:2] and ref.dtype == np.uint8
    agree = float((ref == torch_labels20[0]).mean())
    assert agree >= 0.98, f"PyTorch ENet agrees with OpenCV DNN on only {agree:.2%} of pixels"

    cam = teacher.predict_camvid(frame)
    np.testing.assert_array_equal(cam, teacher_to_camvid(ref))
    # one net per input size: a different size in between must not disturb it
    small = teacher.predict20(frame[::2, ::2].copy())
    assert small.shape == (180, 240)
    np.testing.assert_array_equal(teacher.predict20(frame), ref)


@needs_data
def test_remapped_camvid_head_follows_teacher_mapping(torch_labels20):
    import torch

    from cvseg_ros.model.enet_torch7 import enet_from_torch7

    labels20, x = torch_labels20
    model11 = enet_from_torch7(TEACHER, num_classes=11, class_map=camvid_class_map())
    assert model11.classifier.out_channels == 11
    with torch.inference_mode():
        pred11 = model11(x)[0].argmax(0).numpy()
    mapped = teacher_to_camvid(labels20)
    valid = mapped != NO_CLASS
    assert valid.mean() > 0.5
    agree = float((pred11[valid] == mapped[valid]).mean())
    assert agree >= 0.95, f"11-class head agrees with the mapped 20-class argmax on only {agree:.2%}"
