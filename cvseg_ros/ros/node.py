"""``cvseg_node``: the rclpy adapter around :class:`cvseg_ros.engine.pipeline.SegmentationEngine`.

Subscribes to ``sensor_msgs/CompressedImage`` (format ``h264``, Annex B, one access unit per
message) per camera and publishes, with the input's header (stamp, frame_id):

- ``<camera>/semantic/mask``  ``sensor_msgs/Image`` ``mono8``: class ids, 255 = unknown
- ``<camera>/semantic/color`` ``sensor_msgs/Image`` ``rgb8``: the ids in the checkpoint's palette
- ``/diagnostics`` ``diagnostic_msgs/DiagnosticArray``: one status per camera

The work is done by :class:`cvseg_ros.ros.message_path.MessagePath` (ROS-free, so the fuzz and soak
commands and the tests drive the very same code without DDS): subscription callbacks only check
and enqueue (one bounded queue per camera); a worker thread batches what is queued across cameras
(waiting at most ``batch_window_ms`` for the other cameras), runs the engine and publishes. Nothing
is dropped silently, and what is dropped is chosen on purpose (see that module: duplicates, late
stamps, lost pictures, the queue policy when the engine falls behind); every message received
ends in exactly one counted outcome in ``/diagnostics``. A camera with no input for
``input_timeout_s`` is reported STALE (and no mask is published for it meanwhile).

Parameters (all read at start-up, hence read-only; see ``config/cvseg.yaml``):

``cameras`` (string[]), ``<camera>.topic`` (string, default ``/<camera>/image_raw/h264``),
``device`` (auto|cpu|cuda[:N]), ``checkpoint`` ("" = the shipped one), ``publish_mask`` (bool),
``publish_color`` (bool), ``qos_reliability`` (best_effort|reliable, input side),
``queue_depth`` (int), ``batch_window_ms`` (float), ``max_stamp_gap_periods`` (float),
``diagnostics_period`` (float, s), ``input_timeout_s`` (float, s), ``threads`` (int, torch CPU
threads, 0 = torch's default), ``class_names`` (string[], published by the node).
"""
from __future__ import annotations

import json
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor, ParameterType
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image

from cvseg_ros.ros.message_path import ERROR, OK, STALE, WARN, MaskOutput, MessagePath

NODE_NAME = "cvseg_node"
DEVICES_HELP = "'auto', 'cpu' or 'cuda[:N]'"
_CAMERA_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_LEVELS = {OK: DiagnosticStatus.OK, WARN: DiagnosticStatus.WARN, ERROR: DiagnosticStatus.ERROR,
           STALE: DiagnosticStatus.STALE}
#: Overrides that rclpy itself understands (not warned about as unknown).
_BUILTIN_PARAMS = ("use_sim_time", "start_type_description_service")


class StartupError(Exception):
    """A bad configuration: the node logs the message and exits with status 1."""


# -- helpers -------------------------------------------------------------------------------------

