"""``cvseg eval-bag BAG [--record OUT]``: a bag's H.264 topics through the node's message path,
offline: counters, throughput, per-frame latency, and optionally a new bag that Foxglove or RViz
shows input and masks from together: the input topics as recorded (and their cameras'
CameraInfo, where the bag has it beside them), and per camera the masks (``mono8`` Image on
``/<camera>/semantic/mask``), the colour masks (``rgb8``, ``.../color``), the label info
(``std_msgs/String`` JSON, ``.../label_info``, once) and, with a CameraInfo, its latest one under
each mask's header at the mask's size (``.../camera_info``), as the node republishes it."""
from __future__ import annotations

import bisect
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from cvseg_ros.model.checkpoint import CHECKPOINT_HELP
from cvseg_ros.common import stats
from cvseg_ros.ros.bags import (CAMERA_INFO, IMAGE, STORAGES, ReadReport, _header, _open_writer, bag_info,
                                camera_from_topic, camera_info_message, camera_info_messages, iter_compressed,
                                typestore, write_json)
from cvseg_ros.ros.camera_info import camera_info_topic
from cvseg_ros.ros.inputs import INPUT_TYPES, TYPE_NAMES
from cvseg_ros.ros.labels import label_info_json

STRING = "std_msgs/msg/String"

