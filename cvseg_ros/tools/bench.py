"""`cvseg bench`: what the compressed-domain pipeline costs, against its floor and its baselines.

All in one run, on the same input: a real clip is re-encoded once (``--width`` wide, ``--fps``,
GOP ``--gop``, libx264 I/P as a camera would send it) and every method consumes *the same access
units*:

* ``decode_only`` -- a bare PyAV H.264 decoder with motion-vector export (``flags2=+export_mvs``,
  slice threading, one ``av.Packet`` per access unit, the vectors' side data fetched): the floor;
* ``compressed``  -- :class:`~cvseg_ros.engine.pipeline.SegmentationEngine` in mode ``compressed``, one
  ``process`` call per access unit: access unit in, class-id mask at the published (frame) size out;
* ``per_frame``   -- the same engine in mode ``per_frame``: decode + the I-frame network on every frame;
* ``teacher``     -- with ``--teacher``: decode + the ENet teacher (OpenCV DNN) on every frame.

Methods are interleaved: ``--passes`` passes over the clip, each running every method once (in an
order rotated from pass to pass), each on a fresh stream (new camera: decoder and state), after an
untimed warm-up. Per pass and method: the median wall time of the I-frames and of the P-frames;
``ms_gop`` = (I + (GOP-1) P) / GOP, the average over a GOP. Reported: the median over the passes.

Ratios: ``per_frame / compressed`` (GOP averages) and ``compressed_p / decode_only`` (P-frames of
both). Then the node under load: ``cvseg_node`` in its own process, ``--cameras`` synthetic camera
topics (the same re-encoded clip, looped, I-frames staggered between cameras as unsynchronised
cameras have them) published at ``--fps`` over DDS for ``--seconds`` after ``--warmup`` seconds;
achieved rate per camera, latency (publish -> mask received here, and the node's own
receive -> publish from ``/diagnostics``), drops (reported by the node or not), the node's peak RSS.
"""
from __future__ import annotations

import array
import datetime
import json
import os
import platform
import random
import statistics
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

TARGETS = {
    "per_frame_over_compressed_min": 8.0,       # GOP-12 average at least 8x cheaper than per_frame
    "compressed_p_over_decode_only_max": 2.0,   # P-frame end to end at most 2x the decode floor
    "node_latency_p99_ms_max": 100.0,
    "node_rate_fraction_min": 0.97,             # achieved rate per camera >= 97 % of the input rate
    "node_unreported_drops_max": 0,
}
METHOD_ORDER = ("decode_only", "compressed", "per_frame", "teacher")
TIMING_IS = ("wall time (time.perf_counter) of one call per access unit, from the access unit's bytes to "
             "the method's output (decode_only: the decoded frame and its motion-vector side data; the "
             "others: the class-id mask at the frame's size); per pass the median of each frame kind; "
             "ms_gop = (ms_i + (gop - 1) * ms_p) / gop; every figure is the median over the passes")


class BenchError(RuntimeError):
    pass


# -- input ---------------------------------------------------------------------------------------

def prepare_units(video: str | Path, *, frames: int, width: int | None, fps: float, gop: int,
                  height: int | None = None, crf: int = 23) -> tuple[list[bytes], int, int]:
    """The clip's first ``frames`` frames at ``width`` x ``height`` (centre-cropped to that aspect
    first; ``height`` None: the clip's aspect; ``width`` None: the clip's size), encoded to H.264
    I/P with GOP ``gop``; cut to whole GOPs (so that it loops cleanly). Returns (units, width, height)."""
    import cv2

    from cvseg_ros.training.data import fit_frame
    from cvseg_ros.codec.video import encode_frames, even_size, read_frames

    video = Path(video)
    if not video.is_file():
        raise FileNotFoundError(f"no such video: {video}")
    if gop < 2:
        raise ValueError("--gop must be >= 2 (the bench compares I- and P-frames)")
    rgbs = []
    for rgb in read_frames(video, frames):
        if width and height:
            if rgb.shape[:2] != (height, width):
                rgb = fit_frame(rgb, (height, width))
        elif width and rgb.shape[1] != width:
            h = max(2, round(rgb.shape[0] * width / rgb.shape[1]))
            rgb = cv2.resize(rgb, (width, h), interpolation=cv2.INTER_AREA)
        rgbs.append(np.ascontiguousarray(even_size(rgb)))
    whole = len(rgbs) // gop * gop
    if whole == 0:
        raise BenchError(f"{video}: {len(rgbs)} frames read, at least one GOP ({gop}) is needed")
    rgbs = rgbs[:whole]
    units = encode_frames(rgbs, fps, gop, crf=crf)
    if len(units) != whole:
        raise BenchError(f"the encoder returned {len(units)} access units for {whole} frames")
    return units, rgbs[0].shape[1], rgbs[0].shape[0]


