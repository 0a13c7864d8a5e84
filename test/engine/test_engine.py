"""The engine on real H.264: the shipped model's masks, the inputs it hands the model, the
reader's settings, the label kernels, and the compiled loops prepared at start."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cvseg_ros.codec.decoder import H264StreamDecoder
from cvseg_ros.codec.video import encode_frames
from cvseg_ros.engine.pipeline import SegmentationEngine
from cvseg_ros.model.classes import CAMVID_CLASSES

from conftest import CAMVID_TRAIN, moving_still, require


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
    units = moving_still(1, 2, 4)
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


def test_class_ids_is_the_arg_max_of_real_logits(real_frames):
    """The engine's arg-max equals ``argmax(1)`` on the shipped model's logits of a real frame,
    ties included (first class wins): the compiled CPU loops in both memory layouts, and the
    tensor formulation a GPU runs."""
    from cvseg_ros.engine.labels import _class_ids_on_device, class_ids
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
    from cvseg_ros.engine.labels import _bilinear_taps, _upsampled_class_ids_on_device, upsampled_class_ids
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
        assert (got != full).mean() < 2e-3 and (got != nearest).mean() > 5e-3   # CamVid: ~2e-4
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
    code = ("from cvseg_ros.engine import labels, pipeline as engine\nfrom cvseg_ros.codec import motion_vectors as mv\n"
            "from cvseg_ros.model import correction_head as ch, enet, luma_matching as lm, warping\n"
            "loops = (mv._paint_blocks, mv._window_means, labels._arg_max_planes,\n"
            "         labels._arg_max_last_kernel(11), lm._refine, warping._warp_channels_last,\n"
            "         labels._mend_upsampled_ids, ch._correction_kernel(11, 3, 16), labels._fill_taps,\n"
            "         enet._add_prelu_channels_last_)\n"
            "before = [len(f.signatures) for f in loops]\n"
            "engine.SegmentationEngine(device='cpu')\n"
            "print(before, [len(f.signatures) for f in loops])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split("\n")[-2] == "[0, 0, 0, 0, 0, 0, 0, 0, 0, 0] [1, 1, 1, 1, 1, 1, 2, 1, 1, 1]", \
        out.stdout + out.stderr


def test_model_inputs_bring_the_frames_to_the_work_size(real_frames):
    """The tensors the engine hands the model, from real reader output: at the frame's own size
    as the reader gave them; at a smaller work size resized, the vectors scaled with the image;
    without the P-frame branch only the vectors (and the luma)."""
    from cvseg_ros.codec.residual import residual_stats
    from cvseg_ros.engine.inputs import ModelInputs
    inputs = ModelInputs(torch.device("cpu"), residual_stride=2, intra=True, luma=True)
    i_frame, p_frames = real_frames[0], real_frames[1:3]
    rgb = inputs.rgb([i_frame], (360, 480))
    assert rgb.shape == (1, 3, 360, 480) and rgb.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(rgb[0].permute(1, 2, 0) * 255, torch.from_numpy(i_frame.rgb).float())
    t = inputs.p_frame(p_frames, (360, 480))
    assert t["residual"] is None and t["motion_vectors"].shape == (2, 2, 90, 120)
    assert torch.equal(t["motion_vectors"][1], torch.from_numpy(p_frames[1].motion_vectors))
    assert torch.equal(t["residual_stats"][0], torch.from_numpy(residual_stats(p_frames[0].residual, cell=2)))
    assert torch.equal(t["intra"][0, 0] > 0.5, torch.from_numpy(p_frames[0].intra))
    assert torch.equal(t["luma"][1, 0], torch.from_numpy(p_frames[1].luma_cells).float())
    small = inputs.p_frame(p_frames[:1], (176, 240))
    assert small["motion_vectors"].shape == (1, 2, 44, 60) and small["intra"].shape == (1, 1, 44, 60)
    assert small["residual_stats"].shape == (1, 2, 44, 60) and small["luma"].shape == (1, 1, 44, 60)
    big = t["motion_vectors"][0].abs().max()
    assert 0.4 * big <= small["motion_vectors"][0].abs().max() <= 0.6 * big   # vectors in work-size pixels
    assert inputs.rgb([i_frame], (176, 240)).shape == (1, 3, 176, 240)
    bare = ModelInputs(torch.device("cpu"), residual_stride=2, intra=True, p_frame_branch=False).p_frame(
        p_frames, (360, 480))
    assert bare["motion_vectors"].shape == (2, 2, 90, 120) and "luma" not in bare
    assert bare["residual"] is bare["residual_stats"] is bare["intra"] is None


def test_cameras_in_one_call_run_as_one_batch_with_the_masks_they_get_alone(real_units):
    """Two cameras' frames in one :meth:`process` call run as one batch per kind (their states
    concatenated, then split back) and get the masks each camera gets alone."""
    other = moving_still(3, 5, 6)
    alone = {}
    for camera, units in (("a", real_units), ("b", other)):
        engine = SegmentationEngine(device="cpu")
        alone[camera] = [r.mask for i, u in enumerate(units) for r in engine.process([(camera, u, i)])]
    engine = SegmentationEngine(device="cpu")
    batches, p_frame = [], engine.model.p_frame
    engine.model.p_frame = lambda **k: batches.append(k["state"].hidden.shape[0]) or p_frame(**k)
    together = {"a": [], "b": []}
    for i, (ua, ub) in enumerate(zip(real_units, other)):
        for r in engine.process([("a", ua, i), ("b", ub, i)]):
            together[r.camera].append(r.mask)
    assert batches == [2] * 4
    for camera in ("a", "b"):
        assert len(together[camera]) == len(alone[camera]) == 6
        for got, want in zip(together[camera], alone[camera]):
            assert (got == want).mean() > 0.999
    assert engine._cameras["a"].state.hidden.shape[0] == 1


def test_many_cameras_in_one_round_run_in_batches_of_at_most_max_batch(real_units):
    """20 cameras with their IDR (then a P-frame) in the same call: the I-frame network and the
    P-frame step each take at most MAX_BATCH frames per call, and every camera gets its masks."""
    from cvseg_ros.engine.pipeline import MAX_BATCH
    engine = SegmentationEngine(device="cpu", decode_threads=1)
    sizes, i_frame, p_frame = [], engine.model.i_frame, engine.model.p_frame
    engine.model.i_frame = lambda rgb, **k: sizes.append(("I", rgb.shape[0])) or i_frame(rgb, **k)
    engine.model.p_frame = lambda **k: sizes.append(("P", k["state"].hidden.shape[0])) or p_frame(**k)
    cameras = [f"c{k}" for k in range(20)]
    for i in range(2):
        results = engine.process([(c, real_units[i], i) for c in cameras])
        assert sorted(r.camera for r in results) == sorted(cameras)
    assert max(n for _, n in sizes) == MAX_BATCH == 8
    assert [n for kind, n in sizes if kind == "I"] == [8, 8, 4] and [n for kind, n in sizes if kind == "P"] == [8, 8, 4]


def test_cameras_decoded_in_parallel_give_what_one_thread_gives(real_units):
    """``decode_threads``: the cameras of one call are decoded by several threads, each camera's
    units in order; masks, stamps, kinds and the order of the results are those of one thread,
    with several units of one camera in a call too."""
    streams = {"a": real_units, "b": moving_still(3, 5, 6), "c": moving_still(1, 2, 6)}
    runs = {}
    for threads in (1, 3):
        engine = SegmentationEngine(device="cpu", decode_threads=threads)
        out = []
        for i in range(0, 6, 2):   # two units of each camera per call
            calls = [(c, u[j], (c, j)) for j in (i, i + 1) for c, u in streams.items()]
            out += [(r.camera, r.stamp, r.kind, r.mask) for r in engine.process(calls)]
        runs[threads] = out
        assert engine._decoding.started == (threads > 1)
        engine.close()
        assert not engine._decoding.started and engine.decode_threads == 1
    assert len(runs[1]) == len(runs[3]) == 18
    for (c1, s1, k1, m1), (c3, s3, k3, m3) in zip(runs[1], runs[3]):
        assert (c1, s1, k1) == (c3, s3, k3) and np.array_equal(m1, m3)
    with pytest.raises(ValueError, match="decode_threads"):
        SegmentationEngine(device="cpu", decode_threads=-1)


def test_runtime_resolves_devices_and_precisions():
    from cvseg_ros.engine.runtime import PRECISIONS, resolve_device, resolve_precision
    cpu = resolve_device("cpu")
    assert cpu == torch.device("cpu") and resolve_device(" CPU ") == cpu
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_precision("auto", cpu) in ("fp32", "mixed")
    assert [resolve_precision(p, cpu) for p in PRECISIONS[1:]] == list(PRECISIONS[1:])
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("fp8", cpu)


def test_b_frames_are_segmented_from_the_state_without_changing_it(b_frame_units):
    """A B-frame's mask is a P step from the camera's state (the frame before it in display
    order) that is not kept: its masks agree with the network run on the B-frame's own pixels
    nearly as well as the P-frames' do and better than the I-frame's mask repeated; a call that
    gives only B-frames leaves the camera's state as it was."""
    units, shown = b_frame_units

    def masks(mode):
        engine = SegmentationEngine("fast", device="cpu", mode=mode)
        out, kept = {}, []
        for k, u in zip(shown, units):
            before = engine._cameras["c"].state if "c" in engine._cameras else None
            results = engine.process([("c", u, k)])
            if results and all(r.kind == "B" for r in results):
                kept.append(engine._cameras["c"].state is before)
            out.update((r.stamp, r) for r in results)
        out.update((r.stamp, r) for r in engine.flush("c"))
        return out, kept

    (compressed, kept), (per_frame, _), (copy, _) = masks("compressed"), masks("per_frame"), masks("iframe_copy")
    assert sorted(compressed) == sorted(per_frame) == sorted(copy) == list(range(36))
    assert len(kept) >= 10 and all(kept)

    def agreement(kind, run):
        return np.mean([(run[k].mask == per_frame[k].mask).mean() for k in run if run[k].kind == kind])
    assert agreement("B", compressed) > max(agreement("P", compressed) - 0.03, agreement("B", copy) + 0.01)
    assert all(compressed[k].network == "p_frame" for k in compressed if compressed[k].kind == "B")
