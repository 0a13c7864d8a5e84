"""rosbag2 files (mcap or sqlite3, via `rosbags`): make them from videos, read them.

- ``cvseg bag from-video VIDEO [VIDEO...] OUT --topic T [--topic T2 ...]``: real clips re-encoded
  to H.264 at a fixed GOP (I/P, or ``--bframes N``: in decoding order), one
  ``sensor_msgs/msg/CompressedImage`` per access unit (format ``h264``, Annex B), header stamp =
  start time + the picture's time, frame_id = camera name.
- ``cvseg bag info BAG``: topics, types, counts, time span.

Replaying a bag over DDS is :mod:`cvseg_ros.ros.replay`; running one through the node's message
path offline is :mod:`cvseg_ros.ros.eval_bag`. This module is ROS-free.
"""
from __future__ import annotations

import contextlib
import heapq
import json
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Sequence

import numpy as np

from cvseg_ros.codec.annexb import NAL_IDR, nal_unit_types
from cvseg_ros.ros.camera_info import camera_info_topic, read_calibration, scaled_fields
from cvseg_ros.ros.inputs import DEFINITIONS, INPUT_TYPES, TYPE_NAMES, unpack

COMPRESSED_IMAGE = "sensor_msgs/msg/CompressedImage"
IMAGE = "sensor_msgs/msg/Image"
CAMERA_INFO = "sensor_msgs/msg/CameraInfo"
STORAGES = ("mcap", "sqlite3")


def typestore():
    """The newest ROS 2 typestore this rosbags knows (Kilted, else Jazzy, else Humble), with the
    H.264 message types outside ROS 2's standard set registered (:data:`.inputs.DEFINITIONS`)."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore
    store = None
    for name in ("ROS2_KILTED", "ROS2_JAZZY", "ROS2_HUMBLE"):
        if hasattr(Stores, name):
            store = get_typestore(getattr(Stores, name))
            break
    store = store or get_typestore(Stores.LATEST)
    for msgtype, text in DEFINITIONS.items():
        if msgtype not in store.types:
            store.register(get_types_from_msg(text, msgtype))
    return store


def camera_from_topic(topic: str) -> str:
    """``/front/image_compressed`` -> ``front`` (the first name of the topic)."""
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

def _copied_units(video: Path, topic: str, frame_id: str, *, max_frames: int | None, start_ns: int,
                  info_out: dict) -> Iterator[tuple[int, int, str, str, bytes]]:
    """(log_ns, stamp_ns, topic, frame_id, access unit) of an H.264 video's own access units, as
    recorded (B-frames included, no re-encode): decoding order, stamped with each picture's
    presentation time, logged once every picture up to it can have been captured."""
    from cvseg_ros.codec.video import read_access_units, video_info

    info = video_info(video)
    info_out.update(video=str(video), width=info.width, height=info.height, fps=info.fps, source_codec=info.codec,
                    copied=True)
    latest, log_ns = 0, start_ns - 1
    for index, unit in enumerate(read_access_units(video)):
        if max_frames is not None and index >= max_frames:
            break
        stamp = start_ns + round(unit.time * 1e9)
        latest = max(latest, stamp)
        log_ns = max(log_ns + 1, latest)
        yield log_ns, stamp, topic, frame_id, unit.data
        info_out["messages"] = index + 1


def _video_units(video: Path, topic: str, frame_id: str, *, gop: int, fps: float | None,
                 max_frames: int | None, width: int | None, start_ns: int, crf: int,
                 info_out: dict, bframes: int = 0) -> Iterator[tuple[int, int, str, str, bytes]]:
    """(log_ns, stamp_ns, topic, frame_id, access unit) of one video re-encoded to H.264 (I/P, or
    with ``bframes`` B-frames): units in decoding order, each logged when a camera could send it
    (``bframes`` periods after its decoding-order slot) and stamped with its picture's time."""
    import cv2

    from cvseg_ros.codec.video import H264Encoder, even_size, read_frames, video_info

    info = video_info(video)
    rate = float(fps or info.fps or 25.0)
    encoder = None
    index = 0

    def stamped(units):
        nonlocal index
        for unit in units:
            shown = encoder.presentation[index]
            yield (start_ns + round((index + bframes) * 1e9 / rate), start_ns + round(shown * 1e9 / rate),
                   topic, frame_id, unit)
            index += 1

    for rgb in read_frames(video, max_frames):
        if width and rgb.shape[1] != width:
            height = max(2, round(rgb.shape[0] * width / rgb.shape[1]))
            rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)
        rgb = even_size(rgb)
        if encoder is None:
            encoder = H264Encoder(rgb.shape[1], rgb.shape[0], fps=rate, gop=gop, crf=crf, bframes=bframes)
            info_out.update(video=str(video), width=rgb.shape[1], height=rgb.shape[0], fps=rate,
                            source_codec=info.codec)
        yield from stamped(encoder.encode(rgb))
    if encoder is not None:
        yield from stamped(encoder.flush())
    info_out["messages"] = index


