"""Broken streams through the node's message path, in-process (the same code the node runs, no DDS).

Real clips, as a vehicle sees them: joining mid-GOP, lost messages, a camera restart with new
SPS/PPS, a resolution change, stamps that go back, duplicates, an engine that falls behind, and
fuzzed access units (hypothesis here; ``cvseg fuzz`` for the long run). After every scenario each
message is accounted for: ``frames_in == masks_out + drop reasons`` in the diagnostics.
"""
from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FUZZ_CLIP, SHARED_CLIPS, SMALL1_CLIP, SMALL_CLIP, read_rgb, require
from cvseg_ros.codec.annexb import nal_units
from cvseg_ros.codec.h264_syntax import FrameNumTracker, parse_sps
from cvseg_ros.ros.message_path import DROP_REASONS, MessagePath, make_message
from cvseg_ros.codec.video import H264Encoder

T0 = 1_700_000_000_000_000_000
PERIOD = 40_000_000


class Camera:
    """One camera of a fresh :class:`MessagePath`; ``send`` = a message received, then processed."""

    def __init__(self, engine, name: str = "front", **kwargs) -> None:
        self.name = name
        self.path = MessagePath(engine, [name], batch_window_ms=0.0, **kwargs)
        self.outputs = []

    def send(self, data: bytes, stamp_ns: int, fmt: str = "h264", process: bool = True) -> list:
        self.path.receive(self.name, make_message(data, stamp_ns, fmt, self.name))
        return self.process() if process else []

    def process(self) -> list:
        out = self.path.drain()
        self.outputs.extend(out)
        return out

    def values(self) -> dict:
        return dict(self.path.camera_values(self.name, 1.0)[2])

    def counts(self) -> dict:
        return dict(self.path.cameras[self.name].counts)

    def assert_accounted(self) -> dict:
        v = self.values()
        drops = sum(int(v[k]) for k in DROP_REASONS)
        assert int(v["frames_in"]) == (int(v["masks_out"]) + drops + int(v["queue_size"]) + int(v["in_flight"])
                                       + int(v["reorder_held"])), v
        assert int(v["masks_out"]) == len(self.outputs)
        return v


def encode(path, count: int, size: tuple[int, int], gop: int = 12, preset: str = "veryfast", crf: int = 23):
    frames = read_rgb(path, count, size)
    enc = H264Encoder(size[0], size[1], fps=25, gop=gop, crf=crf, preset=preset)
    units = [u for f in frames for u in enc.encode(f)]
    return units + enc.flush()


def sps_of(unit: bytes) -> bytes:
    return next(p for _, t, p in nal_units(unit) if t == 7)


@pytest.fixture(scope="module")
def camera_units():
    """80 access units of a real clip as its camera encoded them (960x540, GOP 30), Annex B."""
    from cvseg_ros.codec.video import read_access_units
    require(FUZZ_CLIP, "real clip")
    return [u.data for u in itertools.islice(read_access_units(FUZZ_CLIP), 80)]


# -- building blocks ------------------------------------------------------------------------------

def test_sps_sizes_and_frame_num_continuity_on_real_streams(camera_units, gop12_units):
    sps = parse_sps(sps_of(camera_units[0]))
    assert (sps.width, sps.height) == (960, 540)
    assert (parse_sps(sps_of(gop12_units[0])).width, parse_sps(sps_of(gop12_units[0])).height) == (320, 180)
    t = FrameNumTracker()
    assert all(t.check(u) == ("ok", None) for u in camera_units)        # a clean stream is continuous
    t = FrameNumTracker()
    units = gop12_units[:12]
    assert [t.check(u)[0] for u in units[:4]] == ["ok"] * 4
    status, reason = t.check(units[5])                                  # units[4] lost
    assert status == "lost" and "1 reference picture(s) lost" in reason
    status, reason = t.check(units[4])                                  # ... and arriving late
    assert status == "broken" and "went back" in reason
    t = FrameNumTracker()
    for u in units[:3]:
        t.check(u)
    assert t.check(units[9])[0] == "broken"                             # 6 lost: wait for an IDR
    assert t.check(gop12_units[12]) == ("ok", None)                     # the IDR: all is well again
    assert t.check(b"") == ("ok", None) and t.check(b"\x00\x00\x01\x41") == ("ok", None)  # unparsable


