"""The GPU paths without a GPU: the inference copy on the ``meta`` device, the GPU formulations of
every step run on CPU tensors (:func:`cvseg_ros.common.kernels.device_kernels`) against the CPU's,
for every mode and both shipped checkpoints, one device-to-host copy per group, the device's
warm-up, the reused upload buffers and the fp16 precision."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import moving_still
from cvseg_ros.common.kernels import cpu_kernels, device_kernels
from cvseg_ros.engine import labels
from cvseg_ros.engine.inputs import Uploads
from cvseg_ros.engine.pipeline import MODES, SegmentationEngine
from cvseg_ros.model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from cvseg_ros.model.inference import inference_copy

CHECKPOINTS = {name: DEFAULT_CHECKPOINT.parent / f"cvseg_{name}.safetensors" for name in ("improved", "paper")}
#: share of pixels whose class may differ between the formulations, per frame: the improved model's
#: only differences are float rounding; the paper model's CPU masks take a shortcut of the
#: upsampled arg-max (engine/labels.py) that its coarse H/32 logits expose
TOLERANCE = {"improved": 0.002, "paper": 0.05}


@pytest.fixture(scope="module")
def two_cameras():
    """Two cameras, 8 real frames each (GOP 4: I-frames and P-frames, a restart)."""
    return {"a": moving_still(1, 2, 8, gop=4), "b": moving_still(3, 4, 8, gop=4)}


def run(engine: SegmentationEngine, cameras: dict) -> list[np.ndarray]:
    count = len(next(iter(cameras.values())))
    return [r.mask for i in range(count) for r in engine.process([(c, u[i], i) for c, u in cameras.items()])]


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_the_inference_copy_and_both_frame_kinds_stay_on_the_models_device(name):
    """The engine moves the model to its device and then builds the inference copy; every layer
    that copy makes must be on that device (on ``meta`` a CPU-made layer cannot be filled)."""
    model, _ = load_checkpoint(CHECKPOINTS[name], torch.device("cpu"))
    fast = inference_copy(model.to("meta").eval())
    assert {t.device.type for t in [*fast.parameters(), *fast.buffers()]} == {"meta"}
    config = fast.config
    zeros = lambda *shape: torch.zeros(*shape, device="meta")   # noqa: E731
    luma = zeros(2, 1, 90, 120) if config.uses_luma else None
    with torch.inference_mode():
        logits, state = fast.i_frame(zeros(2, 360, 480, 3).permute(0, 3, 1, 2), luma=luma)
        for _ in range(2):
            logits, state = fast.p_frame(motion_vectors=zeros(2, 2, 90, 120), residual=None, state=state,
                                         residual_stats=zeros(2, 2, 90, 120), luma=luma,
                                         intra=zeros(2, 1, 90, 120) if config.intra else None)
    assert logits.device.type == "meta" and logits.shape[:2] == (2, config.num_classes)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_the_gpu_formulations_on_cpu_tensors_give_the_cpu_masks(two_cameras, name, mode):
    cpu = run(SegmentationEngine(CHECKPOINTS[name], device="cpu", mode=mode, precision="fp32"), two_cameras)
    with device_kernels():
        assert not cpu_kernels(torch.zeros(1))
        device = run(SegmentationEngine(CHECKPOINTS[name], device="cpu", mode=mode, precision="fp32"), two_cameras)
    assert cpu_kernels(torch.zeros(1))
    assert len(device) == len(cpu) == 16
    differ = [float((a != b).mean()) for a, b in zip(cpu, device)]
    exact = TOLERANCE[name] if mode == "compressed" else 0.002    # the I-frame network: float rounding
    assert max(differ) <= exact, differ
    if name == "improved" and mode == "compressed":
        assert np.mean(differ) < 0.001


def test_no_cpu_only_kernel_runs_while_the_gpu_formulations_are_forced(two_cameras, monkeypatch):
    """Every step that has a CPU formulation asks the switch: with it forced, none of them runs."""
    from cvseg_ros.model import correction_head, enet, luma_matching, warping
    from cvseg_ros.model.inference import PackedConv2d

    def cpu_only(*_args, **_kwargs):
        raise AssertionError("a CPU-only kernel ran")
    for module, name in ((labels, "_arg_max_planes"), (labels, "_arg_max_last_kernel"), (labels, "_mend_upsampled_ids"),
                         (luma_matching, "_refine"), (warping, "_warp_channels_last"),
                         (enet, "_add_prelu_channels_last_"), (correction_head.CorrectionHead, "_compiled"),
                         (PackedConv2d, "_weights")):
        monkeypatch.setattr(module, name, cpu_only)
    with device_kernels():
        for name, mode in (("improved", "compressed"), ("paper", "compressed"), ("improved", "per_frame")):
            engine = SegmentationEngine(CHECKPOINTS[name], device="cpu", mode=mode, precision="fp32")
            assert len(run(engine, {"a": two_cameras["a"][:5]})) == 5
    with pytest.raises(AssertionError, match="CPU-only"):     # and without the switch, they do run
        run(SegmentationEngine(CHECKPOINTS["improved"], device="cpu", precision="fp32"), {"a": two_cameras["a"][:2]})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (the GPU check runs this on one)")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_cuda_masks_are_the_cpu_masks(two_cameras, name, mode):
    cpu = run(SegmentationEngine(CHECKPOINTS[name], device="cpu", mode=mode, precision="fp32"), two_cameras)
    cuda = run(SegmentationEngine(CHECKPOINTS[name], device="cuda", mode=mode, precision="fp32"), two_cameras)
    differ = [float((a != b).mean()) for a, b in zip(cpu, cuda)]
    assert len(differ) == 16 and max(differ) <= (TOLERANCE[name] if mode == "compressed" else 0.002), differ


def test_one_copy_to_the_host_per_group(two_cameras, monkeypatch):
    copies = []
    real = labels.to_host
    monkeypatch.setattr(labels, "to_host", lambda ids: copies.append(ids.shape) or real(ids))
    with device_kernels():
        engine = SegmentationEngine(CHECKPOINTS["improved"], device="cpu", precision="fp32")
        for i in range(4):    # an I-frame then P-frames, both cameras in one group each time
            copies.clear()
            results = engine.process([(c, u[i], i) for c, u in two_cameras.items()])
            assert [r.network for r in results] == (["i_frame"] * 2 if i == 0 else ["p_frame"] * 2)
            assert len(copies) == 1 and copies[0] == (2 * 360 * 480,)


@pytest.mark.parametrize("setting", [{"mode": m} for m in MODES] + [{"p_frame_branch": False}, {"precision": "fp16"}])
def test_the_warm_up_runs_every_path_and_touches_no_camera(two_cameras, setting):
    single = {"a": two_cameras["a"][:3]}
    with device_kernels():
        engine = SegmentationEngine(CHECKPOINTS["improved"], device="cpu", **setting)
        steps, p_frame = [], engine.model.p_frame
        engine.model.p_frame = lambda *a, **k: steps.append(k["motion_vectors"].shape) or p_frame(*a, **k)
        assert engine.warm_up_device((360, 480)) == [(360, 480)]
        assert engine.warm_up_device() == [(360, 640), (360, 480)]     # 16:9 and 4:3 at the work height
        assert engine.cameras == []
        uses_p_frames = setting.get("mode", "compressed") == "compressed"
        assert steps == ([(1, 2, 90, 120)] * 2 + [(1, 2, 90, 160)] * 2 + [(1, 2, 90, 120)] * 2
                         if uses_p_frames else []), steps
        warmed = run(engine, single)
        fresh = run(SegmentationEngine(CHECKPOINTS["improved"], device="cpu", **setting), single)
    assert all(np.array_equal(a, b) for a, b in zip(warmed, fresh))


def test_fp16_masks_are_those_of_fp32(two_cameras):
    with device_kernels():
        fp16 = run(SegmentationEngine(CHECKPOINTS["improved"], device="cpu", precision="fp16"), two_cameras)
    fp32 = run(SegmentationEngine(CHECKPOINTS["improved"], device="cpu", precision="fp32"), two_cameras)
    assert max(float((a != b).mean()) for a, b in zip(fp16, fp32)) < 0.01


def test_uploads_reuse_one_buffer_per_role_and_size():
    uploads = Uploads(torch.device("cpu"), limit=2)
    assert not uploads.pinned       # no CUDA here: plain host buffers
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((2, 3), np.float32)
    first = uploads("mv", [a, b])
    assert torch.equal(first, torch.from_numpy(np.stack([a, b])))
    pointer = uploads._buffers[("mv", 2, (2, 3), "<f4")][0].data_ptr()
    again = uploads("mv", [b, a])
    assert torch.equal(again, torch.from_numpy(np.stack([b, a])))
    assert uploads._buffers[("mv", 2, (2, 3), "<f4")][0].data_ptr() == pointer
    flags = uploads("intra", [np.eye(3, dtype=bool)])
    assert flags.dtype == torch.bool and flags.shape == (1, 3, 3)
    uploads("luma", [np.zeros((4, 4), np.uint8)])       # a third buffer: the oldest goes
    assert len(uploads._buffers) == 2 and ("mv", 2, (2, 3), "<f4") not in uploads._buffers
