"""`cvseg demo`: the whole path on real street footage, over real DDS.

1. Footage: ``--video PATH``, or (default) Debian's ``opencv-doc`` sample ``vtest.avi`` (a street
   seen from a fixed camera, MS-MPEG4), fetched without root with ``apt-get download`` into
   ``~/.cache/cvseg_ros/`` and unpacked from the .deb.
2. ``bag from-video``: re-encoded to H.264 I/P (GOP 12) as ``sensor_msgs/CompressedImage`` on
   ``/front/image_compressed`` (the node's default topic for it) in ``OUT/bag`` (mcap).
3. ``cvseg_node`` in its own process (``python -m cvseg_ros.ros.node --ros-args --params-file ...``)
   on a ROS domain of its own (random 1..200 unless ``--domain-id``), discovery on localhost.
4. The bag is replayed into it (reliable QoS on both ends, a node queue deep enough for every
   frame: nothing may be lost); this process records every mask and colour image it publishes
   to ``OUT/segmentation`` (mcap) and reads its ``/diagnostics``.
5. ``OUT/overlay.png`` (a strip of frames: input | colour mask blended), ``OUT/overlay.mp4``,
   and a summary (printed; ``OUT/summary.json`` and ``--json OUT``). See :data:`SUMMARY_DOC`.
6. The node is stopped with SIGINT and must exit cleanly.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

from cvseg_ros.common import stats
from cvseg_ros.common.paths import cache_dir
from cvseg_ros.ros.inputs import default_topic
from cvseg_ros.ros.process import DiagnosticsListener, LocalNode, NodeProcess, diagnostic_number, random_domain
from cvseg_ros.model.checkpoint import CHECKPOINT_HELP, checkpoint_argument

CAMERA = "front"
TOPIC = default_topic(CAMERA)
CACHE = cache_dir()
VTEST_MEMBER = "usr/share/doc/opencv-doc/examples/data/vtest.avi"

SUMMARY_DOC = {
    "frames_in": "CompressedImage messages replayed into the node",
    "masks_out": "mask images received from the node (one colour image each too: colors_out)",
    "skipped_before_keyframe": "access units the node skipped before the first IDR (node diagnostics)",
    "decode_errors": "access units the node could not decode (node diagnostics)",
    "queue_drops": "frames the node dropped because the engine fell behind (node diagnostics)",
    "fps": "masks received per second, wall clock from the first replayed message to the last mask",
    "latency_ms_p50/p99": "measured by the node: message received by the node -> its mask and colour "
                          "image published (queueing + decoding + network), from /diagnostics",
    "e2e_latency_ms_p50/p99": "measured here: replay publish -> mask received (adds DDS transport both ways)",
}


class DemoError(RuntimeError):
    pass


# -- footage --------------------------------------------------------------------------------------

def fetch_vtest(cache: Path = CACHE) -> Path:
    """``vtest.avi`` from Debian's ``opencv-doc`` (no root: ``apt-get download`` + unpack)."""
    target = cache / "vtest.avi"
    if target.is_file():
        return target
    if not shutil.which("apt-get"):
        raise DemoError("no --video given and apt-get is not available to fetch Debian's opencv-doc "
                        "sample (vtest.avi); run with --video PATH")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix="opencv-doc-") as tmp:
        print(f"[demo] fetching Debian's opencv-doc (about 95 MB) into {cache} for vtest.avi ...", flush=True)
        proc = subprocess.run(["apt-get", "download", "opencv-doc"], cwd=tmp, capture_output=True, text=True)
        debs = sorted(Path(tmp).glob("opencv-doc_*.deb"))
        if proc.returncode != 0 or not debs:
            raise DemoError(f"`apt-get download opencv-doc` failed ({proc.stderr.strip()[-400:]}); "
                            f"try `sudo apt-get update` first, or run with --video PATH")
        part = cache / "vtest.avi.part"
        if not _extract_member(debs[0], VTEST_MEMBER, part):
            unpacked = Path(tmp) / "x"
            subprocess.run(["dpkg", "-x", str(debs[0]), str(unpacked)], check=True, capture_output=True)
            src = unpacked / VTEST_MEMBER
            if not src.is_file():
                raise DemoError(f"{debs[0].name} does not contain {VTEST_MEMBER}; run with --video PATH")
            shutil.move(str(src), part)
        part.replace(target)
    return target


