"""rosbag2 files (mcap or sqlite3, via `rosbags`): make them from videos, replay them, evaluate them.

- ``cvseg bag from-video VIDEO [VIDEO...] OUT --topic T [--topic T2 ...]``: real clips re-encoded
  to H.264 I/P at a fixed GOP, one ``sensor_msgs/msg/CompressedImage`` per access unit (format
  ``h264``, Annex B), header stamp = start time + frame time, frame_id = camera name.
- ``cvseg bag info BAG``: topics, types, counts, time span.
- ``cvseg replay BAG [--rate R] [--loop]``: publishes a bag over DDS with its timing (rclpy).
- ``cvseg eval-bag BAG [--record OUT]``: runs :class:`~cvseg_ros.engine.pipeline.SegmentationEngine` over
  every CompressedImage topic offline; throughput and per-frame latency; optionally the masks
  (``mono8`` Image on ``/<camera>/semantic/mask``) to a bag.

Only :func:`replay` needs rclpy (imported there); the rest is ROS-free.
"""
from __future__ import annotations

import heapq
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from cvseg_ros.common import stats

COMPRESSED_IMAGE = "sensor_msgs/msg/CompressedImage"
IMAGE = "sensor_msgs/msg/Image"
STORAGES = ("mcap", "sqlite3")


def typestore():
    """The newest ROS 2 typestore this rosbags knows (Kilted, else Jazzy, else Humble)."""
    from rosbags.typesys import Stores, get_typestore
    for name in ("ROS2_KILTED", "ROS2_JAZZY", "ROS2_HUMBLE"):
        if hasattr(Stores, name):
            return get_typestore(getattr(Stores, name))
    return get_typestore(Stores.LATEST)


def camera_from_topic(topic: str) -> str:
    """``/front/image_raw/h264`` -> ``front`` (the first name of the topic)."""
    parts = [p for p in topic.strip("/").split("/") if p]
    return parts[0] if parts else "camera"


def _open_writer(out: str | Path, storage: str):
    from rosbags.rosbag2 import StoragePlugin, Writer
    if storage not in STORAGES:
        raise ValueError(f"unknown storage {storage!r}: use one of {', '.join(STORAGES)}")
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} exists: rosbag2 writes a new folder; remove it or pick another name")
    out.parent.mkdir(parents=True, exist_ok=True)
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    return Writer(out, version=9, storage_plugin=plugin)