# -- the offline methods -------------------------------------------------------------------------

# a method: new_stream(name) -> step(index, unit) -> the kind of the frame it output ("I"/"P") or None
Stepper = Callable[[int, bytes], "str | None"]


def decode_only_method() -> Callable[[str], Stepper]:
    import av

    def new_stream(_name: str) -> Stepper:
        codec = av.CodecContext.create("h264", "r")
        codec.options = {"flags2": "+export_mvs"}
        codec.thread_type = "SLICE"

        def step(_i: int, unit: bytes):
            kind = None
            for frame in codec.decode(av.Packet(unit)):
                frame.side_data.get("MOTION_VECTORS")
                kind = "I" if int(frame.pict_type) == 1 or frame.key_frame else "P"
            return kind
        return step
    return new_stream


def engine_method(engine) -> Callable[[str], Stepper]:
    def new_stream(name: str) -> Stepper:
        engine.add_camera(name)   # its decoder is made here, not in the first timed call

        def step(i: int, unit: bytes):
            results = engine.process([(name, unit, i)])
            return results[0].kind if results else None
        return step
    return new_stream


def teacher_method(teacher) -> Callable[[str], Stepper]:
    from cvseg_ros.codec.decoder import H264StreamDecoder

    def new_stream(name: str) -> Stepper:
        decoder = H264StreamDecoder(name, rgb_for_p_frames=True, motion=False)

        def step(i: int, unit: bytes):
            kind = None
            for f in decoder.feed(unit, i):
                teacher.predict_camvid(f.rgb)
                kind = f.kind
            return kind
        return step
    return new_stream


def _median(values):
    return float(statistics.median(values)) if values else None


def _round(v, nd=3):
    return None if v is None else round(float(v), nd)


@dataclass
class MethodTimes:
    gop: int
    passes: list[dict] = field(default_factory=list)
    missing: int = 0

    def add_pass(self, times_ms: list[float], kinds: list[str | None]) -> None:
        i_t = [t for t, k in zip(times_ms, kinds) if k == "I"]
        p_t = [t for t, k in zip(times_ms, kinds) if k == "P"]
        self.missing += sum(1 for k in kinds if k is None)
        ms_i, ms_p = _median(i_t), _median(p_t)
        ms_gop = (ms_i + (self.gop - 1) * ms_p) / self.gop if ms_i is not None and ms_p is not None else None
        self.passes.append({"ms_i": ms_i, "ms_p": ms_p, "ms_gop": ms_gop,
                            "ms_mean": float(np.mean(times_ms)) if times_ms else None,
                            "ms_p_p90": float(np.percentile(p_t, 90)) if p_t else None,
                            "frames_i": len(i_t), "frames_p": len(p_t)})

    def summary(self) -> dict:
        out = {}
        for key in ("ms_i", "ms_p", "ms_gop", "ms_mean", "ms_p_p90"):
            out[key] = _round(_median([p[key] for p in self.passes if p[key] is not None]))
        out["frames_per_pass"] = self.passes[0]["frames_i"] + self.passes[0]["frames_p"] if self.passes else 0
        out["missing_outputs"] = self.missing
        out["passes"] = [{k: _round(v) if isinstance(v, float) else v for k, v in p.items()} for p in self.passes]
        return out


