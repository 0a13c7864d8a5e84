"""Motion vectors against a known sub-pixel translation, and the residual on static / real video."""
from __future__ import annotations

import itertools

import av
import cv2
import numpy as np
import pytest

from conftest import FUZZ_CLIP, SMALL1_CLIP, require
from cvseg_ros.codec.motion_vectors import GRID, dense_field, field_shape, fill_intra
from cvseg_ros.codec.decoder import H264StreamDecoder
from cvseg_ros.codec.video import encode_frames, read_access_units

SIZE = (320, 240)   # (w, h) of the encoded frames
FRAMES = 24         # two GOPs of 12
BORDER = 4          # field cells (16 px) left out along each edge


def translated(image: np.ndarray, shift: tuple[float, float], count: int) -> list[np.ndarray]:
    """Frames where the content moves by ``shift`` px per frame (cubic warp, centre crop, no border)."""
    h, w = image.shape[:2]
    out_w, out_h = SIZE
    x0, y0 = (w - out_w) // 2, (h - out_h) // 2
    assert abs(shift[0]) * count < x0 and abs(shift[1]) * count < y0, "borders would enter the crop"
    frames = []
    for k in range(count):
        m = np.float32([[1, 0, shift[0] * k], [0, 1, shift[1] * k]])   # dst(p + k*s) = src(p)
        moved = cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_CUBIC)
        frames.append(np.ascontiguousarray(moved[y0:y0 + out_h, x0:x0 + out_w]))
    return frames


def decode_all(units: list[bytes]):
    decoder = H264StreamDecoder()
    frames = []
    for unit in units:
        out = decoder.feed(unit)
        assert len(out) == 1
        frames.extend(out)
    assert decoder.stats.corrupt == 0 and decoder.stats.frames == len(units)
    return frames, decoder.stats


@pytest.mark.parametrize("shift", [(1.25, -0.75), (-2.5, 0.5)], ids=["1.25,-0.75", "-2.5,0.5"])
def test_field_matches_a_known_subpixel_translation(camvid_image, shift):
    frames, stats = decode_all(encode_frames(translated(camvid_image, shift, FRAMES), gop=12))
    assert stats.i_frames == 2 and stats.p_frames == FRAMES - 2
    rows, cols = field_shape(SIZE[1], SIZE[0])
    inner = np.zeros((rows, cols), bool)
    inner[BORDER:-BORDER, BORDER:-BORDER] = True
    expected = -np.asarray(shift, np.float32)   # content at p came from p - s: mv = -s
    hits = total = 0
    for frame in frames:
        if frame.kind == "I":
            assert frame.motion_vectors is None and frame.reset
            continue
        field, intra = frame.motion_vectors, frame.intra
        assert field.shape == (2, rows, cols) and field.dtype == np.float32
        assert intra.shape == (rows, cols) and intra.dtype == bool
        cells = inner & ~intra
        assert cells.sum() > 0.5 * inner.sum(), "almost no inter cells: the test would prove nothing"
        error = np.hypot(field[0] - expected[0], field[1] - expected[1])[cells]
        assert np.median(error) <= 0.25, (frame.index, np.median(field[0][cells]), np.median(field[1][cells]))
        hits += int((error <= 0.5).sum())
        total += int(cells.sum())
    assert hits / total >= 0.90, f"only {hits / total:.1%} of the inner inter cells within 0.5 px"