def test_reader_recovers_when_damage_makes_the_decoder_hold_pictures_back(clip_units, gop12_units):
    """Found by ``cvseg fuzz``: a damaged P-frame can make FFmpeg grow its reorder buffer for good;
    every later picture then came out one unit late, under the next unit's stamp and size (a stale,
    wrong-size mask), even after clean IDRs. The reader now notices and reopens the decoder."""
    require(SHARED_CLIPS, "the camera's own stream (picture order counts coded, not derived as in x264's I/P streams)")
    import av

    from cvseg_ros.codec.decoder import H264StreamDecoder
    damaged = bytearray(clip_units[3])
    for pos, bit in ((42, 0), (6, 2), (44, 5)):
        damaged[pos] ^= 1 << bit
    raw = av.CodecContext.create("h264", "r")
    raw.thread_type = "SLICE"
    raw.decode(av.Packet(clip_units[0]))
    try:
        raw.decode(av.Packet(bytes(damaged)))
    except av.error.FFmpegError:
        pass
    assert raw.has_b_frames            # what the damage does to a bare FFmpeg decoder
    reader = H264StreamDecoder()
    assert reader.feed(clip_units[0], 0)[0].kind == "I"
    assert reader.feed(bytes(damaged), 1) == []
    assert reader.feed(clip_units[4], 2) == []        # waits for an IDR (nothing decoded wrongly)
    for k, unit in enumerate(gop12_units[:6], start=3):
        (frame,) = reader.feed(unit, k)
        assert frame.stamp == k and (frame.width, frame.height) == (320, 180)
    assert reader.stats.decoder_restarts == 1


# -- scenarios --------------------------------------------------------------------------------------

def test_join_mid_gop(make_engine, gop12_units):
    cam = Camera(make_engine())
    for i, unit in enumerate(gop12_units[5:], start=5):
        cam.send(unit, T0 + i * PERIOD)
    v = cam.assert_accounted()
    assert v["skipped_before_keyframe"] == "7" and v["decode_errors"] == "0"
    assert len(cam.outputs) == 24
    first = cam.outputs[0]
    assert first.stamp_ns == T0 + 12 * PERIOD and first.network == "i_frame" and first.reset
    assert all(o.network == "p_frame" and not o.reset for o in cam.outputs[1:12])
    assert all(o.mask.shape == (180, 320) for o in cam.outputs)