def run_offline(units: list[bytes], methods: dict[str, Callable[[str], Stepper]], *, gop: int, passes: int,
                progress: bool = True) -> dict[str, MethodTimes]:
    """Interleaved passes (see the module docstring). Returns the times of every method."""
    from tqdm import tqdm

    names = list(methods)
    warm = units[: min(len(units), gop + 2)]
    for name in names:   # lazy initialisation (kernels, allocations, first decode) is not timed
        step = methods[name](f"{name}_warmup")
        for i, unit in enumerate(warm):
            step(i, unit)
    times = {name: MethodTimes(gop) for name in names}
    bar = tqdm(total=passes * len(names) * len(units), desc="bench offline", unit="frame", disable=not progress)
    try:
        for p in range(passes):
            order = names[p % len(names):] + names[: p % len(names)]
            for name in order:
                step = methods[name](f"{name}_{p}")
                ts, kinds = [], []
                for i, unit in enumerate(units):
                    start = time.perf_counter()
                    kind = step(i, unit)
                    ts.append(1000.0 * (time.perf_counter() - start))
                    kinds.append(kind)
                bar.update(len(units))
                bar.set_postfix_str(name)
                times[name].add_pass(ts, kinds)
    finally:
        bar.close()
    return times


def ratios(results: dict) -> dict:
    """``per_frame / compressed`` (GOP averages) and ``compressed_p / decode_only`` (P-frames)."""
    def ratio(a, b):
        return None if a is None or b is None or b <= 0 else round(a / b, 3)
    comp, pf, dec = results.get("compressed"), results.get("per_frame"), results.get("decode_only")
    out = {
        "per_frame_over_compressed": ratio(pf and pf["ms_gop"], comp and comp["ms_gop"]),
        "compressed_p_over_decode_only": ratio(comp and comp["ms_p"], dec and dec["ms_p"]),
        "per_frame_over_compressed_p": ratio(pf and pf["ms_p"], comp and comp["ms_p"]),
        "compressed_gop_over_decode_only": ratio(comp and comp["ms_gop"], dec and dec["ms_gop"]),
    }
    if results.get("teacher"):
        out["teacher_over_compressed"] = ratio(results["teacher"]["ms_gop"], comp and comp["ms_gop"])
    return out


# -- the node under load -------------------------------------------------------------------------

def _proc_status(pid: int) -> dict:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024.0   # kB -> MiB
    except OSError:
        pass
    return out