def from_video(videos: Sequence[str | Path], out: str | Path, topics: Sequence[str], *,
               frame_ids: Sequence[str] | None = None, gop: int = 12, storage: str = "mcap",
               fps: float | None = None, max_frames: int | None = None, width: int | None = None,
               start_ns: int | None = None, crf: int = 23, bframes: int = 0,
               msg_type: str = "compressed_image", copy: bool = False,
               camera_infos: Sequence[str | Path] | None = None) -> dict:
    """Write a rosbag2 with one H.264 topic per video (``bframes``: B-frames between the I/P
    pictures), of ``msg_type`` (one of :data:`.inputs.INPUT_TYPES`). ``copy``: the videos' own
    H.264 access units as recorded (no re-encode: ``gop``, ``bframes``, ``width``, ``fps`` and
    ``crf`` do not apply; only H.264 sources). ``camera_infos``: a calibration file per video (or
    one for all): a CameraInfo beside each message, under its header, on the topic's
    :func:`~cvseg_ros.ros.camera_info.camera_info_topic`, scaled to the frames' size. Returns a summary."""
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
    if copy:
        from cvseg_ros.codec.video import video_info
        for v in videos:
            codec = video_info(v).codec
            if codec != "h264":
                raise ValueError(f"--copy keeps the source's H.264 units, but {v} is {codec}: re-encode it "
                                 f"(leave out --copy)")
        if bframes or width:
            raise ValueError("--copy keeps the source's units as recorded: --bframes and --width do not apply")
    if msg_type not in INPUT_TYPES:
        raise ValueError(f"unknown message type {msg_type!r}: use one of {', '.join(INPUT_TYPES)}")
    calibrations = [read_calibration(c) for c in camera_infos or ()]
    if len(calibrations) == 1:
        calibrations *= len(videos)
    if calibrations and len(calibrations) != len(videos):
        raise ValueError(f"{len(videos)} video(s) but {len(calibrations)} --camera-info: give one per video (or one)")
    frame_ids = list(frame_ids) if frame_ids else [camera_from_topic(t) for t in topics]
    if len(frame_ids) != len(videos):
        raise ValueError("give one --frame-id per video (or none)")
    start_ns = int(time.time_ns() if start_ns is None else start_ns)
    ts = typestore()
    ros_type = INPUT_TYPES[msg_type]
    infos = [dict(topic=t, frame_id=f) for t, f in zip(topics, frame_ids)]
    if copy:
        streams = [_copied_units(v, t, f, max_frames=max_frames, start_ns=start_ns, info_out=i)
                   for v, t, f, i in zip(videos, topics, frame_ids, infos)]
    else:
        streams = [_video_units(v, t, f, gop=gop, fps=fps, max_frames=max_frames, width=width,
                                start_ns=start_ns, crf=crf, info_out=i, bframes=bframes)
                   for v, t, f, i in zip(videos, topics, frame_ids, infos)]
    info_of = {i["topic"]: i for i in infos}
    sent = dict.fromkeys(topics, 0)
    calibration_of = dict(zip(topics, calibrations))
    with _open_writer(out, storage) as writer:
        conns = {t: writer.add_connection(t, ros_type, typestore=ts) for t in topics}
        info_conns = {t: writer.add_connection(camera_info_topic(t), CAMERA_INFO, typestore=ts) for t in calibration_of}
        for log_ns, stamp_ns, topic, frame_id, unit in heapq.merge(*streams, key=lambda x: x[0]):
            size = info_of[topic]["width"], info_of[topic]["height"]
            msg = h264_message(ts, msg_type, unit, stamp_ns, frame_id, width=size[0], height=size[1], pts=sent[topic])
            sent[topic] += 1
            writer.write(conns[topic], log_ns, ts.serialize_cdr(msg, ros_type))
            if topic in calibration_of:
                info = camera_info_message(ts, calibration_of[topic], _header(ts, stamp_ns, frame_id), *size)
                writer.write(info_conns[topic], log_ns, ts.serialize_cdr(info, CAMERA_INFO))
    for t in calibration_of:
        info_of[t]["camera_info_topic"] = camera_info_topic(t)
    return {"bag": str(out), "storage": storage, "gop": None if copy else gop, "bframes": None if copy else bframes,
            "copied": copy, "type": ros_type,
            "start_ns": start_ns, "topics": infos}


