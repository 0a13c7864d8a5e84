"""``cvseg_node``: the rclpy adapter around :class:`cvseg_ros.engine.SegmentationEngine`.

Subscribes to ``sensor_msgs/CompressedImage`` (format ``h264``, Annex B, one access unit per
message) per camera and publishes, with the input's header (stamp, frame_id):

- ``<camera>/semantic/mask``  ``sensor_msgs/Image`` ``mono8``: class ids, 255 = unknown
- ``<camera>/semantic/color`` ``sensor_msgs/Image`` ``rgb8``: the ids in the checkpoint's palette
- ``/diagnostics`` ``diagnostic_msgs/DiagnosticArray``: one status per camera

Subscription callbacks only enqueue (one bounded queue per camera); a worker thread batches what
is queued across cameras (waiting at most ``batch_window_ms`` for the other cameras) and runs the
engine. Nothing is dropped silently: when a camera's queue is full its oldest message is dropped,
counted (``queue_drops``) and the camera's model state is restarted (its P-frames depend on the
dropped one). Stamps that go backwards or jump by more than ``max_stamp_gap_periods`` frame periods
also restart the state.

Parameters (all read at start-up, hence read-only; see ``config/cvseg.yaml``):

``cameras`` (string[]), ``<camera>.topic`` (string, default ``/<camera>/image_raw/h264``),
``device`` (auto|cpu|cuda[:N]), ``checkpoint`` ("" = the shipped one), ``publish_mask`` (bool),
``publish_color`` (bool), ``qos_reliability`` (best_effort|reliable, input side),
``queue_depth`` (int), ``batch_window_ms`` (float), ``max_stamp_gap_periods`` (float),
``diagnostics_period`` (float, s), ``class_names`` (string[], published by the node).
"""
from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor, ParameterType
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image

from .stream import UnsupportedStreamError, check_format

NODE_NAME = "cvseg_node"
DEVICES_HELP = "'auto', 'cpu' or 'cuda[:N]'"
_CAMERA_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
#: Overrides that rclpy itself understands (not warned about as unknown).
_BUILTIN_PARAMS = ("use_sim_time", "start_type_description_service")


class StartupError(Exception):
    """A bad configuration: the node logs the message and exits with status 1."""


# -- ROS-free helpers (unit-tested without DDS) -------------------------------------------------

@dataclass
class QueuedFrame:
    camera: str
    data: bytes
    stamp_ns: int
    header: Any               # std_msgs/Header of the input, copied to the outputs
    received_ns: int          # time.monotonic_ns() when the callback ran


class CameraQueue:
    """Bounded FIFO of one camera. When full, the oldest entry is dropped and counted, and the next
    entry popped carries a discontinuity reason (the model state must restart there)."""

    def __init__(self, depth: int) -> None:
        if depth < 1:
            raise ValueError("queue depth must be >= 1")
        self.depth = depth
        self._items: deque = deque()
        self.drops = 0
        self._pending: str | None = None

    def __len__(self) -> int:
        return len(self._items)

    def push(self, item) -> bool:
        """Enqueue; returns True when an older entry had to be dropped to make room."""
        dropped = False
        while len(self._items) >= self.depth:
            self._items.popleft()
            self.drops += 1
            dropped = True
        if dropped:
            self._pending = f"queue overflow ({self.drops} dropped so far)"
        self._items.append(item)
        return dropped

    def oldest(self):
        return self._items[0] if self._items else None

    def pop(self) -> tuple[Any, str | None]:
        """(oldest entry, discontinuity reason or None)."""
        item = self._items.popleft()
        reason, self._pending = self._pending, None
        return item, reason


class StampTracker:
    """Detects stamps that go backwards (or repeat) and jumps of more than ``gap_periods`` frame
    periods (the period is the median of the recent positive steps)."""

    def __init__(self, gap_periods: float = 3.0, history: int = 15, min_history: int = 3) -> None:
        self.gap_periods = gap_periods
        self.min_history = min_history
        self._steps: deque = deque(maxlen=history)
        self._last: int | None = None

    @property
    def period_ns(self) -> float | None:
        if len(self._steps) < self.min_history:
            return None
        return float(np.median(self._steps))

    def check(self, stamp_ns: int) -> str | None:
        """Feed the next stamp; returns the reason for a discontinuity, or None."""
        last, self._last = self._last, stamp_ns
        if last is None:
            return None
        step = stamp_ns - last
        if step <= 0:
            self._steps.clear()
            return f"stamp went backwards by {-step / 1e6:.1f} ms" if step else "stamp repeated"
        period = self.period_ns
        if period is not None and step > self.gap_periods * period:
            return f"stamp gap of {step / 1e6:.1f} ms ({step / period:.1f} frame periods)"
        self._steps.append(step)
        return None