def _proc_cpu_s(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _stamp_of_raw_image(raw: bytes) -> int:
    """Header stamp of a CDR-serialised sensor_msgs/Image (4-byte encapsulation, then sec, nanosec)."""
    sec, nsec = struct.unpack_from("<iI" if raw[1] & 1 else ">iI", raw, 4)   # CDR_LE / CDR_BE
    return sec * 1_000_000_000 + nsec


def _pct(values, q):
    return round(float(np.percentile(values, q)), 2) if len(values) else None


def _mean(values) -> float | None:
    return round(float(np.mean(values)), 2) if len(values) else None


def run_node_load(units: list[bytes], *, cameras: int, fps: float, gop: int, seconds: float, warmup: float,
                  device: str = "auto", checkpoint: str | None = None, qos: str = "best_effort",
                  queue_depth: int | None = None, node_threads: int | None = None, domain_id: int | None = None,
                  startup_timeout: float = 180.0, workdir: Path | None = None, progress: bool = True,
                  log: Callable[[str], None] = print) -> dict:
    """Start ``cvseg_node`` in a subprocess, publish ``cameras`` H.264 topics into it at ``fps``
    (each camera loops ``units``; camera k starts k * GOP / cameras frames later) for
    ``warmup + seconds`` seconds, and measure it (see :data:`NODE_DOC`)."""
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CompressedImage, Image
    from tqdm import tqdm

    from cvseg_ros.tools.demo import node_command, params_file, stop_process, wait_for_node

    if cameras < 1:
        raise ValueError("--cameras must be >= 1")
    names = [f"bench{k}" for k in range(cameras)]
    topics = {c: f"/{c}/image_raw/h264" for c in names}
    overrides = {"cameras": "[" + ",".join(names) + "]", "device": device, "qos_reliability": qos,
                 "diagnostics_period": "0.5"}
    overrides.update({f"{c}.topic": t for c, t in topics.items()})
    if checkpoint:
        overrides["checkpoint"] = str(Path(checkpoint).resolve())
    if queue_depth:
        overrides["queue_depth"] = str(queue_depth)
    if node_threads:
        overrides["threads"] = str(node_threads)
    if domain_id is None:
        domain_id = random.SystemRandom().randint(1, 200)
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain_id), PYTHONUNBUFFERED="1")
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", env["ROS_AUTOMATIC_DISCOVERY_RANGE"])
    workdir = Path(workdir) if workdir else Path(os.environ.get("TMPDIR", "/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    node_log = workdir / f"bench_node_{domain_id}.log"
    cmd = node_command(params_file(), overrides)

    period_ns = int(round(1e9 / fps))
    stagger = max(1, gop // cameras) if cameras > 1 else 0
    per_camera_frames = int(round((warmup + seconds) * fps))
    lock = threading.Lock()
    sent: dict[tuple[int, int], int] = {}          # (camera, stamp) -> monotonic ns after publish
    sent_count = [0] * cameras
    received: dict[tuple[int, int], int] = {}      # (camera, stamp) -> monotonic ns on arrival
    duplicates = [0]
    diagnostics: dict[str, dict] = {}
    node_samples: list[dict] = []

    ctx = rclpy.context.Context()
    rclpy.init(context=ctx, domain_id=domain_id)
    node = rclpy.create_node("cvseg_bench", context=ctx)
    in_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, durability=DurabilityPolicy.VOLATILE,
                        reliability=ReliabilityPolicy.RELIABLE if qos == "reliable" else ReliabilityPolicy.BEST_EFFORT)
    out_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=200, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)
    pubs = [node.create_publisher(CompressedImage, topics[c], in_qos) for c in names]

    def on_mask(k: int, raw: bytes) -> None:
        now = time.monotonic_ns()
        key = (k, _stamp_of_raw_image(raw))
        with lock:
            if key in received:
                duplicates[0] += 1
            else:
                received[key] = now

    def on_diag(msg) -> None:
        with lock:
            for status in msg.status:
                if status.hardware_id in names:
                    diagnostics[status.hardware_id] = {kv.key: kv.value for kv in status.values}

    # masks only (raw, no deserialisation here): the node still makes and publishes the colour images
    for k, c in enumerate(names):
        node.create_subscription(Image, f"/{c}/semantic/mask", lambda raw, k=k: on_mask(k, raw), out_qos,
                                 raw=True)
    node.create_subscription(DiagnosticArray, "/diagnostics", on_diag, 10)
    executor = SingleThreadedExecutor(context=ctx)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, name="bench_spin", daemon=True)
    spinner.start()

    # messages made once (converting bytes to a uint8[] field is slow in Python)
    messages = []
    for k, c in enumerate(names):
        msgs = []
        for unit in units:
            m = CompressedImage()
            m.header.frame_id = c
            m.format = "h264"
            m.data = array.array("B", unit)
            msgs.append(m)
        messages.append(msgs)

    result: dict = {"cameras": cameras, "fps": fps, "seconds": seconds, "warmup_s": warmup, "qos": qos,
                    "stagger_frames": stagger, "domain_id": domain_id, "node_log": str(node_log),
                    "node_command": " ".join(cmd[1:])}
    log(f"[bench] node: {cameras} camera(s) x {fps:g} fps, {warmup:g} s warm-up + {seconds:g} s "
        f"(ROS_DOMAIN_ID={domain_id}); log {node_log}")
    with open(node_log, "w") as node_out:
        proc = subprocess.Popen(cmd, env=env, stdout=node_out, stderr=subprocess.STDOUT)
        try:
            wait_for_node(proc, lambda: all(p.get_subscription_count() > 0 for p in pubs)
                          and all(node.count_publishers(f"/{c}/semantic/mask") > 0 for c in names),
                          startup_timeout, node_log, "come up", BenchError)
            time.sleep(1.0)   # let discovery settle on both sides (reliable outputs matched)
            rss_idle = _proc_status(proc.pid)
            cpu0 = _proc_cpu_s(proc.pid)
            base_stamp = time.time_ns()
            total_ticks = per_camera_frames + (cameras - 1) * stagger
            t0 = time.monotonic_ns() + 50_000_000
            bar = tqdm(total=total_ticks, desc="bench node", unit="tick", disable=not progress)
            for tick in range(total_ticks):
                target = t0 + tick * period_ns
                delay = (target - time.monotonic_ns()) / 1e9
                if delay > 0:
                    time.sleep(delay)
                if proc.poll() is not None:
                    raise BenchError(f"the node died during the run (status {proc.returncode}, see {node_log})")
                stamp = base_stamp + tick * period_ns
                for k in range(cameras):
                    j = tick - k * stagger
                    if j < 0 or j >= per_camera_frames:
                        continue
                    msg = messages[k][j % len(units)]
                    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
                    pubs[k].publish(msg)
                    now = time.monotonic_ns()
                    with lock:
                        sent[(k, stamp)] = now
                        sent_count[k] += 1
                if tick % 15 == 0:
                    node_samples.append(_proc_status(proc.pid))
                bar.update(1)
            bar.close()
            t_end = time.monotonic_ns()
            cpu1 = _proc_cpu_s(proc.pid)
            # wait for the last masks, then for diagnostics that include them
            last_count, last_change = -1, time.monotonic()
            while time.monotonic() - last_change < 3.0:
                with lock:
                    n = len(received)
                if n >= sum(sent_count):
                    break
                if n != last_count:
                    last_count, last_change = n, time.monotonic()
                time.sleep(0.05)
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                with lock:
                    done = all(int(float(diagnostics.get(c, {}).get("masks_out", -1)))
                               >= sum(1 for key in received if key[0] == k) for k, c in enumerate(names))
                if done:
                    break
                time.sleep(0.1)
            time.sleep(0.6)
            status = _proc_status(proc.pid)
        finally:
            exit_code = stop_process(proc)
            executor.shutdown(timeout_sec=5)
            spinner.join(timeout=5)
            node.destroy_node()
            rclpy.try_shutdown(context=ctx)

    window_start = t0 + int(warmup * 1e9)
    window_s = max((t_end - window_start) / 1e9, 1e-9)
    per_cam, all_lat, totals = {}, [], dict.fromkeys(
        ("sent", "masks_received", "reported_drops", "unreported_drops", "transport_lost"), 0)
    try:   # every reason the node counts for a message that got no mask
        from cvseg_ros.ros.message_path import DROP_REASONS as reported_keys
    except ImportError:
        reported_keys = ("queue_drops", "decode_errors", "skipped_before_keyframe", "b_frames", "wrong_format",
                         "engine_errors")
    with lock:
        for k, c in enumerate(names):
            keys = [key for key in sent if key[0] == k]
            got = [key for key in keys if key in received]
            lat = [(received[key] - sent[key]) / 1e6 for key in got if sent[key] >= window_start]
            in_window = sum(1 for key in got if window_start <= received[key] <= t_end)
            d = diagnostics.get(c, {})

            def num(key, d=d):
                try:
                    return int(float(d[key]))
                except (KeyError, ValueError):
                    return None
            reported = {key: num(key) for key in reported_keys if key in d}
            reported_total = sum(v for v in reported.values() if v)
            frames_in = num("frames_in")
            unreported = len(keys) - len(got) - reported_total
            per_cam[c] = {
                "sent": len(keys), "masks_received": len(got),
                "rate_hz": round(in_window / window_s, 2),
                "latency_ms_p50": _pct(lat, 50), "latency_ms_p90": _pct(lat, 90), "latency_ms_p99": _pct(lat, 99),
                "latency_ms_max": _pct(lat, 100), "latency_ms_mean": _mean(lat),
                "node_latency_ms_p50": float(d["latency_ms_p50"]) if "latency_ms_p50" in d else None,
                "node_latency_ms_p99": float(d["latency_ms_p99"]) if "latency_ms_p99" in d else None,
                "node_frames_in": frames_in, "node_masks_out": num("masks_out"),
                "transport_lost": None if frames_in is None else len(keys) - frames_in,
                **reported, "reported_drops": reported_total, "unreported_drops": unreported,
                "resyncs": num("resyncs"), "discontinuities": num("discontinuities"),
            }
            all_lat.extend(lat)
            totals["sent"] += len(keys)
            totals["masks_received"] += len(got)
            totals["reported_drops"] += reported_total
            totals["unreported_drops"] += unreported
            totals["transport_lost"] += per_cam[c]["transport_lost"] or 0
        dup = duplicates[0]
    rates = [v["rate_hz"] for v in per_cam.values()]
    peak = max([s.get("VmHWM", 0.0) for s in node_samples] + [status.get("VmHWM", 0.0)])
    result.update({
        "per_camera": per_cam, **totals, "duplicate_masks": dup,
        "rate_hz_min": min(rates), "rate_hz_mean": round(float(np.mean(rates)), 2),
        "latency_ms_p50": _pct(all_lat, 50), "latency_ms_p90": _pct(all_lat, 90), "latency_ms_p99": _pct(all_lat, 99),
        "latency_ms_max": _pct(all_lat, 100), "latency_ms_mean": _mean(all_lat),
        "node_latency_ms_p99_max": max((v["node_latency_ms_p99"] for v in per_cam.values()
                                        if v["node_latency_ms_p99"] is not None), default=None),
        "peak_rss_mib": round(peak, 1), "idle_rss_mib": round(rss_idle.get("VmRSS", 0.0), 1),
        "node_cpu_cores": round((cpu1 - cpu0) / ((t_end - t0) / 1e9), 2) if cpu0 is not None and cpu1 is not None else None,
        "node_exit_code": exit_code,
    })
    return result


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
}