def camera_info_message(ts, info, header, width: int, height: int):
    """A rosbags CameraInfo of ``info`` (CameraInfo fields, a message or a calibration's dict)
    under ``header`` for an image of ``width`` x ``height``."""
    fields = scaled_fields(SimpleNamespace(**info) if isinstance(info, dict) else info, width, height)
    roi = fields["roi"] or ts.types["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0,
                                                                           do_rectify=False)
    arrays = {k: np.asarray(fields[k], dtype=np.float64) for k in ("d", "k", "r", "p")}
    return ts.types[CAMERA_INFO](header=header, **{**fields, **arrays, "roi": roi})


def h264_message(ts, msg_type: str, unit: bytes, stamp_ns: int, frame_id: str, *, fmt: str = "h264",
                 width: int = 0, height: int = 0, pts: int = 0):
    """One access unit as a rosbags message of ``msg_type`` (:data:`.inputs.INPUT_TYPES`), as the
    drivers and transports that publish that type fill it; ``fmt`` its format (an FFMPEGPacket's
    encoding: ``libx264`` for ``h264``, else ``fmt`` itself)."""
    data = np.frombuffer(unit, dtype=np.uint8)
    cls = ts.types[INPUT_TYPES[msg_type]]
    if msg_type == "compressed_video":
        return cls(timestamp=_stamp(ts, stamp_ns), frame_id=frame_id, data=data, format=fmt)
    if msg_type == "ffmpeg_packet":
        return cls(header=_header(ts, stamp_ns, frame_id), width=width, height=height,
                   encoding="libx264" if fmt == "h264" else fmt, pts=pts,
                   flags=int(NAL_IDR in nal_unit_types(unit)), is_bigendian=False, data=data)
    return cls(header=_header(ts, stamp_ns, frame_id), format=fmt, data=data)


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
    msgtype: str = COMPRESSED_IMAGE
    raw: bytes = b""          # the message as recorded (CDR)


class BagError(ValueError):
    """A bag that cannot be read; the message names the bag and the reason in one line."""


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."


@contextlib.contextmanager
def _reader(bag: str | Path):
    """An open rosbags reader of ``bag``; every failure to open it (missing files, unparseable
    metadata, an unknown storage, a corrupt database, a truncated mcap, ...) a :class:`BagError`."""
    from rosbags.highlevel import AnyReader
    bag = Path(bag)
    if not bag.exists():
        raise FileNotFoundError(f"no such bag: {bag}")
    try:
        reader = AnyReader([bag], default_typestore=typestore())
        reader.open()
    except Exception as exc:  # noqa: BLE001 - rosbags, yaml, sqlite3, mcap, zstd, OSError, ...
        raise BagError(f"cannot read bag {bag}: {_reason(exc)}") from None
    try:
        yield reader
    finally:
        try:
            reader.close()
        except Exception:  # noqa: BLE001 - closing a damaged bag must not hide the first error
            pass


@dataclass
class ReadReport:
    """What reading a bag met: messages that could not be deserialised (skipped), a read error
    that ended it early, and the messages its metadata lists but it did not yield."""
    listed: int = 0
    read: int = 0
    undecodable: int = 0
    read_error: str | None = None
    stopped: bool = False     # the caller stopped reading on purpose (e.g. a message limit)

    @property
    def missing(self) -> int:
        return 0 if self.stopped else max(self.listed - self.read - self.undecodable, 0)

    def warnings(self, bag) -> list[str]:
        out = []
        if self.undecodable:
            out.append(f"bag {bag}: {self.undecodable} message(s) could not be deserialised: skipped")
        if self.read_error:
            out.append(f"bag {bag}: reading stopped early: {self.read_error}")
        if self.missing:
            out.append(f"bag {bag}: yielded {self.read + self.undecodable} of the {self.listed} messages "
                       f"its metadata lists")
        return out

    def as_dict(self) -> dict:
        return {"listed": self.listed, "read": self.read, "undecodable": self.undecodable,
                "missing": self.missing, "read_error": self.read_error}


def camera_info_messages(bag: str | Path, topics: Sequence[str]) -> tuple[dict[str, list[tuple[int, Any, bytes]]], int]:
    """Every CameraInfo on ``topics`` of ``bag``: topic -> [(log_ns, message, as recorded)] in
    log-time order, and how many could not be deserialised (left out)."""
    found: dict[str, list[tuple[int, Any, bytes]]] = {t: [] for t in topics}
    bad = 0
    with _reader(bag) as reader:
        conns = [c for c in reader.connections if c.msgtype == CAMERA_INFO and c.topic in found]
        for conn, log_ns, raw in reader.messages(connections=conns):
            try:
                found[conn.topic].append((log_ns, reader.deserialize(raw, conn.msgtype), bytes(raw)))
            except Exception:  # noqa: BLE001 - a damaged message: counted
                bad += 1
    return found, bad


