"""Training on real data: the loss goes down, the CLI exports a loadable checkpoint and resumes,
and DDP runs with two CPU processes (gloo)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cvseg_ros.model.checkpoint import load_checkpoint
from cvseg_ros.model.segmenter import CompressedSegmenter, make_config

from conftest import REPO, SHARED_DATA, require

TINY = ["--i_steps=2", "--i_batch=2", "--i_crop=128x160", "--i_limit=4", "--p_steps=2", "--p_batch=1",
        "--p_limit=2", "--use_clips=false", "--group_length=4", "--threads=1", "--save_every=1",
        "--models=improved", "--distill_batch=1", "--distill_frame_step=50"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def test_short_training_run_lowers_the_loss():
    """A few optimiser steps of Eq. 1's P-frame terms on real H.264 groups lower the loss."""
    from cvseg_ros.training.data import load_camvid, still_groups
    from cvseg_ros.training.loss import GroupLoss, class_weights
    from cvseg_ros.training.train import collate
    require(SHARED_DATA / "camvid" / "train", "CamVid train stills")
    torch.manual_seed(0)
    images, labels = load_camvid(SHARED_DATA / "camvid" / "train", SHARED_DATA / "camvid" / "trainannot", limit=2)
    groups = still_groups(images, labels, length=4, progress=False)
    model = CompressedSegmenter(make_config("improved"))
    model.i_frame_net.eval()
    with torch.inference_mode():
        outs = []
        for g in groups:
            z, logits = model.i_frame_net(torch.from_numpy(g.rgb).permute(2, 0, 1)[None].float() / 255)
            outs.append((z[0].clone(), torch.nn.functional.avg_pool2d(logits, 4)[0].clone()))
    batch = collate(groups, outs, flip=False, device=torch.device("cpu"))
    loss_fn = GroupLoss(model, class_weights(labels))
    optimizer = torch.optim.AdamW(model.p_frame_parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = loss_fn(*batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.9 * losses[0], losses


def test_improved_model_settings_from_the_command_line():
    from cvseg_ros.training.train import TrainConfig, _model_overrides, parse_overrides
    cfg = parse_overrides(["--improved_config=state_stride=8, intra=false"], TrainConfig())
    settings = _model_overrides(cfg.improved_config)
    assert settings == {"state_stride": 8, "intra": False}
    assert make_config("improved", **settings).state_stride == 8
    for bad in ("state_stride", "name=paper", "no_such_field=1"):
        with pytest.raises(ValueError, match="bad model setting"):
            _model_overrides(bad)


def test_train_command_exports_a_checkpoint_and_resumes(tmp_path):
    require(SHARED_DATA / "teacher" / "enet-cityscapes.net", "the ENet teacher")
    out, export = tmp_path / "run", tmp_path / "export"
    cmd = [sys.executable, "-m", "cvseg_ros.tools.cli", "train", f"--out={out}", f"--export_dir={export}", *TINY]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    model, meta = load_checkpoint(export / "cvseg_improved.safetensors")
    assert meta["command"].startswith("cvseg train") and "--p_steps=2" in meta["command"]
    assert meta["data"]["teacher_sha256"] and meta["data"]["camvid_train"]
    assert meta["distilled_from"] == ["enet:enet-cityscapes.net"]    # stage 1 learnt from the teacher
    assert json.loads((out / "pframe_improved_state.json").read_text())["step"] == 2
    # resume: a longer schedule continues from the saved step instead of starting over
    done = subprocess.run(cmd + ["--p_steps=3", "--stages=pframe"], capture_output=True, text=True,
                          timeout=300, env=_env(), cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "pframe_improved_state.json").read_text())["step"] == 3
    assert "2/3" in done.stderr   # the progress bar started at the resumed step


def test_ddp_with_two_cpu_processes(tmp_path):
    require(SHARED_DATA / "teacher" / "enet-cityscapes.net", "the ENet teacher")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun not installed beside this Python")
    out, export = tmp_path / "ddp", tmp_path / "export"
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "cvseg_ros.training.train", f"--out={out}",
           f"--export_dir={export}", *TINY]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=_env(), cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    model, meta = load_checkpoint(export / "cvseg_improved.safetensors")
    assert meta["train_config"]["p_steps"] == 2
    assert (out / "iframe_net.safetensors").exists()


