"""cvseg_node: its image messages, then integration over real DDS on loopback.

The node runs in its own process (``python -m cvseg_ros.ros.node --ros-args --params-file
config/cvseg.yaml -p ...``) on a ROS domain of this module's own; two cameras are replayed into it
from a real rosbag2 made from two real clips; this process subscribes to the outputs.
"""
from __future__ import annotations

import random
import time

import numpy as np
import pytest

from conftest import MPEG4_CLIP, SMALL1_CLIP, SMALL_CLIP, require

DOMAIN = random.SystemRandom().randint(1, 50)      # this module's own ROS domains:
OVERFLOW_DOMAIN, DEMO_DOMAIN = DOMAIN + 50, DOMAIN + 100   # one per node run alive at a time
CAMERAS = ("front", "rear")
FRAMES = 40
rclpy = pytest.importorskip("rclpy", reason="rclpy is not importable (ROS 2 wheels missing)")

from ros_helpers import Outputs, Ros, checkpoint_args, start_node, stop_node, stop_node_cleanly, wait_until  # noqa: E402

from cvseg_ros.ros.messages import image_message  # noqa: E402


# -- helpers without DDS (the queue and stamp policies: test_policies.py) -------------------------

def test_image_message():
    from std_msgs.msg import Header
    h = Header(frame_id="front")
    h.stamp.sec, h.stamp.nanosec = 12, 34
    mask = np.arange(12, dtype=np.uint8).reshape(3, 4)
    msg = image_message(mask, "mono8", h)
    assert (msg.height, msg.width, msg.step, msg.encoding) == (3, 4, 4, "mono8")
    assert bytes(msg.data) == mask.tobytes() and msg.header.frame_id == "front"
    rgb = np.zeros((3, 4, 3), np.uint8)
    msg = image_message(rgb, "rgb8", h)
    assert msg.step == 12 and len(msg.data) == 36


# -- integration --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_camera_bag(tmp_path_factory):
    """A real mcap bag: two real clips (one of them MPEG-4 Part 2, re-encoded) as two cameras."""
    from cvseg_ros.ros.bags import from_video
    require(SMALL_CLIP, "real clip")
    require(MPEG4_CLIP, "real clip")
    bag = tmp_path_factory.mktemp("node") / "bag"
    from_video([SMALL_CLIP, MPEG4_CLIP], bag, [f"/{c}/image_compressed" for c in CAMERAS],
               gop=12, max_frames=FRAMES, width=320, storage="mcap")
    return bag


@pytest.fixture(scope="module")
def live(tmp_path_factory, two_camera_bag):
    """The node (2 cameras, reliable input) in another process, and this process's subscribers."""
    tmp = tmp_path_factory.mktemp("node_run")
    log = tmp / "node.log"
    colors = tmp / "colors.yaml"
    colors.write_text("Road: '#ff00ff'\nSky: [1, 2, 3]\n")       # a colour map (as Autoware's)
    proc = start_node(log, ["-p", f"cameras:=[{', '.join(CAMERAS)}]", "-p", "qos_reliability:=reliable",
                            "-p", "queue_depth:=200", "-p", "diagnostics_period:=0.25",
                            "-p", "batch_window_ms:=20", "-p", f"palette:={colors}", *checkpoint_args(tmp)], DOMAIN)
    ros = Ros("cvseg_test", DOMAIN)
    outputs = Outputs(ros.node, CAMERAS)
    try:
        wait_until(lambda: all(ros.node.count_subscribers(f"/{c}/image_compressed") for c in CAMERAS)
                   and all(ros.node.count_publishers(f"/{c}/semantic/mask") for c in CAMERAS),
                   120, proc, "the node's subscriptions")
        yield proc, ros, outputs, log
    finally:
        try:
            stop_node_cleanly(proc, log)
        finally:
            ros.close()


def _bag_frames(bag):
    from cvseg_ros.ros.bags import iter_compressed
    return list(iter_compressed(bag))


def latched_label_info(proc, node, topic: str) -> dict:
    """The label info a subscriber that joins late gets (transient local), as JSON."""
    import json
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from std_msgs.msg import String
    got = []
    sub = node.create_subscription(String, topic, got.append, QoSProfile(
        depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL))
    try:
        wait_until(lambda: got, 10, proc, f"the label info on {topic}")
    finally:
        node.destroy_subscription(sub)
    return json.loads(got[0].data)


