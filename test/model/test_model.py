"""The model on real reader output: shapes, batching over streams, state reset; checkpoints; the
inference copy and the compiled layers."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cvseg_ros.model.checkpoint import DEFAULT_CHECKPOINT, CheckpointError, load_checkpoint, save_checkpoint
from cvseg_ros.model.classes import CAMVID_CLASSES, CAMVID_PALETTE
from cvseg_ros.engine.pipeline import SegmentationEngine
from cvseg_ros.model.checkpoint import config_of
from cvseg_ros.model.segmenter import CompressedSegmenter, ModelConfig, make_config
from cvseg_ros.model.state import PFrameState
from cvseg_ros.codec.residual import residual_stats
from cvseg_ros.codec.decoder import H264StreamDecoder

from conftest import CAMVID_TRAIN, decode, require


@pytest.mark.parametrize("name", ["paper", "improved"])
def test_shapes_and_state_reset_on_real_reader_output(real_frames, name):
    torch.manual_seed(0)
    model = CompressedSegmenter(make_config(name)).eval()
    kinds = [f.kind for f in real_frames]
    assert kinds == ["I", "P", "P", "P", "I", "P"]
    stride = 32 if name == "paper" else 4
    with torch.inference_mode():
        state = None
        for f in real_frames:
            if f.kind == "I":
                rgb = torch.from_numpy(f.rgb).permute(2, 0, 1)[None].float() / 255
                logits, state = model.i_frame(rgb)
                assert logits.shape == (1, 11, 360, 480)
                fresh = model.i_frame(rgb)[1]   # the state after an I-frame depends on that frame only
                assert state.tensors().keys() == fresh.tensors().keys()
                assert all(torch.equal(a, b) for a, b in zip(state.tensors().values(), fresh.tensors().values()))
            else:
                mv = torch.from_numpy(f.motion_vectors)[None]
                res = torch.from_numpy(f.residual)[None, None].float() / 255
                intra = torch.from_numpy(f.intra)[None, None].float()
                assert mv.shape == (1, 2, 90, 120) and intra.shape == (1, 1, 90, 120)
                assert res.shape == (1, 1, 180, 240) and model.config.residual_stride == 2
                logits, state = model.p_frame(mv, res, state, intra=intra)
                assert logits.shape == (1, 11, math.ceil(360 / stride), math.ceil(480 / stride))
                assert torch.isfinite(logits).all()


def test_batched_streams_equal_single_streams(real_frames):
    """Two cameras in one forward pass give what each gives alone (luma matching included)."""
    torch.manual_seed(0)
    model = CompressedSegmenter(make_config("improved")).eval()
    assert model.config.luma_matching
    i_frame, p_frame = real_frames[0], real_frames[1]
    rgb = torch.from_numpy(i_frame.rgb).permute(2, 0, 1)[None].float() / 255
    mv = torch.from_numpy(p_frame.motion_vectors)[None]
    res = torch.from_numpy(p_frame.residual)[None, None].float() / 255
    i_luma = torch.from_numpy(i_frame.luma_cells)[None, None].float()
    luma = torch.from_numpy(p_frame.luma_cells)[None, None].float()
    with torch.inference_mode():
        _, s1 = model.i_frame(rgb, luma=i_luma)
        _, s2 = model.i_frame(rgb.flip(-1), luma=i_luma.flip(-1))
        single = [model.p_frame(mv, res, s, luma=lu)[0] for s, lu in ((s1, luma), (s2, luma.flip(-1)))]
        both, state = model.p_frame(torch.cat([mv, mv]), torch.cat([res, res]), PFrameState.cat([s1, s2]),
                                    luma=torch.cat([luma, luma.flip(-1)]))
    assert torch.allclose(both[0], single[0][0], atol=1e-4)
    assert torch.allclose(both[1], single[1][0], atol=1e-4)
    assert all(t.shape[0] == 1 for t in state.split([1, 1])[0].tensors().values())


def test_state_concatenates_splits_and_moves_by_field(real_frames):
    """The state's fields by configuration; concatenating streams and splitting them back gives
    each stream's tensors; states of different forms do not concatenate."""
    torch.manual_seed(0)
    rgb = torch.from_numpy(real_frames[0].rgb).permute(2, 0, 1)[None].float() / 255
    luma = torch.from_numpy(real_frames[0].luma_cells)[None, None].float()
    with torch.inference_mode():
        states = {name: CompressedSegmenter(make_config(name)).eval().i_frame(rgb, luma=luma)[1]
                  for name in ("paper", "improved")}
    assert list(states["paper"].tensors()) == ["hidden", "cell"]
    assert list(states["improved"].tensors()) == ["hidden", "cell", "logits", "motion", "i_frame_luma"]
    assert states["paper"].shapes == (("hidden", (1, 11, 12, 15)), ("cell", (1, 11, 12, 15)))
    s = states["improved"]
    other = s.replace(hidden=s.hidden + 1, logits=s.logits.flip(-1))
    both = PFrameState.cat([s, other])
    assert both.hidden.shape[0] == 2 and both.i_frame_luma.shape == (2, 1, 90, 120)
    for part, want in zip(both.split([1, 1]), (s, other)):
        assert all(torch.equal(part.tensors()[k], t) for k, t in want.tensors().items())
    assert PFrameState.cat([s]) is s and s.split([1]) == [s]
    moved = s.to("cpu")
    assert moved is not s and all(torch.equal(moved.tensors()[k], t) for k, t in s.tensors().items())
    with pytest.raises(ValueError, match="different fields"):
        PFrameState.cat([s, s.replace(i_frame_luma=None)])