def _extract_member(deb: Path, member: str, dst: Path) -> bool:
    """Stream one file out of a .deb's data tarball (``dpkg-deb --fsys-tarfile``)."""
    if not shutil.which("dpkg-deb"):
        return False
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    found = False
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for info in tar:
                if info.name.lstrip("./") == member and info.isfile():
                    src = tar.extractfile(info)
                    with open(dst, "wb") as f:
                        shutil.copyfileobj(src, f)
                    found = True
                    break
    except tarfile.TarError:
        found = False
    finally:
        proc.kill()
        proc.wait()
    return found


# -- the ROS side of the demo (this process) ---------------------------------------------------

class Recorder:
    """Subscribes to a camera's outputs (reliable); writes every image to a bag."""

    def __init__(self, node, camera: str, record_dir: Path) -> None:
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from rosbags.rosbag2 import StoragePlugin, Writer
        from sensor_msgs.msg import Image

        from cvseg_ros.ros.bags import IMAGE, typestore

        self.ts = typestore()
        self.lock = threading.Lock()
        self.masks = 0
        self.colors = 0
        self.receive_ns: dict[int, int] = {}     # header stamp -> monotonic receive time of the mask
        self.last_receive_ns = 0
        self.bad: list[str] = []
        self.writer = Writer(record_dir, version=9, storage_plugin=StoragePlugin.MCAP)
        self.writer.open()
        self.conns = {kind: self.writer.add_connection(f"/{camera}/semantic/{kind}", IMAGE, typestore=self.ts)
                      for kind in ("mask", "color")}
        qos = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
        self.subs = [node.create_subscription(Image, f"/{camera}/semantic/{kind}",
                                              lambda raw, k=kind: self._on_image(k, raw), qos, raw=True)
                     for kind in ("mask", "color")]
        self.camera = camera

    def _on_image(self, kind: str, raw: bytes) -> None:
        now = time.monotonic_ns()
        from cvseg_ros.ros.bags import IMAGE, stamp_ns_of
        msg = self.ts.deserialize_cdr(raw, IMAGE)
        stamp = stamp_ns_of(msg.header)
        expected = "mono8" if kind == "mask" else "rgb8"
        if msg.encoding != expected or msg.header.frame_id != self.camera:
            self.bad.append(f"{kind} {stamp}: encoding {msg.encoding}, frame_id {msg.header.frame_id!r}")
        self.writer.write(self.conns[kind], stamp, raw)
        with self.lock:
            if kind == "mask":
                self.masks += 1
                self.receive_ns[stamp] = now
                self.last_receive_ns = now
            else:
                self.colors += 1

    def close(self) -> None:
        self.writer.close()