def test_two_cameras_every_frame_one_mask_and_one_color(live, two_camera_bag):
    from cvseg_ros.ros.replay import replay
    from cvseg_ros.model.checkpoint import DEFAULT_CHECKPOINT, read_metadata
    proc, ros, outputs, _ = live
    inputs = _bag_frames(two_camera_bag)
    n = replay(two_camera_bag, rate=2.0, node=ros.node, context=ros.context, wait_for_subscribers=30)
    assert n == len(inputs) >= 2 * FRAMES - 4
    wait_until(lambda: outputs.count("mask") >= n and outputs.count("color") >= n, 90, proc, "all masks")
    time.sleep(0.5)    # nothing more may come
    assert outputs.count("mask") == n and outputs.count("color") == n
    for cam in CAMERAS:
        sent = [m for m in inputs if m.frame_id == cam]
        size = None
        for kind, encoding, channels in (("mask", "mono8", 1), ("color", "rgb8", 3)):
            msgs = outputs.images[(cam, kind)]
            stamps = [m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec for m in msgs]
            assert stamps == [m.stamp_ns for m in sent], f"{cam} {kind}: stamps differ from the input's"
            assert {m.header.frame_id for m in msgs} == {cam}
            assert {m.encoding for m in msgs} == {encoding}
            for m in msgs:
                assert m.step == m.width * channels and len(m.data) == m.step * m.height
            size = size or (msgs[0].width, msgs[0].height)
            assert {(m.width, m.height) for m in msgs} == {size}
        assert size[0] == 320
    # masks hold class ids (or 255); colours are those of the label info (latched: this late
    # subscriber gets it), the checkpoint's palette with the colour map's Road and Sky
    info = latched_label_info(proc, ros.node, "/front/semantic/label_info")
    names = [c["name"] for c in info["classes"]]
    palette = np.array([c["color"] for c in info["classes"]], np.uint8)
    meta = read_metadata(DEFAULT_CHECKPOINT) if DEFAULT_CHECKPOINT.exists() else None
    if meta is not None:
        assert names == meta["classes"] and info["unknown_id"] == 255
        want = np.asarray(meta["palette"], np.uint8).copy()
        want[names.index("Road")], want[names.index("Sky")] = (255, 0, 255), (1, 2, 3)
        assert np.array_equal(palette, want)
    mask_msg, color_msg = outputs.images[("front", "mask")][5], outputs.images[("front", "color")][5]
    mask = np.frombuffer(bytes(mask_msg.data), np.uint8).reshape(mask_msg.height, mask_msg.width)
    color = np.frombuffer(bytes(color_msg.data), np.uint8).reshape(color_msg.height, color_msg.width, 3)
    assert np.all((mask < len(names)) | (mask == 255)) and (mask == names.index("Road")).any()
    lut = np.zeros((256, 3), np.uint8)
    lut[:len(names)] = palette
    assert np.array_equal(color, lut[mask])
    # the diagnostics account for every frame
    def settled():
        return all(int(outputs.latest_status(c)[1].get("masks_out", -1)) == len(
            [m for m in inputs if m.frame_id == c]) for c in CAMERAS)
    wait_until(settled, 10, proc, "diagnostics with every frame")
    for cam in CAMERAS:
        status, values = outputs.latest_status(cam)
        assert status.name == f"cvseg_node: {cam}"
        assert values["frames_in"] == values["masks_out"]
        assert values["queue_drops"] == "0" and values["decode_errors"] == "0"
        assert values["skipped_before_keyframe"] == "0" and values["wrong_format"] == "0"
        assert float(values["latency_ms_p50"]) > 0 and float(values["latency_ms_p99"]) >= float(values["latency_ms_p50"])
        for key in ("input_rate_hz", "output_rate_hz", "resyncs", "discontinuities", "device"):
            assert key in values