def test_configurations_choose_the_model_by_their_fields():
    """The paper's form (the state is the logits, no head) follows ``logits_state``, not the name;
    a checkpoint's metadata written before the field existed gets it from its configuration's
    name; fields that do not go together are refused."""
    paper, improved = make_config("paper"), make_config("improved")
    assert paper.logits_state and paper.hidden_channels == 11 and not improved.logits_state
    for name, config in (("paper", paper), ("improved", improved)):
        legacy = {k: v for k, v in config.to_dict().items() if k != "logits_state"}
        assert config_of({"config": legacy}) == config
        assert config_of({"config": config.to_dict()}) == config
    renamed = CompressedSegmenter(config_of({"config": dict(paper.to_dict(), name="improved")}))
    assert renamed.head is None and renamed.init_state is None
    logits_form = make_config("improved", logits_state=True, accumulate=False, luma_matching=False)
    assert logits_form.hidden_channels == 11 and CompressedSegmenter(logits_form).head is None
    with pytest.raises(ValueError, match="hidden channels"):
        ModelConfig(**dict(paper.to_dict(), hidden_channels=24))
    with pytest.raises(ValueError, match="accumulate"):
        make_config("paper", accumulate=True)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = CompressedSegmenter(make_config("improved")).eval()
    path = save_checkpoint(model, tmp_path / "m.safetensors", classes=CAMVID_CLASSES, palette=CAMVID_PALETTE,
                           input_size=(360, 480), extra={"command": "test"})
    loaded, meta = load_checkpoint(path)
    assert meta["classes"] == CAMVID_CLASSES and meta["command"] == "test"
    assert meta["config"]["name"] == "improved"
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.rand(1, 3, 64, 96)
    with torch.inference_mode():
        assert torch.equal(model.i_frame(x)[0], loaded.i_frame(x)[0])
    # a metadata file that disagrees with the weights is refused with the reason
    meta_path = tmp_path / "m.json"
    bad = json.loads(meta_path.read_text())
    bad["classes"] = bad["classes"][:5]
    bad["palette"] = bad["palette"][:5]
    meta_path.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="classes"):
        load_checkpoint(path)