class LatencyWindow:
    """The last ``size`` latencies (ms) of a camera; percentiles for the diagnostics."""

    def __init__(self, size: int = 5000) -> None:
        self._values: deque = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, ms: float) -> None:
        with self._lock:
            self._values.append(ms)

    def percentiles(self, *qs: float) -> list[float] | None:
        with self._lock:
            if not self._values:
                return None
            values = np.fromiter(self._values, dtype=np.float64)
        return [float(np.percentile(values, q)) for q in qs]


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
class _Camera:
    name: str
    topic: str
    queue: CameraQueue
    stamps: StampTracker
    latency: LatencyWindow = field(default_factory=LatencyWindow)
    received: int = 0                 # messages received (any format)
    wrong_format: int = 0
    format_warned: bool = False
    published: int = 0                # masks published (frames out)
    discontinuities: int = 0          # state restarts requested by the node (drops, stamps)
    engine_errors: int = 0
    engine_stats: dict = field(default_factory=dict)
    last_error: str = ""
    # diagnostics bookkeeping
    prev_received: int = 0
    prev_published: int = 0
    prev_errors: int = 0
    mask_pub: Any = None
    color_pub: Any = None


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
        self._cameras: dict[str, _Camera] = {}
        self._cond = threading.Condition()
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
            from .engine import SegmentationEngine
            self.engine = SegmentationEngine(checkpoint=cfg["checkpoint"] or None, device=cfg["device"])
        except Exception as exc:  # noqa: BLE001 - CheckpointError, ValueError, RuntimeError, ...
            raise StartupError(f"cannot start the segmentation engine: {exc}") from None
        class_names = list(self.engine.class_names)
        self.declare_parameter("class_names", class_names, _descriptor(
            "class id -> name (read-only, from the checkpoint)", ParameterType.PARAMETER_STRING_ARRAY),
            ignore_override=True)
        self._bridge = _make_bridge()

        reliability = (ReliabilityPolicy.RELIABLE if cfg["qos_reliability"] == "reliable"
                       else ReliabilityPolicy.BEST_EFFORT)
        # the DDS history is never the smaller queue: overflow happens (and is counted) in ours
        in_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=max(cfg["queue_depth"], 10),
                            reliability=reliability, durability=DurabilityPolicy.VOLATILE)
        # outputs are reliable: that serves reliable and best-effort subscribers alike
        out_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=max(cfg["queue_depth"], 10),
                             reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
        for name in cfg["cameras"]:
            cam = _Camera(name, cfg[f"{name}.topic"], CameraQueue(cfg["queue_depth"]),
                          StampTracker(cfg["max_stamp_gap_periods"]))
            try:
                if cfg["publish_mask"]:
                    cam.mask_pub = self.create_publisher(Image, f"{name}/semantic/mask", out_qos)
                if cfg["publish_color"]:
                    cam.color_pub = self.create_publisher(Image, f"{name}/semantic/color", out_qos)
                self.create_subscription(CompressedImage, cam.topic,
                                         lambda msg, c=cam: self._on_image(c, msg), in_qos)
            except Exception as exc:  # noqa: BLE001 - InvalidTopicNameException
                raise StartupError(f"camera '{name}': {exc}") from None
            self.engine.add_camera(name)
            self._cameras[name] = cam
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = self.create_timer(cfg["diagnostics_period"], self._publish_diagnostics)
        self._worker = threading.Thread(target=self._work, name="cvseg_engine", daemon=True)
        self._worker.start()

        effective = dict(cfg, class_names=class_names, resolved_device=str(self.engine.device),
                         cv_bridge=self._bridge is not None)
        self.get_logger().info("effective parameters: " + json.dumps(effective, sort_keys=True))
        for cam in self._cameras.values():
            outs = [p.topic_name for p in (cam.mask_pub, cam.color_pub) if p is not None]
            self.get_logger().info(f"camera '{cam.name}': {cam.topic} ({cfg['qos_reliability']}) -> "
                                   f"{', '.join(outs) or 'no outputs'}")

    # -- input --------------------------------------------------------------------------------------
    def _on_image(self, cam: _Camera, msg: CompressedImage) -> None:
        received = time.monotonic_ns()
        cam.received += 1
        try:
            check_format(msg.format)
        except UnsupportedStreamError as exc:
            cam.wrong_format += 1
            cam.last_error = str(exc)
            if not cam.format_warned:
                cam.format_warned = True
                self.get_logger().warning(f"camera '{cam.name}' ({cam.topic}): {exc}; such messages are "
                                          f"ignored and counted (diagnostics 'wrong_format'); warned once")
            return
        stamp_ns = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        item = QueuedFrame(cam.name, bytes(msg.data), stamp_ns, msg.header, received)
        with self._cond:
            dropped = cam.queue.push(item)
            self._cond.notify()
        if dropped:
            self.get_logger().warning(f"camera '{cam.name}': engine behind, dropped the oldest queued "
                                      f"frame ({cam.queue.drops} so far); the state restarts",
                                      throttle_duration_sec=5.0)

    # -- the worker ------------------------------------------------------------------------------
    def _take_batch(self) -> list[tuple[_Camera, QueuedFrame, str | None]]:
        """Wait for work; then up to batch_window_ms for every camera to have a frame; take at most
        one frame (the oldest) per camera."""
        window_ns = int(self.cfg["batch_window_ms"] * 1e6)
        cams = list(self._cameras.values())
        with self._cond:
            while not self._stop.is_set() and not any(len(c.queue) for c in cams):
                self._cond.wait(0.2)
            if self._stop.is_set():
                return []
            oldest = min(c.queue.oldest().received_ns for c in cams if len(c.queue))
            while not self._stop.is_set() and not all(len(c.queue) for c in cams):
                left = oldest + window_ns - time.monotonic_ns()
                if left <= 0:
                    break
                self._cond.wait(left / 1e9)
            batch = []
            for c in cams:
                if len(c.queue):
                    item, reason = c.queue.pop()
                    batch.append((c, item, reason))
            return batch

    def _work(self) -> None:
        while not self._stop.is_set():
            batch = self._take_batch()
            if batch:
                try:
                    self._run_batch(batch)
                except Exception as exc:  # noqa: BLE001 - keep serving the other frames
                    self.get_logger().error(f"engine failure: {type(exc).__name__}: {exc}",
                                            throttle_duration_sec=5.0)
                    for cam, _, _ in batch:
                        cam.engine_errors += 1
                        cam.last_error = f"engine failure: {exc}"
                        try:
                            self.engine.mark_discontinuity(cam.name, "engine failure")
                        except Exception:  # noqa: BLE001
                            pass

    def _run_batch(self, batch) -> None:
        engine = self.engine
        units, by_camera = [], {}
        for cam, item, reason in batch:
            stamp_reason = cam.stamps.check(item.stamp_ns)
            reason = reason or stamp_reason
            if reason:
                cam.discontinuities += 1
                engine.mark_discontinuity(cam.name, reason)
            units.append((cam.name, item.data, item.stamp_ns))
            by_camera[cam.name] = (cam, item)
        results = engine.process(units)
        for res in results:
            cam, item = by_camera[res.camera]
            mask = res.mask
            if cam.mask_pub is not None:
                cam.mask_pub.publish(image_message(mask, "mono8", item.header, self._bridge))
            if cam.color_pub is not None:
                cam.color_pub.publish(image_message(engine.colorize(mask), "rgb8", item.header,
                                                    self._bridge))
            cam.latency.add((time.monotonic_ns() - item.received_ns) / 1e6)
            cam.published += 1
        for cam, _, _ in batch:
            cam.engine_stats = dict(engine.stats(cam.name))

    # -- diagnostics -----------------------------------------------------------------------------
    def camera_report(self, cam: _Camera, elapsed: float) -> tuple[int, str, list[tuple[str, str]]]:
        st = cam.engine_stats
        decode_errors = int(st.get("corrupt", 0))
        errors = decode_errors + cam.queue.drops + cam.wrong_format + cam.engine_errors \
            + int(st.get("b_frames", 0))
        lat = cam.latency.percentiles(50, 99)
        in_rate = (cam.received - cam.prev_received) / elapsed
        out_rate = (cam.published - cam.prev_published) / elapsed
        level, message = DiagnosticStatus.OK, "ok"
        if errors > cam.prev_errors:
            level = DiagnosticStatus.WARN
            message = f"errors grew by {errors - cam.prev_errors}: {cam.last_error or st.get('last_error', '')}"
        elif cam.received == 0:
            message = f"waiting for {cam.topic}"
        cam.prev_received, cam.prev_published, cam.prev_errors = cam.received, cam.published, errors
        values = [
            ("topic", cam.topic),
            ("input_rate_hz", f"{in_rate:.2f}"),
            ("output_rate_hz", f"{out_rate:.2f}"),
            ("latency_ms_p50", f"{lat[0]:.2f}" if lat else "nan"),
            ("latency_ms_p99", f"{lat[1]:.2f}" if lat else "nan"),
            ("frames_in", str(cam.received)),
            ("masks_out", str(cam.published)),
            ("i_frames", str(st.get("i_frames", 0))),
            ("p_frames", str(st.get("p_frames", 0))),
            ("skipped_before_keyframe", str(st.get("skipped_before_keyframe", 0))),
            ("decode_errors", str(decode_errors)),
            ("b_frames", str(st.get("b_frames", 0))),
            ("resyncs", str(st.get("resyncs", 0))),
            ("queue_drops", str(cam.queue.drops)),
            ("queue_size", str(len(cam.queue))),
            ("wrong_format", str(cam.wrong_format)),
            ("discontinuities", str(cam.discontinuities)),
            ("engine_errors", str(cam.engine_errors)),
            ("device", str(self.engine.device)),
        ]
        return level, message, values

    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        elapsed = max(now - self._last_diag, 1e-3)
        self._last_diag = now
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        for cam in self._cameras.values():
            level, message, values = self.camera_report(cam, elapsed)
            status = DiagnosticStatus()
            status.level = level
            status.name = f"{NODE_NAME}: {cam.name}"
            status.hardware_id = cam.name
            status.message = message
            status.values = [KeyValue(key=k, value=v) for k, v in values]
            arr.status.append(status)
        self._diag_pub.publish(arr)

    # -- shutdown -------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
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