def _stamp(ts, stamp_ns: int):
    Time = ts.types["builtin_interfaces/msg/Time"]
    return Time(sec=int(stamp_ns // 1_000_000_000), nanosec=int(stamp_ns % 1_000_000_000))


def _header(ts, stamp_ns: int, frame_id: str):
    Header = ts.types["std_msgs/msg/Header"]
    return Header(stamp=_stamp(ts, stamp_ns), frame_id=frame_id)


def stamp_ns_of(header) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


# -- from-video -----------------------------------------------------------------------------------

def _video_units(video: Path, topic: str, frame_id: str, *, gop: int, fps: float | None,
                 max_frames: int | None, width: int | None, start_ns: int, crf: int,
                 info_out: dict) -> Iterator[tuple[int, str, str, bytes]]:
    """(stamp_ns, topic, frame_id, access unit) of one video re-encoded to H.264 I/P."""
    import cv2

    from cvseg_ros.codec.video import H264Encoder, even_size, read_frames, video_info

    info = video_info(video)
    rate = float(fps or info.fps or 25.0)
    encoder = None
    index = 0

    def stamped(units):
        nonlocal index
        for unit in units:
            yield start_ns + round(index * 1e9 / rate), topic, frame_id, unit
            index += 1

    for rgb in read_frames(video, max_frames):
        if width and rgb.shape[1] != width:
            height = max(2, round(rgb.shape[0] * width / rgb.shape[1]))
            rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)
        rgb = even_size(rgb)
        if encoder is None:
            encoder = H264Encoder(rgb.shape[1], rgb.shape[0], fps=rate, gop=gop, crf=crf)
            info_out.update(video=str(video), width=rgb.shape[1], height=rgb.shape[0], fps=rate,
                            source_codec=info.codec)
        yield from stamped(encoder.encode(rgb))
    if encoder is not None:
        yield from stamped(encoder.flush())
    info_out["messages"] = index


def from_video(videos: Sequence[str | Path], out: str | Path, topics: Sequence[str], *,
               frame_ids: Sequence[str] | None = None, gop: int = 12, storage: str = "mcap",
               fps: float | None = None, max_frames: int | None = None, width: int | None = None,
               start_ns: int | None = None, crf: int = 23) -> dict:
    """Write a rosbag2 with one H.264 ``CompressedImage`` topic per video. Returns a summary."""
    videos = [Path(v) for v in videos]
    if not videos:
        raise ValueError("no video given")
    if len(topics) != len(videos):
        raise ValueError(f"{len(videos)} video(s) but {len(topics)} --topic: give one topic per video")
    if len(set(topics)) != len(topics):
        raise ValueError(f"topics must differ: {list(topics)}")
    for v in videos:
        if not v.is_file():
            raise FileNotFoundError(f"no such video: {v}")
    if gop < 1:
        raise ValueError("--gop must be >= 1")
    frame_ids = list(frame_ids) if frame_ids else [camera_from_topic(t) for t in topics]
    if len(frame_ids) != len(videos):
        raise ValueError("give one --frame-id per video (or none)")
    start_ns = int(time.time_ns() if start_ns is None else start_ns)
    ts = typestore()
    CompressedImage = ts.types[COMPRESSED_IMAGE]
    infos = [dict(topic=t, frame_id=f) for t, f in zip(topics, frame_ids)]
    streams = [_video_units(v, t, f, gop=gop, fps=fps, max_frames=max_frames, width=width,
                            start_ns=start_ns, crf=crf, info_out=i)
               for v, t, f, i in zip(videos, topics, frame_ids, infos)]
    with _open_writer(out, storage) as writer:
        conns = {t: writer.add_connection(t, COMPRESSED_IMAGE, typestore=ts) for t in topics}
        for stamp_ns, topic, frame_id, unit in heapq.merge(*streams, key=lambda x: x[0]):
            msg = CompressedImage(header=_header(ts, stamp_ns, frame_id), format="h264",
                                  data=np.frombuffer(unit, dtype=np.uint8))
            writer.write(conns[topic], stamp_ns, ts.serialize_cdr(msg, COMPRESSED_IMAGE))
    return {"bag": str(out), "storage": storage, "gop": gop, "start_ns": start_ns, "topics": infos}


# -- reading --------------------------------------------------------------------------------------

@dataclass
class BagImage:
    topic: str
    log_ns: int
    stamp_ns: int
    frame_id: str
    format: str
    data: bytes
    header: Any


def _reader(bag: str | Path):
    from rosbags.highlevel import AnyReader
    bag = Path(bag)
    if not bag.exists():
        raise FileNotFoundError(f"no such bag: {bag}")
    return AnyReader([bag], default_typestore=typestore())


def iter_compressed(bag: str | Path, topics: Sequence[str] | None = None) -> Iterator[BagImage]:
    """Every ``CompressedImage`` of a bag (all topics or ``topics``) in log-time order."""
    with _reader(bag) as reader:
        conns = [c for c in reader.connections if c.msgtype == COMPRESSED_IMAGE
                 and (topics is None or c.topic in topics)]
        for conn, log_ns, raw in reader.messages(connections=conns):
            msg = reader.deserialize(raw, conn.msgtype)
            yield BagImage(conn.topic, int(log_ns), stamp_ns_of(msg.header), msg.header.frame_id,
                           msg.format, msg.data.tobytes(), msg.header)


def bag_info(bag: str | Path) -> dict:
    with _reader(bag) as reader:
        topics = {}
        for c in reader.connections:
            t = topics.setdefault(c.topic, {"type": c.msgtype, "messages": 0})
            t["messages"] += c.msgcount
        return {"bag": str(bag), "start_ns": reader.start_time, "end_ns": reader.end_time,
                "duration_s": round((reader.end_time - reader.start_time) / 1e9, 3)
                if reader.connections else 0.0, "topics": topics}


# -- replay (rclpy) ------------------------------------------------------------------------------

@dataclass
class ReplayEvent:
    topic: str
    msgtype: str
    log_ns: int
    raw: bytes
    sent_ns: int       # time.monotonic_ns() right after publish
    loop: int


def _ros_message_class(msgtype: str):
    import importlib
    pkg, kind, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{pkg}.{kind}"), name)


def replay(bag: str | Path, *, rate: float = 1.0, loop: bool = False, reliability: str = "reliable",
           depth: int = 100, topics: Sequence[str] | None = None, wait_for_subscribers: float = 0.0,
           context=None, node=None, on_publish: Callable[[ReplayEvent], None] | None = None,
           should_stop: Callable[[], bool] | None = None, log: Callable[[str], None] = print) -> int:
    """Publish a bag's messages over DDS with their recorded timing (scaled by ``rate``).

    Messages go out serialized as stored (no re-serialisation). ``wait_for_subscribers``: wait up
    to that many seconds for every topic to have a subscriber before starting. With ``node``
    (and its ``context``) the caller's node publishes; otherwise a node ``cvseg_replay`` is made
    in a fresh context (ROS_DOMAIN_ID from the environment). Returns the messages published.
    """
    import rclpy
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    if rate <= 0:
        raise ValueError("--rate must be > 0")
    if reliability not in ("reliable", "best_effort"):
        raise ValueError(f"unknown reliability {reliability!r}: reliable or best_effort")
    own = node is None
    if own:
        context = rclpy.context.Context()
        rclpy.init(context=context)
        node = rclpy.create_node("cvseg_replay", context=context)
    context = context or node.context
    qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, durability=DurabilityPolicy.VOLATILE,
                     reliability=ReliabilityPolicy.RELIABLE if reliability == "reliable"
                     else ReliabilityPolicy.BEST_EFFORT)
    published = 0
    pubs = {}
    try:
        with _reader(bag) as reader:
            conns = []
            for c in reader.connections:
                if topics is not None and c.topic not in topics:
                    continue
                try:
                    cls = _ros_message_class(c.msgtype)
                except (ImportError, AttributeError, ValueError):
                    log(f"replay: skipping {c.topic}: message type {c.msgtype} is not importable here")
                    continue
                if c.topic not in pubs:
                    pubs[c.topic] = node.create_publisher(cls, c.topic, qos)
                conns.append(c)
            if not conns:
                raise ValueError(f"{bag}: nothing to replay (topics {topics or 'all'})")
            if wait_for_subscribers > 0:
                deadline = time.monotonic() + wait_for_subscribers
                while time.monotonic() < deadline and context.ok() and \
                        not all(p.get_subscription_count() > 0 for p in pubs.values()):
                    time.sleep(0.05)
                missing = [t for t, p in pubs.items() if p.get_subscription_count() == 0]
                if missing:
                    log(f"replay: no subscriber after {wait_for_subscribers:.0f} s on {', '.join(missing)}")
                time.sleep(0.5)   # let the reliable handshake finish on both sides
            duration = max(reader.end_time - reader.start_time, 0)
            first = reader.start_time
            t0 = time.monotonic()
            loop_index = 0
            while True:
                offset = loop_index * (duration + 1e8)   # 0.1 s between loops
                for conn, log_ns, raw in reader.messages(connections=conns):
                    if not context.ok() or (should_stop is not None and should_stop()):
                        return published
                    target = t0 + (log_ns - first + offset) / 1e9 / rate
                    delay = target - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    pubs[conn.topic].publish(bytes(raw))
                    published += 1
                    if on_publish is not None:
                        on_publish(ReplayEvent(conn.topic, conn.msgtype, int(log_ns), bytes(raw),
                                               time.monotonic_ns(), loop_index))
                loop_index += 1
                if not loop:
                    return published
    except KeyboardInterrupt:
        if not own:
            raise
        log(f"replay: interrupted after {published} messages")
        return published
    finally:
        if own:
            node.destroy_node()
            rclpy.try_shutdown(context=context)