def test_drop_one_message_in_twenty(make_engine, camera_units):
    """Messages 10, 30 (an IDR), 50 and 70 never arrive. A lost P-frame: the state restarts at the
    next frame (I-frame network on it). The lost IDR: the P-frames that refer to it (31..59) are
    not decoded (no mask from wrong references); masks resume at the next IDR (60)."""
    cam = Camera(make_engine())
    lost = {10, 30, 50, 70}
    masks = {}
    for i, unit in enumerate(camera_units):
        if i not in lost:
            for o in cam.send(unit, T0 + i * PERIOD):
                masks[(o.stamp_ns - T0) // PERIOD] = o
    v = cam.assert_accounted()
    assert v["lost_units"] == "3" and v["awaiting_idr"] == str(60 - 31 - 1) and v["decode_errors"] == "0"
    assert sorted(masks) == [i for i in range(80) if i not in lost and not 31 <= i < 60]
    for i in (11, 71):                           # after a lost P-frame: restarted from the pixels
        assert masks[i].reset and masks[i].network == "i_frame", i
    assert masks[60].reset and masks[60].kind == "I"
    assert all(not masks[i].reset for i in masks if i not in (0, 11, 60, 71))
    assert all(o.mask.shape == (540, 960) for o in masks.values())
    assert int(v["resyncs"]) == 2


def test_camera_restart_with_new_parameter_sets(make_engine, gop12_units):
    """The camera restarts mid-GOP: a new encoder session (other SPS/PPS), stamps from zero."""
    require(SMALL1_CLIP, "real clip")
    restarted = encode(SMALL1_CLIP, 24, (320, 180), gop=12, preset="ultrafast", crf=30)
    assert sps_of(restarted[0]) != sps_of(gop12_units[0])
    cam = Camera(make_engine())
    for i, unit in enumerate(gop12_units[:17]):
        cam.send(unit, T0 + i * PERIOD)
    for i, unit in enumerate(restarted):
        cam.send(unit, 1_000_000 + i * PERIOD)       # the camera's clock restarted too
    v = cam.assert_accounted()
    assert len(cam.outputs) == 17 + 24
    assert v["stamp_resets"] == "1" and v["decode_errors"] == "0" and v["lost_units"] == "0"
    after = cam.outputs[17:]
    assert after[0].network == "i_frame" and after[0].reset and after[0].stamp_ns == 1_000_000
    assert all(o.network == "p_frame" and not o.reset for o in after[1:12])


def test_camera_restart_whose_first_frames_are_lost(make_engine, gop12_units):
    """The new session's IDR is lost: its P-frames would be decoded against the old stream."""
    require(SMALL1_CLIP, "real clip")
    restarted = encode(SMALL1_CLIP, 24, (320, 180), gop=12, preset="ultrafast", crf=30)
    cam = Camera(make_engine())
    for i, unit in enumerate(gop12_units[:17]):
        cam.send(unit, T0 + i * PERIOD)
    for i, unit in enumerate(restarted[3:], start=3):
        cam.send(unit, T0 + (40 + i) * PERIOD)
    v = cam.assert_accounted()
    assert v["awaiting_idr"] == "9" and v["lost_units"] == "1"       # units 3..11 of the new session
    after = cam.outputs[17:]
    assert len(after) == 12 and after[0].stamp_ns == T0 + 52 * PERIOD and after[0].reset


def test_resolution_change(make_engine, gop12_units):
    require(SMALL_CLIP, "real clip")
    smaller = encode(SMALL_CLIP, 12, (256, 144))
    cam = Camera(make_engine())
    for i, unit in enumerate(gop12_units[:20] + smaller):
        cam.send(unit, T0 + i * PERIOD)
    v = cam.assert_accounted()
    assert len(cam.outputs) == 32 and v["resolution_changes"] == "1" and v["decode_errors"] == "0"
    assert all(o.mask.shape == (180, 320) for o in cam.outputs[:20])
    assert all(o.mask.shape == (144, 256) for o in cam.outputs[20:])
    assert cam.outputs[20].reset and cam.outputs[20].network == "i_frame"
    assert all(not o.reset for o in cam.outputs[21:])


def test_stamps_going_backwards(make_engine, gop12_units):
    """A reordered pair (the late one is dropped: masks never go back in time), then the camera
    clock jumps back 10 s mid-GOP: late P-frames are dropped until the IDR, accepted as a reset."""
    cam = Camera(make_engine())
    order = list(range(5)) + [6, 5] + list(range(7, 18))
    for i in order:
        cam.send(gop12_units[i], T0 + i * PERIOD)
    back = T0 - 10 * 10**9
    for i in range(18, 30):
        cam.send(gop12_units[i], back + i * PERIOD)
    v = cam.assert_accounted()
    assert v["out_of_order"] == str(1 + 6) and v["stamp_resets"] == "1" and v["lost_units"] == "1"
    stamps = [o.stamp_ns for o in cam.outputs]
    before_reset = [s for s in stamps if s > T0 - 10**9]
    assert before_reset == sorted(set(before_reset)) and T0 + 5 * PERIOD not in stamps
    assert cam.outputs[5].stamp_ns == T0 + 6 * PERIOD and cam.outputs[5].reset      # after the lost one
    after = [o for o in cam.outputs if o.stamp_ns < T0]
    assert [o.stamp_ns for o in after] == [back + i * PERIOD for i in range(24, 30)]
    assert after[0].reset and after[0].kind == "I"


def test_b_frames_get_masks_under_their_own_headers(make_engine, b_frame_units):
    """A stream with B-frames as a camera sends it: decoding order, each message stamped with its
    picture's capture time, so stamps go back at every B-frame. Every message gets its own
    mask under its own header, the masks in display order; a message waits while the decoder
    holds its picture back (``reorder_held``, at most 2 here) and the end of the input gives the
    last ones out."""
    units, shown = b_frame_units
    cam = Camera(make_engine())
    held = []
    for unit, k in zip(units, shown):
        cam.send(unit, T0 + k * PERIOD)
        v = cam.assert_accounted()
        held.append(int(v["reorder_held"]))
    assert max(held) == 2 and v["out_of_order"] == "0" and v["lost_units"] == "0"
    cam.outputs.extend(cam.path.flush())
    v = cam.assert_accounted()
    assert v["masks_out"] == "36" and v["reorder_held"] == "0"
    assert int(v["b_frames"]) == sum(o.kind == "B" for o in cam.outputs) >= 18
    assert [o.stamp_ns for o in cam.outputs] == [T0 + k * PERIOD for k in range(36)]
    assert all(o.header.stamp.sec * 10**9 + o.header.stamp.nanosec == o.stamp_ns for o in cam.outputs)
    assert [o.kind for o in cam.outputs[:4]] == ["I", "B", "B", "P"]
    assert [o.network for o in cam.outputs].count("i_frame") == 3          # one per GOP: no restarts
    assert int(v["discontinuities"]) == 0


def test_a_mask_never_goes_out_older_than_the_last_one(make_engine, b_frame_units):
    """Two B-frames' stamps swapped (each still between its reference pictures' stamps, so
    accepted on receipt): the decoder gives the pictures out in display order, so the second
    picture carries the earlier stamp. Its mask is not published but counted ``out_of_order``;
    every other message gets its mask, in stamp order."""
    units, shown = b_frame_units
    shown = list(shown)
    first_b = next(i for i in range(1, len(shown)) if shown[i] < shown[i - 1])   # the first B-frame
    assert shown[first_b + 1] == shown[first_b] + 1                             # and the one after it
    shown[first_b], shown[first_b + 1] = shown[first_b + 1], shown[first_b]
    cam = Camera(make_engine())
    for unit, k in zip(units, shown):
        cam.send(unit, T0 + k * PERIOD)
    cam.outputs.extend(cam.path.flush())
    v = cam.assert_accounted()
    assert v["out_of_order"] == "1" and v["masks_out"] == str(len(units) - 1), v
    stamps = [o.stamp_ns for o in cam.outputs]
    assert stamps == sorted(set(stamps))
    assert T0 + shown[first_b + 1] * PERIOD not in stamps      # the earlier stamp came out second


def test_an_ip_stream_that_declares_reordering_gets_each_mask_under_its_own_header(make_engine):
    """I/P only, but the SPS declares reordering (x264 set up for B-frames, every frame forced to
    I or P): FFmpeg gives each picture two units late. Each mask still goes out under its own
    message's header, two messages later (``reorder_held`` 2), none under a newer stamp."""
    import av
    enc = H264Encoder(320, 180, fps=25, gop=12, bframes=2)
    units = []
    for i, rgb in enumerate(read_rgb(require(SMALL_CLIP, "real clip"), 24, (320, 180))):
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
        frame.pts = i
        frame.pict_type = av.video.frame.PictureType.I if i % 12 == 0 else av.video.frame.PictureType.P
        units += enc._units(enc._ctx.encode(frame))
    units += enc.flush()
    assert enc.presentation == list(range(24))
    cam = Camera(make_engine())
    for i, unit in enumerate(units):
        out = cam.send(unit, T0 + i * PERIOD)
        v = cam.assert_accounted()
        # the IDR of the second GOP gives out the two pictures held before it (it needs neither)
        want = {12: [10, 11], 13: []}.get(i, [i - 2] if i >= 2 else [])
        assert [o.stamp_ns for o in out] == [T0 + k * PERIOD for k in want]
        assert v["reorder_held"] == ("1" if i in (0, 12) else "2")
    assert [o.kind for o in cam.outputs] == ["I"] + ["P"] * 11 + ["I"] + ["P"] * 9
    cam.outputs.extend(cam.path.flush())
    assert [o.stamp_ns for o in cam.outputs] == [T0 + i * PERIOD for i in range(24)]
    assert cam.assert_accounted()["bad_outputs"] == "0"


def test_b_frames_with_the_engine_behind(make_engine, b_frame_units):
    """Depth 3, the whole B-frame stream queued before the engine runs: every message is published
    or counted, the masks stay in display order, and none goes out under another's header."""
    units, shown = b_frame_units
    cam = Camera(make_engine(), queue_depth=3)
    for unit, k in zip(units, shown):
        cam.send(unit, T0 + k * PERIOD, process=False)
    cam.process()
    cam.outputs.extend(cam.path.flush())
    v = cam.assert_accounted()
    stamps = [o.stamp_ns for o in cam.outputs]
    assert stamps == sorted(set(stamps)) and int(v["queue_drops"]) > 0 and v["bad_outputs"] == "0"
    assert all(o.header.stamp.sec * 10**9 + o.header.stamp.nanosec == o.stamp_ns for o in cam.outputs)


def test_duplicates_and_wrong_format_are_dropped_and_counted(make_engine, gop12_units):
    cam = Camera(make_engine())
    for i, unit in enumerate(gop12_units[:8]):
        cam.send(unit, T0 + i * PERIOD)
        if i == 3:
            cam.send(unit, T0 + i * PERIOD + PERIOD // 2)     # the same bytes again
            cam.send(unit, T0 + i * PERIOD + PERIOD // 2, fmt="jpeg")
    v = cam.assert_accounted()
    assert v["duplicates"] == "1" and v["wrong_format"] == "1" and v["discontinuities"] == "0"
    assert len(cam.outputs) == 8 and not any(o.reset for o in cam.outputs[1:])
    level, message, _ = cam.path.camera_values("front", 1.0)
    assert level == 0   # the counters grew before the first report: nothing new since
    cam.send(gop12_units[8], T0 + 8 * PERIOD, fmt="h265")
    level, message, _ = cam.path.camera_values("front", 1.0)
    assert level == 1 and "wrong_format +1" in message


def test_input_below_the_expected_rate_is_a_warning(make_engine, gop12_units):
    """``expected_rate_hz`` 25: a period in which 10 messages arrive (10 Hz) turns the camera's
    diagnostics to WARN with the two rates named; at 25 messages a period it is OK again."""
    cam = Camera(make_engine(), expected_rates={"front": 25.0})
    sent = 0

    def period(count: int):
        nonlocal sent
        for _ in range(count):
            cam.send(gop12_units[sent], T0 + sent * PERIOD)
            sent += 1
        return cam.path.camera_values("front", 1.0)
    period(5)                                    # the first report: no rate to judge yet
    level, message, values = period(10)
    assert level == 1 and "10.0 Hz, below the expected 25 Hz" in message
    assert dict(values)["expected_rate_hz"] == "25" and dict(values)["input_rate_hz"] == "10.00"
    level, message, _ = period(21)
    assert level == 0, message


def behind_by_eight(cam: Camera, units) -> dict:
    """The IDR segmented, then eight P-frames queued before the engine runs, then all processed:
    the camera's diagnostics values (its accounting checked)."""
    cam.send(units[0], T0)
    for i in range(1, 9):
        cam.send(units[i], T0 + i * PERIOD, process=False)
    cam.process()
    return cam.assert_accounted()


def test_queue_policy_when_the_engine_falls_behind(make_engine, gop12_units):
    """Depth 3. Eight P-frames arrive before the engine runs: the five oldest get no mask but the
    state is carried through them (their motion accumulated, no restart: the shipped model
    accumulates the motion), and 6, 7 and 8 are segmented as P-frames continuing it; 8's mask
    is close to the one it gets when every frame is segmented."""
    cam = Camera(make_engine(), queue_depth=3)
    v = behind_by_eight(cam, gop12_units)
    assert v["queue_drops"] == "5" and v["queue_decode_only"] == "5" and v["queue_carried"] == "5"
    assert v["decode_errors"] == "0" and v["discontinuities"] == "0"
    assert [o.stamp_ns for o in cam.outputs[1:]] == [T0 + i * PERIOD for i in (6, 7, 8)]
    assert all(o.network == "p_frame" and not o.reset for o in cam.outputs[1:])
    assert int(v["p_frames"]) == 8 and v["lost_units"] == "0" and v["i_frames"] == "1"
    every = make_engine()
    want = [r.mask for i in range(9) for r in every.process([("front", gop12_units[i], T0 + i * PERIOD)])][8]
    assert (cam.outputs[-1].mask == want).mean() > 0.9
    # an IDR waiting: the queue jumps to it (what precedes it is not decoded: nothing needs it)
    for i in range(9, 15):
        cam.send(gop12_units[i], T0 + i * PERIOD, process=False)
    cam.process()
    v = cam.assert_accounted()
    assert [o.stamp_ns for o in cam.outputs[4:]] == [T0 + 12 * PERIOD, T0 + 13 * PERIOD, T0 + 14 * PERIOD]
    assert cam.outputs[4].kind == "I" and v["queue_drops"] == str(5 + 3) and v["queue_discarded"] == "3"
    assert [o.network for o in cam.outputs[4:]] == ["i_frame", "p_frame", "p_frame"]


def test_without_carrying_the_state_restarts_once_caught_up(gop12_units):
    """The same backlog with the paper's model, which does not accumulate the motion (no state can
    be carried): the five oldest are decoded only (references kept); the state does not restart on
    a P-frame while the camera is still behind (the I-frame network would put it further behind):
    6 and 7 are decoded only too, and the state restarts at 8, taken with the queue empty."""
    from cvseg_ros.engine.pipeline import SegmentationEngine
    from cvseg_ros.model.checkpoint import PACKAGE_CHECKPOINT_DIR
    cam = Camera(SegmentationEngine(PACKAGE_CHECKPOINT_DIR / "cvseg_paper.safetensors", device="cpu"), queue_depth=3)
    v = behind_by_eight(cam, gop12_units)
    assert v["queue_drops"] == "7" and v["queue_decode_only"] == "7" and v["queue_carried"] == "0"
    assert [o.stamp_ns for o in cam.outputs[1:]] == [T0 + 8 * PERIOD]
    assert cam.outputs[1].reset and cam.outputs[1].network == "i_frame"
    assert int(v["p_frames"]) == 8 and v["lost_units"] == "0"      # every P-frame was decoded
    # caught up: the next P-frame continues the state
    cam.send(gop12_units[9], T0 + 9 * PERIOD)
    assert cam.outputs[2].network == "p_frame" and not cam.outputs[2].reset


def test_a_p_frame_is_published_before_another_cameras_i_frame_runs(make_engine, gop12_units, monkeypatch):
    """One batch: "front" has a P-frame, "rear" joins with its first I-frame. The engine runs the
    P-frame first and front's mask is published before rear's I-frame network runs; both masks
    are what each camera alone gives. If the engine then fails, only rear is counted as an engine
    error: front's message was published already."""
    import numpy as np
    engine = make_engine()
    path = MessagePath(engine, ["front", "rear"], batch_window_ms=0.0)
    path.receive("front", make_message(gop12_units[0], T0, "h264", "front"))
    path.drain()
    events = []
    run_i = engine._run_i
    monkeypatch.setattr(engine, "_run_i", lambda works: events.append("rear I-frame runs") or run_i(works))
    path.receive("front", make_message(gop12_units[1], T0 + PERIOD, "h264", "front"))
    path.receive("rear", make_message(gop12_units[0], T0 + PERIOD, "h264", "rear"))
    outputs = path.drain(publish=lambda out: events.append(f"{out.camera} published"))
    assert events == ["front published", "rear I-frame runs", "rear published"]
    assert [(o.camera, o.network) for o in outputs] == [("front", "p_frame"), ("rear", "i_frame")]
    alone = make_engine()
    want = [r.mask for i in (0, 1) for r in alone.process([("front", gop12_units[i], T0 + i * PERIOD)])]
    assert np.array_equal(outputs[0].mask, want[1]) and np.array_equal(outputs[1].mask, want[0])

    def fail(works):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(engine, "_run_i", fail)
    path.receive("front", make_message(gop12_units[2], T0 + 2 * PERIOD, "h264", "front"))
    path.receive("rear", make_message(gop12_units[12], T0 + 12 * PERIOD, "h264", "rear"))
    outputs = path.drain()
    assert [o.camera for o in outputs] == ["front"]
    counts = {name: dict(path.cameras[name].counts) for name in ("front", "rear")}
    assert counts["front"].get("engine_errors", 0) == 0 and counts["rear"]["engine_errors"] == 1
    for name in ("front", "rear"):
        v = dict(path.camera_values(name, 1.0)[2])
        assert int(v["frames_in"]) == int(v["masks_out"]) + sum(int(v[k]) for k in DROP_REASONS), v


def test_per_frame_mode_restarts_at_once_after_a_backlog(make_engine, gop12_units):
    """The same backlog in ``per_frame`` mode, where every frame runs the I-frame network: a restart
    costs no more than any frame, so nothing waits for the queue to empty. The five oldest are
    decoded only (depth 3), then 6, 7 and 8 are segmented."""
    engine = make_engine(mode="per_frame")
    assert not engine.restart_is_costly and make_engine().restart_is_costly
    cam = Camera(engine, queue_depth=3)
    v = behind_by_eight(cam, gop12_units)
    assert v["queue_drops"] == "5" and v["queue_decode_only"] == "5"
    assert [o.stamp_ns for o in cam.outputs[1:]] == [T0 + i * PERIOD for i in (6, 7, 8)]
    assert all(o.network == "i_frame" for o in cam.outputs)


def test_queue_backlog_limit_waits_for_an_idr(make_engine, gop12_units):
    """Decoding falls behind too (more than the backlog limit queued): units are discarded
    undecoded and nothing but an IDR is taken next; no mask from a picture with lost references."""
    cam = Camera(make_engine(), queue_depth=2, backlog_limit=4)
    cam.send(gop12_units[0], T0)
    for i in range(1, 14):
        cam.send(gop12_units[i], T0 + i * PERIOD, process=False)
    cam.process()
    v = cam.assert_accounted()
    assert [o.stamp_ns for o in cam.outputs] == [T0, T0 + 12 * PERIOD, T0 + 13 * PERIOD]
    assert v["queue_drops"] == "11" and v["lost_units"] == "0" and v["decode_errors"] == "0"
    assert int(v["p_frames"]) == 1                  # 1..11 were never decoded
    assert cam.outputs[1].kind == "I" and cam.outputs[1].reset and not cam.outputs[2].reset


# -- fuzzing ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_sources(gop12_units, clip_units):
    from cvseg_ros.tools.mutations import Source
    require(SMALL_CLIP, "real clip")
    other = encode(SMALL_CLIP, 16, (240, 136), gop=6, preset="ultrafast", crf=30)
    return [Source("gop12", list(gop12_units), 320, 180), Source("ultrafast", other, 240, 136),
            Source("camera", list(clip_units), 960, 540)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(rng=st.randoms(use_true_random=False), episodes=st.integers(1, 3))
def test_fuzzed_messages_never_break_the_path_and_it_recovers_at_the_next_idr(make_engine, fuzz_sources,
                                                                               rng, episodes):
    """Mutated access units of real clips (bit flips, truncation, duplication, reordering, losses,
    random bytes, empty messages, wrong format, foreign / spliced units, damaged parameter sets,
    bad stamps), sometimes in bursts that overflow the queue; then a clean run from an IDR."""
    from cvseg_ros.tools.fuzz import FuzzHarness
    harness = FuzzHarness(make_engine(), fuzz_sources, queue_depth=2)
    for _ in range(episodes):
        harness.episode(rng, max_window=6, max_tail=4)
    rep = harness.report
    assert rep.ok, json.dumps(rep.failures[:3], indent=1)
    assert rep.recovered == rep.episodes


def test_fuzz_command(tmp_path, capsys):
    """``cvseg fuzz``: the long run's command, briefly, on real clips."""
    from cvseg_ros.tools.cli import main
    require(SMALL_CLIP, "real clip")
    out = tmp_path / "fuzz.json"
    code = main(["fuzz", "--iterations", "250", "--seed", "7", "--frames", "24", "--no-native",
                 "--video", str(SMALL_CLIP), "--video", str(SMALL1_CLIP),
                 "--json", str(out)])
    report = json.loads(out.read_text())
    assert code == 0, report["failures"][:3]
    assert report["mutated_units"] >= 250 and report["crashes"] == 0 and report["engine_errors"] == 0
    assert report["recovered"] == report["episodes"] > 0 and report["ok"]
    o = report["outcomes"]
    assert o["frames_in"] == report["messages"]
    assert o["frames_in"] == o["masks_out"] + sum(o[k] for k in DROP_REASONS)
    assert '"mutated_units"' in capsys.readouterr().out


def test_messages_beyond_the_stream_limits_are_dropped_and_counted(make_engine, gop12_units):
    """A message larger than the engine's ``max_unit_bytes`` is dropped on receipt (not copied or
    queued); one with too many NAL units is refused by the camera's decoder, and so are the
    P-frames after it: all ``over_limits``, every message accounted for; the camera segments
    again from its next IDR."""
    from cvseg_ros.codec.limits import StreamLimits
    engine = make_engine()
    engine.limits = StreamLimits(max_unit_bytes=64 << 10)
    cam = Camera(engine)
    for i in range(4):
        cam.send(gop12_units[i], T0 + i * PERIOD)
    big = make_message(gop12_units[4] + bytes(70 << 10), T0 + 4 * PERIOD, "h264", "front")
    assert cam.path.receive("front", big) == "over_limits"
    cam.send(b"\x00\x00\x01\x09\xf0" * 2100, T0 + 5 * PERIOD)       # 2100 NAL units in 10.5 kB
    for i in range(6, 14):
        cam.send(gop12_units[i], T0 + i * PERIOD)
    v = cam.assert_accounted()
    assert v["over_limits"] == str(1 + 1 + 6) and v["decode_errors"] == "0", v
    assert [o.stamp_ns for o in cam.outputs] == [T0 + i * PERIOD for i in (0, 1, 2, 3, 12, 13)]
    assert cam.outputs[4].kind == "I" and cam.outputs[5].network == "p_frame" and not cam.outputs[5].reset


def test_a_flooding_camera_does_not_take_the_other_cameras_turn(make_engine, gop12_units):
    """'flood' sends 30 messages between two batches, 'calm' one: each batch decodes at most
    MAX_SKIPPED_PER_TURN + 1 of the flood's units, 'calm' gets its mask in every batch, and every
    message of both is accounted for (the flood's surplus discarded and counted in queue_drops)."""
    from cvseg_ros.ros.policies import MAX_SKIPPED_PER_TURN
    engine = make_engine()
    path = MessagePath(engine, ["flood", "calm"], batch_window_ms=0.0, queue_depth=3)
    def fed(camera):     # units given to the camera's decoder so far
        return engine.stats(camera)["access_units"]
    calm_masks, stamp = 0, T0
    for tick in range(3):
        for k in range(30 if tick else 1):
            path.receive("flood", make_message(gop12_units[(tick * 30 + k) % 36], stamp, "h264", "flood"))
            stamp += PERIOD
        path.receive("calm", make_message(gop12_units[tick], T0 + tick * PERIOD, "h264", "calm"))
        before = fed("flood")
        out = path.run_batch(path.take_batch(timeout=0, window=False))
        assert fed("flood") - before <= MAX_SKIPPED_PER_TURN + 1
        calm_masks += sum(o.camera == "calm" for o in out)
        assert calm_masks == tick + 1
    path.drain()
    for name in ("flood", "calm"):
        v = dict(path.camera_values(name, 1.0)[2])
        assert int(v["frames_in"]) == int(v["masks_out"]) + sum(int(v[k]) for k in DROP_REASONS), v
    assert int(dict(path.camera_values("flood", 1.0)[2])["queue_drops"]) > 20