def test_static_scene_has_zero_vectors_and_residual(camvid_image):
    crop = np.ascontiguousarray(camvid_image[:SIZE[1], :SIZE[0]])
    frames, _ = decode_all(encode_frames([crop] * 12, gop=12))
    for frame in frames[1:]:
        assert frame.kind == "P" and not frame.reset
        assert frame.residual.shape == (SIZE[1], SIZE[0]) and frame.residual.dtype == np.int16
        assert np.abs(frame.residual).mean() < 1.0
        moved = np.abs(frame.motion_vectors).max(axis=0)[~frame.intra]
        # nothing moves: (almost) every inter cell says so (flat patches may get a stray vector)
        assert moved.size == 0 or (moved == 0).mean() >= 0.9


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("clip", [FUZZ_CLIP, SMALL1_CLIP], ids=lambda p: p.name)
def test_residual_energy_on_real_video(clip, stride):
    """The rebuilt residual (at full size, and at half size as the models take it) is far smaller
    than the frame difference: the vectors predict the frame."""
    require(clip, "real clip")
    units = [u.data for u in itertools.islice(read_access_units(clip), 60)]
    decoder = H264StreamDecoder(residual_size=lambda h, w: (h // stride, w // stride))
    plain = av.CodecContext.create("h264", "r")   # independent decode for the frame difference
    residual_energy, diff_energy, frame_energy = [], [], []
    previous = None
    for unit in units:
        (frame,) = decoder.feed(unit)
        (ref,) = plain.decode(av.Packet(unit))
        luma = ref.to_ndarray(format="gray")
        if stride > 1:
            luma = cv2.resize(luma, (luma.shape[1] // stride, luma.shape[0] // stride), interpolation=cv2.INTER_AREA)
        luma = luma.astype(np.float64)
        if frame.kind == "P":
            assert frame.residual is not None and frame.residual.shape == luma.shape
            assert previous is not None
            residual_energy.append(np.mean(frame.residual.astype(np.float64) ** 2))
            diff_energy.append(np.mean((luma - previous) ** 2))
            frame_energy.append(np.mean(luma ** 2))
        previous = luma
    assert len(residual_energy) >= 50
    residual, diff, energy = map(np.mean, (residual_energy, diff_energy, frame_energy))
    assert residual < 0.7 * diff, (residual, diff)
    assert residual < 0.05 * energy, (residual, energy)


def test_field_grid_is_four_pixels():
    assert GRID == 4
    assert field_shape(540, 960) == (135, 240) and field_shape(181, 322) == (46, 81)


def test_intra_cells_take_their_neighbours_motion():
    rows, cols = 60, 80
    field = np.zeros((2, rows, cols), np.float32)
    field[0], field[1] = 1.5, -0.5
    intra = np.zeros((rows, cols), bool)
    intra[20:26, 30:36] = True          # a small hole: the 5-cell window sees inter cells
    intra[:10, :10] = True              # a large corner: only the 23-cell window does
    field[:, intra] = 0.0               # what dense_field gives intra cells
    filled = fill_intra(field, intra)
    assert np.allclose(filled[0][intra], 1.5, atol=1e-4) and np.allclose(filled[1][intra], -0.5, atol=1e-4)
    assert np.array_equal(filled[:, ~intra], field[:, ~intra])           # inter cells unchanged
    # zoom-like motion: the left half moves left, the right half right; a hole on the left takes
    # the left's motion, not the mean of the frame
    field[0, :, :40], field[0, :, 40:], field[1] = -2.0, 2.0, 0.0
    hole = np.zeros((rows, cols), bool)
    hole[30:33, 10:13] = True
    field[:, hole] = 0.0
    assert np.allclose(fill_intra(field, hole)[0][hole], -2.0, atol=1e-4)
    # nothing to fill from, or nothing to fill: the field as it is
    assert fill_intra(field, np.ones((rows, cols), bool)) is field
    assert fill_intra(field, np.zeros((rows, cols), bool)) is field


def painted_by_hand(blocks: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """dense_field's job done block by block and cell by cell in plain Python (the reference)."""
    rows, cols = field_shape(height, width)
    field = np.zeros((2, rows, cols), np.float32)
    intra = np.ones((rows, cols), bool)
    for b in blocks:
        if b["source"] >= 0:
            continue
        scale = np.float32(max(int(b["motion_scale"]), 1))
        left, top = (int(b["dst_x"]) - int(b["w"]) // 2) // GRID, (int(b["dst_y"]) - int(b["h"]) // 2) // GRID
        for y in range(top, top + max(int(b["h"]) // GRID, 1)):
            for x in range(left, left + max(int(b["w"]) // GRID, 1)):
                if 0 <= y < rows and 0 <= x < cols:
                    field[:, y, x] = np.float32(b["motion_x"]) / scale, np.float32(b["motion_y"]) / scale
                    intra[y, x] = False
    return field, intra


def filled_by_box_filters(field: np.ndarray, intra: np.ndarray, sizes=(5, 23)) -> np.ndarray:
    """fill_intra's job with OpenCV box filters (the reference): per intra cell, the inter cells'
    mean vector in the smallest window that has any."""
    inter = (~intra).astype(np.float64)
    out = field.astype(np.float64).copy()
    todo = intra.copy()
    for size in sorted(sizes):
        sx, sy, n = (cv2.boxFilter(p, -1, (size, size), normalize=False, borderType=cv2.BORDER_CONSTANT)
                     for p in (field[0] * inter, field[1] * inter, inter))
        here = todo & (n > 0.5)
        out[0][here], out[1][here] = sx[here] / n[here], sy[here] / n[here]
        todo &= ~here
    out[:, todo] = 0.0
    return out


def test_field_and_intra_fill_match_plain_references_on_real_video():
    """The compiled block painting and intra fill against the plain references above, on the
    exported blocks of real P-frames (all block sizes, blocks along every border)."""
    clip = require(FUZZ_CLIP, "real clip")
    checked = sizes = 0
    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        stream.codec_context.options = {"flags2": "+export_mvs"}
        for frame in itertools.islice(container.decode(stream), 40):
            side = frame.side_data.get("MOTION_VECTORS")
            if side is None:
                continue
            blocks = side.to_ndarray()
            field, intra = dense_field(blocks, frame.height, frame.width)
            ref_field, ref_intra = painted_by_hand(blocks, frame.height, frame.width)
            assert np.array_equal(field, ref_field) and np.array_equal(intra, ref_intra)
            assert 0 < intra.sum() < intra.size, "no intra cells to fill: the test would prove little"
            assert np.allclose(fill_intra(field, intra), filled_by_box_filters(field, intra), atol=1e-4)
            sizes = max(sizes, len(np.unique(blocks["w"].astype(int) * 100 + blocks["h"])))
            checked += 1
    assert checked >= 30 and sizes >= 3, (checked, sizes)


def test_filled_vectors_predict_real_video_better(monkeypatch):
    """On a real clip the filled intra cells give a better motion-compensated prediction (a smaller
    residual) than zero motion would."""
    import cvseg_ros.codec.decoder as stream

    clip = require(FUZZ_CLIP, "real clip")
    units = [u.data for u in itertools.islice(read_access_units(clip), 48)]

    def residual_energy():
        decoder = H264StreamDecoder()
        frames = [f for u in units for f in decoder.feed(u) if f.kind == "P"]
        intra_share = np.mean([f.intra.mean() for f in frames])
        return np.mean([np.mean(f.residual.astype(np.float64) ** 2) for f in frames]), intra_share

    filled, intra_share = residual_energy()
    monkeypatch.setattr(stream, "fill_intra", lambda field, intra: field)
    zero, _ = residual_energy()
    assert intra_share > 0.01, f"only {intra_share:.2%} intra cells: nothing to compare"
    assert filled < 0.97 * zero, (filled, zero, intra_share)


def test_skipping_the_p_frames_deblocking_keeps_vectors_and_i_frames():
    """``deblock_p_frames=False`` (what the shipped models take): the same vectors and intra cells
    (they come from the bitstream), I-frames decoded exactly, P-frame pixels close to the exact
    decode, and a residual still far smaller than the frame difference."""
    clip = require(FUZZ_CLIP, "real clip")
    units = [u.data for u in itertools.islice(read_access_units(clip), 30)]
    exact = H264StreamDecoder(rgb_for_p_frames=True)
    fast = H264StreamDecoder(rgb_for_p_frames=True, deblock_p_frames=False)
    drift, residual, diff = [], [], []
    previous = None
    for unit in units:
        (a,), (b,) = exact.feed(unit), fast.feed(unit)
        assert a.kind == b.kind
        if a.kind == "I":
            assert np.array_equal(a.rgb, b.rgb)
        else:
            assert np.array_equal(a.motion_vectors, b.motion_vectors) and np.array_equal(a.intra, b.intra)
            drift.append(np.abs(a.rgb.astype(np.int16) - b.rgb).mean())
            residual.append(np.mean(b.residual.astype(np.float64) ** 2))
            luma = cv2.cvtColor(b.rgb, cv2.COLOR_RGB2GRAY).astype(np.float64)
            if previous is not None:
                diff.append(np.mean((luma - previous) ** 2))
        previous = cv2.cvtColor(b.rgb, cv2.COLOR_RGB2GRAY).astype(np.float64)
    assert len(drift) >= 25 and 0 < max(drift) < 3.0, drift
    assert np.mean(residual) < 0.7 * np.mean(diff)
