"""``cvseg soak``: several cameras through the node's message path for a bounded time; memory and queues.

The node's own :class:`~cvseg_ros.ros.message_path.MessagePath` runs with its worker thread (as in
``cvseg_node``: batching window, queue policy, diagnostics) on the shipped checkpoint; a feeder
thread plays one real clip per camera (re-encoded to H.264 I/P, looped with continuing stamps) at
``--fps``; the colour image is made for every mask as the node does. Every ``--sample`` seconds
the process's resident memory (``VmRSS`` from ``/proc/self/status``) and every camera's queue are
sampled. After the warm-up, RSS growth is (median of the last samples) / (median of the first
samples after the warm-up) - 1, each over a fifth of the measured time (at least 2 s), and the
least-squares trend is reported too (MiB/min); queues must stay bounded (at most ``queue_depth`` waiting) and not grow
(mean of the second half of the samples after warm-up no more than the first half's + 1).
Targets: RSS growth < 5 %, queues not growing. Exit status 1 when a target is missed.

``--node``: the same with the real ``cvseg_node`` in its own process over DDS (reliable QoS, a ROS
domain of its own, discovery on localhost): this process publishes the cameras, RSS is the node
process's (``/proc/<pid>/status``), queues and counters come from its ``/diagnostics``.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from cvseg_ros.common.procfs import rss_bytes
from cvseg_ros.common.stats import median
from cvseg_ros.ros.inputs import default_topic
from cvseg_ros.ros.message_path import make_message
from cvseg_ros.model.checkpoint import CHECKPOINT_HELP, checkpoint_argument


def paced_feed(names: Sequence[str], sources: dict, fps: float, stop: threading.Event, send) -> None:
    """Until ``stop``: every 1/``fps`` s, one access unit per camera (its clip looped), as a
    ``CompressedImage`` with the frame's stamp, handed to ``send(camera, message)``."""
    period = 1.0 / fps
    t0 = time.monotonic()
    k = 0
    while not stop.is_set():
        stamp = 1_700_000_000_000_000_000 + int(k * period * 1e9)
        for name in names:
            units = sources[name].units
            send(name, make_message(units[k % len(units)], stamp, "h264", name))
        k += 1
        delay = t0 + k * period - time.monotonic()
        if delay > 0:
            stop.wait(delay)


def soak(cameras: int = 4, seconds: float = 60.0, *, fps: float = 10.0, width: int = 320, frames: int = 48,
         gop: int = 12, warmup: float | None = None, queue_depth: int = 5, batch_window_ms: float = 5.0,
         sample_period: float = 0.5, threads: int | None = 1, checkpoint: str | None = None,
         videos: Sequence[str | Path] = (), engine=None, progress=None) -> dict:
    """Run the soak; returns the report (see the module doc)."""
    from cvseg_ros.tools.mutations import default_videos, encoded_source
    from cvseg_ros.ros.message_path import MessagePath

    if cameras < 1 or seconds <= 0 or fps <= 0:
        raise ValueError("--cameras >= 1, --seconds > 0 and --fps > 0")
    warmup = min(30.0, max(3.0, 0.25 * seconds)) if warmup is None else warmup
    if warmup >= seconds:
        raise ValueError(f"--warmup ({warmup} s) must be shorter than --seconds ({seconds} s)")
    videos = [Path(v) for v in (videos or default_videos())]
    if not videos:
        raise ValueError("no video: give --video")
    names = [f"cam{i}" for i in range(cameras)]
    sources = {}
    for i, name in enumerate(names):
        sources[name] = encoded_source(videos[i % len(videos)], width, frames, gop)
    if engine is None:
        from cvseg_ros.engine.pipeline import SegmentationEngine
        engine = SegmentationEngine(checkpoint=checkpoint, device="auto", threads=threads)
    path = MessagePath(engine, names, queue_depth=queue_depth, batch_window_ms=batch_window_ms)
    stop = threading.Event()
    colors = [0]

    def publish(out) -> None:
        engine.colorize(out.mask)
        colors[0] += 1

    def work() -> None:
        while not stop.is_set():
            batch = path.take_batch(timeout=0.2, stop=stop)
            if batch:
                path.run_batch(batch, publish)

    samples = []          # (t, rss, {camera: (waiting, backlog)})
    worker = threading.Thread(target=work, name="soak_worker", daemon=True)
    feeder = threading.Thread(target=paced_feed, name="soak_feeder", daemon=True,
                              args=(names, sources, fps, stop, path.receive))
    t0 = time.monotonic()
    worker.start()
    feeder.start()
    try:
        next_progress = 10.0
        while True:
            t = time.monotonic() - t0
            if t >= seconds:
                break
            queues = path.queue_sizes()
            samples.append((t, rss_bytes(), queues))
            if progress is not None and t >= next_progress:
                progress(f"soak: {t:.0f}/{seconds:.0f} s, RSS {samples[-1][1] / 2**20:.1f} MiB, "
                         f"queues {queues}")
                next_progress += 10.0
            time.sleep(sample_period)
    finally:
        stop.set()
        path.wake()
        feeder.join(5)
        worker.join(30)
    path.drain(publish)
    values = {name: dict(path.camera_values(name, seconds)[2]) for name in names}
    report = _report(samples, values, names, sources, seconds=seconds, warmup=warmup, fps=fps, width=width,
                     queue_depth=queue_depth)
    report.update(mode="in-process", device=str(engine.device), torch_threads=_torch_threads(),
                  colors_out=colors[0])
    return report


