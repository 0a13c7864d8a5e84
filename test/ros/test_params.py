"""cvseg_node parameters: the params file is read in full, overrides win, bad values fail clearly.

The node runs in its own process (real rclpy, real parameter services) on this module's ROS domain;
its parameters are read back with the standard ``GetParameters`` / ``SetParameters`` services.
"""
from __future__ import annotations

import json
import random
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PARAMS = REPO / "config" / "cvseg.yaml"
PAPER = REPO / "cvseg_ros" / "checkpoints" / "cvseg_paper.safetensors"   # shipped with the package
BAD_COLORS = Path(tempfile.mkdtemp(prefix="cvseg_colors_")) / "colors.json"   # a class the model has not
BAD_COLORS.write_text('{"Lava": [255, 80, 0]}')
DOMAIN = random.SystemRandom().randint(161, 200)   # this module's own ROS domain
rclpy = pytest.importorskip("rclpy", reason="rclpy is not importable (ROS 2 wheels missing)")

from test_param_table import file_params  # noqa: E402
from ros_helpers import Ros, checkpoint_args, env_for, start_node, stop_node  # noqa: E402
from ros_helpers import node_cmd as helpers_node_cmd  # noqa: E402

from cvseg_ros.ros import process  # noqa: E402


def env() -> dict:
    return env_for(DOMAIN)


def node_cmd(*args: str) -> list[str]:
    """The node's command line with the params file alone (its own ``threads``) and ``args``."""
    return helpers_node_cmd(*args, threads=None)


def test_params_file_lists_every_parameter():
    flat = file_params()
    for name in ("cameras", "front.topic", "device", "checkpoint", "publish_mask", "publish_color",
                 "qos_reliability", "queue_depth", "batch_window_ms", "max_stamp_gap_periods",
                 "diagnostics_period", "input_timeout_s", "luma_matching", "p_frame_branch", "threads"):
        assert name in flat, name
    assert flat["cameras"] == ["front"] and flat["front.topic"] == ""
    assert "class_names" in PARAMS.read_text()       # documented (read-only, set by the node)


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("params")
    log = tmp / "node.log"
    ck = checkpoint_args(tmp)
    proc = start_node(log, ["-p", "cameras:=[front, rear]", "-p", "rear.topic:=/rear/cam/h264",
                            "-p", "batch_window_ms:=7", "-p", "p_frame_branch:=false", *ck], DOMAIN, threads=None)
    ros = Ros("cvseg_params_test", DOMAIN)
    try:
        yield proc, ros.node, log, ck
    finally:
        ros.close()
        code = stop_node(proc)
        assert code == 0, log.read_text()[-3000:]


def call(node, srv_type, name, request, proc, timeout=120.0):
    client = node.create_client(srv_type, name)
    deadline = time.monotonic() + timeout
    while not client.wait_for_service(timeout_sec=0.2):
        assert proc.poll() is None, "the node exited"
        assert time.monotonic() < deadline, f"no service {name}"
    future = client.call_async(request)
    while not future.done():
        assert time.monotonic() < deadline, f"no answer from {name}"
        time.sleep(0.02)
    node.destroy_client(client)
    return future.result()


def test_node_reads_every_value_from_the_file_and_the_overrides(running):
    from rcl_interfaces.srv import DescribeParameters, GetParameters
    from rclpy.parameter import parameter_value_to_python
    proc, node, log, ck = running
    expected = file_params()
    expected.update({"cameras": ["front", "rear"], "rear.topic": "/rear/cam/h264", "batch_window_ms": 7,
                     "p_frame_branch": False})
    if ck:
        expected["checkpoint"] = ck[1].split(":=", 1)[1]
    names = sorted(expected) + ["class_names"]
    reply = call(node, GetParameters, "/cvseg_node/get_parameters", GetParameters.Request(names=names), proc)
    got = {n: parameter_value_to_python(v) for n, v in zip(names, reply.values)}
    for name, value in expected.items():
        assert got[name] == value, f"{name}: node has {got[name]!r}, expected {value!r}"
    assert got["class_names"] and all(isinstance(c, str) for c in got["class_names"])
    described = call(node, DescribeParameters, "/cvseg_node/describe_parameters",
                     DescribeParameters.Request(names=names), proc)
    for d in described.descriptors:
        assert d.description, f"{d.name} has no description"
        assert d.read_only, f"{d.name} should be read-only (read once at start-up)"
    # the start-up log states the effective values too
    line = next(l for l in log.read_text().splitlines() if "effective parameters:" in l)
    logged = json.loads(line.split("effective parameters:", 1)[1])
    assert logged["cameras"] == ["front", "rear"] and logged["rear.topic"] == "/rear/cam/h264"
    assert logged["class_names"] == got["class_names"]
    assert logged["p_frame_branch"] == "false" and logged["resolved_p_frame_branch"] is False


