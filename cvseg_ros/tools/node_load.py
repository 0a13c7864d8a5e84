"""The node under load, for ``cvseg bench``: ``cvseg_node`` in its own process, N cameras over DDS.

``--cameras`` synthetic camera topics (the same re-encoded clip, looped, I-frames staggered
between cameras as unsynchronised cameras have them) are published at ``--fps`` for
``--seconds`` after ``--warmup`` seconds. Measured: achieved rate per camera, latency (publish ->
mask received here, and the node's own receive -> publish from ``/diagnostics``), drops (reported
by the node or not), the node's peak RSS and CPU use (see :data:`NODE_DOC`).
"""
from __future__ import annotations

import array
import os
import struct
import threading
import time
from pathlib import Path
from typing import Callable

from cvseg_ros.common import stats
from cvseg_ros.ros.inputs import default_topic
from cvseg_ros.ros.process import DiagnosticsListener, LocalNode, NodeProcess, diagnostic_number, random_domain
from cvseg_ros.model.checkpoint import checkpoint_argument

NODE_DOC = {
    "rate_hz": "masks received here per second during the measured window (after the warm-up)",
    "latency_ms_*": "publish here -> mask received here (DDS both ways + the node), frames sent in the window",
    "node_latency_ms_*": "the node's own figure from /diagnostics: message received -> mask and colour "
                         "image published (all frames, warm-up included)",
    "reported_drops": "frames the node reports it made no mask for, every reason it counts in /diagnostics "
                      "(queue_drops, decode_errors, skipped_before_keyframe, ...; listed per camera)",
    "unreported_drops": "sent - masks received - reported_drops: frames lost without a count",
    "transport_lost": "sent - frames the node says it received (lost by DDS, e.g. best-effort overflow)",
    "peak_rss_mib": "VmHWM of the node process (/proc/PID/status) at the end of the run",
    "node_cpu_cores": "the node process's CPU time / wall time while publishing",
    "node_cpu_ms_per_mask": "the node process's CPU time from the first publish to the last mask / the "
                            "masks received (ratios.node_cpu_per_mask_over_engine compares it with the engine offline)",
}


class NodeLoadError(RuntimeError):
    pass


def _stamp_of_raw_image(raw: bytes) -> int:
    """Header stamp of a CDR-serialised sensor_msgs/Image (4-byte encapsulation, then sec, nanosec)."""
    sec, nsec = struct.unpack_from("<iI" if raw[1] & 1 else ">iI", raw, 4)   # CDR_LE / CDR_BE
    return sec * 1_000_000_000 + nsec