# -- the whole bench -----------------------------------------------------------------------------

def machine_info() -> dict:
    import cv2
    import torch

    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return {"cpu": model, "cpus": os.cpu_count(), "load_avg": [round(v, 2) for v in os.getloadavg()],
            "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_bf16" in flags,
            "python": platform.python_version(), "torch": torch.__version__, "opencv": cv2.__version__,
            "torch_threads_default": torch.get_num_threads(), "hostname": platform.node()}


def bench(video: str | Path, *, cameras: int = 4, device: str = "auto", frames: int = 120, width: int | None = 480,
          height: int | None = 360, fps: float = 30.0, gop: int = 12, passes: int = 5, teacher: str | None = None,
          checkpoint: str | None = None, precision: str = "auto", threads: int | None = None,
          node: bool = True, seconds: float = 20.0, warmup: float = 3.0, qos: str = "best_effort",
          queue_depth: int | None = None, node_threads: int | None = None, domain_id: int | None = None,
          progress: bool = True, log: Callable[[str], None] = print, command: str | None = None) -> dict:
    """Run everything (see the module docstring); returns the JSON-ready result.

    ``command``: the command line to record (default: this process's argv)."""
    import torch

    from cvseg_ros.model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
    from cvseg_ros.engine.pipeline import SegmentationEngine, resolve_device

    if passes < 1:
        raise ValueError("--passes must be >= 1")
    started = datetime.datetime.now(datetime.timezone.utc)
    machine = machine_info()
    dev = resolve_device(device)
    units, w, h = prepare_units(video, frames=frames, width=width, height=height, fps=fps, gop=gop)
    log(f"[bench] {len(units)} frames {w}x{h}, GOP {gop}, {fps:g} fps, "
        f"{sum(map(len, units)) * 8 * fps / len(units) / 1000:.0f} kbit/s; device {dev}; {passes} passes")
    if threads:
        torch.set_num_threads(threads)
    model, meta = load_checkpoint(checkpoint or DEFAULT_CHECKPOINT, dev)
    methods = {"decode_only": decode_only_method()}
    for mode in ("compressed", "per_frame"):
        engine = SegmentationEngine(model=model, metadata=meta, device=str(dev), mode=mode,
                                    precision=precision, threads=threads)
        methods[mode] = engine_method(engine)
    precision = getattr(engine, "precision", precision)   # resolved ("auto" -> what this machine runs)
    if teacher:
        from cvseg_ros.training.teacher import Teacher
        methods["teacher"] = teacher_method(Teacher(teacher, threads=threads))
    times = run_offline(units, methods, gop=gop, passes=passes, progress=progress)
    results = {name: times[name].summary() for name in METHOD_ORDER if name in times}
    rat = ratios(results)
    node_result = None
    if node:
        node_result = run_node_load(units, cameras=cameras, fps=fps, gop=gop, seconds=seconds, warmup=warmup,
                                    device=device, checkpoint=checkpoint, qos=qos, queue_depth=queue_depth,
                                    node_threads=node_threads, domain_id=domain_id, progress=progress, log=log)
        node_result["doc"] = NODE_DOC
    met = {
        "per_frame_over_compressed": None if rat["per_frame_over_compressed"] is None
        else rat["per_frame_over_compressed"] >= TARGETS["per_frame_over_compressed_min"],
        "compressed_p_over_decode_only": None if rat["compressed_p_over_decode_only"] is None
        else rat["compressed_p_over_decode_only"] <= TARGETS["compressed_p_over_decode_only_max"],
    }
    if node_result is not None:
        met["node_latency_p99"] = node_result["latency_ms_p99"] is not None and \
            node_result["latency_ms_p99"] <= TARGETS["node_latency_p99_ms_max"]
        met["node_rate"] = node_result["rate_hz_min"] >= TARGETS["node_rate_fraction_min"] * fps
        met["node_unreported_drops"] = node_result["unreported_drops"] <= TARGETS["node_unreported_drops_max"]
    machine["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    return {
        "date": started.isoformat(timespec="seconds"),
        "command": command or " ".join(sys.argv),
        "machine": machine,
        "video": str(video), "width": w, "height": h, "frames": len(units), "gop": gop, "fps": fps,
        "passes": passes, "device": str(dev), "precision": precision, "threads": torch.get_num_threads(),
        "checkpoint": str(checkpoint or DEFAULT_CHECKPOINT), "checkpoint_note": meta.get("note"),
        "timing_is": TIMING_IS,
        "methods": results,
        "ratios": rat,
        "targets": TARGETS,
        "targets_met": met,
        "node": node_result,
    }


