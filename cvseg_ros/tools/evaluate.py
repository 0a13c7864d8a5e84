"""`cvseg eval`: accuracy and speed of the compressed-domain model against its baselines.

Labelled frames (sorted PNGs + CamVid label PNGs) are encoded once with :func:`video.encode_frames`
(libx264, GOP ``gop``, I/P only unless ``--bframes N``); every method then segments the *same*
access units, one :meth:`SegmentationEngine.process` call per unit (one camera), timed end to end
(access unit in, mask at frame size out; with B-frames a unit's call gives the masks of the
pictures it completes, in display order):

* ``compressed``       -- the improved checkpoint (``--checkpoint``: ``fast``, ``accurate``, a path;
  several at once give ``compressed@fast``, ``compressed@accurate``, ...), mode ``compressed``
  (the paper's method);
* ``compressed_no_matching`` -- the same with its luma matching switched off (the engine's and the
  node's ``luma_matching=False``: less time, less accuracy; only for a checkpoint that matches luma);
* ``compressed_no_branch`` -- the same without its P-frame branch (the engine's
  ``p_frame_branch=False``: the I-frame's logits warped along the luma-matched accumulated motion,
  no CNN, ConvLSTM or correction head; an ablation, for a checkpoint that accumulates the motion);
* ``compressed_paper`` -- the paper-faithful checkpoint, mode ``compressed`` (if that file exists);
* ``per_frame``        -- the improved checkpoint's I-frame network on every frame;
* ``iframe_copy``      -- the I-frame mask repeated over the GOP (the paper's baseline);
* ``teacher``          -- the ENet teacher (OpenCV DNN) on every decoded frame (with ``--teacher``).

Metrics are those of :mod:`cvseg_ros.tools.metrics` (void ignored, "no class" predictions wrong).
Outputs (:mod:`cvseg_ros.tools.eval_report`): a JSON file, a Markdown table ``eval.md`` and a plot
``miou_by_gop.png``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cvseg_ros.common import stats
from cvseg_ros.common.timing import MS_PER_FRAME_IS
from cvseg_ros.model.checkpoint import CHECKPOINT_HELP, PACKAGE_CHECKPOINT_DIR
from cvseg_ros.model.classes import CAMVID_CLASSES
from cvseg_ros.tools.eval_data import load_labelled_frames
from cvseg_ros.tools.eval_runs import WARMUP_UNITS, MethodRun, Segmenter, engine_segmenter, run_method, \
    teacher_segmenter, time_pass
from cvseg_ros.tools.metrics import MIOU_CLASSES, nan_to_none
from cvseg_ros.training.ensemble import REFERENCE

PAPER_CHECKPOINT = PACKAGE_CHECKPOINT_DIR / "cvseg_paper.safetensors"
METHODS = ("compressed", "compressed_no_matching", "compressed_no_branch", "compressed_paper", "per_frame",
           "iframe_copy", "teacher")
ENGINE_MODES = {"compressed": "compressed", "compressed_no_matching": "compressed",
                "compressed_no_branch": "compressed", "compressed_paper": "compressed",
                "per_frame": "per_frame", "iframe_copy": "iframe_copy"}
TIMING = ("per-access-unit wall time (time.perf_counter) of one call that takes the access unit to the "
          "mask at frame size: SegmentationEngine.process (decode + network + mask), or for the teacher "
          "H264StreamDecoder.feed + Teacher.predict_camvid; after a warm-up on a separate camera. "
          "ms_per_frame (the figure of cvseg bench's ms_gop too): " + MS_PER_FRAME_IS + "; the engine's "
          "methods make timing_passes passes, the first scored, the others interleaved (one pass of each "
          "method in turn, the order rotated), ms_per_frame_passes the per-pass figures, so that a drift "
          "of the machine's speed during the run does not favour one method; ms_per_frame_by_kind: the "
          "median over the passes of each kind's median; ms_per_frame_median and ms_per_frame_mean are "
          "the plain median and mean over all timed frames")


# -- the evaluation -------------------------------------------------------------------------------
def evaluate(frames_dir: str | Path, labels_dir: str | Path, *, max_frames: int | None = None,
             sequence: str = "", **options) -> dict:
    """:func:`evaluate_frames` on labelled stills (PNG or JPEG frames, CamVid label PNGs; those of
    one ``sequence``, a name prefix, when given)."""
    frames, labels, names = load_labelled_frames(frames_dir, labels_dir, max_frames, sequence)
    return evaluate_frames(frames, labels, source={"frames_dir": str(frames_dir), "labels_dir": str(labels_dir),
                                                   "first_frame": names[0], "last_frame": names[-1],
                                                   "sequence": sequence}, **options)


def evaluate_video(video: str | Path, *, frame_step: int = 2, start: int = 0, max_frames: int | None = None,
                   width: int = 0, fps: float | None = None, confidence: float = 0.5,
                   teachers: Sequence | None = None, reference: Sequence[str] = REFERENCE, **options) -> dict:
    """:func:`evaluate_frames` on an unlabelled video file at its own size (or ``width``), scored
    against the Cityscapes teachers' ensemble on its clean frames (:mod:`cvseg_ros.tools.reference`):
    ``teachers`` as built, else those named in ``reference``."""
    from cvseg_ros.tools.eval_data import video_frames
    from cvseg_ros.tools.reference import reference_labels
    from cvseg_ros.training.ensemble import default_teachers

    frames, video_fps = video_frames(video, step=frame_step, start=start, max_frames=max_frames, width=width)
    if teachers is None:
        teachers = default_teachers(options.get("threads"), options.get("log", print), names=reference)
    labels = reference_labels(frames, teachers, confidence=confidence, progress=options.get("progress", True))
    void = float(np.mean([np.mean(lab == len(CAMVID_CLASSES)) for lab in labels]))
    source = {"video": str(video), "frame_step": frame_step, "start_frame": start,
              "reference": [t.name for t in teachers], "reference_confidence": confidence,
              "reference_void_share": round(void, 4)}
    return evaluate_frames(frames, labels, source=source, fps=fps or video_fps, **options)


def evaluate_frames(frames: list[np.ndarray], labels: Sequence[np.ndarray], *, source: dict,
                    fps: float = 15.0, gop: int = 12, checkpoint: str | Path | None = None,
                    paper_checkpoint: str | Path | None = None, teacher: str | Path | None = None,
                    methods: Sequence[str] | None = None, device: str = "auto", precision: str = "auto",
                    threads: int | None = None, crf: int = 23, progress: bool = True, timing_passes: int = 3,
                    bframes: int = 0, log: Callable[[str], None] = print) -> dict:
    """Run the methods over the same access units (``frames`` encoded once) and score them against
    ``labels`` (void 11); returns the JSON-ready result (NaN -> None), ``source`` (where the frames
    and labels came from) included. ``timing_passes``: passes over the stream timed per engine
    method (see :data:`TIMING`). ``bframes``: B-frames between the I/P pictures of the encoded
    stream. ``frames`` is emptied once encoded."""
    from cvseg_ros.model.checkpoint import load_checkpoint
    from cvseg_ros.engine.pipeline import SegmentationEngine, resolve_device, resolve_precision
    from cvseg_ros.codec.video import encode_frames

    if gop < 1:
        raise ValueError(f"--gop must be >= 1, got {gop}")
    explicit = methods is not None
    methods = list(methods) if explicit else [m for m in METHODS if m != "teacher" or teacher]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")

    skipped: dict[str, str] = {}
    if "compressed_paper" in methods:
        if paper_checkpoint:
            paper_checkpoint = Path(paper_checkpoint)
            if not paper_checkpoint.exists():
                raise FileNotFoundError(f"paper checkpoint not found: {paper_checkpoint}")
        elif PAPER_CHECKPOINT.exists():
            paper_checkpoint = PAPER_CHECKPOINT
        else:
            skipped["compressed_paper"] = f"no paper checkpoint ({PAPER_CHECKPOINT} does not exist)"
            log(f"note: skipping compressed_paper: {skipped['compressed_paper']}")
            methods.remove("compressed_paper")
    teacher_model = None
    if "teacher" in methods:
        from cvseg_ros.training.teacher import Teacher
        # None -> the default path (FileNotFoundError if absent); threads: cv2.setNumThreads
        teacher_model = Teacher(teacher, threads=threads)

    dev = resolve_device(device)
    checkpoints = checkpoint_labels(checkpoint, dev)
    order: list[int] = []
    units = encode_frames(frames, fps, gop, crf=crf, bframes=bframes, presentation=order)
    if len(units) != len(frames):
        raise RuntimeError(f"encoder returned {len(units)} access units for {len(frames)} frames")
    height, width = frames[0].shape[:2]
    frames.clear()
    log(f"{len(units)} frames {width}x{height}, GOP {gop}, {bframes} B-frames, {fps:g} fps, "
        f"{sum(map(len, units)) * 8 * fps / len(units) / 1000:.0f} kbit/s; device {dev}")

    loaded: dict[Path, tuple] = {}

    def model_of(path: Path):
        if path not in loaded:
            model, meta = load_checkpoint(path, dev)
            if list(meta["classes"]) != list(CAMVID_CLASSES):
                raise ValueError(f"{path}: classes {meta['classes']} are not the 11 CamVid classes "
                                 f"this evaluation scores against")
            loaded[path] = (model, meta)
        return loaded[path]

    if threads:
        import torch
        torch.set_num_threads(threads)
    if timing_passes < 1:
        raise ValueError(f"--timing-passes must be >= 1, got {timing_passes}")
    runs: dict[str, MethodRun] = {}
    engine_segments: dict[str, Segmenter] = {}
    for label, path in checkpoints.items():
        for name in METHODS:
            # the paper checkpoint and the teacher once, with the first checkpoint's methods
            if name not in methods or (name in ("teacher", "compressed_paper") and label != next(iter(checkpoints))):
                continue
            key = method_key(name, label, checkpoints)
            if name == "teacher":   # one pass: ~20 s each
                segment = teacher_segmenter(teacher_model, units[:WARMUP_UNITS])
            else:
                model, meta = model_of(paper_checkpoint if name == "compressed_paper" else path)
                if name == "compressed_no_matching" and not getattr(model.config, "luma_matching", False):
                    skipped[key] = f"{path.name} does not match luma (it would repeat compressed)"
                if name == "compressed_no_branch" and not getattr(model.config, "accumulate", False):
                    skipped[key] = f"{path.name} does not accumulate the motion (it has nothing to warp)"
                if key in skipped:
                    log(f"note: skipping {key}: {skipped[key]}")
                    continue
                engine = SegmentationEngine(model=model, metadata=meta, device=str(dev), mode=ENGINE_MODES[name],
                                            precision=precision, threads=threads,
                                            luma_matching=name != "compressed_no_matching",
                                            p_frame_branch=name != "compressed_no_branch")
                segment = engine_segments[key] = engine_segmenter(engine, units[:WARMUP_UNITS])
            runs[key] = run_method(key, units, labels, gop, segment, progress, order)
    order = list(engine_segments)
    if order and timing_passes > 1:
        log(f"timing: {timing_passes - 1} more pass(es) of {', '.join(order)}, interleaved")
    for p in range(1, timing_passes if order else 1):   # each method once per round, the order rotated
        for name in order[p % len(order):] + order[: p % len(order)]:
            runs[name].more_passes.append(time_pass(engine_segments[name], units))

    result = {
        "frames": len(units),
        "gop": gop,
        "bframes": bframes,
        "fps": fps,
        "width": width,
        "height": height,
        "device": str(dev),
        "precision": resolve_precision(precision, dev),   # what "auto" is on this machine
        "threads": _threads(),
        "crf": crf,
        "timing_passes": timing_passes,
        "checkpoint": str(next(iter(checkpoints.values()))),
        "checkpoints": {label: str(path) for label, path in checkpoints.items()},
        "checkpoint_note": model_of(next(iter(checkpoints.values())))[1].get("note") if any(
            method_key(m, next(iter(checkpoints)), checkpoints) in runs
            for m in ("compressed", "per_frame", "iframe_copy")) else None,
        "paper_checkpoint": str(paper_checkpoint) if "compressed_paper" in runs else None,
        "teacher": str(teacher_model.path) if teacher_model is not None else None,
        **source,
        "stream_kbit_s": round(sum(map(len, units)) * 8 * fps / len(units) / 1000, 1),
        "classes": list(CAMVID_CLASSES),
        "void_label": 11,
        "miou_over": MIOU_CLASSES,
        "no_class_prediction": "a predicted id outside 0..10 (255) is wrong: a false negative of the "
                               "true class, nobody's false positive",
        "ms_per_frame_is": TIMING,
        "methods": {name: run.summary() for name, run in runs.items()},
        "skipped": skipped,
    }
    result.update(derived_figures(result["methods"]))
    return nan_to_none(result)


def checkpoint_labels(spec, device) -> dict[str, Path]:
    """``--checkpoint`` (names or paths, comma-separated, or a list) -> {label: file}: the label is
    the name (``fast``, ``accurate``) or the file's stem."""
    from cvseg_ros.model.checkpoint import CHECKPOINT_ALIASES, resolve_checkpoint
    items = spec if isinstance(spec, (list, tuple)) else [s for s in str(spec or "auto").split(",") if s.strip()]
    out: dict[str, Path] = {}
    for item in items:
        path = resolve_checkpoint(item, device)
        text = str(item).strip()
        label = text if text in CHECKPOINT_ALIASES else path.stem
        if label in out:
            raise ValueError(f"checkpoint {label!r} given twice")
        out[label] = path
    return out