def test_class_names_and_settings_are_read_only(running):
    from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
    from rcl_interfaces.srv import SetParameters
    proc, node, _, _ = running
    request = SetParameters.Request(parameters=[
        Parameter(name="class_names", value=ParameterValue(type=ParameterType.PARAMETER_STRING_ARRAY,
                                                           string_array_value=["x"])),
        Parameter(name="queue_depth", value=ParameterValue(type=ParameterType.PARAMETER_INTEGER,
                                                           integer_value=3)),
    ])
    reply = call(node, SetParameters, "/cvseg_node/set_parameters", request, proc)
    assert [r.successful for r in reply.results] == [False, False]


BAD = [
    pytest.param(["-p", "cameras:=[]"], "'cameras' is empty", id="empty-cameras"),
    pytest.param(["-p", "device:=tpu"], "unknown device 'tpu'", id="unknown-device"),
    pytest.param(["-p", "checkpoint:=/nonexistent/model.safetensors"], "file not found", id="missing-checkpoint"),
    pytest.param(["-p", "cameras:=[front, front]"], "twice", id="duplicate-camera"),
    pytest.param(["-p", "cameras:=['front/x']"], "not a valid camera name", id="bad-camera-name"),
    pytest.param(["-p", "qos_reliability:=sometimes"], "qos_reliability", id="bad-qos"),
    pytest.param(["-p", "queue_depth:=0"], "queue_depth", id="zero-queue"),
    pytest.param(["-p", "queue_depth:=many"], "queue_depth", id="wrong-type"),
    pytest.param(["-p", "threads:=-1"], "'threads' must be >= 0", id="negative-threads"),
    pytest.param(["-p", "input_timeout_s:=0"], "input_timeout_s", id="zero-input-timeout"),
    pytest.param(["-p", "front.type:=jpeg"], "front.type", id="unknown-input-type"),
    pytest.param(["-p", "front.topic:=bad topic"], "camera 'front': failed to resolve name", id="bad-topic"),
    pytest.param(["-p", "palette:=/nonexistent/colors.yaml"], "file not found", id="missing-palette"),
    pytest.param(["-p", f"palette:={BAD_COLORS}"], "unknown class 'Lava'", id="palette-unknown-class"),
    pytest.param(["-p", "p_frame_branch:=false", "-p", f"checkpoint:={PAPER}"], "accumulates the motion",
                 id="no-branch-for-the-paper-model"),
]


