"""rosbag2 files from real clips (mcap and sqlite3), read back; eval-bag; replay over DDS."""
from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import MPEG4_CLIP, SMALL_CLIP, require
from cvseg_ros.tools.cli import main
from cvseg_ros.codec.decoder import H264StreamDecoder

FRAMES, GOP, FPS = 30, 10, 10.0
START_NS = 1_700_000_000_123_456_789
TOPICS = ("/front/image_compressed", "/rear/image_compressed")
DOMAIN = random.SystemRandom().randint(201, 230)   # this module's own ROS domain


def read_bag(bag: Path) -> dict[str, list]:
    from rosbags.highlevel import AnyReader

    from cvseg_ros.ros.bags import typestore
    out: dict[str, list] = {}
    with AnyReader([bag], default_typestore=typestore()) as reader:
        for conn, log_ns, raw in reader.messages():
            msg = reader.deserialize(raw, conn.msgtype)
            out.setdefault(conn.topic, []).append((conn.msgtype, log_ns, msg, bytes(raw)))
    return out


@pytest.fixture(scope="module", params=["mcap", "sqlite3"])
def made(request, tmp_path_factory):
    require(SMALL_CLIP, "real clip")
    require(MPEG4_CLIP, "real clip")
    bag = tmp_path_factory.mktemp(request.param) / "bag"
    code = main(["bag", "from-video", str(SMALL_CLIP), str(MPEG4_CLIP), str(bag), "--topic", TOPICS[0],
                 "--topic", TOPICS[1], "--gop", str(GOP), "--storage", request.param, "--fps", str(FPS),
                 "--max-frames", str(FRAMES), "--width", "320", "--start-ns", str(START_NS)])
    assert code == 0
    return request.param, bag


def test_from_video_reads_back(made):
    storage, bag = made
    suffix = ".mcap" if storage == "mcap" else ".db3"
    assert list(bag.glob(f"*{suffix}")) and (bag / "metadata.yaml").is_file()
    topics = read_bag(bag)
    assert sorted(topics) == sorted(TOPICS)
    for topic in TOPICS:
        msgs = topics[topic]
        assert len(msgs) == FRAMES
        assert {t for t, *_ in msgs} == {"sensor_msgs/msg/CompressedImage"}
        stamps = [m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec for _, _, m, _ in msgs]
        assert stamps[0] == START_NS
        assert all(b > a for a, b in zip(stamps, stamps[1:]))
        assert np.allclose(np.diff(stamps), 1e9 / FPS, atol=2)
        assert [log for _, log, _, _ in msgs] == stamps          # log time = header stamp
        assert {m.format for _, _, m, _ in msgs} == {"h264"}
        assert {m.header.frame_id for _, _, m, _ in msgs} == {topic.split("/")[1]}
        decoder = H264StreamDecoder(topic)
        kinds = []
        for _, _, m, _ in msgs:
            data = m.data.tobytes()
            assert data.startswith(b"\x00\x00\x00\x01") or data.startswith(b"\x00\x00\x01")   # Annex B
            frames = decoder.feed(data, m.header.stamp)
            assert len(frames) == 1                                # one access unit per message
            kinds.append(frames[0].kind)
            assert frames[0].width == 320
        st = decoder.stats
        assert st.frames == FRAMES and st.corrupt == 0 and st.skipped_before_keyframe == 0 and st.b_frames == 0
        assert kinds == ["I" if i % GOP == 0 else "P" for i in range(FRAMES)]


def test_bag_info(made, capsys):
    _, bag = made
    assert main(["bag", "info", str(bag)]) == 0
    text = capsys.readouterr().out
    assert TOPICS[0] in text and "sensor_msgs/msg/CompressedImage" in text and f'"messages": {FRAMES}' in text


def test_from_video_errors_are_clear(tmp_path, capsys):
    require(SMALL_CLIP, "real clip")
    assert main(["bag", "from-video", str(SMALL_CLIP), str(SMALL_CLIP), str(tmp_path / "b"),
                 "--topic", "/a/h264"]) == 1
    assert "one topic per video" in capsys.readouterr().err
    (tmp_path / "exists").mkdir()
    assert main(["bag", "from-video", str(SMALL_CLIP), str(tmp_path / "exists"), "--topic", "/a/h264"]) == 1
    assert "exists" in capsys.readouterr().err
    assert main(["bag", "from-video", str(tmp_path / "none.mp4"), str(tmp_path / "c"), "--topic", "/a/h264"]) == 1
    assert "no such video" in capsys.readouterr().err