class _Arrivals:
    """Masks received here: (camera, stamp) -> monotonic ns of the first arrival; duplicates."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: dict[tuple[int, int], int] = {}
        self.duplicates = 0

    def on_mask(self, k: int, raw: bytes) -> None:
        now = time.monotonic_ns()
        key = (k, _stamp_of_raw_image(raw))
        with self.lock:
            if key in self.received:
                self.duplicates += 1
            else:
                self.received[key] = now

    def count(self, k: int | None = None) -> int:
        with self.lock:
            return len(self.received) if k is None else sum(1 for key in self.received if key[0] == k)


def run_node_load(units: list[bytes], *, cameras: int, fps: float, gop: int, seconds: float, warmup: float,
                  device: str = "auto", checkpoint: str | None = None, qos: str = "best_effort",
                  precision: str = "auto",
                  queue_depth: int | None = None, node_threads: int | None = None, domain_id: int | None = None,
                  startup_timeout: float = 180.0, workdir: Path | None = None, progress: bool = True,
                  log: Callable[[str], None] = print, error: type[Exception] = NodeLoadError) -> dict:
    """Start ``cvseg_node`` in a subprocess, publish ``cameras`` H.264 topics into it at ``fps``
    (each camera loops ``units``; camera k starts k * GOP / cameras frames later) for
    ``warmup + seconds`` seconds, and measure it (see :data:`NODE_DOC`). ``error``: raised when
    the node does not come up or dies."""
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CompressedImage, Image

    if cameras < 1:
        raise ValueError("--cameras must be >= 1")
    names = [f"bench{k}" for k in range(cameras)]
    topics = {c: default_topic(c) for c in names}
    overrides = {"cameras": "[" + ",".join(names) + "]", "device": device, "qos_reliability": qos,
                 "precision": precision,
                 "diagnostics_period": "0.5"}
    overrides.update({f"{c}.topic": t for c, t in topics.items()})
    if checkpoint:
        overrides["checkpoint"] = checkpoint_argument(checkpoint)
    if queue_depth:
        overrides["queue_depth"] = str(queue_depth)
    if node_threads:
        overrides["threads"] = str(node_threads)
    domain_id = random_domain() if domain_id is None else domain_id
    workdir = Path(workdir) if workdir else Path(os.environ.get("TMPDIR", "/tmp"))
    proc = NodeProcess(overrides, log_path=workdir / f"bench_node_{domain_id}.log", domain_id=domain_id,
                       error=error)

    period_ns = int(round(1e9 / fps))
    stagger = max(1, gop // cameras) if cameras > 1 else 0
    per_camera_frames = int(round((warmup + seconds) * fps))
    sent: dict[tuple[int, int], int] = {}          # (camera, stamp) -> monotonic ns after publish
    arrivals = _Arrivals()

    ros = LocalNode("cvseg_bench", domain_id)
    in_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, durability=DurabilityPolicy.VOLATILE,
                        reliability=ReliabilityPolicy.RELIABLE if qos == "reliable" else ReliabilityPolicy.BEST_EFFORT)
    out_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=200, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)
    pubs = [ros.node.create_publisher(CompressedImage, topics[c], in_qos) for c in names]
    # masks only (raw, no deserialisation here): the node still makes and publishes the colour images
    for k, c in enumerate(names):
        ros.node.create_subscription(Image, f"/{c}/semantic/mask", lambda raw, k=k: arrivals.on_mask(k, raw),
                                     out_qos, raw=True)
    diagnostics = DiagnosticsListener(ros.node, names)

    # messages made once (converting bytes to a uint8[] field is slow in Python)
    messages = []
    for c in names:
        msgs = []
        for unit in units:
            m = CompressedImage()
            m.header.frame_id = c
            m.format = "h264"
            m.data = array.array("B", unit)
            msgs.append(m)
        messages.append(msgs)

    result: dict = {"cameras": cameras, "fps": fps, "seconds": seconds, "warmup_s": warmup, "qos": qos,
                    "stagger_frames": stagger, "domain_id": domain_id, "node_log": str(proc.log_path),
                    "node_command": " ".join(proc.command[1:])}
    log(f"[bench] node: {cameras} camera(s) x {fps:g} fps, {warmup:g} s warm-up + {seconds:g} s "
        f"(ROS_DOMAIN_ID={domain_id}); log {proc.log_path}")
    try:
        with proc:
            proc.wait_until(lambda: all(p.get_subscription_count() > 0 for p in pubs)
                            and all(ros.node.count_publishers(f"/{c}/semantic/mask") > 0 for c in names),
                            startup_timeout, "the node to come up")
            time.sleep(1.0)   # let discovery settle on both sides (reliable outputs matched)
            idle = proc.sample()
            t0, t_end, cpu0, cpu1 = _publish(proc, pubs, messages, sent, per_camera_frames, stagger, period_ns,
                                             progress, error)
            _wait_for_the_last(arrivals, diagnostics, names, len(sent))
            cpu_end, masks_end = proc.cpu_seconds(), arrivals.count()
            time.sleep(0.6)
    finally:
        ros.close()

    window_start = t0 + int(warmup * 1e9)
    result.update(_summary(names, sent, arrivals, diagnostics, window_start, t_end))
    result.update({
        "peak_rss_mib": round(proc.peak_rss_mib, 1), "idle_rss_mib": round(idle.get("VmRSS", 0) / 2**20, 1),
        "node_cpu_cores": round((cpu1 - cpu0) / ((t_end - t0) / 1e9), 2) if cpu0 is not None and cpu1 is not None else None,
        "node_cpu_ms_per_mask": round(1000 * (cpu_end - cpu0) / masks_end, 2)
        if cpu0 is not None and cpu_end is not None and masks_end else None,
        "node_exit_code": proc.exit_code,
    })
    return result


def _publish(proc: NodeProcess, pubs, messages, sent: dict, per_camera_frames: int, stagger: int, period_ns: int,
             progress: bool, error: type[Exception]) -> tuple[int, int, float | None, float | None]:
    """Publish every camera's messages on the clock; returns (t0, t_end, CPU s of the node at both)."""
    from tqdm import tqdm

    cameras, n_units = len(pubs), len(messages[0])
    cpu0 = proc.cpu_seconds()
    base_stamp = time.time_ns()
    total_ticks = per_camera_frames + (cameras - 1) * stagger
    t0 = time.monotonic_ns() + 50_000_000
    bar = tqdm(total=total_ticks, desc="bench node", unit="tick", disable=not progress)
    for tick in range(total_ticks):
        delay = (t0 + tick * period_ns - time.monotonic_ns()) / 1e9
        if delay > 0:
            time.sleep(delay)
        if proc.poll() is not None:
            raise error(f"the node died during the run (status {proc.returncode}, see {proc.log_path})")
        stamp = base_stamp + tick * period_ns
        for k in range(cameras):
            j = tick - k * stagger
            if j < 0 or j >= per_camera_frames:
                continue
            msg = messages[k][j % n_units]
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
            pubs[k].publish(msg)
            sent[(k, stamp)] = time.monotonic_ns()
        if tick % 15 == 0:
            proc.sample()
        bar.update(1)
    bar.close()
    return t0, time.monotonic_ns(), cpu0, proc.cpu_seconds()