@pytest.mark.parametrize("args,needle", BAD)
def test_bad_parameters_fail_at_start_up_with_one_clear_message(args, needle):
    start = time.monotonic()
    proc = subprocess.run(node_cmd(*args), env=env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    errors = [line for line in out.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and needle in errors[0] and "cvseg_node" in errors[0], out
    assert "Traceback" not in out, out
    assert time.monotonic() - start < 60


def test_an_input_type_whose_message_package_is_missing_fails_clearly():
    """``front.type:=compressed_video`` where ``foxglove_msgs`` is not installed (as here): one
    error naming the type and the missing package, exit status 1."""
    import importlib.util
    if importlib.util.find_spec("foxglove_msgs") is not None:
        pytest.skip("foxglove_msgs is installed here: the type is readable")
    proc = subprocess.run(node_cmd("-p", "front.type:=compressed_video"), env=env(), capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    errors = [line for line in out.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "foxglove_msgs/msg/CompressedVideo" in errors[0] and "not installed" in errors[0], out
    assert "Traceback" not in out, out


def test_missing_params_file_fails_clearly():
    proc = subprocess.run(process.node_command(params="/nonexistent/cvseg.yaml"), env=env(), capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    errors = [line for line in out.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "params file not found" in errors[0] and "cvseg_node" in errors[0], out
    assert "Traceback" not in out, out


def test_a_renamed_node_reads_a_wildcard_file_and_qos_overrides_apply(tmp_path):
    """A params file keyed ``/**`` serves a node renamed at start-up (``-r __node:=...``);
    ``qos_overrides.<topic>.subscription.reliability`` in it makes the input subscription
    reliable (the default is best effort), as rclpy's QoS overriding does."""
    from rclpy.qos import ReliabilityPolicy
    from cvseg_ros.ros.process import NodeProcess
    params = tmp_path / "renamed.yaml"
    params.write_text("/**:\n  ros__parameters:\n    queue_depth: 7\n    qos_overrides:\n"
                      "      /front/image_compressed:\n        subscription:\n          reliability: reliable\n")
    log = tmp_path / "node.log"
    domain = DOMAIN - 40     # not the module's running node's
    proc = NodeProcess({"threads": 1}, args=["-r", "__node:=front_segmentation", *checkpoint_args(tmp_path)],
                       log_path=log, domain_id=domain, params=params, cwd=REPO, error=AssertionError).start()
    ros = Ros("cvseg_rename_test", domain)
    try:
        deadline = time.monotonic() + 120
        while not [i for i in ros.node.get_subscriptions_info_by_topic("/front/image_compressed")
                   if i.node_name != "_NODE_NAME_UNKNOWN_"]:    # (until discovery has the name)
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        (info,) = ros.node.get_subscriptions_info_by_topic("/front/image_compressed")
        assert info.node_name == "front_segmentation"
        assert info.qos_profile.reliability == ReliabilityPolicy.RELIABLE
        while "effective parameters:" not in log.read_text():      # logged once set up
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        line = next(line for line in log.read_text().splitlines() if "effective parameters:" in line)
        assert json.loads(line.split("effective parameters:", 1)[1])["queue_depth"] == 7
    finally:
        ros.close()
        assert stop_node(proc) == 0, log.read_text()[-3000:]


def test_an_auto_camera_with_no_topic_set_finds_its_input_on_the_types_default_topics(tmp_path, gop12_units):
    """``side.topic`` empty, ``side.type`` auto: a publisher on ``/side/image_raw/ffmpeg`` (one of
    the three default topics; CompressedImage here, the only H.264 type installed) is found, the
    node subscribes there instead of ``/side/image_compressed`` and segments what arrives."""
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CompressedImage, Image
    from cvseg_ros.ros.process import NodeProcess
    log = tmp_path / "node.log"
    domain = DOMAIN - 41
    ros = Ros("cvseg_default_topic_test", domain)
    qos = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
    pub = ros.node.create_publisher(CompressedImage, "/side/image_raw/ffmpeg", qos)
    masks = []
    ros.node.create_subscription(Image, "/side/semantic/mask", masks.append, qos)
    proc = NodeProcess({"threads": 1, "cameras": "[side]", "diagnostics_period": "0.5", "qos_reliability": "reliable",
                        "queue_depth": 30},
                       args=checkpoint_args(tmp_path), log_path=log, domain_id=domain, cwd=REPO,
                       error=AssertionError).start()
    try:
        deadline = time.monotonic() + 120
        while pub.get_subscription_count() == 0:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        assert not ros.node.get_subscriptions_info_by_topic("/side/image_compressed")
        time.sleep(0.5)
        for i, unit in enumerate(gop12_units[:6]):
            msg = CompressedImage(format="h264", data=unit)
            msg.header.frame_id, msg.header.stamp.sec = "side", 1_700_000_000 + i
            pub.publish(msg)
        while len(masks) < 6:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        assert [m.header.stamp.sec for m in masks] == [1_700_000_000 + i for i in range(6)]
        assert "/side/image_raw/ffmpeg (sensor_msgs/msg/CompressedImage" in log.read_text() or \
               "/side/image_raw/ffmpeg is published as sensor_msgs/msg/CompressedImage" in log.read_text()
    finally:
        ros.close()
        assert stop_node(proc) == 0, log.read_text()[-3000:]