def eval_bag(bag: str | Path, *, record: str | Path | None = None, device: str = "auto",
             checkpoint: str | None = None, storage: str = "mcap", max_frames: int | None = None,
             threads: int | None = None, engine=None) -> dict:
    """Run every H.264 topic of ``bag`` (CompressedImage, CompressedVideo or FFMPEGPacket; log-time
    order) through the node's message path (:class:`~cvseg_ros.ros.message_path.MessagePath`: the
    same checks, drop policies, batching and counters as ``cvseg_node``), without DDS and without
    ever falling behind: a camera's queued frame is segmented before its next one is taken.

    Latency of a frame = read from the bag -> mask (includes waiting for the other cameras' frames
    of its batch)."""
    from cvseg_ros.ros.message_path import DROP_REASONS, MessagePath, make_message
    if engine is None:
        from cvseg_ros.engine.pipeline import SegmentationEngine
        engine = SegmentationEngine(checkpoint=checkpoint or None, device=device, threads=threads)
    ts = typestore()
    Image = ts.types[IMAGE]
    cameras: dict[str, str] = {}       # topic -> camera
    listed = bag_info(bag)["topics"]
    for topic, info in listed.items():
        if info["type"] in TYPE_NAMES:
            name = camera_from_topic(topic)
            cameras[topic] = topic.strip("/").replace("/", "_") if name in cameras.values() else name
    if not cameras:
        raise ValueError(f"{bag}: no H.264 topic (of {', '.join(INPUT_TYPES.values())})")
    path = MessagePath(engine, cameras.values(), topics={c: t for t, c in cameras.items()})
    latencies: list[float] = []
    busy_s = 0.0
    log_ns_of: dict[tuple[str, int], int] = {}
    latest_log_ns: dict[str, int] = {}   # of each camera's last message received
    writer = _open_writer(record, storage) if record else None
    out_conns: dict[str, Any] = {}
    info_topics = {cam: camera_info_topic(t) for t, cam in cameras.items()
                   if listed.get(camera_info_topic(t), {}).get("type") == CAMERA_INFO}
    infos, bad_infos = camera_info_messages(bag, sorted(set(info_topics.values()))) if record else ({}, 0)
    info_times = {t: [log_ns for log_ns, _, _ in m] for t, m in infos.items()}
    republished = dict.fromkeys(cameras.values(), 0)

    def write_camera_info(out, header, log_ns: int) -> None:
        """The camera's latest CameraInfo (logged at or before the mask) under the mask's header."""
        topic = info_topics.get(out.camera)
        at = bisect.bisect_right(info_times.get(topic, []), log_ns) if topic else 0
        if at:
            write(f"/{out.camera}/semantic/camera_info", CAMERA_INFO, log_ns,
                  camera_info_message(ts, infos[topic][at - 1][1], header, out.mask.shape[1], out.mask.shape[0]))
            republished[out.camera] += 1

    def publish(out) -> None:
        latencies.append((time.monotonic_ns() - out.received_ns) / 1e6)
        # logged when it can be published: not before the message whose processing gave it out
        # (B-frame streams give pictures, and masks, a few messages later, in display order)
        log_ns = max(log_ns_of.pop((out.camera, out.stamp_ns)), latest_log_ns[out.camera])
        if writer is None:
            return
        if f"/{out.camera}/semantic/label_info" not in out_conns:     # once per camera, before its masks
            write(f"/{out.camera}/semantic/label_info", STRING, log_ns,
                  ts.types[STRING](data=label_info_json(engine.class_names, engine.palette)))
        header = _header(ts, out.stamp_ns, out.header.frame_id)
        for kind, image, encoding in (("mask", out.mask, "mono8"), ("color", engine.colorize(out.mask), "rgb8")):
            image = np.ascontiguousarray(image, dtype=np.uint8)
            write(f"/{out.camera}/semantic/{kind}", IMAGE, log_ns,
                  Image(header=header, height=image.shape[0], width=image.shape[1], encoding=encoding,
                        is_bigendian=0, step=image.strides[0], data=image.reshape(-1)))
        write_camera_info(out, header, log_ns)

    def write(topic: str, msgtype: str, log_ns: int, msg=None, raw: bytes | None = None) -> None:
        if topic not in out_conns:
            out_conns[topic] = writer.add_connection(topic, msgtype, typestore=ts)
        writer.write(out_conns[topic], log_ns, raw if raw is not None else ts.serialize_cdr(msg, msgtype))

    def drain() -> None:
        nonlocal busy_s
        start = time.perf_counter()
        path.drain(publish)
        busy_s += time.perf_counter() - start

    def finish() -> None:      # the pictures a B-frame stream's decoders still hold back
        nonlocal busy_s
        start = time.perf_counter()
        path.flush(publish)
        busy_s += time.perf_counter() - start

    total = 0
    report = ReadReport()
    wall0 = time.perf_counter()
    try:
        if writer is not None:
            writer.open()
            for topic, messages in infos.items():       # the cameras' CameraInfo, as recorded
                for log_ns, _, raw in messages:
                    write(topic, CAMERA_INFO, log_ns, raw=raw)
        for m in iter_compressed(bag, list(cameras), report):
            cam = cameras[m.topic]
            if len(path.cameras[cam].queue):     # this camera's last frame first: never behind
                drain()
            log_ns_of[(cam, m.stamp_ns)] = latest_log_ns[cam] = m.log_ns
            if writer is not None:       # the input beside the masks, as recorded
                write(m.topic, m.msgtype, m.log_ns, raw=m.raw)
            path.receive(cam, make_message(m.data, m.stamp_ns, m.format, m.frame_id))
            total += 1
            if max_frames is not None and total >= max_frames:
                report.stopped = True
                break
        drain()
        finish()
    finally:
        if writer is not None:
            writer.close()
    wall = time.perf_counter() - wall0
    per_camera = {}
    for topic, cam in cameras.items():
        c, st = path.cameras[cam].counts, engine.stats(cam)
        per_camera[cam] = {"topic": topic, "frames_in": c["received"], "masks_out": c["published"],
                           "i_frames": st.get("i_frames"), "p_frames": st.get("p_frames"),
                           "b_frames": st.get("b_frames"),
                           "decode_errors": st.get("corrupt"),
                           "camera_info": ({"topic": info_topics[cam], "recorded": len(infos.get(info_topics[cam], [])),
                                            "republished": republished[cam]} if cam in info_topics and record else None),
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
        "read": report.as_dict(), "complete": not report.warnings(bag) and not bad_infos,
        "warnings": report.warnings(bag) + ([f"{bag}: {bad_infos} CameraInfo message(s) could not be read: "
                                             f"left out of the record"] if bad_infos else []),
    }


def register(sub) -> None:
    ev = sub.add_parser("eval-bag", help="run the segmentation engine offline over a bag's H.264 topics")
    ev.add_argument("bag")
    ev.add_argument("--record", default=None, help="write the input, the masks (mono8), the colour masks (rgb8) "
                                                   "and the label info to this new bag")
    ev.add_argument("--storage", choices=STORAGES, default="mcap", help="storage of --record")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    ev.add_argument("--max-frames", type=int, default=None)
    ev.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's); 1 is much faster on a busy machine")
    ev.add_argument("--json", dest="json_out")
    ev.set_defaults(func=_eval_main)


def _eval_main(args) -> int:
    result = eval_bag(args.bag, record=args.record, device=args.device, checkpoint=args.checkpoint,
                      storage=args.storage, max_frames=args.max_frames, threads=args.threads)
    for key, value in result.items():
        if key != "cameras":
            print(f"{key:>16}: {value}")
    for cam, st in result["cameras"].items():
        print(f"{cam:>16}: {st}")
    for warning in result["warnings"]:
        print(f"cvseg eval-bag: warning: {warning}", file=sys.stderr)
    write_json(args.json_out, result)
    return 0