def table(result: dict) -> str:
    lines = [f"{result['frames']} frames {result['width']}x{result['height']}, GOP {result['gop']}, "
             f"{result['fps']:g} fps, {result['passes']} passes, device {result['device']} "
             f"({result['threads']} torch threads, {result['precision']}); {result['machine']['cpu']}",
             "", "| method | I ms | P ms | GOP avg ms | mean ms | P p90 ms |", "|---|---:|---:|---:|---:|---:|"]

    def f(v):
        return "-" if v is None else f"{v:.2f}"
    for name, m in result["methods"].items():
        lines.append(f"| {name} | {f(m['ms_i'])} | {f(m['ms_p'])} | {f(m['ms_gop'])} | {f(m['ms_mean'])} "
                     f"| {f(m['ms_p_p90'])} |")
    r, t, met = result["ratios"], result["targets"], result["targets_met"]

    def ok(key):
        return {True: "met", False: "NOT met", None: "-"}[met.get(key)]
    lines += ["", f"per_frame / compressed (GOP average): {f(r['per_frame_over_compressed'])}x "
                  f"(target >= {t['per_frame_over_compressed_min']:g}x: {ok('per_frame_over_compressed')})",
              f"compressed_p / decode_only (P-frames): {f(r['compressed_p_over_decode_only'])}x "
              f"(target <= {t['compressed_p_over_decode_only_max']:g}x: {ok('compressed_p_over_decode_only')})"]
    n = result.get("node")
    if n:
        lines += ["", f"node: {n['cameras']} camera(s) x {n['fps']:g} fps for {n['seconds']:g} s "
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
                  f"(target <= {t['node_latency_p99_ms_max']:g}: {ok('node_latency_p99')}); "
                  f"min rate {f(n['rate_hz_min'])} Hz ({ok('node_rate')}); unreported drops "
                  f"{n['unreported_drops']} ({ok('node_unreported_drops')}); peak RSS {n['peak_rss_mib']} MiB; "
                  f"node CPU {n['node_cpu_cores']} cores"]
    return "\n".join(lines) + "\n"