def method_key(name: str, label: str, checkpoints: dict) -> str:
    """A method's name in the result: ``compressed``, or ``compressed@accurate`` when several
    checkpoints are evaluated in one run (the teacher and the paper checkpoint run once)."""
    return name if len(checkpoints) == 1 or name in ("teacher", "compressed_paper") else f"{name}@{label}"


def _threads() -> dict:
    import cv2
    import torch
    return {"torch": torch.get_num_threads(), "opencv": cv2.getNumThreads()}


def derived_figures(methods: dict) -> dict:
    """``gap_closed`` = (m - iframe_copy) / (per_frame - iframe_copy) in mIoU and ``speedup`` =
    per_frame ms / m ms, for ``compressed`` (top level) and every compressed method (``derived``)."""
    derived = {}
    for key, m in methods.items():
        name, at, label = key.partition("@")
        if name not in ("compressed", "compressed_no_matching", "compressed_no_branch", "compressed_paper"):
            continue
        # against the same checkpoint's baselines (the paper checkpoint: the first one's)
        suffix = at + label or next((k.partition("@")[1] + k.partition("@")[2] for k in methods
                                     if k.startswith("per_frame")), "")
        pf, cp = methods.get("per_frame" + suffix), methods.get("iframe_copy" + suffix)
        derived[key] = {
            "gap_closed": stats.ratio(m["miou"] - cp["miou"], pf["miou"] - cp["miou"]) if pf and cp else None,
            "speedup": stats.ratio(pf["ms_per_frame"], m["ms_per_frame"]) if pf else None,
        }
    top = derived.get("compressed") or next((v for k, v in derived.items() if k.startswith("compressed@")), {})
    return {"gap_closed": top.get("gap_closed"), "speedup": top.get("speedup"),
            "derived": derived,
            "derived_are": "gap_closed = (mIoU - iframe_copy) / (per_frame - iframe_copy); "
                           "speedup = per_frame ms/frame / method ms/frame"}