def test_wrong_format_is_warned_once_counted_and_survived(live):
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CompressedImage
    from diagnostic_msgs.msg import DiagnosticStatus
    proc, ros, outputs, log = live
    pub = ros.node.create_publisher(CompressedImage, "/rear/image_compressed",
                                    QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
    wait_until(lambda: pub.get_subscription_count() > 0, 10, proc, "the node to match")
    time.sleep(0.3)
    for i in range(3):
        msg = CompressedImage(format="jpeg", data=b"\xff\xd8\xff\xe0 not h264")
        msg.header.frame_id = "rear"
        msg.header.stamp.sec = 4_000_000_000 - 10 + i
        pub.publish(msg)
    wait_until(lambda: outputs.latest_status("rear")[1].get("wrong_format") == "3", 10, proc,
               "wrong_format == 3 in the diagnostics")
    assert proc.poll() is None, "the node died on a wrong-format message"
    with outputs.lock:
        levels = [st.level for arr in outputs.diagnostics for st in arr.status if st.hardware_id == "rear"]
    assert DiagnosticStatus.WARN in levels
    time.sleep(0.3)
    warnings = [line for line in log.read_text().splitlines() if "unsupported format" in line]
    assert len(warnings) == 1 and "WARN" in warnings[0] and "'jpeg'" in warnings[0], warnings
    ros.node.destroy_publisher(pub)


def test_a_topic_published_as_a_type_the_node_cannot_read_is_warned_about(live):
    """Someone publishes ``std_msgs/String`` on a camera's input topic (as ``h264_msgs/Packet``
    would be on the default topic): no message can arrive, and the node says so once, naming the
    type it sees and the ones it reads."""
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from std_msgs.msg import String
    proc, _, outputs, log = live
    other = Ros("cvseg_test_other_type", DOMAIN)    # a participant of its own: one type per topic each
    pub = other.node.create_publisher(String, "/rear/image_compressed",
                                      QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))

    def warned():
        return [line for line in log.read_text().splitlines()
                if "is published as std_msgs/msg/String" in line and "camera 'rear'" in line]
    try:
        wait_until(lambda: warned(), 15, proc, "a warning about the topic's type")
        time.sleep(1.5)          # a few more diagnostics periods: still one warning
        lines = warned()
        assert len(lines) == 1 and "WARN" in lines[0] and "foxglove_msgs/msg/CompressedVideo" in lines[0], lines
        assert proc.poll() is None and pub.get_subscription_count() == 0    # nothing reads it
    finally:
        other.close()


def test_camera_info_is_republished_under_each_masks_header_at_its_size(live, two_camera_bag):
    """The front camera's CameraInfo (for an image twice the mask's size) arrives, then the GOP
    of a clip: each mask gets a CameraInfo on front/semantic/camera_info under the mask's own
    stamp and frame_id, at the mask's size with K and P halved; nothing for 'rear' (no info)."""
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, CompressedImage
    proc, ros, outputs, _ = live
    got = []
    qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
    sub = ros.node.create_subscription(CameraInfo, "/front/semantic/camera_info", got.append, qos)
    rear_sub = ros.node.create_subscription(CameraInfo, "/rear/semantic/camera_info", got.append, qos)
    info_pub = ros.node.create_publisher(CameraInfo, "/front/camera_info", qos)
    image_pub = ros.node.create_publisher(CompressedImage, "/front/image_compressed", qos)
    wait_until(lambda: info_pub.get_subscription_count() and image_pub.get_subscription_count()
               and sub.get_publisher_count(), 10, proc, "the node to match")
    units = [m for m in _bag_frames(two_camera_bag) if m.frame_id == "front"][:12]
    with outputs.lock:
        before = len(outputs.images[("front", "mask")])
    info = CameraInfo(width=0, height=0, distortion_model="plumb_bob", d=[0.1, 0.0, 0.0, 0.0, 0.0],
                      k=[600.0, 0, 320.0, 0, 600.0, 180.0, 0, 0, 1.0],
                      p=[600.0, 0, 320.0, 0, 0, 600.0, 180.0, 0, 0, 0, 1.0, 0])
    from cvseg_ros.codec.annexb import nal_units
    from cvseg_ros.codec.h264_syntax import parse_sps
    sps = parse_sps(next(payload for _, t, payload in nal_units(units[0].data) if t == 7))
    info.width, info.height = 2 * sps.width, 2 * sps.height     # the masks come out at the frame's size
    info_pub.publish(info)
    time.sleep(0.3)
    for i, unit in enumerate(units):
        msg = CompressedImage(format="h264", data=unit.data)
        msg.header.frame_id = "front"
        msg.header.stamp.sec = 2_100_000_000 + i
        image_pub.publish(msg)
        time.sleep(0.05)
    wait_until(lambda: len(got) >= len(units), 30, proc, "a CameraInfo per mask")
    time.sleep(0.3)
    with outputs.lock:
        masks = outputs.images[("front", "mask")][before:]
    assert [m.header.stamp.sec for m in got] == [m.header.stamp.sec for m in masks] == [
        2_100_000_000 + i for i in range(len(units))]
    assert {m.header.frame_id for m in got} == {"front"}
    assert {(m.width, m.height) for m in got} == {(m.width, m.height) for m in masks} == {(sps.width, sps.height)}
    assert list(got[0].k) == [300.0, 0, 160.0, 0, 300.0, 90.0, 0, 0, 1.0] and list(got[0].d) == [0.1, 0, 0, 0, 0]
    assert list(got[0].p)[:7] == [300.0, 0, 160.0, 0, 0, 300.0, 90.0]
    for entity in (sub, rear_sub):
        ros.node.destroy_subscription(entity)
    for entity in (info_pub, image_pub):
        ros.node.destroy_publisher(entity)


