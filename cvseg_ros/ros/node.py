"""``cvseg_node``: the rclpy adapter around :class:`cvseg_ros.engine.pipeline.SegmentationEngine`.

Subscribes per camera to H.264 (Annex B, one access unit per message) as
``sensor_msgs/CompressedImage``, ``foxglove_msgs/CompressedVideo`` or
``ffmpeg_image_transport_msgs/FFMPEGPacket`` (``<camera>.type``; the last two where their message
packages are installed) and publishes, with the input's header (stamp, frame_id):

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

Parameters: the table in :mod:`cvseg_ros.ros.params` (``python -m cvseg_ros.ros.params`` prints
it), declared from it with their descriptions, ranges and read-only flags, read once at
start-up and checked from it; ``config/cvseg.yaml`` sets each of them.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.qos_overriding_options import QoSOverridingOptions
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header, String

from cvseg_ros.ros import params
from cvseg_ros.ros.camera_info import camera_info_topic
from cvseg_ros.ros.inputs import INPUT_TYPES, TYPE_NAMES, default_topic
from cvseg_ros.ros.labels import label_info_json, read_color_map
from cvseg_ros.ros.messages import camera_info_for, image_message, make_bridge, message_class
from cvseg_ros.ros.message_path import ERROR, OK, STALE, WARN, MaskOutput, MessagePath

NODE_NAME = "cvseg_node"
_LEVELS = {OK: DiagnosticStatus.OK, WARN: DiagnosticStatus.WARN, ERROR: DiagnosticStatus.ERROR,
           STALE: DiagnosticStatus.STALE}
#: Overrides that rclpy itself understands (not warned about as unknown).
_BUILTIN_PARAMS = ("use_sim_time", "start_type_description_service")


class StartupError(Exception):
    """A bad configuration: the node logs the message and exits with status 1."""


# -- the node -----------------------------------------------------------------------------------

@dataclass
class _Input:
    kind: str                  # one of INPUT_TYPES
    topic: str
    subscription: Any = None
    warned: str = ""           # the advertised types last warned about


@dataclass
class _Outputs:
    mask: Any = None
    color: Any = None
    camera_info: Any = None
    label_info: Any = None
    latest_info: Any = None    # the camera's latest CameraInfo (set by its subscription)


_ROS_TYPES = {"bool": ParameterType.PARAMETER_BOOL, "int": ParameterType.PARAMETER_INTEGER,
              "string": ParameterType.PARAMETER_STRING, "string[]": ParameterType.PARAMETER_STRING_ARRAY}
_INT64 = (-2 ** 63, 2 ** 63 - 1)
_BRANCH = {"auto": None, "true": True, "false": False}    # `p_frame_branch` -> the engine's argument


def descriptor(param: params.Param) -> ParameterDescriptor:
    """The ``ParameterDescriptor`` of a table entry: its description, read-only flag, numeric range
    (the type's limit where the table gives one bound) and its range in words."""
    d = ParameterDescriptor(description=param.description, read_only=param.read_only,
                            additional_constraints=param.range_text())
    if param.type == "float" or param.bool_words:  # `-p batch_window_ms:=7`, `-p p_frame_branch:=false`
        d.dynamic_typing = True
    else:
        d.type = _ROS_TYPES[param.type]
    if param.has_bounds:
        if param.type == "int":
            lo = _INT64[0] if param.minimum is None else int(param.minimum)
            hi = _INT64[1] if param.maximum is None else int(param.maximum)
            d.integer_range = [IntegerRange(from_value=lo, to_value=hi, step=0)]
        else:                      # an excluded bound is stated in additional_constraints
            lo = -float("inf") if param.minimum is None else float(param.minimum)
            hi = float("inf") if param.maximum is None else float(param.maximum)
            d.floating_point_range = [FloatingPointRange(from_value=lo, to_value=hi, step=0.0)]
    return d


class CvsegNode(Node):
    """See the module docstring. Construct, then :meth:`setup` (raises :class:`StartupError`)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(NODE_NAME, automatically_declare_parameters_from_overrides=False,
                         allow_undeclared_parameters=False, **kwargs)
        self.engine = None
        self.path: MessagePath | None = None
        self._outputs: dict[str, _Outputs] = {}
        self._inputs: dict[str, _Input] = {}
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._bridge = None
        self._last_diag = time.monotonic()

    # -- parameters -------------------------------------------------------------------------------
    def _declared(self, param: params.Param):
        """``param``'s value (the override, else the default), checked by the table, then declared."""
        override = self._overrides().get(param.name)
        try:
            value = param.check(param.default if override is None else override.value)
        except params.ParameterError as exc:
            raise StartupError(str(exc)) from None
        try:
            self.declare_parameter(param.name, param.default, descriptor(param))
        except Exception as exc:  # noqa: BLE001 - InvalidParameterValueException, ...
            raise StartupError(f"parameter '{param.name}': {exc}") from None
        return value

    def _overrides(self) -> dict:
        """The values given on the command line and in params files (rclpy keeps them here)."""
        return getattr(self, "_parameter_overrides", None) or {}

    def read_parameters(self) -> dict:
        """Every parameter of the table declared and checked (raises :class:`StartupError`)."""
        cfg = params.read(self._declared)
        known = set(cfg) | set(params.BY_NAME) | set(_BUILTIN_PARAMS)
        overrides = self._overrides()
        unknown = sorted(k for k in overrides if k not in known and not k.startswith("qos_overrides."))
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
                                             threads=cfg["threads"] or None, precision=cfg["precision"], luma_matching=cfg["luma_matching"],
                                             p_frame_branch=_BRANCH[cfg["p_frame_branch"]],
                                             decode_threads=cfg["decode_threads"] or None)
        except Exception as exc:  # noqa: BLE001 - CheckpointError, ValueError, RuntimeError, ...
            raise StartupError(f"cannot start the segmentation engine: {exc}") from None
        if self.engine.device.type != "cuda":       # (on CUDA the engine did it)
            start = time.monotonic()
            sizes = self.engine.warm_up_device()
            self.get_logger().info(f"networks warmed up at {', '.join(f'{w}x{h}' for h, w in sizes)} "
                                   f"in {time.monotonic() - start:.2f} s")
        class_names = list(self.engine.class_names)
        if cfg["palette"]:
            try:
                self.engine.set_palette(read_color_map(cfg["palette"], class_names, self.engine.palette))
            except ValueError as exc:
                raise StartupError(f"parameter 'palette': {exc}") from None
        self.declare_parameter("class_names", class_names, descriptor(params.BY_NAME["class_names"]),
                               ignore_override=True)
        self._bridge = make_bridge()
        for name in cfg["cameras"]:
            try:
                self._inputs[name] = self._input_of(name)
            except Exception as exc:  # noqa: BLE001 - InvalidTopicNameException
                raise StartupError(f"camera '{name}': {exc}") from None
        self.path = MessagePath(
            self.engine, cfg["cameras"], topics={c: i.topic for c, i in self._inputs.items()},
            queue_depth=cfg["queue_depth"], batch_window_ms=cfg["batch_window_ms"],
            max_stamp_gap_periods=cfg["max_stamp_gap_periods"], input_timeout_s=cfg["input_timeout_s"],
            warn=self.get_logger().warning,
            expected_rates={c: cfg[f"{c}.expected_rate_hz"] for c in cfg["cameras"]})

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
        # the label info: sent once, kept for late subscribers (transient local)
        latched = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        for name in cfg["cameras"]:
            pubs = self._outputs[name] = _Outputs()
            try:
                if cfg["publish_mask"]:
                    pubs.mask = self.create_publisher(Image, f"{name}/semantic/mask", out_qos,
                                                      qos_overriding_options=QoSOverridingOptions.with_default_policies())
                if cfg["publish_color"]:
                    pubs.color = self.create_publisher(Image, f"{name}/semantic/color", out_qos,
                                                      qos_overriding_options=QoSOverridingOptions.with_default_policies())
                pubs.label_info = self.create_publisher(self._label_info_type(), f"{name}/semantic/label_info",
                                                        latched)
                info_topic = cfg[f"{name}.camera_info_topic"]
                if info_topic == "auto":
                    info_topic = camera_info_topic(self._inputs[name].topic)
                if info_topic:
                    pubs.camera_info = self.create_publisher(CameraInfo, f"{name}/semantic/camera_info", out_qos)
                    self.create_subscription(CameraInfo, info_topic,
                                             lambda msg, o=pubs: setattr(o, "latest_info", msg), in_qos)
                kind = self._inputs[name].kind
                self._subscribe(name, kind, self._inputs[name].topic, in_qos)
            except ImportError as exc:
                raise StartupError(f"camera '{name}': {name}.type {kind} needs the message package of "
                                   f"{INPUT_TYPES[kind]}, which is not installed here ({exc})") from None
            except Exception as exc:  # noqa: BLE001 - InvalidTopicNameException
                raise StartupError(f"camera '{name}': {exc}") from None
        self._in_qos = in_qos
        for pubs in self._outputs.values():
            pubs.label_info.publish(self._label_info_message(class_names))
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = self.create_timer(cfg["diagnostics_period"], self._publish_diagnostics)
        self._worker = threading.Thread(target=self._work, name="cvseg_engine", daemon=True)
        self._worker.start()

        effective = dict(cfg, class_names=class_names, resolved_device=str(self.engine.device),
                         resolved_p_frame_branch=self.engine.p_frame_branch,
                         cv_bridge=self._bridge is not None)
        self.get_logger().info("effective parameters: " + json.dumps(effective, sort_keys=True))
        for name, pubs in self._outputs.items():
            outs = [p.topic_name for p in (pubs.mask, pubs.color) if p is not None]
            self.get_logger().info(f"camera '{name}': {self._inputs[name].topic} ({INPUT_TYPES[self._inputs[name].kind]}, "
                                   f"{cfg['qos_reliability']}) -> {', '.join(outs) or 'no outputs'}")

    # -- input: the message path checks, counts and enqueues ----------------------------------------
    def _advertised(self, topic: str) -> list[str]:
        """The types ``topic`` is published with now (discovery; empty before any publisher)."""
        types = {info.topic_type for info in self.get_publishers_info_by_topic(self.resolve_topic_name(topic))}
        return sorted(types)

    def _input_of(self, camera: str) -> _Input:
        """The type and topic ``camera``'s input starts with: its parameters' (an empty topic: the
        type's :func:`~cvseg_ros.ros.inputs.default_topic`); type ``auto``: what is published now
        (:meth:`_published_input`), else ``compressed_image``."""
        kind, topic = self.cfg[f"{camera}.type"], self.cfg[f"{camera}.topic"]
        if kind != "auto":
            return _Input(kind, topic or default_topic(camera, kind))
        found = self._published_input(camera)
        return _Input(*found) if found else _Input("compressed_image", topic or default_topic(camera))

    def _published_input(self, camera: str) -> tuple[str, str] | None:
        """``(type, topic)``: an H.264 type published on ``camera``'s topic or, with no topic set,
        on the first of the three types' default topics that has a publisher; None: none yet."""
        topic = self.cfg[f"{camera}.topic"]
        for candidate in [topic] if topic else [default_topic(camera, k) for k in INPUT_TYPES]:
            readable = [TYPE_NAMES[t] for t in self._advertised(candidate) if t in TYPE_NAMES]
            if readable:
                return readable[0], candidate
        return None

    def _subscribe(self, camera: str, kind: str, topic: str, qos) -> None:
        """(Re)subscribe ``camera``'s input as ``kind`` on ``topic``; qos_overrides.<topic>.subscription.* apply."""
        entry = self._inputs[camera]
        cls = message_class(INPUT_TYPES[kind])
        if entry.subscription is not None:
            self.destroy_subscription(entry.subscription)
        if kind == "compressed_video":      # its timestamp and frame_id make the outputs' header
            callback = lambda msg, c=camera: self._on_image(c, msg, Header(stamp=msg.timestamp,  # noqa: E731
                                                                             frame_id=msg.frame_id))
        else:
            callback = lambda msg, c=camera: self._on_image(c, msg)  # noqa: E731
        entry.kind, entry.topic = kind, topic
        entry.subscription = self.create_subscription(
            cls, topic, callback, qos,
            qos_overriding_options=QoSOverridingOptions.with_default_policies())

    @staticmethod
    def _label_info_type():
        """``vision_msgs/LabelInfo`` where that package is installed, else ``std_msgs/String``."""
        try:
            return message_class("vision_msgs/msg/LabelInfo")
        except (ImportError, AttributeError):
            return String

    def _label_info_message(self, class_names: list[str]):
        cls = self._label_info_type()
        if cls is String:
            return String(data=label_info_json(class_names, self.engine.palette))
        vision_class = message_class("vision_msgs/msg/VisionClass")
        msg = cls(class_map=[vision_class(class_id=i, class_name=n) for i, n in enumerate(class_names)],
                  threshold=0.0)
        msg.header.stamp = self.get_clock().now().to_msg()
        return msg

    def _check_input_types(self) -> None:
        """Follow what each camera's topic is published as: an ``auto`` camera whose type no one
        publishes switches to another H.264 type it sees (with no topic set: on any of the types'
        default topics); any other type on the topic (e.g. ``h264_msgs/Packet``) is warned about,
        once per change."""
        for camera, entry in self._inputs.items():
            advertised = self._advertised(entry.topic)
            ours = INPUT_TYPES[entry.kind]
            if self.cfg[f"{camera}.type"] == "auto" and ours not in advertised:
                found = self._published_input(camera)
                if found and found != (entry.kind, entry.topic):
                    try:
                        self._subscribe(camera, *found, self._in_qos)
                        self.path.cameras[camera].topic = entry.topic
                        self.get_logger().info(f"camera '{camera}': {entry.topic} is published as "
                                               f"{INPUT_TYPES[entry.kind]}: subscribed as that")
                        continue
                    except ImportError:
                        pass
            others = [t for t in advertised if t != ours]
            key = ",".join(others)
            if others and entry.warned != key:
                entry.warned = key
                self.get_logger().warning(
                    f"camera '{camera}': {entry.topic} is published as {key}, but the node "
                    f"subscribes to {ours}: those messages cannot arrive; publish one of "
                    f"{', '.join(INPUT_TYPES.values())} (set {camera}.type; the other two need their message "
                    f"packages installed)")

    def _on_image(self, camera: str, msg, header=None) -> None:
        try:
            self.path.receive(camera, msg, header=header)
        except Exception as exc:  # noqa: BLE001 - an exception here would stop the executor
            self.get_logger().error(f"camera '{camera}': receive failure: {type(exc).__name__}: {exc}",
                                    throttle_duration_sec=5.0)

    # -- the worker: the message path does the work, this publishes ------------------------------------
    def _publish(self, out: MaskOutput) -> None:
        """Each output that has a subscriber (one without is not made: at 1280x720 the colour
        image and the messages cost about a tenth of the node's time)."""
        pubs = self._outputs[out.camera]
        if pubs.mask is not None and pubs.mask.get_subscription_count():
            pubs.mask.publish(image_message(out.mask, "mono8", out.header, self._bridge))
        if pubs.color is not None and pubs.color.get_subscription_count():
            pubs.color.publish(image_message(self.engine.colorize(out.mask), "rgb8", out.header, self._bridge))
        info = pubs.latest_info
        if info is not None and pubs.camera_info.get_subscription_count():
            pubs.camera_info.publish(camera_info_for(info, out.header, out.mask.shape[1], out.mask.shape[0]))

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
            self._check_input_types()
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
        if self.engine is not None and not (self._worker is not None and self._worker.is_alive()):
            self.engine.close()


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