def _wait_for_the_last(arrivals: _Arrivals, diagnostics: DiagnosticsListener, names: list[str], sent: int) -> None:
    """Wait for the last masks (until 3 s pass without one), then for diagnostics that count them."""
    last_count, last_change = -1, time.monotonic()
    while time.monotonic() - last_change < 3.0:
        n = arrivals.count()
        if n >= sent:
            break
        if n != last_count:
            last_count, last_change = n, time.monotonic()
        time.sleep(0.05)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        out = [diagnostic_number(diagnostics.values(c), "masks_out") for c in names]
        if all(n is not None and n >= arrivals.count(k) for k, n in enumerate(out)):
            break
        time.sleep(0.1)


def _summary(names: list[str], sent: dict, arrivals: _Arrivals, diagnostics: DiagnosticsListener,
             window_start: int, t_end: int) -> dict:
    """Per camera and in total: what was sent, received, dropped (reported or not), latencies."""
    from cvseg_ros.ros.message_path import DROP_REASONS   # every reason the node counts for no mask

    window_s = max((t_end - window_start) / 1e9, 1e-9)
    per_cam, all_lat, totals = {}, [], dict.fromkeys(
        ("sent", "masks_received", "reported_drops", "unreported_drops", "transport_lost"), 0)
    with arrivals.lock:
        received = dict(arrivals.received)
        duplicates = arrivals.duplicates
    for k, c in enumerate(names):
        keys = [key for key in sent if key[0] == k]
        got = [key for key in keys if key in received]
        lat = [(received[key] - sent[key]) / 1e6 for key in got if sent[key] >= window_start]
        in_window = sum(1 for key in got if window_start <= received[key] <= t_end)
        d = diagnostics.values(c)
        reported = {key: diagnostic_number(d, key) for key in DROP_REASONS if key in d}
        reported_total = sum(v for v in reported.values() if v)
        frames_in = diagnostic_number(d, "frames_in")
        unreported = len(keys) - len(got) - reported_total
        per_cam[c] = {
            "sent": len(keys), "masks_received": len(got),
            "rate_hz": round(in_window / window_s, 2),
            **stats.summary(lat, "latency_ms_"),
            "node_latency_ms_p50": diagnostic_number(d, "latency_ms_p50", float),
            "node_latency_ms_p99": diagnostic_number(d, "latency_ms_p99", float),
            "node_frames_in": frames_in, "node_masks_out": diagnostic_number(d, "masks_out"),
            "transport_lost": None if frames_in is None else len(keys) - frames_in,
            **reported, "reported_drops": reported_total, "unreported_drops": unreported,
            "resyncs": diagnostic_number(d, "resyncs"), "discontinuities": diagnostic_number(d, "discontinuities"),
        }
        all_lat.extend(lat)
        totals["sent"] += len(keys)
        totals["masks_received"] += len(got)
        totals["reported_drops"] += reported_total
        totals["unreported_drops"] += unreported
        totals["transport_lost"] += per_cam[c]["transport_lost"] or 0
    rates = [v["rate_hz"] for v in per_cam.values()]
    return {
        "per_camera": per_cam, **totals, "duplicate_masks": duplicates,
        "rate_hz_min": min(rates), "rate_hz_mean": stats.mean(rates, 2),
        **stats.summary(all_lat, "latency_ms_"),
        "node_latency_ms_p99_max": max((v["node_latency_ms_p99"] for v in per_cam.values()
                                        if v["node_latency_ms_p99"] is not None), default=None),
    }


