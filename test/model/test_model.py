"""The model on real reader output: shapes, batching over streams, state reset; checkpoints."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cvseg_ros.model.checkpoint import DEFAULT_CHECKPOINT, CheckpointError, load_checkpoint, save_checkpoint
from cvseg_ros.model.classes import CAMVID_CLASSES, CAMVID_PALETTE
from cvseg_ros.engine.pipeline import SegmentationEngine
from cvseg_ros.model.segmenter import CompressedSegmenter, cat_states, make_config, split_state
from cvseg_ros.codec.residual import residual_stats
from cvseg_ros.codec.decoder import H264StreamDecoder
from cvseg_ros.codec.video import encode_frames

from conftest import CAMVID_TRAIN, require


@pytest.fixture(scope="module")
def real_units():
    """A real CamVid still seen by a moving camera, encoded with GOP 4."""
    from cvseg_ros.training.data import read_label, read_rgb, synthetic_sequence
    require(CAMVID_TRAIN, "CamVid train stills")
    image = sorted(CAMVID_TRAIN.glob("*.png"))[0]
    label = CAMVID_TRAIN.parent / "trainannot" / image.name
    frames, _ = synthetic_sequence(read_rgb(image), read_label(label), np.random.default_rng(1), 6)
    return encode_frames(frames, gop=4)


def decode(units, residual_stride: int):
    decoder = H264StreamDecoder("test", residual_size=lambda h, w: (h // residual_stride, w // residual_stride))
    return [f for u in units for f in decoder.feed(u)]


@pytest.fixture(scope="module")
def real_frames(real_units):
    """``real_units`` decoded by our reader (the residual at half size, as the configurations take it)."""
    from cvseg_ros.training.data import RESIDUAL_STRIDE
    return decode(real_units, RESIDUAL_STRIDE)


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
                assert all(torch.equal(a, b) for a, b in zip(state, fresh))
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
        both, state = model.p_frame(torch.cat([mv, mv]), torch.cat([res, res]), cat_states([s1, s2]),
                                    luma=torch.cat([luma, luma.flip(-1)]))
    assert torch.allclose(both[0], single[0][0], atol=1e-4)
    assert torch.allclose(both[1], single[1][0], atol=1e-4)
    assert all(t.shape[0] == 1 for t in split_state(state, [1, 1])[0])


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


def test_shipped_checkpoint_loads_and_segments():
    """The default checkpoint is a trained one: it segments a real CamVid frame sensibly."""
    from cvseg_ros.training.data import read_label, read_rgb
    require(CAMVID_TRAIN, "CamVid train stills")
    engine = SegmentationEngine(device="cpu")
    assert engine.class_names == CAMVID_CLASSES
    assert engine.metadata["config"]["name"] == "improved"
    assert engine.metadata["command"].startswith("cvseg train")
    image_path = sorted(CAMVID_TRAIN.glob("*.png"))[10]
    image, label = read_rgb(image_path), read_label(CAMVID_TRAIN.parent / "trainannot" / image_path.name)
    units = encode_frames([image, image, image], gop=12)
    results = [r for i, u in enumerate(units) for r in engine.process([("cam", u, i)])]
    assert [r.network for r in results] == ["i_frame", "p_frame", "p_frame"]
    for r in results:
        assert r.mask.shape == label.shape and r.mask.dtype == np.uint8 and r.stamp in (0, 1, 2)
        valid = label != 255
        assert (r.mask[valid] == label[valid]).mean() > 0.75


def test_engine_gives_the_model_the_intra_cells():
    """The shipped improved model takes the intra-coded cells as an input; the engine hands it the
    reader's intra map of each P-frame (real H.264 of a CamVid still seen by a moving camera)."""
    from cvseg_ros.training.data import read_label, read_rgb, synthetic_sequence
    require(CAMVID_TRAIN, "CamVid train stills")
    image = sorted(CAMVID_TRAIN.glob("*.png"))[1]
    label = CAMVID_TRAIN.parent / "trainannot" / image.name
    frames, _ = synthetic_sequence(read_rgb(image), read_label(label), np.random.default_rng(2), 4)
    units = encode_frames(frames, gop=4)
    engine = SegmentationEngine(device="cpu")
    assert engine.model.config.intra
    seen, p_frame = [], engine.model.p_frame
    engine.model.p_frame = lambda *a, **k: seen.append(k["intra"]) or p_frame(*a, **k)
    reader = H264StreamDecoder("reference")
    expected = [f.intra for u in units for f in reader.feed(u) if f.kind == "P"]
    results = [r for i, u in enumerate(units) for r in engine.process([("cam", u, i)])]
    assert [r.network for r in results] == ["i_frame", "p_frame", "p_frame", "p_frame"]
    assert len(seen) == 3 and any(e.any() for e in expected)
    for got, want in zip(seen, expected):
        assert got.shape == (1, 1, *want.shape) and np.array_equal(got[0, 0].numpy() > 0.5, want)