def iter_compressed(bag: str | Path, topics: Sequence[str] | None = None,
                    report: ReadReport | None = None) -> Iterator[BagImage]:
    """Every H.264 message of a bag (any of :data:`.inputs.INPUT_TYPES`; all topics or
    ``topics``) in log-time order. A message that cannot be deserialised is skipped and a read
    error ends the iteration, both noted in ``report`` (with the count the metadata lists)."""
    report = report if report is not None else ReadReport()
    with _reader(bag) as reader:
        conns = [c for c in reader.connections if c.msgtype in TYPE_NAMES
                 and (topics is None or c.topic in topics)]
        report.listed = sum(c.msgcount for c in conns)
        messages = reader.messages(connections=conns)
        while True:
            try:
                conn, log_ns, raw = next(messages)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001 - a damaged chunk, bad compression, ...
                report.read_error = f"after {report.read + report.undecodable} message(s): {_reason(exc)}"
                return
            try:
                fmt, data, header = unpack(reader.deserialize(raw, conn.msgtype))
                image = BagImage(conn.topic, int(log_ns), stamp_ns_of(header), header.frame_id, fmt,
                                 bytes(data), header, conn.msgtype, bytes(raw))
            except Exception:  # noqa: BLE001 - undecodable CDR, a field of the wrong kind
                report.undecodable += 1
                continue
            report.read += 1
            yield image


def bag_info(bag: str | Path) -> dict:
    with _reader(bag) as reader:
        topics = {}
        for c in reader.connections:
            t = topics.setdefault(c.topic, {"type": c.msgtype, "messages": 0})
            t["messages"] += c.msgcount
        return {"bag": str(bag), "start_ns": reader.start_time, "end_ns": reader.end_time,
                "duration_s": round((reader.end_time - reader.start_time) / 1e9, 3)
                if reader.connections else 0.0, "topics": topics}


# -- CLI ------------------------------------------------------------------------------------------

def write_json(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2))


def register(sub) -> None:
    bag = sub.add_parser("bag", help="rosbag2 files: make them from videos, inspect them")
    bag_sub = bag.add_subparsers(dest="bag_command", metavar="BAG_COMMAND")
    fv = bag_sub.add_parser("from-video", help="videos -> H.264 topics in a rosbag2")
    fv.add_argument("paths", nargs="+", metavar="VIDEO... OUT", help="one or more videos, then the output bag")
    fv.add_argument("--topic", action="append", default=[], required=True,
                    help="topic of each video, in order (repeat: one per video)")
    fv.add_argument("--frame-id", action="append", default=None,
                    help="header frame_id of each video (default: the topic's first name, the camera)")
    fv.add_argument("--gop", type=int, default=12, help="I-frame every N frames")
    fv.add_argument("--bframes", type=int, default=0, choices=range(5), metavar="N",
                    help="B-frames between the I/P pictures (0-4; default 0: I/P only), sent in decoding "
                         "order and stamped with their pictures' times, as a camera's encoder would")
    fv.add_argument("--storage", choices=STORAGES, default="mcap")
    fv.add_argument("--copy", action="store_true",
                    help="keep each H.264 video's own access units as recorded (B-frames included, no "
                         "re-encode; stamps from its presentation times)")
    fv.add_argument("--type", dest="msg_type", choices=list(INPUT_TYPES), default="compressed_image",
                    help="message type: sensor_msgs CompressedImage (default), foxglove_msgs CompressedVideo "
                         "(Foxglove plays H.264 from it) or ffmpeg_image_transport_msgs FFMPEGPacket")
    fv.add_argument("--camera-info", action="append", default=None, metavar="YAML",
                    help="a camera_calibration file per video (or one for all): a CameraInfo beside each "
                         "frame on the topic's sibling camera_info (/front/image_compressed -> /front/camera_info)")
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


def _from_video_main(args) -> int:
    if len(args.paths) < 2:
        raise ValueError("give at least one VIDEO and the OUT bag")
    *videos, out = args.paths
    result = from_video(videos, out, args.topic, frame_ids=args.frame_id, gop=args.gop,
                        storage=args.storage, fps=args.fps, max_frames=args.max_frames,
                        width=args.width, start_ns=args.start_ns, crf=args.crf, bframes=args.bframes,
                        msg_type=args.msg_type, copy=args.copy, camera_infos=args.camera_info)
    for t in result["topics"]:
        how = "copied as recorded" if args.copy else f"GOP {args.gop}, {args.bframes} B-frames"
        print(f"{t['topic']}: {t.get('messages', 0)} H.264 messages ({t.get('width')}x{t.get('height')}, "
              f"{t.get('fps', 0):.2f} fps, {how}) from {t.get('video')}")
    print(f"wrote {out} ({args.storage})")
    write_json(args.json_out, result)
    return 0


def _info_main(args) -> int:
    info = bag_info(args.bag)
    print(json.dumps(info, indent=2))
    return 0