def assert_same_up_to_rounding(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to float rounding, but for a few values: rounding may flip which of two equal
    values (flat areas of a decoded frame) an ENet max-pooling picks, and the unpooling then puts
    it one pixel off; the folded norms round differently (the shipped ENet: 0.075 % of its logits
    differ by more than 3e-4 of the largest, none by more than 0.4 %; a wrong fold: most of them)."""
    off = (got - want).abs() > 3e-4 * want.abs().max()
    assert off.float().mean() < 2e-3, off.float().mean()
    assert (got.argmax(1) == want.argmax(1)).float().mean() > 0.999


@pytest.mark.parametrize("name", ["improved", "paper", "improved_espnetv2"])
def test_inference_copy_gives_the_trained_models_outputs(real_units, name):
    """The engine's inference copy (batch norms folded or fused with their PReLU, ESPNetv2's
    shuffles folded into its concatenations, the P-frame CNNs fused, the convolutions packed,
    channels-last) computes what the shipped model computes, on real reader output; the
    fused norms' GPU formulation too."""
    # flat image areas make ties in ENet's max-pooling; the bound below is measured on CamVid
    require(CAMVID_TRAIN, "CamVid train stills (the rounding bound is measured on them)")
    from cvseg_ros.model.checkpoint import PACKAGE_CHECKPOINT_DIR
    from cvseg_ros.common.kernels import device_kernels
    from cvseg_ros.model.espnetv2 import _ChannelShuffle
    from cvseg_ros.model.inference import AffinePReLU, PackedConv2d, inference_copy
    model, _ = load_checkpoint(PACKAGE_CHECKPOINT_DIR / f"cvseg_{name}.safetensors")
    model.eval()
    fast = inference_copy(model)
    assert fast.fused_branches is not None and model.fused_branches is None
    # every convolution of the I-frame network runs with packed weights (where oneDNN is)
    modules = list(fast.i_frame_net.modules())
    convolutions = sum(type(m) is torch.nn.Conv2d for m in modules)
    assert convolutions > 80 and sum(type(m) is PackedConv2d for m in modules) == convolutions
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    if name.endswith("espnetv2"):   # every norm folded or fused with its PReLU, no shuffle left
        assert norms == 0 and sum(isinstance(m, AffinePReLU) for m in modules) == 23
        assert not any(isinstance(m, _ChannelShuffle) for m in modules)
    else:   # all but the ENet initial block's norm (it follows a concatenation, not one convolution)
        assert norms == 1
    frames = decode(real_units, model.config.residual_stride)
    rgb = torch.from_numpy(frames[0].rgb).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        (want, want_state), (got, got_state) = model.i_frame(rgb), fast.i_frame(rgb.contiguous(memory_format=torch.channels_last))
        assert_same_up_to_rounding(got, want)
        with device_kernels():
            assert_same_up_to_rounding(fast.i_frame(rgb.contiguous(memory_format=torch.channels_last))[0], want)
        for f in frames[1:4]:
            args = (torch.from_numpy(f.motion_vectors)[None], torch.from_numpy(f.residual)[None, None].float() / 255)
            intra = torch.from_numpy(f.intra)[None, None].float()
            want, want_state = model.p_frame(*args, want_state, intra=intra)
            got, got_state = fast.p_frame(*args, got_state, intra=intra)
            assert_same_up_to_rounding(got, want)