def _report(samples: list, values: dict, names: list[str], sources: dict, *, seconds: float, warmup: float,
            fps: float, width: int, queue_depth: int) -> dict:
    """The report of a run from its samples ``(t, rss, {camera: (waiting, backlog)})`` and each
    camera's final diagnostics values."""
    after = [s for s in samples if s[0] >= warmup]
    span = max(2.0, 0.2 * (seconds - warmup))      # RSS moves by a few % as malloc gives memory back
    rss_start = median([s[1] for s in after if s[0] <= warmup + span])
    rss_end = median([s[1] for s in after if s[0] >= seconds - span])
    growth = (rss_end / rss_start - 1.0) * 100 if rss_start and rss_end else None
    slope = None
    if len(after) >= 3:     # least-squares trend after the warm-up, MiB per minute
        slope = float(np.polyfit([s[0] for s in after], [s[1] / 2**20 for s in after], 1)[0]) * 60
    half = len(after) // 2
    per_camera = {}
    queues_ok = True
    for name in names:
        waiting = [s[2][name][0] for s in after if name in s[2]]
        backlog = [s[2][name][1] for s in after if name in s[2]]
        first = float(np.mean(waiting[:half])) if waiting[:half] else 0.0
        second = float(np.mean(waiting[half:])) if waiting[half:] else 0.0
        v = values.get(name, {})
        growing = second > first + 1.0
        bounded = max(waiting, default=0) <= queue_depth
        queues_ok &= bounded and not growing
        per_camera[name] = {
            "source": sources[name].name, "frames_in": int(v.get("frames_in", 0)),
            "masks_out": int(v.get("masks_out", 0)), "fps_out": round(int(v.get("masks_out", 0)) / seconds, 2),
            "queue_drops": int(v.get("queue_drops", 0)), "decode_errors": int(v.get("decode_errors", 0)),
            "latency_ms_p50": v.get("latency_ms_p50"), "latency_ms_p99": v.get("latency_ms_p99"),
            "queue_max": max(waiting, default=0), "queue_mean_first_half": round(first, 2),
            "queue_mean_second_half": round(second, 2), "backlog_max": max(backlog, default=0),
            "queue_growing": growing,
        }
    report = {
        "cameras": len(names), "seconds": seconds, "warmup_s": warmup, "fps_in_per_camera": fps,
        "width": width, "queue_depth": queue_depth,
        "rss_mib_after_warmup": round(rss_start / 2**20, 1) if rss_start else None,
        "rss_mib_end": round(rss_end / 2**20, 1) if rss_end else None,
        "rss_mib_max": round(max(s[1] for s in samples) / 2**20, 1) if samples else None,
        "rss_growth_pct": round(growth, 2) if growth is not None else None,
        "rss_trend_mib_per_min": round(slope, 2) if slope is not None else None,
        "rss_mib_series": [(round(s[0], 1), round(s[1] / 2**20, 1))        # about 20 points of the run
                           for s in samples[:: max(1, len(samples) // 20)]],
        "samples": len(samples), "masks_out": sum(c["masks_out"] for c in per_camera.values()),
        "per_camera": per_camera,
    }
    report["rss_ok"] = growth is not None and growth < 5.0
    report["queues_ok"] = queues_ok
    report["ok"] = report["rss_ok"] and queues_ok
    return report


def soak_node(cameras: int = 4, seconds: float = 60.0, *, fps: float = 10.0, width: int = 320, frames: int = 48,
              gop: int = 12, warmup: float | None = None, queue_depth: int = 5, sample_period: float = 0.5,
              threads: int | None = 1, checkpoint: str | None = None, videos: Sequence[str | Path] = (),
              domain_id: int | None = None, device: str = "auto", startup_timeout: float = 120.0,
              log_dir: str | Path | None = None, progress=None) -> dict:
    """The soak with ``cvseg_node`` in its own process over DDS (see the module doc)."""
    import tempfile

    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CompressedImage

    from cvseg_ros.ros.process import DiagnosticsListener, LocalNode, NodeProcess, random_domain
    from cvseg_ros.tools.mutations import default_videos, encoded_source

    warmup = min(30.0, max(3.0, 0.25 * seconds)) if warmup is None else warmup
    if cameras < 1 or seconds <= warmup or fps <= 0:
        raise ValueError("--cameras >= 1, --seconds > --warmup and --fps > 0")
    videos = [Path(v) for v in (videos or default_videos())]
    if not videos:
        raise ValueError("no video: give --video")
    names = [f"cam{i}" for i in range(cameras)]
    sources = {name: encoded_source(videos[i % len(videos)], width, frames, gop) for i, name in enumerate(names)}
    domain_id = domain_id or random_domain()
    overrides = {"cameras": f"[{', '.join(names)}]", "qos_reliability": "reliable",
                 "queue_depth": str(queue_depth), "diagnostics_period": str(sample_period),
                 "threads": str(threads or 0), "device": device, "publish_color": "true"}
    if checkpoint:
        overrides["checkpoint"] = checkpoint_argument(checkpoint)
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="cvseg_soak_"))
    proc = NodeProcess(overrides, log_path=log_dir / "node.log", domain_id=domain_id)
    ros = LocalNode("cvseg_soak", domain_id)
    diagnostics = DiagnosticsListener(ros.node)
    qos = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
    pubs = {n: ros.node.create_publisher(CompressedImage, default_topic(n), qos) for n in names}
    stop = threading.Event()
    samples = []
    try:
        with proc:
            proc.wait_until(lambda: all(p.get_subscription_count() > 0 for p in pubs.values()),
                            startup_timeout, "the node to subscribe to the cameras")
            time.sleep(0.5)

            feeder = threading.Thread(target=paced_feed, daemon=True,
                                      args=(names, sources, fps, stop, lambda name, msg: pubs[name].publish(msg)))
            t0 = time.monotonic()
            feeder.start()
            next_progress = 10.0
            while (t := time.monotonic() - t0) < seconds:
                if proc.poll() is not None:
                    raise RuntimeError(f"the node exited ({proc.returncode}) during the soak (see {proc.log_path})")
                queues = {n: (int(d.get("queue_size", 0)), int(d.get("queue_backlog", 0)))
                          for n, d in diagnostics.all_values().items() if n in sources}
                samples.append((t, rss_bytes(proc.pid), queues))
                if progress is not None and t >= next_progress:
                    progress(f"soak (node): {t:.0f}/{seconds:.0f} s, node RSS {samples[-1][1] / 2**20:.1f} MiB, "
                             f"queues {queues}")
                    next_progress += 10.0
                time.sleep(sample_period)
            stop.set()
            feeder.join(5)
            time.sleep(max(2.0, 3 * sample_period))     # the last frames, the last diagnostics
            values = {n: diagnostics.values(n) for n in names}
    finally:
        stop.set()
        ros.close()
    report = _report(samples, values, names, sources, seconds=seconds, warmup=warmup, fps=fps, width=width,
                     queue_depth=queue_depth)
    report.update(mode="node", node_pid=proc.pid, node_exit_code=proc.exit_code, node_log=str(proc.log_path),
                  domain_id=domain_id, device=values[names[0]].get("device"),
                  node_peak_rss_mib=round(proc.peak_rss_mib, 1))
    report["ok"] = report["ok"] and proc.exit_code == 0
    return report


def _torch_threads() -> int | None:
    try:
        import torch
        return torch.get_num_threads()
    except ImportError:
        return None


def register(sub) -> None:
    p = sub.add_parser("soak", help="N cameras through the node's message path for S seconds: RSS growth, queues")
    p.add_argument("--cameras", type=int, default=4)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--fps", type=float, default=10.0, help="frames per second per camera")
    p.add_argument("--width", type=int, default=320, help="re-encode the clips at this width")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds left out of the growth figure (default: a quarter of the run, 3..30 s)")
    p.add_argument("--queue-depth", type=int, default=5)
    p.add_argument("--video", action="append", default=None, help="real clip(s), one per camera in turn")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    p.add_argument("--node", action="store_true",
                   help="soak the real cvseg_node in its own process over DDS (RSS of that process)")
    p.add_argument("--domain-id", type=int, default=None, help="with --node: ROS_DOMAIN_ID (default random)")
    p.add_argument("--json", dest="json_out")
    p.set_defaults(func=_main)


def _main(args) -> int:
    kwargs = dict(fps=args.fps, width=args.width, warmup=args.warmup, queue_depth=args.queue_depth,
                  threads=args.threads, checkpoint=args.checkpoint, videos=args.video or (), progress=print)
    if args.node:
        report = soak_node(args.cameras, args.seconds, domain_id=args.domain_id, **kwargs)
    else:
        report = soak(args.cameras, args.seconds, **kwargs)
    print(json.dumps(report, indent=2))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1