def test_eval_bag_records_masks(made, tmp_path, capsys):
    import json
    storage, bag = made
    rec = tmp_path / "masks"
    assert main(["eval-bag", str(bag), "--record", str(rec), "--storage", storage, "--device", "cpu",
                 "--threads", "1",
                 "--json", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["frames_in"] == result["masks_out"] == 2 * FRAMES
    assert result["latency_ms_p50"] > 0 and result["latency_ms_p99"] >= result["latency_ms_p50"]
    assert result["fps"] > 0
    assert "latency_ms_p50" in capsys.readouterr().out
    inputs, masks = read_bag(bag), read_bag(rec)
    for topic in TOPICS:
        cam = topic.split("/")[1]
        out = masks[f"/{cam}/semantic/mask"]
        assert [m.header.stamp for _, _, m, _ in out] == [m.header.stamp for _, _, m, _ in inputs[topic]]
        for _, _, m, _ in out:
            assert m.encoding == "mono8" and m.header.frame_id == cam and m.width == 320
            assert m.step == m.width and m.data.size == m.width * m.height
        # beside them: the input as recorded, the colour masks, the label info once
        assert [raw for *_, raw in masks[topic]] == [raw for *_, raw in inputs[topic]]
        colors = masks[f"/{cam}/semantic/color"]
        assert [m.header for _, _, m, _ in colors] == [m.header for _, _, m, _ in out]
        assert {(m.encoding, m.step) for _, _, m, _ in colors} == {("rgb8", 3 * 320)}
        (info,) = masks[f"/{cam}/semantic/label_info"]
        assert [c["name"] for c in json.loads(info[2].data)["classes"]][:2] == ["Sky", "Building"]


def test_a_bag_with_b_frames_gets_every_mask_under_its_own_stamp(tmp_path):
    """``--bframes 2``: messages in decoding order (log time), stamped with their pictures' times
    (so stamps go back at each B-frame); eval-bag gives every message its mask, in display order,
    under that message's stamp."""
    import json
    require(SMALL_CLIP, "real clip")
    bag, rec = tmp_path / "bbag", tmp_path / "masks"
    assert main(["bag", "from-video", str(SMALL_CLIP), str(bag), "--topic", TOPICS[0], "--gop", "12",
                 "--bframes", "2", "--fps", str(FPS), "--max-frames", "24", "--width", "320",
                 "--start-ns", str(START_NS)]) == 0
    msgs = read_bag(bag)[TOPICS[0]]
    stamps = [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for _, _, m, _ in msgs]
    logs = [log for _, log, _, _ in msgs]
    assert logs == sorted(logs) and stamps != sorted(stamps) and all(s <= log for s, log in zip(stamps, logs))
    assert sorted(stamps) == [START_NS + round(i * 1e9 / FPS) for i in range(24)]
    assert main(["eval-bag", str(bag), "--record", str(rec), "--device", "cpu", "--threads", "1",
                 "--json", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    front = result["cameras"]["front"]
    assert result["frames_in"] == result["masks_out"] == 24, result
    assert front["b_frames"] >= 12 and front["out_of_order"] == 0 and front["no_state"] == 0
    out = read_bag(rec)["/front/semantic/mask"]
    assert [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for _, _, m, _ in out] == sorted(stamps)


def test_the_camera_info_topic_is_the_sibling_of_the_base_topic():
    """As image_transport places it (the node's ``auto`` and the bag tools use this one rule)."""
    from cvseg_ros.ros.camera_info import camera_info_topic
    assert camera_info_topic("/front/image_compressed") == "/front/camera_info"
    assert camera_info_topic("/front/image_raw/ffmpeg") == "/front/camera_info"
    assert camera_info_topic("/vehicle/front/image_raw/foxglove") == "/vehicle/front/camera_info"
    assert camera_info_topic("/vehicle/front/image_raw") == "/vehicle/front/camera_info"


def test_camera_info_goes_into_the_bag_and_comes_out_beside_every_mask(tmp_path, capsys):
    """``--camera-info`` (a calibration of 640-wide frames for a clip bagged at 320x180, B-frames
    included): a CameraInfo per message on ``/front/camera_info`` under its header, K and P
    halved; ``eval-bag --record`` copies them and gives every mask the latest one under the
    mask's own header (``/front/semantic/camera_info``), as the node does."""
    import json
    require(SMALL_CLIP, "real clip")
    calib = tmp_path / "front.yaml"
    calib.write_text("image_width: 640\nimage_height: 360\ncamera_name: front\n"
                     "camera_matrix: {rows: 3, cols: 3, data: [500.0, 0, 320.0, 0, 510.0, 180.0, 0, 0, 1]}\n"
                     "distortion_model: plumb_bob\n"
                     "distortion_coefficients: {rows: 1, cols: 5, data: [-0.1, 0.01, 0, 0, 0]}\n")
    bag, rec = tmp_path / "bag", tmp_path / "masks"
    assert main(["bag", "from-video", str(SMALL_CLIP), str(bag), "--topic", TOPICS[0], "--gop", "12",
                 "--bframes", "2", "--fps", str(FPS), "--max-frames", "24", "--width", "320",
                 "--start-ns", str(START_NS), "--camera-info", str(calib)]) == 0
    inputs = read_bag(bag)
    infos = inputs["/front/camera_info"]
    assert [m.header for _, _, m, _ in infos] == [m.header for _, _, m, _ in inputs[TOPICS[0]]]
    _, _, first, _ = infos[0]
    assert (first.width, first.height) == (320, 180) and list(first.k) == [250.0, 0, 160.0, 0, 255.0, 90.0, 0, 0, 1]
    assert list(first.d) == [-0.1, 0.01, 0, 0, 0] and list(first.p)[:3] == [250.0, 0, 160.0]
    assert main(["eval-bag", str(bag), "--record", str(rec), "--device", "cpu", "--threads", "1",
                 "--json", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["masks_out"] == 24 and result["complete"]
    assert result["cameras"]["front"]["camera_info"] == {"topic": "/front/camera_info", "recorded": 24, "republished": 24}
    out = read_bag(rec)
    assert [raw for *_, raw in out["/front/camera_info"]] == [raw for *_, raw in infos]
    beside = out["/front/semantic/camera_info"]
    assert [m.header for _, _, m, _ in beside] == [m.header for _, _, m, _ in out["/front/semantic/mask"]]
    assert {(m.width, m.height, tuple(m.k)) for _, _, m, _ in beside} == {(320, 180, tuple(first.k))}
    calib.write_text("image_width: 640\nimage_height: 360\ncamera_matrix: {data: [1, 2]}\n")
    capsys.readouterr()
    assert main(["bag", "from-video", str(SMALL_CLIP), str(tmp_path / "bad"), "--topic", TOPICS[0],
                 "--camera-info", str(calib)]) == 1
    assert "'camera_matrix' needs 'data' with 9 numbers" in capsys.readouterr().err


def test_a_recorded_b_frame_video_copied_into_a_bag_gets_every_displayed_frame_a_mask(tmp_path):
    """An MP4 recorded with libx264's B-frames (2, B-pyramid), bagged with ``--copy`` (its own
    access units, no re-encode): the messages keep the recorded units and their presentation
    times; eval-bag gives every displayed frame a mask under the input's stamp."""
    import json
    from fractions import Fraction

    import av
    from cvseg_ros.codec.video import read_access_units
    from conftest import read_rgb
    require(SMALL_CLIP, "real clip")
    video = tmp_path / "recorded.mp4"
    with av.open(str(video), "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(25))
        stream.width, stream.height, stream.pix_fmt = 320, 180, "yuv420p"
        stream.codec_context.options = {"preset": "veryfast", "x264-params": "keyint=12:bframes=2:threads=1"}
        for rgb in read_rgb(SMALL_CLIP, 30, (320, 180)):
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    bag, rec = tmp_path / "bag", tmp_path / "masks"
    assert main(["bag", "from-video", str(video), str(bag), "--topic", TOPICS[0], "--copy",
                 "--start-ns", str(START_NS)]) == 0
    msgs = read_bag(bag)[TOPICS[0]]
    recorded = list(read_access_units(video))
    assert [m.data.tobytes() for _, _, m, _ in msgs] == [u.data for u in recorded]      # as recorded
    stamps = [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for _, _, m, _ in msgs]
    assert stamps != sorted(stamps) and sorted(stamps) == [START_NS + i * 40_000_000 for i in range(30)]
    assert main(["eval-bag", str(bag), "--record", str(rec), "--device", "cpu", "--threads", "1",
                 "--json", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["frames_in"] == result["masks_out"] == 30 and result["cameras"]["front"]["b_frames"] >= 10
    out = read_bag(rec)["/front/semantic/mask"]
    assert [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for _, _, m, _ in out] == sorted(stamps)
    # a source that is not H.264 cannot be copied: a clear error, exit status 1
    require(MPEG4_CLIP, "MPEG-4 Part 2 clip")
    assert main(["bag", "from-video", str(MPEG4_CLIP), str(tmp_path / "b2"), "--topic", "/a/h264", "--copy"]) == 1


def test_eval_bag_applies_the_node_policies(made, tmp_path):
    """eval-bag runs the node's message path: a repeated message and a JPEG one in the bag are
    dropped and counted as the node would, every other message gets its mask."""
    import numpy as np

    from cvseg_ros.ros.bags import COMPRESSED_IMAGE, _header, _open_writer, iter_compressed, typestore
    from cvseg_ros.ros.eval_bag import eval_bag
    storage, bag = made
    ts = typestore()
    CompressedImage = ts.types[COMPRESSED_IMAGE]
    edited = tmp_path / "edited"
    messages = list(iter_compressed(bag))
    with _open_writer(edited, storage) as writer:
        conns = {t: writer.add_connection(t, COMPRESSED_IMAGE, typestore=ts) for t in TOPICS}

        def write(m, fmt="h264", stamp_ns=None):
            stamp_ns = m.stamp_ns if stamp_ns is None else stamp_ns
            msg = CompressedImage(header=_header(ts, stamp_ns, m.frame_id), format=fmt,
                                  data=np.frombuffer(m.data, dtype=np.uint8))
            writer.write(conns[m.topic], m.log_ns, ts.serialize_cdr(msg, COMPRESSED_IMAGE))

        for i, m in enumerate(messages):
            write(m)
            if i == 5:
                write(m, stamp_ns=m.stamp_ns + 1)        # the same bytes again
            if i == 9:
                write(m, fmt="jpeg", stamp_ns=m.stamp_ns + 2)
    result = eval_bag(edited, device="cpu", threads=1)
    cams = result["cameras"]
    assert sum(c["duplicates"] for c in cams.values()) == 1
    assert sum(c["wrong_format"] for c in cams.values()) == 1
    assert result["frames_in"] == len(messages) + 2 and result["masks_out"] == len(messages)


def test_replay_publishes_every_message_with_its_timing(made):
    """`replay` over real DDS: every message arrives byte-identical, spaced as recorded."""
    rclpy = pytest.importorskip("rclpy", reason="rclpy is not importable (ROS 2 wheels missing)")
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CompressedImage

    from cvseg_ros.ros.replay import replay
    storage, bag = made
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    ctx = rclpy.context.Context()
    rclpy.init(context=ctx, domain_id=DOMAIN)
    node = rclpy.create_node(f"bag_test_{storage}", context=ctx)
    got: dict[str, list] = {t: [] for t in TOPICS}
    lock = threading.Lock()

    def on(topic, raw):
        with lock:
            got[topic].append((time.monotonic(), raw))
    for topic in TOPICS:
        node.create_subscription(CompressedImage, topic, lambda raw, t=topic: on(t, raw),
                                 QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE), raw=True)
    executor = SingleThreadedExecutor(context=ctx)
    executor.add_node(node)
    spin = threading.Thread(target=executor.spin, daemon=True)
    spin.start()
    try:
        rate = 2.0
        n = replay(bag, rate=rate, reliability="reliable", node=node, context=ctx, wait_for_subscribers=20)
        assert n == 2 * FRAMES
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum(len(v) for v in got.values()) < n:
            time.sleep(0.05)
    finally:
        executor.shutdown(timeout_sec=5)
        spin.join(5)
        node.destroy_node()
        rclpy.try_shutdown(context=ctx)
    stored = read_bag(bag)
    for topic in TOPICS:
        assert [raw for _, raw in got[topic]] == [raw for *_, raw in stored[topic]]
        times = [t for t, _ in got[topic]]
        span = times[-1] - times[0]
        expected = (FRAMES - 1) / FPS / rate
        assert expected * 0.8 < span < expected + 1.0, f"{topic}: {span:.2f} s for {expected:.2f} s of bag"


# -- damaged bags: one clear line, never a traceback; what could be read is read ---------------------

@pytest.fixture(scope="module")
def good_bags(tmp_path_factory):
    require(SMALL_CLIP, "real clip")
    root = tmp_path_factory.mktemp("good_bags")
    for storage in ("mcap", "sqlite3"):
        assert main(["bag", "from-video", str(SMALL_CLIP), str(root / storage), "--topic", TOPICS[0], "--storage",
                     storage, "--max-frames", "24", "--width", "320", "--start-ns", str(START_NS)]) == 0
    return root


def _damage(src: Path, dst: Path, how: str) -> Path:
    import shutil
    shutil.copytree(src, dst)
    data_file = next(p for p in dst.iterdir() if p.suffix in (".mcap", ".db3"))
    meta = dst / "metadata.yaml"
    if how == "truncated":
        data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    elif how == "corrupt":
        data = bytearray(data_file.read_bytes())
        data[100:4000] = bytes(range(256)) * 15 + bytes(60)
        data_file.write_bytes(bytes(data))
    elif how == "unknown_storage":
        meta.write_text(meta.read_text().replace("storage_identifier: mcap", "storage_identifier: foo"))
    elif how == "bad_metadata":
        meta.write_text("rosbag2_bagfile_information: [unclosed\n  :: -")
    elif how == "bad_compression":
        meta.write_text(meta.read_text().replace("compression_format: ''", "compression_format: zstd")
                        .replace("compression_mode: ''", "compression_mode: file"))
    elif how == "missing_file":
        data_file.unlink()
    return dst


@pytest.mark.parametrize("storage,how,needle", [
    ("mcap", "truncated", "magic"), ("sqlite3", "corrupt", "malformed"), ("mcap", "unknown_storage", "'foo'"),
    ("mcap", "bad_metadata", "YAML"), ("mcap", "bad_compression", "Zstandard"), ("mcap", "missing_file", "missing"),
])
def test_an_unreadable_bag_is_one_clear_error(good_bags, tmp_path, capsys, storage, how, needle):
    bag = _damage(good_bags / storage, tmp_path / how, how)
    for argv in (["eval-bag", str(bag), "--device", "cpu", "--threads", "1"], ["bag", "info", str(bag)]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"cannot read bag {bag}" in err and needle in err, err


def test_a_bag_damaged_inside_is_read_as_far_as_it_goes_and_says_so(good_bags, tmp_path, capsys):
    """20 KB zeroed in the middle of an mcap: what precedes the damage is read, then a warning
    names the read error and how many of the listed messages the bag yielded; not complete."""
    import json
    bag = tmp_path / "zeroed"
    import shutil
    shutil.copytree(good_bags / "mcap", bag)
    data_file = next(bag.glob("*.mcap"))
    data = bytearray(data_file.read_bytes())
    middle = len(data) // 2
    data[middle - 10_000: middle + 10_000] = bytes(20_000)
    data_file.write_bytes(bytes(data))
    assert main(["eval-bag", str(bag), "--device", "cpu", "--threads", "1", "--json", str(tmp_path / "e.json")]) == 0
    err = capsys.readouterr().err
    result = json.loads((tmp_path / "e.json").read_text())
    assert not result["complete"] and result["read"]["missing"] > 0 and result["read"]["listed"] == 24
    assert result["masks_out"] == result["frames_in"] == result["read"]["read"] < 24
    assert "warning" in err and "of the 24 messages its metadata lists" in err


def test_a_message_limit_is_no_damage(good_bags, tmp_path, capsys):
    """``--max-frames`` stops reading on purpose: complete, no warning about missing messages."""
    import json
    assert main(["eval-bag", str(good_bags / "mcap"), "--max-frames", "5", "--device", "cpu", "--threads", "1",
                 "--json", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["frames_in"] == 5 and result["complete"] and result["warnings"] == []
    assert "warning" not in capsys.readouterr().err


def test_an_undecodable_message_is_skipped_and_counted(tmp_path, capsys):
    """One message whose bytes are not a CompressedImage among good ones: the others are all
    segmented, the bad one counted and warned about."""
    import json
    from rosbags.rosbag2 import StoragePlugin, Writer
    from cvseg_ros.codec.video import encode_frames
    from cvseg_ros.ros.bags import COMPRESSED_IMAGE, _header, typestore
    from conftest import read_rgb
    require(SMALL_CLIP, "real clip")
    ts = typestore()
    units = encode_frames(read_rgb(SMALL_CLIP, 12, (320, 180)), gop=12)
    bag = tmp_path / "bag"
    with Writer(bag, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        conn = writer.add_connection(TOPICS[0], COMPRESSED_IMAGE, typestore=ts)
        for i, unit in enumerate(units):
            stamp = START_NS + i * 40_000_000
            msg = ts.types[COMPRESSED_IMAGE](header=_header(ts, stamp, "front"), format="h264",
                                             data=np.frombuffer(unit, np.uint8))
            raw = ts.serialize_cdr(msg, COMPRESSED_IMAGE)
            writer.write(conn, stamp, b"\x00\x01\x00\x00" + b"\xff" * 7 if i == 6 else raw)
    assert main(["eval-bag", str(bag), "--device", "cpu", "--threads", "1", "--json", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["read"]["undecodable"] == 1 and result["read"]["read"] == 11 and not result["complete"]
    assert result["frames_in"] == 11 == result["masks_out"]     # the state restarts after the lost picture
    assert "could not be deserialised" in capsys.readouterr().err