def run_live(bag: Path, frames: int, out: Path, *, domain_id: int, device: str, checkpoint: str | None,
             rate: float, startup_timeout: float, log) -> dict:
    """Start the node, replay ``bag`` into it, record its outputs. Returns measurements."""
    from cvseg_ros.ros.bags import COMPRESSED_IMAGE, stamp_ns_of, typestore
    from cvseg_ros.ros.replay import replay

    overrides = {"cameras": f"[{CAMERA}]", f"{CAMERA}.topic": TOPIC, "qos_reliability": "reliable",
                 "queue_depth": str(frames + 16), "diagnostics_period": "0.5", "device": device}
    if checkpoint:
        overrides["checkpoint"] = checkpoint_argument(checkpoint)
    proc = NodeProcess(overrides, log_path=out / "node.log", domain_id=domain_id, error=DemoError)
    log(f"[demo] starting the node (ROS_DOMAIN_ID={domain_id}): {' '.join(proc.command[1:])}")
    record_dir = out / "segmentation"
    if record_dir.exists():
        shutil.rmtree(record_dir)
    ts = typestore()
    sent_ns: dict[int, int] = {}
    first_sent = [0]

    def on_publish(ev) -> None:
        stamp = stamp_ns_of(ts.deserialize_cdr(ev.raw, COMPRESSED_IMAGE).header)
        sent_ns[stamp] = ev.sent_ns
        if not first_sent[0]:
            first_sent[0] = ev.sent_ns

    ros = LocalNode("cvseg_demo", domain_id)
    recorder = None
    try:
        recorder = Recorder(ros.node, CAMERA, record_dir)
        diagnostics = DiagnosticsListener(ros.node, [CAMERA])
        with proc:
            # the node subscribes once its engine is loaded: wait for it (or for its death)
            proc.wait_up(ros.node, startup_timeout, subscribes=[TOPIC],
                         publishes=[f"/{CAMERA}/semantic/mask", f"/{CAMERA}/semantic/color"])
            log(f"[demo] replaying {frames} frames at {rate}x into the node")
            replayed = replay(bag, rate=rate, reliability="reliable", depth=1000, node=ros.node, context=ros.context,
                              wait_for_subscribers=30.0, on_publish=on_publish,
                              should_stop=lambda: proc.poll() is not None)
            # every frame must come out: wait while masks keep arriving
            last_progress, last_count = time.monotonic(), -1
            while True:
                with recorder.lock:
                    masks, colors = recorder.masks, recorder.colors
                if masks >= replayed and colors >= replayed:
                    break
                if masks != last_count:
                    last_progress, last_count = time.monotonic(), masks
                if proc.poll() is not None or time.monotonic() - last_progress > 60:
                    break
                time.sleep(0.1)
            # diagnostics that include the last frame (published every 0.5 s)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                out_count = diagnostic_number(diagnostics.values(CAMERA), "masks_out")
                if out_count is not None and out_count >= masks:
                    break
                time.sleep(0.1)
    finally:
        ros.close()
        if recorder is not None:
            recorder.close()
    diag = diagnostics.values(CAMERA)
    with recorder.lock:
        e2e = [(recorder.receive_ns[s] - sent_ns[s]) / 1e6 for s in recorder.receive_ns if s in sent_ns]
        last = recorder.last_receive_ns
    wall = (last - first_sent[0]) / 1e9 if last and first_sent[0] else 0.0
    return {
        "frames_in": replayed, "masks_out": recorder.masks, "colors_out": recorder.colors,
        "skipped_before_keyframe": diagnostic_number(diag, "skipped_before_keyframe"),
        "decode_errors": diagnostic_number(diag, "decode_errors"), "queue_drops": diagnostic_number(diag, "queue_drops"),
        "fps": round(recorder.masks / wall, 2) if wall > 0 else None,
        "latency_ms_p50": diagnostic_number(diag, "latency_ms_p50", float),
        "latency_ms_p99": diagnostic_number(diag, "latency_ms_p99", float),
        "e2e_latency_ms_p50": stats.percentile(e2e, 50, 2), "e2e_latency_ms_p99": stats.percentile(e2e, 99, 2),
        "device": diag.get("device"), "node_exit_code": proc.exit_code, "bad_outputs": recorder.bad[:5],
        "domain_id": domain_id, "recording": str(record_dir), "node_log": str(proc.log_path),
    }


# -- the command ----------------------------------------------------------------------------------