def node_targets_met(n: dict, targets: dict, fps: float) -> dict[str, bool]:
    """Whether the node run meets ``targets`` (``node_latency_p99_ms_max``, ``node_rate_fraction_min``
    of ``fps``, ``node_unreported_drops_max``)."""
    return {"node_latency_p99": n["latency_ms_p99"] is not None
            and n["latency_ms_p99"] <= targets["node_latency_p99_ms_max"],
            "node_rate": n["rate_hz_min"] >= targets["node_rate_fraction_min"] * fps,
            "node_unreported_drops": n["unreported_drops"] <= targets["node_unreported_drops_max"]}


def node_table(n: dict, targets: dict, met: dict) -> list[str]:
    """The node run as Markdown lines: one row per camera, then the totals against ``targets``."""
    def f(v):
        return "-" if v is None else f"{v:.2f}"

    def ok(key):
        return {True: "met", False: "NOT met", None: "-"}[met.get(key)]
    lines = ["", f"node: {n['cameras']} camera(s) x {n['fps']:g} fps for {n['seconds']:g} s "
                 f"(after {n['warmup_s']:g} s warm-up), {n['qos']} input",
             "| camera | sent | masks | rate Hz | p50 ms | p90 ms | p99 ms | mean ms | node p99 ms | reported drops "
             "| unreported |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c, v in n["per_camera"].items():
        lines.append(f"| {c} | {v['sent']} | {v['masks_received']} | {f(v['rate_hz'])} | "
                     f"{f(v['latency_ms_p50'])} | {f(v['latency_ms_p90'])} | {f(v['latency_ms_p99'])} | "
                     f"{f(v['latency_ms_mean'])} | {f(v['node_latency_ms_p99'])} | "
                     f"{v['reported_drops']} | {v['unreported_drops']} |")
    lines += [f"latency p50 {f(n['latency_ms_p50'])} ms, p90 {f(n['latency_ms_p90'])} ms, mean "
              f"{f(n['latency_ms_mean'])} ms, p99 {f(n['latency_ms_p99'])} ms "
              f"(target <= {targets['node_latency_p99_ms_max']:g}: {ok('node_latency_p99')}); "
              f"min rate {f(n['rate_hz_min'])} Hz ({ok('node_rate')}); unreported drops "
              f"{n['unreported_drops']} ({ok('node_unreported_drops')}); peak RSS {n['peak_rss_mib']} MiB; "
              f"node CPU {n['node_cpu_cores']} cores, {f(n.get('node_cpu_ms_per_mask'))} ms per mask"]
    return lines
