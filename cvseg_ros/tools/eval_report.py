"""The reports of ``cvseg eval``: the JSON result, the Markdown table ``eval.md`` and the plot
``miou_by_gop.png``."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cvseg_ros.common import stats

def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def markdown_table(result: dict) -> str:
    """The paper's Table I/II/III in spirit: one row per method."""
    classes = result["classes"]
    header = ["Method", "mIoU %", "Pixel acc %", "ms/frame", "Speed-up", "I ms", "P ms"] + classes
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    # speed-up against per_frame (of the first checkpoint, where several were evaluated)
    pf = next((m for name, m in result["methods"].items() if name.partition("@")[0] == "per_frame"), None)
    for name, m in result["methods"].items():
        speed = stats.ratio(pf["ms_per_frame"], m["ms_per_frame"]) if pf else None
        row = [name, _pct(m["miou"]), _pct(m["pixel_acc"]), f"{m['ms_per_frame']:.1f}",
               "-" if speed is None else f"{speed:.2f}x"]
        by_kind = m.get("ms_per_frame_by_kind", {})
        row += ["-" if by_kind.get(kind) is None else f"{by_kind[kind]:.2f}" for kind in ("I", "P")]
        row += [_pct(m["per_class_iou"].get(c)) for c in classes]
        lines.append("| " + " | ".join(row) + " |")
    if "video" in result:
        what = (f"`{Path(result['video']).name}` (frame step {result['frame_step']}) against the teachers' "
                f"ensemble ({', '.join(result['reference'])}; {100 * result['reference_void_share']:.0f} % void)")
    else:
        what = f"CamVid {result['first_frame']} .. {result['last_frame']}"
    title = (f"{what}: {result['frames']} frames "
             f"{result['width']}x{result['height']}, GOP {result['gop']}, {result.get('bframes', 0)} B-frames, "
             f"{result['fps']:g} fps, "
             f"CRF {result['crf']} ({result['stream_kbit_s']:g} kbit/s), device {result['device']} "
             f"({result['threads']['torch']} torch threads), checkpoint `{'`, `'.join(Path(c).name for c in result.get('checkpoints', {'': result['checkpoint']}).values())}`"
             + (f" ({result['checkpoint_note']})" if result.get("checkpoint_note") else ""))
    notes = [f"IoU in %, void ignored, mIoU over {result['miou_over']}; ms/frame: {result['ms_per_frame_is']}."]
    if result.get("gap_closed") is not None and "per_frame" in result["methods"]:
        gap = result["methods"]["per_frame"]["miou"] - result["methods"]["iframe_copy"]["miou"]
        notes.append(f"compressed closes {100 * result['gap_closed']:.1f} % of the mIoU gap between "
                     f"iframe_copy and per_frame ({100 * gap:.1f} points"
                     + ("; too small a gap for the ratio to mean much" if abs(gap) < 0.01 else "") + ").")
    for name, why in result.get("skipped", {}).items():
        notes.append(f"{name} skipped: {why}.")
    return "\n".join([title, ""] + lines + [""] + notes) + "\n"


def plot_miou_by_gop(result: dict, path: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.2))
    # a colour per method, a line style per checkpoint (method@checkpoint)
    bases = list(dict.fromkeys(name.partition("@")[0] for name in result["methods"]))
    labels = list(dict.fromkeys(name.partition("@")[2] for name in result["methods"]))
    styles = ["-", "--", ":", "-."]
    for name, m in result["methods"].items():
        base, _, label = name.partition("@")
        ys = [np.nan if v is None else 100 * v for v in m["miou_by_gop_position"]]
        ax.plot(range(len(ys)), ys, marker="o", ms=3, label=name, color=f"C{bases.index(base) % 10}",
                linestyle=styles[labels.index(label) % len(styles)])
    ax.set_xlabel("GOP position (0 = I-frame)")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(f"mIoU by GOP position ({result['frames']} frames, GOP {result['gop']})")
    ax.set_xticks(range(max(result["gop"], 1)))
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(result: dict, json_path: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    json_path = Path(json_path)
    out_dir = Path(out_dir) if out_dir else json_path.parent
    json_path.parent.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2))
    md = out_dir / "eval.md"
    md.write_text(markdown_table(result))
    png = plot_miou_by_gop(result, out_dir / "miou_by_gop.png")
    return {"json": json_path, "table": md, "plot": png}