def test_the_accurate_network_trains_from_both_teachers_without_a_left_out_sequence(tmp_path):
    """``--i_frame_network=espnetv2`` starts from the ESPNetv2 Cityscapes weights, distils from both
    teachers and exports ``cvseg_improved_espnetv2`` with the inference settings given (its work
    height, the branch off); ``--leave_out`` keeps a sequence's stills out."""
    require(SHARED_DATA / "teacher" / "espnetv2_s_2.0_city_1024x512.pth", "the ESPNetv2 weights")
    from cvseg_ros.training.data import load_camvid
    train, annot = SHARED_DATA / "camvid" / "train", SHARED_DATA / "camvid" / "trainannot"
    require(train, "CamVid train stills")
    assert len(load_camvid(train, annot, leave_out=["0001TP", "0016E5"])[0]) == 101     # 0006R0 only
    out, export = tmp_path / "run", tmp_path / "export"
    tiny = [a for a in TINY if not a.startswith("--i_crop")] + ["--i_crop=128x176"]
    cmd = [sys.executable, "-m", "cvseg_ros.tools.cli", "train", f"--out={out}", f"--export_dir={export}", *tiny,
           "--i_frame_network=espnetv2", "--teachers=enet,espnetv2", "--leave_out=0001TP",
           "--work_height=512", "--p_frame_branch=false"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=_env(), cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    model, meta = load_checkpoint(export / "cvseg_improved_espnetv2.safetensors")
    assert model.config.i_frame_network == "espnetv2" and meta["train_config"]["leave_out"] == "0001TP"
    assert meta["distilled_from"] == ["enet:enet-cityscapes.net", "espnetv2:espnetv2_s_2.0_city_1024x512.pth"]
    assert meta["inference"] == {"work_height": 512, "p_frame_branch": False}   # as the shipped one


def test_a_checkpoint_mixed_with_its_cityscapes_initialisation(tmp_path):
    """``--init_from=fast --i_mix=0.5 --p_steps=0``: the exported I-frame network is the midpoint of
    the shipped one and the ENet teacher's converted weights, its P-frame branch the shipped one's,
    its teachers and provenance in the metadata; the file loads through the safe loader."""
    require(SHARED_DATA / "teacher" / "enet-cityscapes.net", "the ENet teacher")
    from cvseg_ros.model.classes import camvid_class_map
    from cvseg_ros.model.i_frame import i_frame_net_from_teacher
    from cvseg_ros.training.i_frame_stage import mix_weights
    out, export = tmp_path / "run", tmp_path / "export"
    cmd = [sys.executable, "-m", "cvseg_ros.tools.cli", "train", f"--out={out}", f"--export_dir={export}",
           "--init_from=fast", "--i_mix=0.5", "--p_steps=0", "--models=improved", "--threads=1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    mixed, meta = load_checkpoint(export / "cvseg_improved.safetensors")
    shipped, shipped_meta = load_checkpoint("fast")
    initial = i_frame_net_from_teacher("enet", 11, camvid_class_map(), SHARED_DATA / "teacher" / "enet-cityscapes.net")
    expected = mix_weights(shipped.i_frame_net.state_dict(), initial.state_dict(), 0.5)
    got = mixed.i_frame_net.state_dict()
    assert all(torch.allclose(got[k].float(), v.float(), atol=1e-6) for k, v in expected.items())
    moved = [k for k, v in got.items() if v.is_floating_point() and not torch.equal(v, shipped.i_frame_net.state_dict()[k])]
    assert len(moved) > 0.5 * len(got)          # not the shipped network unchanged
    branch = {k: v for k, v in shipped.state_dict().items() if not k.startswith("i_frame_net.")}
    assert all(torch.equal(mixed.state_dict()[k], v) for k, v in branch.items())
    assert meta["i_frame"] == {"mix": 0.5, "from": shipped_meta["weights_sha256"]}
    assert meta["distilled_from"] == shipped_meta["distilled_from"]
    bad = subprocess.run([*cmd[:4], f"--out={tmp_path / 'bad'}", "--init_from=fast", "--i_mix=1.5", "--p_steps=0",
                          "--models=improved", "--threads=1"], capture_output=True, text=True, timeout=300, env=_env(), cwd=REPO)
    assert bad.returncode != 0 and "i_mix=1.5: a share in [0, 1]" in bad.stderr, bad.stderr[-2000:]