def image_message(array: np.ndarray, encoding: str, header, bridge=None) -> Image:
    """``sensor_msgs/Image`` from a HxW (mono8) or HxWx3 (rgb8) uint8 array, with ``header``."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if bridge is not None:
        msg = bridge.cv2_to_imgmsg(array, encoding=encoding)
        msg.header = header
        return msg
    msg = Image()
    msg.header = header
    msg.height, msg.width = int(array.shape[0]), int(array.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = int(array.strides[0])
    msg.data = array.tobytes()
    return msg


def _make_bridge():
    """A ROS 2 ``cv_bridge.CvBridge`` when importable and working, else None (plain fields)."""
    try:
        from cv_bridge import CvBridge  # type: ignore
        bridge = CvBridge()
        probe = bridge.cv2_to_imgmsg(np.zeros((2, 2), np.uint8), encoding="mono8")
        if not isinstance(probe, Image):   # e.g. the ROS 1 package from PyPI
            return None
        return bridge
    except Exception:  # noqa: BLE001 - absent or broken (the PyPI ROS 1 build): fall back
        return None


# -- the node -----------------------------------------------------------------------------------

@dataclass
class _Outputs:
    mask: Any = None
    color: Any = None


def _descriptor(description: str, ptype: int | None = None, read_only: bool = True,
                dynamic: bool = False) -> ParameterDescriptor:
    d = ParameterDescriptor(description=description, read_only=read_only)
    if dynamic:
        d.dynamic_typing = True
    elif ptype is not None:
        d.type = ptype
    return d


class CvsegNode(Node):
    """See the module docstring. Construct, then :meth:`setup` (raises :class:`StartupError`)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(NODE_NAME, automatically_declare_parameters_from_overrides=False,
                         allow_undeclared_parameters=False, **kwargs)
        self.engine = None
        self.path: MessagePath | None = None
        self._outputs: dict[str, _Outputs] = {}
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._bridge = None
        self._last_diag = time.monotonic()

    # -- parameters -------------------------------------------------------------------------------
    def _declare(self, name: str, default, descriptor: ParameterDescriptor):
        try:
            return self.declare_parameter(name, default, descriptor).value
        except Exception as exc:  # noqa: BLE001 - InvalidParameterTypeException, ...
            raise StartupError(f"parameter '{name}': {exc}") from None

    def _number(self, name: str, default: float, description: str) -> float:
        value = self._declare(name, default, _descriptor(description, dynamic=True))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise StartupError(f"parameter '{name}' must be a number, got {value!r}")
        return float(value)

    def read_parameters(self) -> dict:
        P = ParameterType
        cameras = self._declare("cameras", ["front"], _descriptor(
            "camera names; each gets <name>.topic, <name>/semantic/mask and <name>/semantic/color",
            P.PARAMETER_STRING_ARRAY))
        cameras = list(cameras or [])
        if not cameras:
            raise StartupError("parameter 'cameras' is empty: list at least one camera, "
                               "e.g. -p cameras:=[front]")
        for cam in cameras:
            if not _CAMERA_RE.match(cam):
                raise StartupError(f"parameter 'cameras': {cam!r} is not a valid camera name "
                                   f"(letters, digits and '_', starting with a letter)")
        if len(set(cameras)) != len(cameras):
            raise StartupError(f"parameter 'cameras' lists a camera twice: {cameras}")
        cfg: dict[str, Any] = {"cameras": cameras}
        for cam in cameras:
            cfg[f"{cam}.topic"] = self._declare(f"{cam}.topic", f"/{cam}/image_raw/h264", _descriptor(
                f"input topic of camera '{cam}' (sensor_msgs/CompressedImage, format h264)",
                P.PARAMETER_STRING))
        device = self._declare("device", "auto", _descriptor(
            f"inference device: {DEVICES_HELP}", P.PARAMETER_STRING)).strip().lower()
        if not _DEVICE_RE.match(device):
            raise StartupError(f"parameter 'device': unknown device {device!r}; use {DEVICES_HELP}")
        cfg["device"] = device
        checkpoint = self._declare("checkpoint", "", _descriptor(
            "model checkpoint (.safetensors with its .json); empty = the shipped default",
            P.PARAMETER_STRING)).strip()
        if checkpoint:
            path = Path(checkpoint).expanduser()
            if not path.is_file():
                raise StartupError(f"parameter 'checkpoint': file not found: {path}")
            checkpoint = str(path)
        cfg["checkpoint"] = checkpoint
        cfg["publish_mask"] = self._declare("publish_mask", True, _descriptor(
            "publish <camera>/semantic/mask (mono8 class ids, 255 = unknown)", P.PARAMETER_BOOL))
        cfg["publish_color"] = self._declare("publish_color", True, _descriptor(
            "publish <camera>/semantic/color (rgb8, checkpoint palette)", P.PARAMETER_BOOL))
        rel = self._declare("qos_reliability", "best_effort", _descriptor(
            "input subscription reliability: best_effort (sensor data QoS) or reliable",
            P.PARAMETER_STRING)).strip().lower()
        if rel not in ("best_effort", "reliable"):
            raise StartupError(f"parameter 'qos_reliability': {rel!r}; use 'best_effort' or 'reliable'")
        cfg["qos_reliability"] = rel
        depth = self._declare("queue_depth", 5, _descriptor(
            "per camera: the bounded queue in front of the engine (and the input QoS depth, at least 10)",
            P.PARAMETER_INTEGER))
        if depth < 1:
            raise StartupError(f"parameter 'queue_depth' must be >= 1, got {depth}")
        cfg["queue_depth"] = depth
        cfg["batch_window_ms"] = self._number(
            "batch_window_ms", 5.0, "how long to wait for the other cameras' frames to batch them (ms)")
        if cfg["batch_window_ms"] < 0:
            raise StartupError("parameter 'batch_window_ms' must be >= 0")
        cfg["max_stamp_gap_periods"] = self._number(
            "max_stamp_gap_periods", 3.0,
            "a stamp step larger than this many frame periods restarts the camera's model state")
        if cfg["max_stamp_gap_periods"] <= 1.0:
            raise StartupError("parameter 'max_stamp_gap_periods' must be > 1")
        cfg["diagnostics_period"] = self._number(
            "diagnostics_period", 1.0, "seconds between /diagnostics messages")
        if cfg["diagnostics_period"] <= 0:
            raise StartupError("parameter 'diagnostics_period' must be > 0")
        cfg["input_timeout_s"] = self._number(
            "input_timeout_s", 1.0, "a camera with no message for this long is reported STALE in /diagnostics")
        if cfg["input_timeout_s"] <= 0:
            raise StartupError("parameter 'input_timeout_s' must be > 0")
        cfg["luma_matching"] = self._declare("luma_matching", True, _descriptor(
            "correct the motion accumulated since the I-frame against the frames' luma where the "
            "checkpoint's model does (false: less time per P-frame, about 1 mIoU point less)",
            P.PARAMETER_BOOL))
        cfg["p_frame_branch"] = self._declare("p_frame_branch", True, _descriptor(
            "run the P-frame branch (CNNs, ConvLSTM, correction head); false: each P-frame's mask is "
            "the I-frame's logits warped along the accumulated motion (about 1 ms less per P-frame; "
            "the same accuracy on CamVid val, see README)", P.PARAMETER_BOOL))
        threads = self._declare("threads", 0, _descriptor(
            "torch CPU threads of the engine (0 = torch's default)", P.PARAMETER_INTEGER))
        if threads < 0:
            raise StartupError(f"parameter 'threads' must be >= 0, got {threads}")
        cfg["threads"] = threads
        overrides = getattr(self, "_parameter_overrides", {}) or {}
        unknown = sorted(k for k in overrides if k not in cfg and k not in _BUILTIN_PARAMS
                         and k != "class_names" and not k.startswith("qos_overrides."))
        if unknown:
            self.get_logger().warning(f"ignoring unknown parameter(s): {', '.join(unknown)}")
        if "class_names" in overrides:
            self.get_logger().warning("parameter 'class_names' is read-only (it comes from the "
                                      "checkpoint): the value given is ignored")
        return cfg

    # -- start-up ---------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg = self.read_parameters()
        if cfg["device"].startswith("cuda"):
            import torch
            if not torch.cuda.is_available():
                raise StartupError(f"parameter 'device': {cfg['device']!r} requested but CUDA is not "
                                   f"available here; use 'cpu' or 'auto'")
        try:
            from cvseg_ros.engine.pipeline import SegmentationEngine
            self.engine = SegmentationEngine(checkpoint=cfg["checkpoint"] or None, device=cfg["device"],
                                             threads=cfg["threads"] or None, luma_matching=cfg["luma_matching"],
                                             p_frame_branch=cfg["p_frame_branch"])
        except Exception as exc:  # noqa: BLE001 - CheckpointError, ValueError, RuntimeError, ...
            raise StartupError(f"cannot start the segmentation engine: {exc}") from None
        class_names = list(self.engine.class_names)
        self.declare_parameter("class_names", class_names, _descriptor(
            "class id -> name (read-only, from the checkpoint)", ParameterType.PARAMETER_STRING_ARRAY),
            ignore_override=True)
        self._bridge = _make_bridge()
        self.path = MessagePath(
            self.engine, cfg["cameras"], topics={c: cfg[f"{c}.topic"] for c in cfg["cameras"]},
            queue_depth=cfg["queue_depth"], batch_window_ms=cfg["batch_window_ms"],
            max_stamp_gap_periods=cfg["max_stamp_gap_periods"], input_timeout_s=cfg["input_timeout_s"],
            warn=self.get_logger().warning)

        reliability = (ReliabilityPolicy.RELIABLE if cfg["qos_reliability"] == "reliable"
                       else ReliabilityPolicy.BEST_EFFORT)
        # the DDS history is never the smaller queue: overflow happens (and is counted) in ours; it
        # is deep enough to ride out a stalled executor (what DDS drops the node cannot count; the
        # frame_num check still sees the loss: lost_units)
        in_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=max(2 * cfg["queue_depth"], 30),
                            reliability=reliability, durability=DurabilityPolicy.VOLATILE)
        # outputs are reliable: that serves reliable and best-effort subscribers alike
        out_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=max(cfg["queue_depth"], 10),
                             reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
        for name in cfg["cameras"]:
            pubs = self._outputs[name] = _Outputs()
            try:
                if cfg["publish_mask"]:
                    pubs.mask = self.create_publisher(Image, f"{name}/semantic/mask", out_qos)
                if cfg["publish_color"]:
                    pubs.color = self.create_publisher(Image, f"{name}/semantic/color", out_qos)
                self.create_subscription(CompressedImage, cfg[f"{name}.topic"],
                                         lambda msg, c=name: self._on_image(c, msg), in_qos)
            except Exception as exc:  # noqa: BLE001 - InvalidTopicNameException
                raise StartupError(f"camera '{name}': {exc}") from None
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = self.create_timer(cfg["diagnostics_period"], self._publish_diagnostics)
        self._worker = threading.Thread(target=self._work, name="cvseg_engine", daemon=True)
        self._worker.start()

        effective = dict(cfg, class_names=class_names, resolved_device=str(self.engine.device),
                         cv_bridge=self._bridge is not None)
        self.get_logger().info("effective parameters: " + json.dumps(effective, sort_keys=True))
        for name, pubs in self._outputs.items():
            outs = [p.topic_name for p in (pubs.mask, pubs.color) if p is not None]
            self.get_logger().info(f"camera '{name}': {cfg[f'{name}.topic']} ({cfg['qos_reliability']}) -> "
                                   f"{', '.join(outs) or 'no outputs'}")

    # -- input: the message path checks, counts and enqueues ----------------------------------------
    def _on_image(self, camera: str, msg: CompressedImage) -> None:
        try:
            self.path.receive(camera, msg)
        except Exception as exc:  # noqa: BLE001 - an exception here would stop the executor
            self.get_logger().error(f"camera '{camera}': receive failure: {type(exc).__name__}: {exc}",
                                    throttle_duration_sec=5.0)

    # -- the worker: the message path does the work, this publishes ------------------------------------
    def _publish(self, out: MaskOutput) -> None:
        pubs = self._outputs[out.camera]
        if pubs.mask is not None:
            pubs.mask.publish(image_message(out.mask, "mono8", out.header, self._bridge))
        if pubs.color is not None:
            pubs.color.publish(image_message(self.engine.colorize(out.mask), "rgb8", out.header, self._bridge))

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                batch = self.path.take_batch(timeout=0.2, stop=self._stop)
                if batch:
                    self.path.run_batch(batch, self._publish)
            except Exception as exc:  # noqa: BLE001 - never let the worker die; run_batch counts
                self.get_logger().error(f"worker failure: {type(exc).__name__}: {exc}",
                                        throttle_duration_sec=5.0)

    # -- diagnostics -----------------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        try:
            self._diagnostics()
        except Exception as exc:  # noqa: BLE001 - an exception here would stop the executor
            self.get_logger().error(f"diagnostics failure: {type(exc).__name__}: {exc}",
                                    throttle_duration_sec=5.0)

    def _diagnostics(self) -> None:
        now = time.monotonic()
        elapsed = max(now - self._last_diag, 1e-3)
        self._last_diag = now
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        for name in self.path.cameras:
            level, message, values = self.path.camera_values(name, elapsed, str(self.engine.device), now)
            status = DiagnosticStatus()
            status.level = _LEVELS[level]
            status.name = f"{NODE_NAME}: {name}"
            status.hardware_id = name
            status.message = message
            status.values = [KeyValue(key=k, value=v) for k, v in values]
            arr.status.append(status)
        self._diag_pub.publish(arr)

    # -- shutdown -------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()
        if self.path is not None:
            self.path.wake()
        if self._worker is not None:
            self._worker.join(timeout=10.0)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv if argv is None else argv
    for flag, value in zip(args, args[1:]):   # rcl would add its own, less clear, error lines
        if flag == "--params-file" and not Path(value).is_file():
            print(f"[ERROR] [{NODE_NAME}]: params file not found: {value}", file=sys.stderr)
            return 1
    try:
        rclpy.init(args=args)
    except Exception as exc:  # noqa: BLE001 - bad --ros-args (e.g. a params file that is not there)
        print(f"[ERROR] [{NODE_NAME}]: cannot initialise ROS 2: {exc}", file=sys.stderr)
        return 1
    node = None
    status = 0
    try:
        node = CvsegNode()
        node.setup()
        rclpy.spin(node)
    except StartupError as exc:
        (node.get_logger() if node is not None else rclpy.logging.get_logger(NODE_NAME)).error(str(exc))
        status = 1
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # noqa: BLE001
        from rclpy.executors import ExternalShutdownException
        if not isinstance(exc, ExternalShutdownException):
            raise
    finally:
        if node is not None:
            node.stop()
            if status == 0 and rclpy.ok():
                node.get_logger().info("shut down")
            node.destroy_node()
        rclpy.try_shutdown()
    return status


if __name__ == "__main__":
    sys.exit(main())
