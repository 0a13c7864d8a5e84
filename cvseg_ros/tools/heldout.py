"""``cvseg heldout``: the check to run before every decision about the model.

It scores the methods on data that no training run of ``cvseg train`` uses (with its default
``held_out_clips``), each at its own size, and on CamVid ``val``:

* the demo's street footage (Debian's ``vtest.avi``: a fixed camera, pedestrians, vans; 768x576),
* the held-out dashcam clips (:data:`HELD_OUT_CLIPS`: highway, 960x540 and 1280x720),

the unlabelled ones against the Cityscapes teachers' ensemble on their clean frames
(:mod:`cvseg_ros.tools.reference`), CamVid ``val`` against its human labels. The figure to decide
on is each method's mean mIoU over the sets (``mean_miou``), never ``val``'s alone: ``val`` lies
between two training stills. Writes one JSON and a Markdown table.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

from cvseg_ros.common import stats
from cvseg_ros.common.paths import cache_dir, shared_data_dir
from cvseg_ros.model.checkpoint import CHECKPOINT_HELP
from cvseg_ros.training.ensemble import REFERENCE
from cvseg_ros.training.data import HELD_OUT_CLIPS

METHODS = ("compressed", "compressed_no_matching", "compressed_no_branch", "per_frame", "iframe_copy")


def held_out_sets(data: Path | None = None, include_val: bool = True, fetch: bool = True,
                  log: Callable[[str], None] = print) -> list[dict]:
    """The sets of the check: ``{"name", "video" | "frames" + "labels"}``; a set whose data is
    absent is left out with a note. ``fetch``: fetch ``vtest.avi`` (as ``cvseg demo`` does) when it
    is not in the cache yet."""
    data = Path(data) if data else shared_data_dir()
    sets = []
    try:
        from cvseg_ros.tools.demo import fetch_vtest
        vtest = cache_dir() / "vtest.avi"
        if fetch or vtest.is_file():
            sets.append({"name": "vtest", "video": str(fetch_vtest(cache_dir())), "frame_step": 1})
    except Exception as exc:  # noqa: BLE001 - no apt-get or no network: the check goes on without it
        log(f"note: no vtest.avi ({exc})")
    for clip in HELD_OUT_CLIPS:
        path = data / "clips" / clip
        if path.is_file():
            sets.append({"name": Path(clip).stem, "video": str(path), "frame_step": 2})
        else:
            log(f"note: no {path}")
    val = data / "camvid"
    if include_val and (val / "val").is_dir():
        sets.append({"name": "camvid_val", "frames": str(val / "val"), "labels": str(val / "valannot")})
    return sets


def run_heldout(*, checkpoint: str | None = None, methods: Sequence[str] = METHODS, max_frames: int = 96,
                data: str | None = None, include_val: bool = True, fetch: bool = True, device: str = "auto",
                threads: int | None = None, progress: bool = True, log: Callable[[str], None] = print,
                reference: Sequence[str] = REFERENCE) -> dict:
    """Every set through :mod:`cvseg_ros.tools.evaluate` (one timing pass); the per-set mIoU of
    every method and their mean; the videos scored against the teachers named in ``reference``."""
    from cvseg_ros.tools.evaluate import evaluate, evaluate_video

    options = dict(checkpoint=checkpoint, methods=list(methods), device=device, threads=threads,
                   progress=progress, timing_passes=1, log=log)
    results = {}
    for s in held_out_sets(Path(data) if data else None, include_val, fetch, log):
        log(f"== {s['name']}")
        if "video" in s:
            results[s["name"]] = evaluate_video(s["video"], frame_step=s["frame_step"], max_frames=max_frames,
                                                reference=reference, **options)
        else:
            results[s["name"]] = evaluate(s["frames"], s["labels"], **options)
    if not results:
        raise FileNotFoundError("no held-out data: neither vtest.avi nor the shared data's clips and CamVid val")
    # the methods as the results name them (method@checkpoint where several checkpoints ran)
    keys = list(dict.fromkeys(k for r in results.values() for k in r["methods"]))
    table = {m: {name: r["methods"][m]["miou"] for name, r in results.items() if m in r["methods"]}
             for m in keys}
    mean = {m: stats.mean(list(v.values()), 4) if len(v) == len(results) else None for m, v in table.items()}
    ms = {m: {name: r["methods"][m]["ms_per_frame"] for name, r in results.items() if m in r["methods"]}
          for m in keys}
    return {"sets": list(results), "checkpoint": checkpoint, "methods": keys, "max_frames": max_frames,
            "miou": table, "mean_miou": mean, "ms_per_frame": ms,
            "mean_is": "the plain mean of the per-set mIoU; None where a method misses a set",
            "results": results}


def markdown(report: dict) -> str:
    sets = report["sets"]
    lines = ["| method | " + " | ".join(sets) + " | mean |", "|---|" + "---:|" * (len(sets) + 1)]
    for m in report["methods"]:
        cells = [report["miou"][m].get(s) for s in sets] + [report["mean_miou"][m]]
        lines.append(f"| {m} | " + " | ".join("-" if v is None else f"{100 * v:.1f}" for v in cells) + " |")
    return "\n".join(lines) + "\n"


def register(sub) -> None:
    p = sub.add_parser("heldout", help="mIoU on data no training run uses (demo footage, held-out dashcam "
                                       "clips against the teachers' ensemble) and CamVid val; their mean")
    p.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP + "; several, comma-separated: each one's methods")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--max-frames", type=int, default=96, help="frames per video set (8 GOPs of 12)")
    p.add_argument("--data", default=None, help="the shared data folder (default ../shared/data)")
    p.add_argument("--no-val", action="store_true", help="leave CamVid val out")
    p.add_argument("--reference", default=",".join(REFERENCE),
                   help="the teachers of the videos' reference, comma-separated (default: both, enet,espnetv2)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", dest="json_out", required=True, help="result JSON path (a .md table beside it)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from cvseg_ros.tools.metrics import nan_to_none
    from cvseg_ros.training.ensemble import teacher_names
    report = run_heldout(checkpoint=args.checkpoint, methods=args.methods, max_frames=args.max_frames,
                         data=args.data, include_val=not args.no_val, device=args.device, threads=args.threads,
                         progress=not args.no_progress, reference=teacher_names(args.reference))
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(nan_to_none(report), indent=1))
    table = markdown(report)
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {out}, {out.with_suffix('.md')}")
    return 0
