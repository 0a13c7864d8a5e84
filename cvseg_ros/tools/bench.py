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
untimed warm-up. Per pass and method: the median wall time of the I-frames and of the P-frames,
and ``ms_gop``, the ms/frame of :mod:`cvseg_ros.common.timing` (the same figure as ``cvseg eval``'s
``ms_per_frame``; the clip is cut to whole GOPs, so it is the average over a GOP,
(I + (GOP-1) P) / GOP). Reported: the median over the passes.

Ratios: ``per_frame / compressed`` (ms/frame) and ``compressed_p / decode_only`` (P-frames of
both). Then the node under load (:mod:`cvseg_ros.tools.node_load`): ``cvseg_node`` in its own
process, ``--cameras`` camera topics over DDS; rate, latency, drops, peak RSS.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from cvseg_ros.common import procfs, stats, timing
from cvseg_ros.model.checkpoint import CHECKPOINT_HELP

TARGETS = {
    "per_frame_over_compressed_min": 8.0,       # ms/frame at least 8x lower than per_frame's
    "compressed_p_over_decode_only_max": 2.0,   # P-frame end to end at most 2x the decode floor
    "node_latency_p99_ms_max": 100.0,
    "node_rate_fraction_min": 0.97,             # achieved rate per camera >= 97 % of the input rate
    "node_unreported_drops_max": 0,
    "node_cpu_per_mask_over_engine_max": 1.3,   # the node's CPU per mask / the engine's offline ms/frame
}
METHOD_ORDER = ("decode_only", "compressed", "per_frame", "teacher")
TIMING_IS = ("wall time (time.perf_counter) of one call per access unit, from the access unit's bytes to "
             "the method's output (decode_only: the decoded frame and its motion-vector side data; the "
             "others: the class-id mask at the frame's size); ms_i, ms_p: per pass the median of each "
             "frame kind; ms_gop = ms/frame, " + timing.MS_PER_FRAME_IS + " (the clip is whole GOPs); "
             "every figure is the median over the passes")


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


def _round(v, nd=3):
    return None if v is None else round(float(v), nd)


@dataclass
class MethodTimes:
    """One method's figures per pass (:meth:`add_pass`); :meth:`summary`: their medians over the passes."""
    passes: list[dict] = field(default_factory=list)
    missing: int = 0

    def add_pass(self, times_ms: list[float], kinds: list[str | None]) -> None:
        by_kind = timing.kind_medians(times_ms, kinds)
        p_t = [t for t, k in zip(times_ms, kinds) if k == "P"]
        self.missing += kinds.count(None)
        self.passes.append({"ms_i": by_kind.get("I"), "ms_p": by_kind.get("P"),
                            "ms_gop": timing.ms_per_frame(times_ms, kinds),
                            "ms_mean": stats.mean(times_ms), "ms_p_p90": stats.percentile(p_t, 90),
                            "frames_i": kinds.count("I"), "frames_p": len(p_t)})

    def summary(self) -> dict:
        out = {key: _round(timing.median_over_passes(p[key] for p in self.passes))
               for key in ("ms_i", "ms_p", "ms_gop", "ms_mean", "ms_p_p90")}
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
    times = {name: MethodTimes() for name in names}
    bar = tqdm(total=passes * len(names) * len(units), desc="bench offline", unit="frame", disable=not progress)
    try:
        for p in range(passes):
            order = names[p % len(names):] + names[: p % len(names)]
            for name in order:
                step = methods[name](f"{name}_{p}")
                ts, kinds = [], []
                for i, unit in enumerate(units):
                    kind, ms = timing.timed(step, i, unit)
                    ts.append(ms)
                    kinds.append(kind)
                bar.update(len(units))
                bar.set_postfix_str(name)
                times[name].add_pass(ts, kinds)
    finally:
        bar.close()
    return times


def ratios(results: dict) -> dict:
    """``per_frame / compressed`` (ms/frame) and ``compressed_p / decode_only`` (P-frames)."""
    def ratio(a, b):
        return stats.ratio(a, b, 3)
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


