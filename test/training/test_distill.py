"""Distillation from the Cityscapes teachers: the loss, the targets' alignment with their crops,
and a teacher-initialised network that learns the teachers' soft targets on real CamVid stills."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import CAMVID_TRAIN, SHARED_DATA, require
from cvseg_ros.training.data import IGNORE, random_crop
from cvseg_ros.training.distill import distillation_loss, full_size, soft_targets

TEACHER = SHARED_DATA / "teacher" / "enet-cityscapes.net"


def test_the_loss_is_zero_for_the_teachers_own_distribution_and_weighs_by_their_mass():
    torch.manual_seed(0)
    p = torch.rand(2, 11, 4, 5).softmax(dim=1)
    mass = torch.rand(2, 1, 4, 5)
    target = p * mass                                     # the rest: no CamVid class
    assert distillation_loss(torch.log(p), target).item() == pytest.approx(0.0, abs=1e-5)
    other = torch.randn(2, 11, 4, 5)
    assert distillation_loss(other, target).item() > 0.1
    # where the teachers see no CamVid class the pixel does not count
    none = target.clone()
    none[:, :, :2] = 0
    shifted = other.clone()
    shifted[:, :, :2] += 100 * torch.randn(2, 11, 2, 5)
    assert distillation_loss(shifted, none).item() == pytest.approx(distillation_loss(other, none).item(), rel=1e-4)


def test_soft_targets_are_cropped_and_flipped_with_their_frame():
    rng = np.random.default_rng(3)
    label = np.repeat(np.arange(11, dtype=np.uint8), 6)[None].repeat(40, axis=0)    # 40x66 stripes
    image = np.dstack([label * 20] * 3).astype(np.uint8)
    soft = np.eye(11, dtype=np.float32)[label]                                     # one-hot, HxWx11
    for _ in range(20):
        crop_image, crop_label, crop_soft = random_crop(image, label, rng, (32, 48), soft=soft)
        assert crop_soft.shape == (32, 48, 11)
        labelled = crop_label != IGNORE
        # the grey level is linear in the class id, so bilinear resampling must agree on both
        expected = (crop_soft * (20.0 * np.arange(11))).sum(axis=2)
        assert np.abs(crop_image[..., 0].astype(np.float32) - expected).max() <= 1.01
        # stripes 3-10 px wide: nearest and bilinear resampling part only at their borders
        assert (crop_soft.argmax(axis=2)[labelled] == crop_label[labelled]).mean() > 0.7
        assert (crop_soft[~labelled] == 0).all()          # padding carries no target
    before = np.random.default_rng(5)
    after = np.random.default_rng(5)
    plain = random_crop(image, label, before, (32, 48))
    with_soft = random_crop(image, label, after, (32, 48), soft=soft)
    assert np.array_equal(plain[0], with_soft[0]) and np.array_equal(plain[1], with_soft[1])


def test_a_teacher_initialised_network_learns_the_teachers_targets_on_real_stills(tmp_path):
    require(CAMVID_TRAIN, "CamVid train stills")
    require(TEACHER, "the ENet teacher")
    from cvseg_ros.model.classes import camvid_class_map
    from cvseg_ros.model.enet_torch7 import enet_from_torch7
    from cvseg_ros.training.data import read_rgb
    from cvseg_ros.training.ensemble import enet_probabilities

    torch.manual_seed(0)
    stills = [read_rgb(p) for p in sorted(CAMVID_TRAIN.glob("*.png"))[:2]]
    teachers = [enet_probabilities(TEACHER, threads=2)]
    targets = soft_targets(stills, teachers, tmp_path, progress=False)
    assert len(list(tmp_path.glob("soft_targets_*.npz"))) == 1
    assert all(t.shape == (11, 90, 120) and t.dtype == np.float16 for t in targets)
    mass = np.mean([t.astype(np.float32).sum(axis=0).mean() for t in targets])
    assert 0.3 < mass <= 1.0 + 1e-3
    again = soft_targets(stills, teachers, tmp_path, progress=False)            # from the cache
    assert all(np.array_equal(a, b) for a, b in zip(targets, again))

    net = enet_from_torch7(TEACHER, num_classes=11, class_map=camvid_class_map()).train()
    x = torch.from_numpy(np.stack(stills)).permute(0, 3, 1, 2).float() / 255
    target = torch.from_numpy(np.stack([full_size(t, 360, 480) for t in targets])).permute(0, 3, 1, 2)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = distillation_loss(net(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