def test_packed_p_frame_convolutions_compute_the_convolutions(real_frames, monkeypatch, caplog):
    """The inference copy runs the P-frame CNNs' convolutions (with their ReLUs) and the ConvLSTM's
    gate convolution with weights packed once for oneDNN: on the shipped model's inputs from real
    P-frames, for a batch of two streams, in fp32 and under bf16 autocast, each layer gives what
    the plain convolution (and ReLU) gives; with gradients, or where oneDNN refuses the dtype,
    they are the plain layers."""
    from cvseg_ros.model.checkpoint import PACKAGE_CHECKPOINT_DIR
    from cvseg_ros.model.inference import PackedConv2d, inference_copy
    if not PackedConv2d.available:
        pytest.skip("this PyTorch has no oneDNN")
    model, _ = load_checkpoint(PACKAGE_CHECKPOINT_DIR / "cvseg_improved.safetensors")
    fast = inference_copy(model.eval())
    layers = list(fast.fused_branches.net)
    assert [type(m) for m in layers] == [PackedConv2d] * 3 and [m.relu for m in layers] == [True, True, False]
    assert isinstance(fast.conv_lstm.gates, PackedConv2d) and not fast.conv_lstm.gates.relu
    f = real_frames[2]
    stats = torch.from_numpy(residual_stats(f.residual, cell=2))[None] * 8
    mv, intra = torch.from_numpy(f.motion_vectors)[None], torch.from_numpy(f.intra)[None, None].float()
    x = torch.cat([mv, intra, stats, stats[:, :1]], dim=1)
    x = torch.cat([x, x.flip(-1)])                       # a second stream: the frame mirrored
    for autocast in (False, True):
        inputs = x
        for layer in layers + [fast.conv_lstm.gates]:
            if layer is fast.conv_lstm.gates:            # the gates see the branches' output and a state
                state = torch.rand(2, 24, *inputs.shape[-2:], generator=torch.Generator().manual_seed(0)) * 2 - 1
                inputs = torch.cat([inputs.float(), state], dim=1)
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                got = layer(inputs)
                want = layer.conv(inputs)
                want = torch.relu(want) if layer.relu else want
            dtype = torch.bfloat16 if autocast else torch.float32
            assert got.dtype == want.dtype == dtype and any(k[0] == dtype for k in layer._packed)   # packed ran
            scale = want.float().abs().max().item()
            assert (got.float() - want.float()).abs().max() <= (1e-2 if autocast else 1e-5) * scale
            assert (got[1].flip(-1) - got[0]).float().abs().max() > 0   # each stream its own output
            inputs = got
    layer = layers[0]
    with torch.enable_grad():
        trainable = x.clone().requires_grad_(True)
        layer(trainable).sum().backward()               # the plain layers: a gradient flows
    assert trainable.grad is not None and trainable.grad.abs().sum() > 0
    # a dtype oneDNN refuses on some CPU: logged once, then the plain layer runs
    def refuse(*args):
        raise RuntimeError("could not create a primitive descriptor")
    monkeypatch.setattr(PackedConv2d, "_weights", refuse)
    monkeypatch.setattr(PackedConv2d, "refused", set())
    with caplog.at_level("WARNING"), torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, again = layer(x), layer(x)
        want = torch.relu(layer.conv(x))
    assert PackedConv2d.refused == {torch.bfloat16} and torch.equal(got, want) and torch.equal(again, want)
    assert sum("packed bfloat16 convolutions unavailable" in r.getMessage() for r in caplog.records) == 1


def test_initial_blocks_pooling_is_max_pool(real_frames):
    """The I-frame network's first pooling (the maximum of the four 2x2 phases) equals
    ``max_pool2d(x, 2, 2)`` on a real decoded frame, in both memory layouts and at odd sizes; the
    block gives the same with a gradient (where its own pooling module runs)."""
    import torch.nn.functional as F
    from cvseg_ros.model.enet import InitialBlock, _max_pool_2x2
    rgb = torch.from_numpy(real_frames[0].rgb).permute(2, 0, 1)[None].float() / 255
    for x in (rgb, rgb[..., :359, :477], torch.cat([rgb, rgb.flip(-1)])):
        for layout in (torch.contiguous_format, torch.channels_last):
            x = x.contiguous(memory_format=layout)
            assert torch.equal(_max_pool_2x2(x), F.max_pool2d(x, 2, 2)), (tuple(x.shape), layout)
    block = InitialBlock().eval()
    with torch.no_grad():
        want = block.act(block.bn(torch.cat([block.conv(rgb), F.max_pool2d(rgb, 2, 2)], dim=1)))
        assert torch.equal(block(rgb), want)
        assert torch.equal(block(rgb.clone().requires_grad_(True)), want)