# -- the whole bench -----------------------------------------------------------------------------

def machine_info() -> dict:
    import cv2
    import torch

    model = procfs.cpu_model() or platform.processor()
    flags = procfs.cpu_flags()
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

    from cvseg_ros.engine.pipeline import SegmentationEngine, resolve_device
    from cvseg_ros.model.checkpoint import load_checkpoint, resolve_checkpoint

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
    model, meta = load_checkpoint(checkpoint, dev)
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
        from cvseg_ros.tools.node_load import NODE_DOC, node_targets_met, run_node_load
        node_result = run_node_load(units, cameras=cameras, fps=fps, gop=gop, seconds=seconds, warmup=warmup,
                                    device=device, precision=precision, checkpoint=checkpoint, qos=qos,
                                    queue_depth=queue_depth, node_threads=node_threads, domain_id=domain_id,
                                    progress=progress, log=log, error=BenchError)
        node_result["doc"] = NODE_DOC
    met = {
        "per_frame_over_compressed": None if rat["per_frame_over_compressed"] is None
        else rat["per_frame_over_compressed"] >= TARGETS["per_frame_over_compressed_min"],
        "compressed_p_over_decode_only": None if rat["compressed_p_over_decode_only"] is None
        else rat["compressed_p_over_decode_only"] <= TARGETS["compressed_p_over_decode_only_max"],
    }
    if node_result is not None:
        met.update(node_targets_met(node_result, TARGETS, fps))
        # the node's own cost: its CPU per mask against the engine's offline ms/frame (one thread
        # there; the node's torch threads, DDS and conversions are what the ratio adds)
        rat["node_cpu_per_mask_over_engine"] = stats.ratio(node_result.get("node_cpu_ms_per_mask"),
                                                           results["compressed"]["ms_gop"], 3)
        met["node_cpu_per_mask"] = None if rat["node_cpu_per_mask_over_engine"] is None else \
            rat["node_cpu_per_mask_over_engine"] <= TARGETS["node_cpu_per_mask_over_engine_max"]
    machine["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    return {
        "date": started.isoformat(timespec="seconds"),
        "command": command or " ".join(sys.argv),
        "machine": machine,
        "video": str(video), "width": w, "height": h, "frames": len(units), "gop": gop, "fps": fps,
        "passes": passes, "device": str(dev), "precision": precision, "threads": torch.get_num_threads(),
        "checkpoint": str(resolve_checkpoint(checkpoint, dev)), "checkpoint_note": meta.get("note"),
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
             "", "| method | I ms | P ms | ms/frame | mean ms | P p90 ms |", "|---|---:|---:|---:|---:|---:|"]

    def f(v):
        return "-" if v is None else f"{v:.2f}"
    for name, m in result["methods"].items():
        lines.append(f"| {name} | {f(m['ms_i'])} | {f(m['ms_p'])} | {f(m['ms_gop'])} | {f(m['ms_mean'])} "
                     f"| {f(m['ms_p_p90'])} |")
    r, t, met = result["ratios"], result["targets"], result["targets_met"]

    def ok(key):
        return {True: "met", False: "NOT met", None: "-"}[met.get(key)]
    lines += ["", f"per_frame / compressed (ms/frame): {f(r['per_frame_over_compressed'])}x "
                  f"(target >= {t['per_frame_over_compressed_min']:g}x: {ok('per_frame_over_compressed')})",
              f"compressed_p / decode_only (P-frames): {f(r['compressed_p_over_decode_only'])}x "
              f"(target <= {t['compressed_p_over_decode_only_max']:g}x: {ok('compressed_p_over_decode_only')})"]
    if result.get("node"):
        from cvseg_ros.tools.node_load import node_table
        lines += node_table(result["node"], t, met)
        lines.append(f"node CPU per mask / engine offline ms/frame: {f(r.get('node_cpu_per_mask_over_engine'))}x "
                     f"(target <= {t['node_cpu_per_mask_over_engine_max']:g}x: {ok('node_cpu_per_mask')})")
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
    p.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16", "mixed"), default="auto",
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