def test_engine_reads_p_frames_as_the_shipped_model_was_trained(real_units):
    """Compressed mode decodes with the shipped configuration's reader settings (residual at half
    size, P-frames without deblocking), the same as the training groups; the other modes decode
    every frame exactly."""
    from cvseg_ros.training.data import DEBLOCK_P_FRAMES, RESIDUAL_STRIDE
    engine = SegmentationEngine(device="cpu")
    config = engine.model.config
    assert (config.residual_stride, config.deblock_p_frames) == (RESIDUAL_STRIDE, DEBLOCK_P_FRAMES) == (2, False)
    results = [r for i, u in enumerate(real_units) for r in engine.process([("cam", u, i)])]
    decoder = engine._cameras["cam"].decoder
    assert not decoder.deblock_p_frames     # its effect: test_motion_vectors.py
    assert decoder._previous_luma.shape == (180, 240)       # the last reference luma: half of 360x480
    assert [r.network for r in results].count("p_frame") == 4
    for mode in ("per_frame", "iframe_copy"):
        other = SegmentationEngine(device="cpu", mode=mode)
        other.add_camera("cam")
        assert other._cameras["cam"].decoder.deblock_p_frames


def assert_same_up_to_rounding(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to float rounding, but for a few values: rounding may flip which of two equal
    values (flat areas of a decoded frame) an ENet max-pooling picks, and the unpooling then puts
    it one pixel off."""
    off = (got - want).abs() > 1e-4 * want.abs().max()
    assert off.float().mean() < 1e-3, off.float().mean()
    assert (got.argmax(1) == want.argmax(1)).float().mean() > 0.999


@pytest.mark.parametrize("name", ["improved", "paper"])
def test_inference_copy_gives_the_trained_models_outputs(real_units, name):
    """The engine's inference copy (batch norms folded, the P-frame CNNs fused, the convolutions
    packed, channels-last) computes what the shipped model computes, on real reader output."""
    from cvseg_ros.model.checkpoint import PACKAGE_CHECKPOINT_DIR
    from cvseg_ros.model.inference import PackedConv2d, inference_copy
    model, _ = load_checkpoint(PACKAGE_CHECKPOINT_DIR / f"cvseg_{name}.safetensors")
    model.eval()
    fast = inference_copy(model)
    assert fast.fused_branches is not None and model.fused_branches is None
    # every convolution of the I-frame network runs with packed weights (where oneDNN is)
    modules = list(fast.i_frame_net.modules())
    convolutions = sum(type(m) is torch.nn.Conv2d for m in modules)
    assert convolutions > 80 and sum(type(m) is PackedConv2d for m in modules) == convolutions
    # all but the ENet initial block's norm (it follows a concatenation, not one convolution)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules()) == 1
    frames = decode(real_units, model.config.residual_stride)
    rgb = torch.from_numpy(frames[0].rgb).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        (want, want_state), (got, got_state) = model.i_frame(rgb), fast.i_frame(rgb.contiguous(memory_format=torch.channels_last))
        assert_same_up_to_rounding(got, want)
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
            for got, expected in zip(state, model.state_from_i_frame(z, logits)):
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    paper, _ = load_checkpoint(DEFAULT_CHECKPOINT.with_name("cvseg_paper.safetensors"))
    with torch.inference_mode():   # the paper model's H/32 state: from the H/4 logits, as in training
        z, logits = paper.i_frame_net(rgb)
        (h, _), want = paper.i_frame(rgb)[1], F.adaptive_avg_pool2d(F.avg_pool2d(logits, 4), (12, 15))
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
    from cvseg_ros.model.segmenter import warp
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
            assert torch.equal(after[3], full[3]) and after[3].abs().max() > 1      # the same motion
            assert torch.equal(logits, warp(alone[2], full[3]))
            assert all(torch.equal(a, b) for a, b in zip(after[:3] + after[4:], alone[:3] + alone[4:]))
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


def test_class_ids_is_the_arg_max_of_real_logits(real_frames):
    """The engine's arg-max equals ``argmax(1)`` on the shipped model's logits of a real frame,
    ties included (first class wins): the compiled CPU loops in both memory layouts, and the
    tensor formulation a GPU runs."""
    from cvseg_ros.engine.pipeline import _class_ids_on_device, class_ids
    engine = SegmentationEngine(device="cpu")
    rgb = torch.from_numpy(real_frames[0].rgb).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        logits = engine.model.i_frame(rgb.contiguous(memory_format=torch.channels_last))[0]
    logits = torch.cat([logits, logits.flip(-1)])            # a batch of two
    logits[:, 5, :40] = logits[:, 2, :40] = 1e3               # ties between classes 2 and 5
    want = logits.argmax(1).numpy()
    assert len(np.unique(want)) >= 5 and (want[:, :40] == 2).all()
    for layout in (torch.contiguous_format, torch.channels_last):
        ids = class_ids(logits.contiguous(memory_format=layout))
        assert ids.dtype == np.uint8 and ids.shape == (2, 360, 480) and np.array_equal(ids, want), layout
    assert np.array_equal(class_ids(logits.bfloat16()), logits.bfloat16().argmax(1).numpy())
    on_device = _class_ids_on_device(logits)
    assert on_device.dtype == torch.uint8 and np.array_equal(on_device.numpy(), want)


def test_upsampled_class_ids_are_the_resized_logits_arg_max_among_the_cells_winners(real_units):
    """P-frame masks: the shipped model's H/4 logits of real P-frames resized bilinearly to the
    frame, then the arg-max. Where a pixel's four bilinear cells rank the same class first it is
    that class (the nearest resize of the ids); elsewhere the best of the cells' first classes by
    the interpolated logits, exactly; nearly everywhere the full arg-max of the resized logits. The
    GPU's tensor formulation gives the full arg-max. The engine's P-frame masks are these ids."""
    import torch.nn.functional as F
    from cvseg_ros.engine.pipeline import _bilinear_taps, _upsampled_class_ids_on_device, upsampled_class_ids
    engine = SegmentationEngine(device="cpu")
    captured = []
    run_p = engine.model.p_frame

    def p_frame(**inputs):
        logits, state = run_p(**inputs)
        captured.append(logits)
        return logits, state
    engine.model.p_frame = p_frame
    results = [r for i, unit in enumerate(real_units[:4]) for r in engine.process([("cam", unit, i)])]
    assert len(captured) == 3 and [r.network for r in results] == ["i_frame"] + ["p_frame"] * 3

    def best_of_the_cells_winners(logits, height, width):
        """Reference: the resized logits, each pixel's arg-max among its four cells' first classes."""
        resized = F.interpolate(logits.contiguous(), size=(height, width), mode="bilinear", align_corners=False)[0]
        ids = logits[0].argmax(0)
        (rows, rows2), (cols, cols2) = ([torch.from_numpy(t) for t in _bilinear_taps(n, m)[:2]]
                                        for n, m in ((height, logits.shape[2]), (width, logits.shape[3])))
        winners = torch.stack([ids[r][:, c] for r in (rows, rows2) for c in (cols, cols2)])   # [4,H,W]
        among = torch.full_like(resized, -torch.inf).scatter_(0, winners.long(), resized.gather(0, winners.long()))
        return among.argmax(0).numpy(), (winners == winners[0]).all(0).numpy(), resized

    for logits, result in zip(captured, results[1:]):
        logits = logits.float()
        assert logits.shape[-2:] == (90, 120) and result.mask.shape == (360, 480)
        got = upsampled_class_ids(logits, 360, 480)
        assert np.array_equal(result.mask, got)
        want, agree, resized = best_of_the_cells_winners(logits, 360, 480)
        nearest = logits[0].argmax(0)[torch.arange(360) // 4][:, torch.arange(480) // 4].numpy()
        assert 0.02 < 1 - agree.mean() < 0.3            # outlines are a small share of pixels
        assert np.array_equal(got[agree], nearest[agree]) and np.array_equal(got, want)
        full = resized.argmax(0).numpy()
        assert (got != full).mean() < 1e-3 and (got != nearest).mean() > 5e-3
        on_device = _upsampled_class_ids_on_device(logits, 360, 480)
        assert on_device.dtype == torch.uint8 and np.array_equal(on_device[0].numpy(), full)
        # shrinking (a frame a little smaller than the work size) and odd factors
        for size in ((85, 113), (250, 333)):
            assert np.array_equal(upsampled_class_ids(logits, *size), best_of_the_cells_winners(logits, *size)[0])


def test_engine_start_prepares_the_compiled_loops():
    """A fresh process: creating a compressed-mode engine compiles (or loads) every Numba loop the
    frames will need, for the block layout PyAV exports, so no first frame waits for it."""
    import subprocess
    import sys
    code = ("from cvseg_ros.engine import pipeline as engine\nfrom cvseg_ros.codec import motion_vectors as mv\n"
            "from cvseg_ros.model import enet, luma_matching as lm, segmenter as sg\n"
            "loops = (mv._paint_blocks, mv._window_means, engine._arg_max_planes,\n"
            "         engine._arg_max_last_kernel(11), lm._refine, sg._warp_channels_last,\n"
            "         engine._mend_upsampled_ids, sg._correction_kernel(11, 3, 16), engine._fill_taps,\n"
            "         enet._add_prelu_channels_last_)\n"
            "before = [len(f.signatures) for f in loops]\n"
            "engine.SegmentationEngine(device='cpu')\n"
            "print(before, [len(f.signatures) for f in loops])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split("\n")[-2] == "[0, 0, 0, 0, 0, 0, 0, 0, 0, 0] [1, 1, 1, 1, 1, 1, 2, 1, 1, 1]", \
        out.stdout + out.stderr


def test_compiled_warp_is_grid_samples_on_real_motion(real_frames):
    """Channels-last maps are warped by a compiled loop on the CPU: the same as grid_sample
    (bilinear, border) along a real P-frame's vectors, at H/4 and at H/16, vectors pointing out of
    the frame included; with a gradient to keep (training) grid_sample runs."""
    import torch.nn.functional as F
    from cvseg_ros.model import segmenter
    mv = torch.from_numpy(real_frames[1].motion_vectors)[None]
    out_of_frame = mv * 4 + torch.tensor([200.0, -150.0]).view(1, 2, 1, 1)
    mv = torch.cat([mv, out_of_frame])     # the second stream's vectors leave the frame
    generator = torch.Generator().manual_seed(0)
    for size, channels in (((90, 120), 11), ((23, 30), 48)):
        x = torch.randn(2, channels, *size, generator=generator).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            got = segmenter.warp(x, mv)
            pooled = F.adaptive_avg_pool2d(mv, size)
            saved, segmenter.COMPILED_WARP_CHANNELS = segmenter.COMPILED_WARP_CHANNELS, 10 ** 6
            try:
                want = segmenter.warp(x, mv)   # the grid_sample path
            finally:
                segmenter.COMPILED_WARP_CHANNELS = saved
        assert got.is_contiguous(memory_format=torch.channels_last) and got.shape == x.shape
        assert (got - want).abs().max() < 1e-4
        px = torch.arange(size[1]).view(1, 1, -1) + pooled[:, 0] * size[1] / 480
        assert ((px < 0) | (px > size[1] - 1)).float().mean() > 0.01   # samples clamped at the border
    trained = torch.randn(1, 11, 90, 120, requires_grad=True)
    segmenter.warp(trained.contiguous(memory_format=torch.channels_last), mv[:1]).sum().backward()
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
        h1, cell = h[:1].contiguous(memory_format=torch.channels_last), state[1]
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