# -- CLI ------------------------------------------------------------------------------------------
def register(sub) -> None:
    p = sub.add_parser("eval", help="mIoU / pixel accuracy / ms per frame of the compressed model and baselines "
                                    "on labelled frames encoded to H.264")
    p.add_argument("--frames", help="directory of RGB PNG or JPEG frames (sorted = temporal order)")
    p.add_argument("--labels", help="directory of CamVid label PNGs with the frames' names")
    p.add_argument("--sequence", default="",
                   help="--frames: only the frames whose names start with this (a CamVid sequence such as "
                        "0006R0, e.g. the one a leave-one-sequence-out training left out)")
    p.add_argument("--video", help="an unlabelled video file instead of --frames/--labels, scored against "
                                   "the Cityscapes teachers' ensemble (labels cached; see cvseg_ros.tools.reference)")
    p.add_argument("--reference", default=",".join(REFERENCE),
                   help="--video: the teachers of the reference, comma-separated (default: both, enet,espnetv2)")
    p.add_argument("--frame-step", type=int, default=2, help="--video: every N-th frame (25 fps -> 12.5)")
    p.add_argument("--width", type=int, default=0, help="--video: resize to this width (0: its own size)")
    p.add_argument("--fps", type=float, default=None, help="frame rate of the encoded stream (default: 15 for "
                                                           "frames, the video's rate / --frame-step)")
    p.add_argument("--gop", type=int, default=12)
    p.add_argument("--bframes", type=int, default=0, choices=range(5), metavar="N",
                   help="B-frames between the I/P pictures of the encoded stream (0-4; default 0: I/P "
                        "only); each B-frame's mask is a P step from the state that is not kept")
    p.add_argument("--json", dest="json_out", required=True, help="result JSON path")
    p.add_argument("--out-dir", default=None, help="where eval.md and miou_by_gop.png go (default: beside --json)")
    p.add_argument("--checkpoint", default=None,
                   help=CHECKPOINT_HELP + "; several, comma-separated (e.g. fast,accurate), run every method "
                        "of each in one run, named method@checkpoint")
    p.add_argument("--paper-checkpoint", default=None,
                   help=f"paper-configuration checkpoint (default {PAPER_CHECKPOINT.name} if present)")
    p.add_argument("--teacher", default=None, help="ENet teacher .net: adds the 'teacher' method")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                   help="subset to run (default: all available)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--precision", choices=("fp32", "bf16", "mixed", "auto"), default="auto",
                   help="auto (the engine's and the node's default: mixed on a CPU with native bf16, else "
                        "fp32); fp32; bf16 (both networks); mixed (P-frame branch in bf16)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch and OpenCV threads (default: theirs); 1 gives steadier timings on a busy CPU")
    p.add_argument("--crf", type=int, default=23, help="libx264 quality of the encoded stream")
    p.add_argument("--max-frames", type=int, default=None, help="only the first N frames")
    p.add_argument("--timing-passes", type=int, default=3,
                   help="passes over the stream timed per method, interleaved; ms/frame is their median "
                        "(the teacher: one pass)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_main)


def _main(args) -> int:
    options = dict(gop=args.gop, checkpoint=args.checkpoint, paper_checkpoint=args.paper_checkpoint,
                   teacher=args.teacher, methods=args.methods, device=args.device, precision=args.precision,
                   threads=args.threads, crf=args.crf, progress=not args.no_progress,
                   timing_passes=args.timing_passes, bframes=args.bframes)
    from cvseg_ros.training.ensemble import teacher_names
    if args.video:
        if args.frames or args.labels:
            raise SystemExit("cvseg eval: give --video or --frames and --labels, not both")
        result = evaluate_video(args.video, frame_step=args.frame_step, max_frames=args.max_frames,
                                width=args.width, fps=args.fps, reference=teacher_names(args.reference),
                                **options)
    elif args.frames and args.labels:
        result = evaluate(args.frames, args.labels, max_frames=args.max_frames, fps=args.fps or 15.0,
                          sequence=args.sequence, **options)
    else:
        raise SystemExit("cvseg eval: give --frames and --labels (labelled stills) or --video (an unlabelled clip)")
    from cvseg_ros.tools.eval_report import markdown_table, write_outputs

    paths = write_outputs(result, args.json_out, args.out_dir)
    print()
    print(markdown_table(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