# -- eval-bag ------------------------------------------------------------------------------------

def eval_bag(bag: str | Path, *, record: str | Path | None = None, device: str = "auto",
             checkpoint: str | None = None, storage: str = "mcap", max_frames: int | None = None,
             threads: int | None = None, engine=None) -> dict:
    """Run every ``CompressedImage`` topic of ``bag`` (log-time order) through the node's message
    path (:class:`~cvseg_ros.ros.message_path.MessagePath`: the same checks, drop policies, batching
    and counters as ``cvseg_node``), without DDS and without ever falling behind: a camera's
    queued frame is segmented before its next one is taken.

    Latency of a frame = read from the bag -> mask (includes waiting for the other cameras' frames
    of its batch)."""
    from cvseg_ros.ros.message_path import DROP_REASONS, MessagePath, make_message
    if engine is None:
        from cvseg_ros.engine.pipeline import SegmentationEngine
        engine = SegmentationEngine(checkpoint=checkpoint or None, device=device, threads=threads)
    ts = typestore()
    Image = ts.types[IMAGE]
    cameras: dict[str, str] = {}       # topic -> camera
    for topic, info in bag_info(bag)["topics"].items():
        if info["type"] == COMPRESSED_IMAGE:
            name = camera_from_topic(topic)
            cameras[topic] = topic.strip("/").replace("/", "_") if name in cameras.values() else name
    if not cameras:
        raise ValueError(f"{bag}: no {COMPRESSED_IMAGE} topic")
    path = MessagePath(engine, cameras.values(), topics={c: t for t, c in cameras.items()})
    latencies: list[float] = []
    busy_s = 0.0
    log_ns_of: dict[tuple[str, int], int] = {}
    writer = _open_writer(record, storage) if record else None
    out_conns: dict[str, Any] = {}

    def publish(out) -> None:
        latencies.append((time.monotonic_ns() - out.received_ns) / 1e6)
        log_ns = log_ns_of.pop((out.camera, out.stamp_ns))
        if writer is None:
            return
        topic = f"/{out.camera}/semantic/mask"
        if topic not in out_conns:
            out_conns[topic] = writer.add_connection(topic, IMAGE, typestore=ts)
        mask = np.ascontiguousarray(out.mask, dtype=np.uint8)
        msg = Image(header=_header(ts, out.stamp_ns, out.header.frame_id), height=mask.shape[0],
                    width=mask.shape[1], encoding="mono8", is_bigendian=0, step=mask.shape[1],
                    data=mask.reshape(-1))
        writer.write(out_conns[topic], log_ns, ts.serialize_cdr(msg, IMAGE))

    def drain() -> None:
        nonlocal busy_s
        start = time.perf_counter()
        path.drain(publish)
        busy_s += time.perf_counter() - start

    total = 0
    wall0 = time.perf_counter()
    try:
        if writer is not None:
            writer.open()
        for m in iter_compressed(bag, list(cameras)):
            cam = cameras[m.topic]
            if len(path.cameras[cam].queue):     # this camera's last frame first: never behind
                drain()
            log_ns_of[(cam, m.stamp_ns)] = m.log_ns
            path.receive(cam, make_message(m.data, m.stamp_ns, m.format, m.frame_id))
            total += 1
            if max_frames is not None and total >= max_frames:
                break
        drain()
    finally:
        if writer is not None:
            writer.close()
    wall = time.perf_counter() - wall0
    per_camera = {}
    for topic, cam in cameras.items():
        c, st = path.cameras[cam].counts, engine.stats(cam)
        per_camera[cam] = {"topic": topic, "frames_in": c["received"], "masks_out": c["published"],
                           "i_frames": st.get("i_frames"), "p_frames": st.get("p_frames"),
                           "decode_errors": st.get("corrupt"),
                           **{k: c[k] for k in DROP_REASONS if k != "decode_errors"}}
    masks_out = sum(pc["masks_out"] for pc in per_camera.values())
    return {
        "bag": str(bag), "device": str(engine.device),
        "frames_in": sum(pc["frames_in"] for pc in per_camera.values()), "masks_out": masks_out,
        "wall_s": round(wall, 3),
        "fps": round(masks_out / wall, 2) if wall > 0 else None,
        "engine_fps": round(masks_out / busy_s, 2) if busy_s > 0 else None,
        "latency_ms_p50": stats.percentile(latencies, 50, 3), "latency_ms_p99": stats.percentile(latencies, 99, 3),
        "cameras": per_camera, "record": str(record) if record else None,
    }