def demo(out: Path, video: str | None = None, max_frames: int = 150, device: str = "auto",
         checkpoint: str | None = None, gop: int = 12, rate: float = 1.0, width: int | None = None,
         domain_id: int | None = None, startup_timeout: float = 180.0, log=print) -> dict:
    from cvseg_ros.codec.video import video_info
    from cvseg_ros.ros.bags import from_video
    from cvseg_ros.tools.overlay import write_pictures

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = Path(video) if video else fetch_vtest()
    if not source.is_file():
        raise FileNotFoundError(f"no such video: {source}")
    info = video_info(source)
    log(f"[demo] footage: {source} ({info.codec}, {info.width}x{info.height}, {info.fps:.1f} fps)")
    bag = out / "bag"
    if bag.exists():
        shutil.rmtree(bag)
    made = from_video([source], bag, [TOPIC], frame_ids=[CAMERA], gop=gop, storage="mcap",
                      max_frames=max_frames, width=width)
    topic = made["topics"][0]
    frames = int(topic.get("messages", 0))
    if frames == 0:
        raise DemoError(f"{source}: no frame could be read")
    log(f"[demo] bag: {bag} ({frames} H.264 frames {topic['width']}x{topic['height']}, GOP {gop}, "
        f"re-encoded from {topic.get('source_codec')})")
    if domain_id is None:
        domain_id = random_domain()
    live = run_live(bag, frames, out, domain_id=domain_id, device=device, checkpoint=checkpoint,
                    rate=rate, startup_timeout=startup_timeout, log=log)
    pictures = write_pictures(bag, TOPIC, Path(live["recording"]), out, fps=topic["fps"], checkpoint=checkpoint)
    summary = {k: live[k] for k in ("frames_in", "masks_out", "skipped_before_keyframe", "decode_errors",
                                    "fps", "latency_ms_p50", "latency_ms_p99")}
    summary.update({k: live[k] for k in ("colors_out", "queue_drops", "e2e_latency_ms_p50",
                                         "e2e_latency_ms_p99", "device", "node_exit_code", "domain_id")})
    summary.update(video=str(source), width=topic["width"], height=topic["height"], source_fps=topic["fps"],
                   replay_rate=rate, bag=str(bag), recording=live["recording"], node_log=live["node_log"],
                   **pictures, doc=SUMMARY_DOC)
    if live["bad_outputs"]:
        summary["bad_outputs"] = live["bad_outputs"]
    return summary


def register(sub) -> None:
    p = sub.add_parser("demo", help="real footage -> bag -> cvseg_node over DDS -> overlay PNG/MP4 + summary")
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--video", default=None,
                   help="your own clip (default: vtest.avi from Debian's opencv-doc, fetched to ~/.cache/cvseg_ros)")
    p.add_argument("--max-frames", type=int, default=150)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    p.add_argument("--gop", type=int, default=12)
    p.add_argument("--rate", type=float, default=1.0, help="replay speed (1 = the footage's frame rate)")
    p.add_argument("--width", type=int, default=None, help="resize the footage to this width first")
    p.add_argument("--domain-id", type=int, default=None, help="ROS_DOMAIN_ID (default: random 1..200)")
    p.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for the node")
    p.add_argument("--json", dest="json_out", default=None, help="also write the summary here")
    p.set_defaults(func=_main)


def _main(args) -> int:
    try:
        summary = demo(Path(args.out), video=args.video, max_frames=args.max_frames, device=args.device,
                       checkpoint=args.checkpoint, gop=args.gop, rate=args.rate, width=args.width,
                       domain_id=args.domain_id, startup_timeout=args.startup_timeout)
    except DemoError as exc:
        print(f"cvseg demo: error: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(summary, indent=2)
    print(text)
    Path(args.out, "summary.json").write_text(text)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(text)
    ok = (summary["masks_out"] == summary["frames_in"] == summary["colors_out"]
          and summary["node_exit_code"] == 0 and not summary.get("bad_outputs"))
    if not ok:
        print("cvseg demo: error: not every frame came out cleanly (see the summary and "
              f"{summary['node_log']})", file=sys.stderr)
    return 0 if ok else 1