def test_i_frame_state_pools_the_logits_through_the_classifier(real_frames):
    """The improved model's I-frame state holds the logits averaged over 4x4 pixels; made from
    the classifier's input, they equal pooling the full-resolution logits on a real frame (fp32,
    both layouts, a batch of two streams), and the state is the one built from those logits. The
    paper model pools them further to H/32, as its training did."""
    import torch.nn.functional as F
    model, _ = load_checkpoint()
    rgb = torch.from_numpy(real_frames[0].rgb).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        for x in (rgb, torch.cat([rgb, rgb.flip(-1)]).contiguous(memory_format=torch.channels_last)):
            z, logits, quarter = model.i_frame_net(x, quarter=True)
            want = F.avg_pool2d(logits, 4)
            assert quarter.shape == want.shape == (x.shape[0], 11, 90, 120)
            torch.testing.assert_close(quarter, want, rtol=1e-5, atol=1e-4)
            got_logits, state = model.i_frame(x)
            assert torch.equal(got_logits, logits)
            expected_state = model.state_from_i_frame(z, logits)
            assert state.tensors().keys() == expected_state.tensors().keys()
            for got, expected in zip(state.tensors().values(), expected_state.tensors().values()):
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    paper, _ = load_checkpoint(DEFAULT_CHECKPOINT.with_name("cvseg_paper.safetensors"))
    with torch.inference_mode():   # the paper model's H/32 state: from the H/4 logits, as in training
        z, logits = paper.i_frame_net(rgb)
        h, want = paper.i_frame(rgb)[1].hidden, F.adaptive_avg_pool2d(F.avg_pool2d(logits, 4), (12, 15))
        assert h.shape == want.shape == (1, 11, 12, 15)
        torch.testing.assert_close(h, want, rtol=1e-5, atol=1e-4)


def test_enet_block_ends_in_one_pass_are_prelu_of_the_sum(real_frames, monkeypatch):
    """Each ENet bottleneck ends in ``PReLU(extension + main)``; the engine's network does that in
    one compiled pass into the extension's map: on the maps of a real frame it gives exactly what
    the sum and the PReLU give, in most of the 27 blocks (the rest, and anything with a
    gradient, take the plain path)."""
    from cvseg_ros.model import enet
    engine = SegmentationEngine(device="cpu")
    fused, results = enet._add_prelu, []

    def checked(y, main, act):
        want = act(y + main)
        mine = y.clone()
        got = fused(mine, main, act)
        results.append((torch.equal(got, want), got.data_ptr() == mine.data_ptr()))
        return got
    monkeypatch.setattr(enet, "_add_prelu", checked)
    rgb = torch.from_numpy(real_frames[0].rgb).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        engine.model.i_frame_net(rgb.contiguous(memory_format=torch.channels_last))
    assert len(results) == 27 and all(equal for equal, _ in results)
    assert sum(in_place for _, in_place in results) >= 20          # the compiled pass ran
    y = torch.randn(1, 4, 3, 5).contiguous(memory_format=torch.channels_last)
    main = torch.randn(1, 4, 3, 5, requires_grad=True).contiguous(memory_format=torch.channels_last)
    out = fused(y, main, torch.nn.PReLU(4))
    assert out.data_ptr() != y.data_ptr() and out.requires_grad     # with a gradient: the plain path


