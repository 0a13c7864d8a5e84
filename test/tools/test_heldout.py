"""The held-out check: reference labels from the Cityscapes teachers on real clips, ``cvseg eval``
on an unlabelled video and on JPEG frames, and ``cvseg heldout``'s sets and mean."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from conftest import SHARED_DATA, SMALL_CLIP, require
from cvseg_ros.model.classes import CAMVID_CLASSES
from cvseg_ros.tools import reference
from cvseg_ros.training import ensemble
from cvseg_ros.tools.cli import main

TEACHER = SHARED_DATA / "teacher" / "enet-cityscapes.net"
VAL = SHARED_DATA / "camvid" / "val"
pytestmark = pytest.mark.usefixtures("restore_threads")


def test_ensemble_labels_void_where_unsure_or_in_disagreement():
    """The rule itself: the mean's first class, void (11) where the mean is below the confidence,
    where a teacher's own first choice differs, or where a teacher's mass for no CamVid class wins."""
    sure = np.zeros((11, 1, 4), np.float32)
    sure[3] = 0.9                                   # both teachers: road, 0.9
    other = sure.copy()
    other[3, 0, 1], other[8, 0, 1] = 0.2, 0.7       # pixel 1: the second one says car
    other[3, 0, 2] = 0.3                            # pixel 2: mostly no CamVid class
    unsure = sure.copy()
    unsure[3, 0, 3] = 0.0
    unsure[3, 0, 3], unsure[5, 0, 3] = 0.45, 0.44   # pixel 3 (with the first: mean road 0.675 ...)
    labels = ensemble.ensemble_labels([sure, other], confidence=0.5)
    assert labels.tolist() == [[3, 11, 11, 3]]
    assert ensemble.ensemble_labels([sure, unsure], confidence=0.7).tolist() == [[3, 3, 3, 11]]


@pytest.fixture(scope="module")
def clip_frames():
    from cvseg_ros.tools.eval_data import video_frames
    frames, fps = video_frames(require(SMALL_CLIP, "real clip"), step=4, max_frames=3)
    assert fps > 0 and len(frames) == 3
    return frames


def test_reference_labels_follow_the_teacher_and_are_cached(clip_frames, monkeypatch, tmp_path):
    require(TEACHER, "the ENet teacher")
    from cvseg_ros.training.teacher import Teacher
    enet = ensemble.enet_probabilities(TEACHER, threads=1)
    calls = []
    counted = ensemble.CamvidProbabilities(enet.name, enet.path, lambda rgb: calls.append(1) or enet(rgb))
    monkeypatch.setattr(reference, "cache_dir", lambda: tmp_path)
    labels = reference.reference_labels(clip_frames, [counted], progress=False)
    assert len(calls) == 3
    direct = Teacher(TEACHER, threads=1)
    for rgb, label in zip(clip_frames, labels):
        assert label.shape == rgb.shape[:2] and label.dtype == np.uint8 and label.max() <= 11
        scored = label != 11
        assert 0.5 < scored.mean() < 1.0        # the teacher is sure of most of a road scene, not all
        # where it is sure, the summed CamVid mass and the teacher's own first class agree
        assert (label[scored] == direct.predict_camvid(rgb)[scored]).mean() > 0.97
    again = reference.reference_labels(clip_frames, [counted], progress=False)
    assert len(calls) == 3 and all(np.array_equal(a, b) for a, b in zip(labels, again))


def test_eval_on_an_unlabelled_video_at_its_own_size(tmp_path):
    require(TEACHER, "the ENet teacher")
    clip = require(SMALL_CLIP, "real clip")
    out = tmp_path / "v.json"
    assert main(["eval", "--video", str(clip), "--max-frames", "6", "--gop", "3", "--methods", "per_frame",
                 "iframe_copy", "--timing-passes", "1", "--device", "cpu", "--threads", "1",
                 "--json", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    height, width = cv2.VideoCapture(str(clip)).read()[1].shape[:2]
    assert (result["width"], result["height"], result["frames"]) == (width, height, 6)
    assert result["video"] == str(clip)
    assert [r.split(":")[0] for r in result["reference"]] == ["enet", "espnetv2"]   # both teachers by default
    assert 0.0 < result["reference_void_share"] < 0.5
    for name in ("per_frame", "iframe_copy"):
        assert 0.0 < result["methods"][name]["miou"] <= 1.0
    assert "teachers' ensemble" in (tmp_path / "eval.md").read_text()


def test_eval_takes_jpeg_frames(tmp_path):
    require(VAL, "CamVid val")
    frames, labels = tmp_path / "frames", tmp_path / "labels"
    frames.mkdir()
    labels.mkdir()
    for png in sorted(VAL.glob("*.png"))[:3]:
        cv2.imwrite(str(frames / f"{png.stem}.jpg"), cv2.imread(str(png)))
        label = cv2.imread(str(VAL.parent / "valannot" / png.name), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(labels / png.name), label)
    out = tmp_path / "j.json"
    assert main(["eval", "--frames", str(frames), "--labels", str(labels), "--gop", "3", "--methods",
                 "per_frame", "--timing-passes", "1", "--device", "cpu", "--json", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["frames"] == 3 and result["first_frame"].endswith(".jpg")
    assert result["methods"]["per_frame"]["miou"] > 0.4


def test_eval_wants_one_kind_of_input(tmp_path):
    with pytest.raises(SystemExit):
        main(["eval", "--json", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        main(["eval", "--video", "a.mp4", "--frames", "f", "--json", str(tmp_path / "x.json")])


def test_heldout_scores_every_set_and_their_mean(tmp_path):
    require(TEACHER, "the ENet teacher")
    require(SHARED_DATA / "clips", "the dashcam clips")
    from cvseg_ros.tools.heldout import run_heldout
    from cvseg_ros.training.data import HELD_OUT_CLIPS
    report = run_heldout(methods=["per_frame", "iframe_copy"], max_frames=3, include_val=False, fetch=False,
                         device="cpu", threads=1, progress=False, log=lambda _: None)
    assert [f"{s}.mp4" for s in report["sets"] if s != "vtest"] == list(HELD_OUT_CLIPS)
    for method in ("per_frame", "iframe_copy"):
        per_set = report["miou"][method]
        assert set(per_set) == set(report["sets"])
        assert report["mean_miou"][method] == pytest.approx(np.mean(list(per_set.values())), abs=1e-4)
    assert list(report["results"][report["sets"][0]]["methods"]["per_frame"]["per_class_iou"]) == list(CAMVID_CLASSES)
