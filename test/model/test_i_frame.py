"""The two I-frame networks: the accurate one (ESPNetv2) starts from the Cityscapes weights with
its classifier remapped to CamVid and keeps the teacher's segmentation on real stills; it runs at
sizes that are multiples of 8 (padded to 16) and composes into the full model, whose inference
copy gives the same outputs; checkpoints are chosen by name."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA, require
from cvseg_ros.model.classes import camvid_class_map
from cvseg_ros.model.i_frame import IFrameNet, i_frame_net_from_teacher

WEIGHTS = SHARED_DATA / "teacher" / "espnetv2_s_2.0_city_1024x512.pth"
CAMVID = SHARED_DATA / "camvid"
STILLS = ["train/0001TP_006690.png", "val/0016E5_07959.png"]
# Measured: the remapped network at 360x480 agrees with the ESPNetv2 teacher (1024x512, mapped to
# CamVid) on 0.88 of these two stills' pixels (0.91-0.92 on val frames); with the classifier rows
# rotated by one (a broken remap): 0.01.
MIN_AGREEMENT = 0.85

pytestmark = pytest.mark.usefixtures("restore_threads", "one_torch_thread")


@pytest.fixture(scope="module")
def accurate_net():
    return i_frame_net_from_teacher("espnetv2", 11, camvid_class_map(), require(WEIGHTS, "the ESPNetv2 weights")).eval()


def _agreement(net, stills) -> float:
    from cvseg_ros.training.ensemble import espnetv2_probabilities
    teacher = espnetv2_probabilities(WEIGHTS)
    agree = []
    for rgb in stills:
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
        with torch.inference_mode():
            pred = net(x)[1].argmax(dim=1)[0].numpy()
        agree.append(float((pred == teacher(rgb).argmax(axis=0)).mean()))
    return float(np.mean(agree))


def test_the_accurate_network_keeps_the_teachers_segmentation_after_the_remap(accurate_net):
    from cvseg_ros.training.data import read_rgb
    require(CAMVID / "train", "CamVid stills")
    stills = [read_rgb(CAMVID / name) for name in STILLS]
    assert _agreement(accurate_net, stills) >= MIN_AGREEMENT
    # control: the same weights with the CamVid classifier rows rotated by one
    broken = IFrameNet(11, "espnetv2").eval()
    state = accurate_net.state_dict()
    for key in ("espnetv2.net.bu_dec_l4.merge_layer.3.weight", "espnetv2.net.bu_dec_l4.merge_layer.3.bias"):
        state[key] = state[key].roll(1, dims=0)
    broken.load_state_dict(state)
    assert _agreement(broken, stills) < 0.2


def test_sizes_that_are_multiples_of_8_are_padded_to_16_and_cropped_back(accurate_net):
    x = torch.rand(1, 3, 360, 648)       # 360 and 648 are not multiples of 16
    with torch.inference_mode():
        z, logits, quarter = accurate_net(x, quarter=True)
    assert z.shape == (1, 48, 45, 81) and logits.shape == (1, 11, 360, 648) and quarter.shape == (1, 11, 90, 162)
    # the quarter logits are the 4x4 means of the full ones, up to the bilinear upsampling
    pooled = torch.nn.functional.avg_pool2d(logits, 4)
    assert (pooled.argmax(1) == quarter.argmax(1)).float().mean() > 0.95


def test_the_accurate_model_runs_i_and_p_frames_and_its_inference_copy_agrees():
    from cvseg_ros.model.inference import inference_copy
    from cvseg_ros.model.segmenter import CompressedSegmenter, make_config
    torch.manual_seed(0)
    model = CompressedSegmenter(make_config("improved", i_frame_network="espnetv2")).eval()
    assert model.init_state.in_channels == 48
    fast = inference_copy(model)
    rgb = torch.rand(1, 3, 360, 480)
    mv = torch.randn(1, 2, 90, 120)
    res = torch.rand(1, 1, 180, 240)
    luma = torch.rand(1, 1, 90, 120) * 255
    with torch.inference_mode():
        outs = []
        for m, x in ((model, rgb), (fast, rgb.contiguous(memory_format=torch.channels_last))):
            logits, state = m.i_frame(x, luma=luma)
            p_logits, _ = m.p_frame(mv, res, state, luma=luma)
            outs.append((logits, p_logits))
    assert outs[0][0].shape == (1, 11, 360, 480) and outs[0][1].shape == (1, 11, 90, 120)
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3)


def test_an_unknown_i_frame_network_is_refused():
    from cvseg_ros.model.segmenter import make_config
    with pytest.raises(ValueError, match="i_frame_network"):
        make_config("improved", i_frame_network="resnet")


def test_checkpoints_are_chosen_by_name_or_path(tmp_path):
    from cvseg_ros.model.checkpoint import (DEFAULT_CHECKPOINT, PACKAGE_CHECKPOINT_DIR, checkpoint_argument,
                                            resolve_checkpoint)
    assert resolve_checkpoint("fast") == DEFAULT_CHECKPOINT == resolve_checkpoint(None, "cpu")
    accurate = PACKAGE_CHECKPOINT_DIR / "cvseg_improved_espnetv2.safetensors"
    assert resolve_checkpoint("accurate") == accurate == resolve_checkpoint("auto", torch.device("cuda"))
    assert resolve_checkpoint("", "cuda:1") == accurate
    own = tmp_path / "mine.safetensors"
    assert resolve_checkpoint(str(own)) == own
    assert checkpoint_argument("accurate") == "accurate"
    assert checkpoint_argument(own) == str(own.resolve())