# -- CLI ------------------------------------------------------------------------------------------

def _write_json(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2))


def register(sub) -> None:
    bag = sub.add_parser("bag", help="rosbag2 files: make them from videos, inspect them")
    bag_sub = bag.add_subparsers(dest="bag_command", metavar="BAG_COMMAND")
    fv = bag_sub.add_parser("from-video", help="videos -> H.264 CompressedImage topics in a rosbag2")
    fv.add_argument("paths", nargs="+", metavar="VIDEO... OUT", help="one or more videos, then the output bag")
    fv.add_argument("--topic", action="append", default=[], required=True,
                    help="topic of each video, in order (repeat: one per video)")
    fv.add_argument("--frame-id", action="append", default=None,
                    help="header frame_id of each video (default: the topic's first name, the camera)")
    fv.add_argument("--gop", type=int, default=12, help="I-frame every N frames (I/P only)")
    fv.add_argument("--storage", choices=STORAGES, default="mcap")
    fv.add_argument("--fps", type=float, default=None, help="frame rate of the stamps (default: the video's)")
    fv.add_argument("--max-frames", type=int, default=None, help="per video")
    fv.add_argument("--width", type=int, default=None, help="resize to this width (keeps the aspect)")
    fv.add_argument("--start-ns", type=int, default=None, help="stamp of the first frame (default: now)")
    fv.add_argument("--crf", type=int, default=23)
    fv.add_argument("--json", dest="json_out")
    fv.set_defaults(func=_from_video_main)
    info = bag_sub.add_parser("info", help="topics, types, counts and time span of a bag")
    info.add_argument("bag")
    info.set_defaults(func=_info_main)
    bag.set_defaults(func=lambda args: (bag.print_help(), 2)[1])

    rp = sub.add_parser("replay", help="publish a bag over DDS with its timing (like `ros2 bag play`)")
    rp.add_argument("bag")
    rp.add_argument("--rate", type=float, default=1.0)
    rp.add_argument("--loop", action="store_true")
    rp.add_argument("--qos", choices=("reliable", "best_effort"), default="reliable")
    rp.add_argument("--topic", action="append", default=None, help="only these topics (repeat)")
    rp.add_argument("--wait-for-subscribers", type=float, default=0.0, metavar="S",
                    help="wait up to S seconds for a subscriber on every topic before starting")
    rp.set_defaults(func=_replay_main)

    ev = sub.add_parser("eval-bag", help="run the segmentation engine offline over a bag's H.264 topics")
    ev.add_argument("bag")
    ev.add_argument("--record", default=None, help="write the masks (mono8 Image) to this new bag")
    ev.add_argument("--storage", choices=STORAGES, default="mcap", help="storage of --record")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--checkpoint", default=None)
    ev.add_argument("--max-frames", type=int, default=None)
    ev.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's); 1 is much faster on a busy machine")
    ev.add_argument("--json", dest="json_out")
    ev.set_defaults(func=_eval_main)


