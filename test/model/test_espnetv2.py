"""ESPNetv2 Cityscapes network: the published weights load safely and strictly, give sensible
street segmentations on real CamVid stills (checked against the ENet teacher and CamVid's own
labels, with a deliberately broken copy as the negative control), and a mismatching file is refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA, require
from cvseg_ros.model import espnetv2
from cvseg_ros.model.espnetv2 import ESPNetv2Seg, espnetv2_cityscapes

WEIGHTS = SHARED_DATA / "teacher" / "espnetv2_s_2.0_city_1024x512.pth"
ENET = SHARED_DATA / "teacher" / "enet-cityscapes.net"
CAMVID = SHARED_DATA / "camvid"
#: one still of each CamVid sequence and the first val frame (480x360, with labels)
STILLS = ["train/0001TP_006690.png", "train/0006R0_f02670.png", "train/0016E5_04620.png", "val/0016E5_07959.png"]
# Measured on these stills: argmax agreement with ENet 0.78 (per still 0.71-0.90), CamVid pixel
# accuracy 0.92 (ENet itself: 0.78). Broken copies: random weights 0.18 / 0.12, one pair of EESP
# expand weights swapped 0.47 / 0.48, no mean/std 0.64 / 0.65, BGR input 0.79 / 0.85.
MIN_AGREEMENT = 0.70
MIN_ACCURACY = 0.88

pytestmark = pytest.mark.usefixtures("restore_threads", "one_torch_thread")


@pytest.fixture(scope="module")
def stills():
    from cvseg_ros.training.data import read_label, read_rgb
    require(CAMVID / "train", "CamVid stills")
    return [(read_rgb(CAMVID / name), read_label(CAMVID / name.replace("/", "annot/"))) for name in STILLS]


def test_the_published_weights_load_safely_and_give_20_logits_at_the_input_size():
    net = espnetv2_cityscapes(require(WEIGHTS, "the ESPNetv2 weights"))
    assert not net.training
    assert 0.78e6 < sum(p.numel() for p in net.parameters()) < 0.80e6
    with torch.inference_mode():
        out = net(torch.randn(1, 3, 512, 1024))
    assert out.shape == (1, 20, 512, 1024) and torch.isfinite(out).all()


def _scores(stills, enet_labels) -> tuple[float, float]:
    """(mean argmax agreement with ENet, mean CamVid pixel accuracy) of the ESPNetv2 teacher."""
    from cvseg_ros.training.ensemble import espnetv2_probabilities
    teacher = espnetv2_probabilities(WEIGHTS)
    agree, acc = [], []
    for (rgb, label), reference in zip(stills, enet_labels):
        pred = teacher(rgb).argmax(axis=0)
        agree.append((pred == reference).mean())
        scored = label < 11
        acc.append((pred[scored] == label[scored]).mean())
    return float(np.mean(agree)), float(np.mean(acc))


def test_segments_real_streets_like_the_enet_teacher_and_a_broken_copy_does_not(stills, monkeypatch):
    require(WEIGHTS, "the ESPNetv2 weights")
    from cvseg_ros.training.ensemble import enet_probabilities
    enet = enet_probabilities(require(ENET, "the ENet teacher"), threads=1)
    enet_labels = [enet(rgb).argmax(axis=0) for rgb, _ in stills]

    agreement, accuracy = _scores(stills, enet_labels)
    assert agreement >= MIN_AGREEMENT, f"ESPNetv2 agrees with ENet on {agreement:.3f} of the pixels"
    assert accuracy >= MIN_ACCURACY, f"ESPNetv2 CamVid pixel accuracy {accuracy:.3f}"

    def swapped(path):          # a conversion that put two same-shape tensors in each other's place
        net = espnetv2_cityscapes(path)
        a, b = (net.base_net.level4[i].conv_1x1_exp.conv.weight for i in (2, 5))
        with torch.no_grad():
            a_copy = a.clone()
            a.copy_(b)
            b.copy_(a_copy)
        return net
    monkeypatch.setattr(espnetv2, "espnetv2_cityscapes", swapped)
    broken_agreement, broken_accuracy = _scores(stills, enet_labels)
    assert broken_agreement < MIN_AGREEMENT and broken_accuracy < MIN_ACCURACY


def _error(state, path) -> str:
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        espnetv2_cityscapes(path)
    return str(info.value)


def test_a_file_with_missing_extra_or_misshapen_tensors_is_refused(tmp_path):
    good = ESPNetv2Seg().state_dict()

    missing = dict(good)
    del missing["bu_dec_l2.stages.3.weight"]
    message = _error(missing, tmp_path / "missing.pth")
    assert "missing.pth" in message and "bu_dec_l2.stages.3.weight" in message

    extra = dict(good, **{"base_net.level5.0.proj_1x1.conv.weight": torch.zeros(1)})
    assert "base_net.level5.0.proj_1x1.conv.weight" in _error(extra, tmp_path / "extra.pth")

    misshapen = dict(good, **{"bu_dec_l4.merge_layer.3.weight": torch.zeros(21, 10, 1, 1)})
    message = _error(misshapen, tmp_path / "classes.pth")
    assert "classes.pth" in message and "bu_dec_l4.merge_layer.3.weight" in message

    assert "not a state_dict" in _error([torch.zeros(1)], tmp_path / "list.pth")


def test_the_teachers_are_chosen_by_name():
    from cvseg_ros.training.ensemble import default_teachers, teacher_names
    require(WEIGHTS, "the ESPNetv2 teacher")
    require(ENET, "the ENet teacher")
    assert teacher_names(" ENet, espnetv2 ") == ("enet", "espnetv2")
    notes = []
    teachers = default_teachers(threads=1, log=notes.append, names=("enet", "espnetv2"))
    assert [t.name.split(":")[0] for t in teachers] == ["enet", "espnetv2"]
    assert notes and "espnetv2" in notes[0]
    with pytest.raises(ValueError, match="choose one or more of enet, espnetv2"):
        default_teachers(names=("deeplab",))