def test_p_frame_without_its_branch_warps_the_i_frames_logits(real_units):
    """``p_frame(branch=False)`` (the evaluation's ``compressed_no_branch``): on real P-frames the
    logits are the I-frame's warped along the accumulated motion, which is the full step's (with
    its luma matching); the ConvLSTM state stays the I-frame's; the engine's ablation reads no
    residual; the paper model, which accumulates nothing, refuses it."""
    from cvseg_ros.model.checkpoint import PACKAGE_CHECKPOINT_DIR
    from cvseg_ros.model.warping import warp
    engine = SegmentationEngine(device="cpu")
    model = engine.model
    frames = decode(real_units, model.config.residual_stride)
    rgb = torch.from_numpy(frames[0].rgb).permute(2, 0, 1)[None].float() / 255
    cells = lambda f: torch.from_numpy(f.luma_cells)[None, None].float()   # noqa: E731
    with torch.inference_mode():
        _, full = model.i_frame(rgb.contiguous(memory_format=torch.channels_last), luma=cells(frames[0]))
        alone = full
        for f in frames[1:4]:
            args = dict(motion_vectors=torch.from_numpy(f.motion_vectors)[None],
                        residual=torch.from_numpy(f.residual)[None, None].float() / 255,
                        intra=torch.from_numpy(f.intra)[None, None].float(), luma=cells(f))
            _, full = model.p_frame(state=full, **args)
            logits, after = model.p_frame(state=alone, branch=False, **args)
            assert torch.equal(after.motion, full.motion) and after.motion.abs().max() > 1   # the same motion
            assert torch.equal(logits, warp(alone.logits, full.motion))
            kept = ("hidden", "cell", "logits", "i_frame_luma")
            assert all(torch.equal(getattr(after, k), getattr(alone, k)) for k in kept)
            alone = after
    # the engine's ablation: every P-frame step without the branch, its masks not the default's;
    # its reader makes no residual (nothing reads it)
    ablation = SegmentationEngine(device="cpu", p_frame_branch=False)
    steps, step = [], ablation.model.p_frame
    ablation.model.p_frame = lambda **k: steps.append(k["branch"]) or step(**k)
    results = [r for i, u in enumerate(real_units) for r in ablation.process([("cam", u, i)])]
    default = [r for i, u in enumerate(real_units) for r in engine.process([("cam", u, i)])]
    assert [r.kind for r in results] == [f.kind for f in frames] and results[1].mask.shape == (360, 480)
    assert steps == [False] * sum(f.kind == "P" for f in frames)
    assert any(not np.array_equal(a.mask, b.mask) for a, b in zip(results, default) if a.kind == "P")
    probe = H264StreamDecoder("probe", residual=False)
    read = [f for u in real_units for f in probe.feed(u)]
    p_frames = [f for f in read if f.kind == "P"]
    assert p_frames and all(f.residual is None and f.motion_vectors is not None and f.luma_cells is not None
                            for f in p_frames)
    assert ablation._cameras["cam"].decoder.residual is False
    with pytest.raises(ValueError, match="accumulates the motion"):
        SegmentationEngine(device="cpu", checkpoint=PACKAGE_CHECKPOINT_DIR / "cvseg_paper.safetensors",
                           p_frame_branch=False)


def test_compiled_warp_is_grid_samples_on_real_motion(real_frames):
    """Channels-last maps are warped by a compiled loop on the CPU: the same as grid_sample
    (bilinear, border) along a real P-frame's vectors, at H/4 and at H/16, vectors pointing out of
    the frame included; with a gradient to keep (training) grid_sample runs."""
    import torch.nn.functional as F
    from cvseg_ros.model import warping
    mv = torch.from_numpy(real_frames[1].motion_vectors)[None]
    out_of_frame = mv * 4 + torch.tensor([200.0, -150.0]).view(1, 2, 1, 1)
    mv = torch.cat([mv, out_of_frame])     # the second stream's vectors leave the frame
    generator = torch.Generator().manual_seed(0)
    for size, channels in (((90, 120), 11), ((23, 30), 48)):
        x = torch.randn(2, channels, *size, generator=generator).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            got = warping.warp(x, mv)
            pooled = F.adaptive_avg_pool2d(mv, size)
            saved, warping.COMPILED_WARP_CHANNELS = warping.COMPILED_WARP_CHANNELS, 10 ** 6
            try:
                want = warping.warp(x, mv)   # the grid_sample path
            finally:
                warping.COMPILED_WARP_CHANNELS = saved
        assert got.is_contiguous(memory_format=torch.channels_last) and got.shape == x.shape
        assert (got - want).abs().max() < 1e-4
        px = torch.arange(size[1]).view(1, 1, -1) + pooled[:, 0] * size[1] / 480
        assert ((px < 0) | (px > size[1] - 1)).float().mean() > 0.01   # samples clamped at the border
    trained = torch.randn(1, 11, 90, 120, requires_grad=True)
    warping.warp(trained.contiguous(memory_format=torch.channels_last), mv[:1]).sum().backward()
    assert trained.grad is not None and trained.grad.abs().sum() > 0


