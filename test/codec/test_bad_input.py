"""Bad input never raises out of the reader: mid-GOP joins, damaged units, size changes, B-frames."""
from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SMALL_CLIP, accounted, read_rgb, require
from cvseg_ros.codec.motion_vectors import field_shape
from cvseg_ros.codec.annexb import UnsupportedStreamError, check_format, is_h264_format
from cvseg_ros.codec.decoder import H264StreamDecoder
from cvseg_ros.codec.video import encode_frames


def feed_checked(decoder: H264StreamDecoder, unit: bytes, stamp=None) -> list:
    """Feed one unit and check what must hold after every unit, whatever it was."""
    out = decoder.feed(unit, stamp)
    st_ = decoder.stats
    assert isinstance(out, list) and len(out) <= 1
    assert accounted(st_) == st_.access_units, st_
    for frame in out:
        assert frame.stamp is stamp
        assert frame.kind in ("I", "P")
        if frame.reset:
            assert frame.rgb is not None and frame.rgb.shape == (frame.height, frame.width, 3)
        if frame.kind == "P":
            rows, cols = field_shape(frame.height, frame.width)
            assert frame.motion_vectors.shape == (2, rows, cols)
            assert frame.intra.shape == (rows, cols)
            if frame.residual is not None:
                assert frame.residual.shape == (frame.height, frame.width)
    return out


# -- joining a stream in the middle of a GOP ------------------------------------------------------

def test_mid_gop_join(gop12_units):
    decoder = H264StreamDecoder()
    frames = []
    for unit in gop12_units[5:]:
        frames.extend(feed_checked(decoder, unit))
    st_ = decoder.stats
    assert st_.skipped_before_keyframe == 7
    assert st_.corrupt == 0 and st_.no_output == 0 and st_.b_frames == 0
    assert st_.frames == len(gop12_units) - 12 == len(frames)
    assert st_.i_frames == 2 and st_.resyncs == 0
    assert frames[0].kind == "I" and frames[0].reset and frames[0].key_frame
    assert [f.gop_index for f in frames[:13]] == list(range(12)) + [0]
    assert all(not f.reset for f in frames if f.kind == "P")


def test_explicit_bad_units_and_discontinuity(clip_units):
    idr, p1, p2, p3 = clip_units[:4]
    decoder = H264StreamDecoder()
    assert feed_checked(decoder, b"") == []
    assert feed_checked(decoder, b"\xff" * 100) == []                 # no start code
    assert feed_checked(decoder, p1) == []                            # before the first IDR
    st_ = decoder.stats
    assert (st_.corrupt, st_.skipped_before_keyframe) == (2, 1)
    assert "empty" in st_.errors[0] and "start code" in st_.last_error
    (frame,) = feed_checked(decoder, idr, "t0")
    assert frame.kind == "I" and frame.reset and frame.rgb is not None and frame.stamp == "t0"
    (frame,) = feed_checked(decoder, p1)
    assert frame.kind == "P" and not frame.reset and frame.rgb is None and frame.gop_index == 1
    decoder.mark_discontinuity("lost a message")                      # p2 never arrives
    (frame,) = feed_checked(decoder, p3)
    assert frame.kind == "P" and frame.reset and frame.rgb is not None
    assert st_.resyncs == 1 and "lost a message" in st_.last_error
    # restart(): the decoder waits for an IDR again
    decoder.restart()
    assert feed_checked(decoder, p1) == [] and st_.skipped_before_keyframe == 2
    (frame,) = feed_checked(decoder, idr)
    assert frame.kind == "I" and frame.reset


# -- property: damaged / random / empty units never break the reader ------------------------------

damage = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 15),
              st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
                       min_size=1, max_size=40)),
    st.tuples(st.just("truncate"), st.integers(0, 15), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("random"), st.binary(min_size=1, max_size=3000)),
    st.tuples(st.just("startcode_random"), st.binary(min_size=1, max_size=3000)),
    st.tuples(st.just("empty"),),
    st.tuples(st.just("clean"), st.integers(0, 15)),
    st.tuples(st.just("splice"), st.integers(0, 15), st.integers(0, 15), st.floats(0.05, 0.95)),
)


def apply(recipe: tuple, units: list[bytes]) -> bytes:
    kind = recipe[0]
    if kind == "flip":
        data = bytearray(units[recipe[1]])
        for where, bit in recipe[2]:
            data[int(where * len(data))] ^= 1 << bit
        return bytes(data)
    if kind == "truncate":
        data = units[recipe[1]]
        return data[: int(recipe[2] * len(data))]
    if kind == "random":
        return recipe[1]
    if kind == "startcode_random":
        return b"\x00\x00\x00\x01" + recipe[1]
    if kind == "empty":
        return b""
    if kind == "clean":
        return units[recipe[1]]
    if kind == "splice":   # head of one unit, tail of another
        a, b = units[recipe[1]], units[recipe[2]]
        return a[: int(recipe[3] * len(a))] + b[int(recipe[3] * len(b)):]
    raise AssertionError(kind)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clean_prefix=st.integers(-1, 3), damaged=st.lists(damage, min_size=1, max_size=6),
       clean_tail=st.integers(1, 4))
