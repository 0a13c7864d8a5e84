"""Luma matching on real H.264: the CamVid val sequence (or the fallback clip), read by our reader."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cvseg_ros.common.kernels import OperationCounter
from cvseg_ros.model import luma_matching
from cvseg_ros.model.segmenter import CompressedSegmenter, make_config
from cvseg_ros.model.warping import warp
from cvseg_ros.codec.decoder import H264StreamDecoder
from cvseg_ros.codec.video import encode_frames

from conftest import street_frames


@pytest.fixture(scope="module")
def val_gop():
    """The first GOP (an I-frame and 11 P-frames) of the CamVid val sequence (a street with
    cyclists and cars), encoded as the evaluation does and read back with the shipped settings."""
    frames = street_frames(12)
    decoder = H264StreamDecoder("val", residual_size=lambda h, w: (h // 2, w // 2), deblock_p_frames=False)
    return [f for u in encode_frames(frames, fps=15, gop=12) for f in decoder.feed(u)]


def accumulated_motions(frames):
    """Per P-frame: (accumulated motion since the I-frame, this frame's luma cells, the I-frame's),
    the motion carried as the improved model carries it (corrected frame after frame)."""
    cells = lambda f: torch.from_numpy(f.luma_cells).float()[None, None]   # noqa: E731
    i_frame_luma, acc, out = cells(frames[0]), None, []
    for f in frames[1:]:
        mv = torch.from_numpy(f.motion_vectors)[None]
        raw = mv if acc is None else mv + warp(acc, mv)
        out.append((raw, cells(f), i_frame_luma))
        acc = luma_matching.refine_accumulated_motion(raw, cells(f), i_frame_luma)
    return out


def test_reader_gives_the_luma_of_every_cell(val_gop):
    assert [f.kind for f in val_gop] == ["I"] + ["P"] * 11
    for f in val_gop:
        assert f.luma_cells.shape == (90, 120) and f.luma_cells.dtype == np.uint8
    # the mean of each 4x4 cell of the decoded luma: the I-frame's against its RGB (BT.601,
    # limited range, as the decoder converted it)
    rgb = val_gop[0].rgb.astype(np.float32)
    luma = 16 + (rgb @ np.array([0.299, 0.587, 0.114], np.float32)) * 219 / 255
    cells = luma.reshape(90, 4, 120, 4).mean(axis=(1, 3))
    assert np.abs(cells - val_gop[0].luma_cells).mean() < 1.5


def test_matching_moves_only_outline_cells_to_a_better_matching_neighbour_vector(val_gop):
    changed_total = 0
    for raw, luma, ref in accumulated_motions(val_gop):
        refined = luma_matching.refine_accumulated_motion(raw, luma, ref)
        changed = (refined != raw).any(dim=1)[0]
        changed_total += int(changed.sum())
        if not changed.any():
            continue
        # every new vector is one of the cell's 3x3 neighbours' vectors ...
        neighbours = luma_matching.neighbourhood(raw)
        assert ((neighbours == refined[:, None]).all(dim=2)).any(dim=1)[0][changed].all()
        # ... on an outline: along a row, column or diagonal the field bends by more than SPREAD ...
        assert luma_matching.outlines(raw)[0][changed].all()
        # ... that matches the pixels better than the old one, by the margin
        scale = 1.0 / luma_matching.CELL
        before = luma_matching.patch_costs(raw, luma, ref, scale)[0]
        after = luma_matching.patch_costs(refined, luma, ref, scale)[0]
        assert (after[changed] < before[changed] - luma_matching.MARGIN + 1e-3).all()
        assert (before[changed] > luma_matching.GOOD).all()
    # the camera drives forward past cyclists and parked cars: outlines get corrected
    assert changed_total > 500


def test_compiled_loop_and_tensor_operations_decide_alike(val_gop):
    for raw, luma, ref in accumulated_motions(val_gop)[::3]:
        # the same outline cells (but where the bend is within float rounding of SPREAD: the
        # loop subtracts twice the cell's vector in float64) ...
        field = raw[0].contiguous().numpy()
        marked = np.empty(field.shape[1:], np.bool_)
        luma_matching._mark_outlines(field[0], field[1], np.float32(luma_matching.SPREAD), marked)
        ahead = luma_matching.neighbourhood(raw, luma_matching.BENDS)
        behind = luma_matching.neighbourhood(raw, [(-di, -dj) for di, dj in luma_matching.BENDS])
        bends = (ahead + behind - 2 * raw[:, None]).abs().sum(dim=2)[0]
        near_tie = ((bends - luma_matching.SPREAD).abs() < 1e-4).any(dim=0).numpy()
        differ = marked != luma_matching.outlines(raw)[0].numpy()
        assert marked.sum() > 500 and not (differ & ~near_tie).any() and differ.sum() <= 2
        # ... and the same corrections
        compiled = luma_matching.refine_accumulated_motion(raw, luma, ref)
        tensors = luma_matching._refine_tensors(raw, luma, ref, 1.0 / luma_matching.CELL)
        differ = ((compiled - tensors).abs().sum(dim=1) > 1e-4).float().mean()
        assert differ < 1e-3, differ   # float rounding may settle a near tie the other way


def test_a_smoothly_moving_picture_is_left_alone(val_gop):
    raw, luma, ref = accumulated_motions(val_gop)[5]
    uniform = torch.ones_like(raw) * raw.mean(dim=(2, 3), keepdim=True)
    assert torch.equal(luma_matching.refine_accumulated_motion(uniform, luma, ref), uniform)
    # a zoom (driving forward): the vectors grow towards the edges, by up to 3 px from cell to
    # cell, but steadily: no outline
    ys, xs = torch.meshgrid(torch.arange(90.0), torch.arange(120.0), indexing="ij")
    zoom = torch.stack([(xs - 60) * 3.0, (ys - 45) * 3.0])[None]
    assert not luma_matching.outlines(zoom).any()
    assert torch.equal(luma_matching.refine_accumulated_motion(zoom, luma, ref), zoom)
    # a step between two motions is an outline on both sides
    step = torch.zeros(1, 2, 90, 120)
    step[:, 0, :, 60:] = 8.0
    assert luma_matching.outlines(step)[0, 1:-1].nonzero()[:, 1].unique().tolist() == [59, 60]
    with pytest.raises(ValueError, match="cover"):   # the compiled loop would read past the maps
        luma_matching.refine_accumulated_motion(raw, luma[..., :-1, :], ref)


def test_model_carries_the_i_frame_luma_and_corrects_its_motion(val_gop):
    torch.manual_seed(0)
    config = make_config("improved", luma_matching=True, match_guide=True)
    model = CompressedSegmenter(config).eval()
    plain = CompressedSegmenter(dataclasses.replace(config, luma_matching=False)).eval()
    plain.load_state_dict(model.state_dict())
    cells = lambda f: torch.from_numpy(f.luma_cells).float()[None, None]   # noqa: E731
    rgb = torch.from_numpy(val_gop[0].rgb).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        _, state = model.i_frame(rgb, luma=cells(val_gop[0]))
        plain_state = state
        assert torch.equal(state.i_frame_luma, cells(val_gop[0]))
        for f in val_gop[1:]:
            inputs = dict(motion_vectors=torch.from_numpy(f.motion_vectors)[None],
                          residual=torch.from_numpy(f.residual)[None, None].float() / 255,
                          intra=torch.from_numpy(f.intra)[None, None].float(), luma=cells(f))
            logits, state = model.p_frame(state=state, **inputs)
            plain_logits, plain_state = plain.p_frame(state=plain_state, **inputs)
            assert logits.shape == (1, 11, 90, 120) and torch.equal(state.i_frame_luma, cells(val_gop[0]))
        # same weights: only the corrected motion (and so the match guide) tells them apart
        assert not torch.equal(state.motion, plain_state.motion)
        assert (logits.argmax(1) != plain_logits.argmax(1)).any()
        # without the I-frame's luma (the engine's other modes) the state holds none and the
        # P-frames run unmatched: as the plain model
        _, bare = model.i_frame(rgb)
        assert bare.i_frame_luma is None and bare.motion is not None
        unmatched, _ = model.p_frame(state=bare, **inputs)
        assert torch.equal(unmatched, plain.p_frame(state=bare, **inputs)[0])
    with pytest.raises(ValueError, match="accumulate"):
        make_config("improved", accumulate=False, luma_matching=True)


def test_engine_gives_the_shipped_model_the_decoders_luma(val_gop):
    """The shipped improved model matches luma; the engine hands it the reader's luma cells of
    the I-frame (kept in the state) and of each P-frame."""
    from cvseg_ros.engine.pipeline import SegmentationEngine
    engine = SegmentationEngine(device="cpu")
    assert engine.model.config.luma_matching
    seen, p_frame = [], engine.model.p_frame
    engine.model.p_frame = lambda *a, **k: seen.append(k["luma"]) or p_frame(*a, **k)
    frames = street_frames(12)
    results = [r for i, u in enumerate(encode_frames(frames, fps=15, gop=12)) for r in engine.process([("cam", u, i)])]
    assert [r.network for r in results] == ["i_frame"] + ["p_frame"] * 11
    assert torch.equal(engine._cameras["cam"].state.i_frame_luma[0, 0], torch.from_numpy(val_gop[0].luma_cells).float())
    for got, frame in zip(seen, val_gop[1:]):
        assert torch.equal(got[0, 0], torch.from_numpy(frame.luma_cells).float())


def test_engine_can_leave_the_matching_off(val_gop):
    """``luma_matching=False`` (the node's parameter): the model gets no luma and uses the
    accumulated motion as it is; the masks differ from the default engine's."""
    from cvseg_ros.engine.pipeline import SegmentationEngine
    frames = street_frames(12)
    units = encode_frames(frames, fps=15, gop=12)
    masks = {}
    for on in (True, False):
        engine = SegmentationEngine(device="cpu", luma_matching=on)
        seen, p_frame = [], engine.model.p_frame
        engine.model.p_frame = lambda *a, **k: seen.append(k.get("luma")) or p_frame(*a, **k)
        masks[on] = [r.mask for i, u in enumerate(units) for r in engine.process([("cam", u, i)])]
        assert len(seen) == 11 and all((luma is not None) == on for luma in seen)
        assert (engine._cameras["cam"].state.i_frame_luma is not None) == on   # the I-frame's luma kept or not
    assert np.array_equal(masks[True][0], masks[False][0])            # the I-frame
    per_frame = SegmentationEngine(device="cpu", mode="per_frame")   # no luma work in the other modes
    per_frame.process([("cam", units[0], 0)])
    assert per_frame._cameras["cam"].state is None                   # (nor any model state)
    assert any(not np.array_equal(a, b) for a, b in zip(masks[True][1:], masks[False][1:]))


def test_the_tensor_formulation_launches_a_fixed_number_of_operations(val_gop):
    """On a GPU each operation is a kernel launch: the shifted maps come from one padded copy
    (no index tensors per shift), and the count depends on neither the map nor the batch."""
    field = torch.zeros(1, 2, 9, 12)
    with OperationCounter() as few, torch.no_grad():
        luma_matching.neighbourhood(field, luma_matching.BENDS)
    with OperationCounter() as all_nine, torch.no_grad():
        luma_matching.neighbourhood(field)
    assert few.total == all_nine.total == 2       # a pad and a stack
    raw, luma, ref = accumulated_motions(val_gop)[5]
    counts = []
    for batch, cells in ((1, slice(None)), (3, slice(None)), (2, slice(0, 45))):
        args = [t[..., cells, :].repeat(batch, 1, 1, 1) for t in (raw, luma, ref)]
        luma_matching._refine_tensors(*args, 1.0 / luma_matching.CELL)   # the per-size constants, made once
        with OperationCounter() as count, torch.no_grad():
            luma_matching._refine_tensors(*args, 1.0 / luma_matching.CELL)
        assert not {"arange", "index", "clamp_", "clamp"} & set(count.ops), count.ops
        counts.append(count.total)
    assert counts[0] == counts[1] == counts[2] <= 80, counts        # 351 with index tensors per shift