def _from_video_main(args) -> int:
    if len(args.paths) < 2:
        raise ValueError("give at least one VIDEO and the OUT bag")
    *videos, out = args.paths
    result = from_video(videos, out, args.topic, frame_ids=args.frame_id, gop=args.gop,
                        storage=args.storage, fps=args.fps, max_frames=args.max_frames,
                        width=args.width, start_ns=args.start_ns, crf=args.crf)
    for t in result["topics"]:
        print(f"{t['topic']}: {t.get('messages', 0)} H.264 messages ({t.get('width')}x{t.get('height')}, "
              f"{t.get('fps', 0):.2f} fps, GOP {args.gop}) from {t.get('video')}")
    print(f"wrote {out} ({args.storage})")
    _write_json(args.json_out, result)
    return 0


def _info_main(args) -> int:
    info = bag_info(args.bag)
    print(json.dumps(info, indent=2))
    return 0


def _replay_main(args) -> int:
    n = replay(args.bag, rate=args.rate, loop=args.loop, reliability=args.qos, topics=args.topic,
               wait_for_subscribers=args.wait_for_subscribers)
    print(f"replayed {n} messages")
    return 0


def _eval_main(args) -> int:
    result = eval_bag(args.bag, record=args.record, device=args.device, checkpoint=args.checkpoint,
                      storage=args.storage, max_frames=args.max_frames, threads=args.threads)
    for key, value in result.items():
        if key != "cameras":
            print(f"{key:>16}: {value}")
    for cam, st in result["cameras"].items():
        print(f"{cam:>16}: {st}")
    _write_json(args.json_out, result)
    return 0