# -- CLI -----------------------------------------------------------------------------------------

def register(sub) -> None:
    p = sub.add_parser("bench", help="decode floor vs compressed vs per-frame (interleaved, medians), "
                                     "then the node under N cameras over DDS")
    p.add_argument("--video", required=True, help="a real clip (any codec: it is re-encoded to H.264 I/P)")
    p.add_argument("--json", dest="json_out", required=True, help="result JSON path")
    p.add_argument("--cameras", type=int, default=4, help="cameras replayed into the node (default 4)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--frames", type=int, default=120, help="frames of the clip used (whole GOPs; default 120)")
    p.add_argument("--width", type=int, default=480, help="re-encode at this width (0 = the clip's size; default 480)")
    p.add_argument("--height", type=int, default=360,
                   help="and this height, centre-cropped to the aspect first (0 = keep the clip's aspect; default 360)")
    p.add_argument("--fps", type=float, default=30.0, help="frame rate of the stream (default 30)")
    p.add_argument("--gop", type=int, default=12)
    p.add_argument("--passes", type=int, default=5, help="interleaved passes (default 5)")
    p.add_argument("--teacher", default=None, help="ENet teacher .net: adds the 'teacher' method")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "mixed"), default="auto",
                   help="auto (the engine's default: mixed on a CPU with native bf16, else fp32), fp32, bf16, mixed")
    p.add_argument("--threads", type=int, default=None, help="torch/OpenCV threads of the offline part")
    p.add_argument("--no-node", action="store_true", help="skip the node under load")
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds of the node run (default 20)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds published before measuring (default 3)")
    p.add_argument("--qos", choices=("best_effort", "reliable"), default="best_effort",
                   help="input QoS of the node run (default best_effort, the node's default)")
    p.add_argument("--queue-depth", type=int, default=None, help="node queue_depth (default: the node's)")
    p.add_argument("--node-threads", type=int, default=None, help="node threads parameter (default: the node's)")
    p.add_argument("--domain-id", type=int, default=None, help="ROS_DOMAIN_ID (default random 1..200)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_main)


def _main(args) -> int:
    try:
        result = bench(args.video, cameras=args.cameras, device=args.device, frames=args.frames,
                       width=args.width or None, height=args.height or None, fps=args.fps, gop=args.gop, passes=args.passes,
                       teacher=args.teacher, checkpoint=args.checkpoint, precision=args.precision,
                       threads=args.threads, node=not args.no_node, seconds=args.seconds, warmup=args.warmup,
                       qos=args.qos, queue_depth=args.queue_depth,
                       node_threads=args.node_threads, domain_id=args.domain_id,
                       progress=not args.no_progress, command=getattr(args, "command_line", None))
    except BenchError as exc:
        print(f"cvseg bench: error: {exc}", file=sys.stderr)
        return 1
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print()
    print(table(result))
    print(f"wrote {out}")
    return 0