def test_compiled_head_and_channels_last_conv_lstm_compute_the_trained_layers(real_units):
    """The inference copy's correction head (warp and both layers in one compiled loop, fp32) and
    ConvLSTM (channels-last, fp32 gates, tanh as a sigmoid) give what the trained layers give on
    the same inputs (the head's warp: grid_sample), taken from the shipped model's P-frames on real
    reader output, for a batch of two streams; in fp32 and under bf16 autocast (the engine's
    precision on a CPU with native bf16)."""
    from cvseg_ros.model.checkpoint import PACKAGE_CHECKPOINT_DIR
    from cvseg_ros.model.inference import inference_copy
    model, _ = load_checkpoint(PACKAGE_CHECKPOINT_DIR / "cvseg_improved.safetensors")
    fast = inference_copy(model.eval())
    seen = []
    head = fast.head.forward
    fast.head.forward = lambda *a: seen.append(a) or head(*a)
    frames = decode(real_units, model.config.residual_stride)
    rgb = torch.from_numpy(frames[0].rgb).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        _, state = fast.i_frame(rgb.contiguous(memory_format=torch.channels_last))
        for f in frames[1:4]:
            _, state = fast.p_frame(torch.from_numpy(f.motion_vectors)[None],
                                    torch.from_numpy(f.residual)[None, None].float() / 255, state,
                                    intra=torch.from_numpy(f.intra)[None, None].float())
        h, seg, guides, motion = seen[-1]
        assert seg.is_contiguous(memory_format=torch.channels_last) and not seg.is_contiguous()
        assert motion.abs().max() > 4          # the accumulated motion of three P-frames
        # a second stream: the same maps mirrored, its motion mirrored too
        mirror = lambda t: torch.cat([t, t.flip(-1)])   # noqa: E731
        h, seg, guides = mirror(h), mirror(seg), [mirror(g) for g in guides]
        motion = torch.cat([motion, motion.flip(-1) * torch.tensor([-1.0, 1.0]).view(1, 2, 1, 1)])
        planar = lambda t: t.contiguous()   # noqa: E731  (NCHW: the trained layers' path)
        lstm_in = torch.randn(1, fast.conv_lstm.gates.in_channels - h.shape[1], *h.shape[-2:],
                              generator=torch.Generator().manual_seed(0))
        h1, cell = h[:1].contiguous(memory_format=torch.channels_last), state.cell
        for autocast in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                got = fast.head(h, seg, guides, motion)
                want = model.head(planar(h), planar(seg), [planar(g) for g in guides], motion)
                got_h, got_c = fast.conv_lstm(lstm_in.contiguous(memory_format=torch.channels_last), (h1, cell))
                want_h, want_c = model.conv_lstm(lstm_in, (planar(h1), planar(cell)))
                assert want_h.is_contiguous() and not got_h.is_contiguous()   # the two paths ran
            # the compiled loop ran (NCHW out of channels-last in), in fp32
            assert got.is_contiguous() and not seg.is_contiguous() and got.dtype == torch.float32
            tolerance = 0.1 if autocast else 1e-4   # bf16: products rounded to 8 bits of mantissa
            assert (got - want).abs().max() < tolerance * max(1.0, want.abs().max().item() / 10)
            assert (got.argmax(1) == want.argmax(1)).float().mean() > 0.999
            assert (got[1].flip(-1) - got[0]).abs().max() < 1e-3   # the mirrored stream: its own maps
            assert (got_h - want_h).abs().max() < tolerance and (got_c - want_c).abs().max() < tolerance