def test_queue_overflow_drops_are_counted_and_state_restarts(tmp_path, two_camera_bag):
    """A queue of 1 and a 10x replay: the engine falls behind. Every frame the node receives is
    published, or counted (queue drop, skipped before a keyframe, decode error, ...); each frame
    that gets no mask is carried into the camera's state (``queue_carried``) or makes the state
    restart (a discontinuity), whichever the engine can at that frame."""
    from cvseg_ros.ros.message_path import DROP_REASONS
    from cvseg_ros.ros.replay import replay
    log = tmp_path / "node.log"
    proc = start_node(log, ["-p", "cameras:=[front]", "-p", "qos_reliability:=reliable",
                            "-p", "queue_depth:=1", "-p", "diagnostics_period:=0.25",
                            *checkpoint_args(tmp_path)], domain=OVERFLOW_DOMAIN)
    ros = Ros("cvseg_test_overflow", OVERFLOW_DOMAIN)
    outputs = Outputs(ros.node, ["front"])
    try:
        wait_until(lambda: ros.node.count_subscribers("/front/image_compressed") > 0
                   and ros.node.count_publishers("/front/semantic/mask") > 0, 120, proc, "the node")
        n = replay(two_camera_bag, rate=10.0, node=ros.node, context=ros.context,
                   topics=["/front/image_compressed"], wait_for_subscribers=30)

        def accounted(v):
            return int(v["masks_out"]) + sum(int(v[k]) for k in DROP_REASONS)

        def settled():
            v = outputs.latest_status("front")[1]
            return bool(v) and v["queue_size"] == "0" and accounted(v) == int(v["frames_in"]) > 0
        time.sleep(0.5)
        try:
            wait_until(settled, 60, proc, "every received frame published or counted")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; replayed {n}, diagnostics {outputs.latest_status('front')[1]}") from None
        values = outputs.latest_status("front")[1]
        assert 0 < int(values["frames_in"]) <= n
        assert int(values["queue_drops"]) > 0, f"the engine kept up: no overflow to test {values}"
        assert int(values["discontinuities"]) + int(values["queue_carried"]) >= 1, values
        assert outputs.count("mask") == int(values["masks_out"])
        assert "engine behind" in log.read_text() and "queue_drops" in log.read_text()
    finally:
        code = stop_node(proc)
        ros.close()
    assert code == 0, log.read_text()[-3000:]


def test_demo_command_on_a_real_clip(tmp_path):
    """`cvseg demo --video CLIP`: bag, node process, replay over DDS, recording, PNG/MP4, JSON."""
    import json

    from cvseg_ros.tools.cli import main
    require(SMALL1_CLIP, "real clip")
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--video", str(SMALL1_CLIP),
            "--max-frames", "30", "--width", "320", "--rate", "2", "--json", str(tmp_path / "s.json"),
            "--domain-id", str(DEMO_DOMAIN)]
    ck = checkpoint_args(tmp_path)
    if ck:
        args += ["--checkpoint", ck[1].split(":=", 1)[1]]
    assert main(args) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    for key in ("frames_in", "masks_out", "skipped_before_keyframe", "decode_errors", "fps",
                "latency_ms_p50", "latency_ms_p99"):
        assert key in summary
    assert summary["frames_in"] == summary["masks_out"] == 30
    assert summary["decode_errors"] == 0 and summary["node_exit_code"] == 0
    assert (out / "overlay.png").stat().st_size > 0 and (out / "overlay.mp4").stat().st_size > 0