def test_damaged_units_never_break_the_reader(clip_units, clean_prefix, damaged, clean_tail):
    decoder = H264StreamDecoder()
    for unit in clip_units[: clean_prefix + 1]:       # -1: start straight with damage
        feed_checked(decoder, unit)
    for recipe in damaged:
        feed_checked(decoder, apply(recipe, clip_units))
    # a clean IDR: the stream is back, the model restarts there
    out = feed_checked(decoder, clip_units[0], "idr")
    assert len(out) == 1, decoder.stats
    assert out[0].kind == "I" and out[0].reset and out[0].stamp == "idr"
    assert (out[0].width, out[0].height) == (960, 540)
    for k, unit in enumerate(clip_units[1: clean_tail + 1], start=1):
        out = feed_checked(decoder, unit, k)
        assert len(out) == 1, decoder.stats
        assert out[0].kind == "P" and out[0].stamp == k


# -- resolution change at an IDR ------------------------------------------------------------------

def test_resolution_change_at_an_idr(gop12_units):
    require(SMALL_CLIP, "real clip")
    smaller = encode_frames(read_rgb(SMALL_CLIP, 12, (256, 144)), gop=12)
    decoder = H264StreamDecoder()
    frames = []
    for unit in gop12_units[:20] + smaller:
        frames.extend(feed_checked(decoder, unit))
    st_ = decoder.stats
    assert st_.resolution_changes == 1 and st_.corrupt == 0 and st_.frames == 32 == len(frames)
    assert all((f.width, f.height) == (320, 180) for f in frames[:20])
    after = frames[20:]
    assert after[0].kind == "I" and after[0].reset
    assert all((f.width, f.height) == (256, 144) for f in after)
    for f in after[1:]:
        assert f.kind == "P" and f.motion_vectors.shape == (2, 36, 64)
        assert f.residual.shape == (144, 256) and f.rgb is None


# -- B-frames: decoded in display order, each picture under its own unit's stamp --------------------

def test_b_frames_come_out_in_display_order_under_their_own_stamps(b_frame_units):
    """x264 with B-frames (B-pyramid): units arrive in decoding order, pictures come out some units
    later in display order; each carries the stamp of the unit it was coded in (here the
    encoder's display index, which the reader never sees)."""
    decoder = H264StreamDecoder()
    units, times = b_frame_units
    assert times != sorted(times), "the stream should send B-frames after their later reference"
    frames = []
    for unit, time in zip(units, times):
        frames.extend(decoder.feed(unit, time))
        st_ = decoder.stats
        assert accounted(st_) == st_.access_units, st_
    assert 0 < decoder.stats.held <= 2
    frames.extend(decoder.flush())
    st_ = decoder.stats
    assert [f.stamp for f in frames] == sorted(times)      # every picture, in display order
    assert st_.held == 0 and accounted(st_) == st_.access_units == len(frames)
    assert st_.b_frames == sum(f.kind == "B" for f in frames) > 0 and st_.corrupt == 0
    rows, cols = field_shape(180, 320)
    for f in frames:
        assert f.reset == (f.kind == "I")                   # a B-frame breaks no chain
        if f.kind != "I":
            assert f.motion_vectors.shape == (2, rows, cols) and f.residual.shape == (180, 320)
    # a B-frame's past-reference vectors, applied to the frame before it in display order, predict
    # it as well as a P-frame's vectors predict the P-frame (a future vector or the wrong
    # reference picture would leave a much larger residual)
    energy = {k: np.mean([np.abs(f.residual).mean() for f in frames if f.kind == k]) for k in "PB"}
    assert energy["B"] < 1.5 * energy["P"], energy
    assert all(not f.intra.all() for f in frames if f.kind == "B")


def test_the_slice_type_read_from_the_first_bytes_is_the_decoded_pictures_kind(b_frame_units):
    """``first_slice_type`` (what the node reads on receipt to accept a B-frame's earlier stamp)
    against the kind the decoder gives each unit's picture, on a real x264 B-frame stream."""
    from cvseg_ros.codec.h264_syntax import first_slice_type
    units, shown = b_frame_units
    decoder = H264StreamDecoder()
    kinds = {f.stamp: f.kind for u, k in zip(units, shown) for f in decoder.feed(u, k)}
    kinds.update((f.stamp, f.kind) for f in decoder.flush())
    assert [{0: "P", 1: "B", 2: "I"}[first_slice_type(u)] for u in units] == [kinds[k] for k in shown]
    assert first_slice_type(b"\x00\x00\x01\x09\xf0") is None        # no slice: an access-unit delimiter


# -- the CompressedImage.format check -------------------------------------------------------------

def test_check_format():
    with pytest.raises(UnsupportedStreamError, match="jpeg"):
        check_format("jpeg")
    with pytest.raises(UnsupportedStreamError, match="png"):
        check_format("rgb8; png compressed bgr8")
    for ok in ("h264", "H264", " h264 ", "avc1", "video/h264"):
        check_format(ok)
        assert is_h264_format(ok)
    assert not is_h264_format("")


def test_random_units_before_any_idr_are_accounted():
    rng = random.Random(1234)
    decoder = H264StreamDecoder()
    for n in range(40):
        size = rng.choice([0, 1, 4, 17, 300, 5000])
        data = bytes(rng.getrandbits(8) for _ in range(size))
        if n % 3 == 0:
            data = b"\x00\x00\x01" + data
        feed_checked(decoder, data)
    assert decoder.stats.frames == 0
    assert accounted(decoder.stats) == decoder.stats.access_units == 40
