"""`cvseg gpu-check`: everything a GPU machine should show, in one run and one JSON
(``scripts/gpu_check.sh`` installs what is missing and calls it).

1. ``tests``: the CUDA tests (``test/engine/test_device_paths.py`` and the luma matching's);
2. ``masks``: CUDA masks against CPU masks, every mode and each shipped checkpoint, 4 cameras,
   at 480x360, 960x540 and 1280x720 (share of pixels whose class differs);
3. ``rounds``: ms per I round and per P round (one frame of each camera, as the node batches
   them) for 1, 4 and 8 cameras at 480x360 and 8 at 1280x720, the device's default checkpoint, each precision;
4. ``profile``: one 4-camera P round: tensor operations dispatched, and on CUDA the kernel
   launches, copies and synchronisations the profiler sees;
5. ``node``: ``cvseg bench --device cuda`` with 8 cameras x 30 fps at 1280x720 into the node.

``--dry-run`` runs steps 2-4 on the CPU with the GPU formulations forced
(:func:`cvseg_ros.common.kernels.device_kernels`), small and short, and prints the commands of
steps 1 and 5 without running them: the tests run it so that the script cannot rot unseen.
"""
from __future__ import annotations

import collections
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np

from cvseg_ros.common import stats
from cvseg_ros.common.paths import cache_dir, shared_data_dir

SIZES = ((480, 360), (960, 540), (1280, 720))
ROUNDS = ((1, 480, 360), (4, 480, 360), (8, 480, 360), (8, 1280, 720))
REPO = Path(__file__).resolve().parents[2]
TESTS = ("test/engine/test_device_paths.py", "test/model/test_luma_matching.py")


def find_clip(clip: str | None) -> Path:
    """``clip``, else a real driving clip of the shared data, else the demo footage of the cache."""
    candidates = [Path(clip)] if clip else [
        shared_data_dir() / "clips" / "udacity_test_video.mp4", shared_data_dir() / "clips" / "udacity_solidWhiteRight.mp4",
        cache_dir() / "vtest.avi", REPO / ".cache" / "gpu-check" / "clip.mp4"]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError("no clip for the GPU check: pass --clip (any real video: it is re-encoded); tried "
                            + ", ".join(str(p) for p in candidates))


def _units(clip: Path, size: tuple[int, int], frames: int, gop: int) -> list[bytes]:
    from cvseg_ros.tools.bench import prepare_units
    return prepare_units(clip, frames=frames, width=size[0], height=size[1], fps=30.0, gop=gop)[0]


def _cameras(units: list[bytes], count: int) -> dict[str, list[bytes]]:
    """``count`` cameras sending the same stream (each with its own decoder and state)."""
    return {f"cam{k}": units for k in range(count)}


def _engine(device: str, forced: bool, **options):
    from cvseg_ros.common.kernels import device_kernels
    from cvseg_ros.engine.pipeline import SegmentationEngine
    with device_kernels(forced):
        return SegmentationEngine(device=device, **options)


def _masks(engine, cameras: dict[str, list[bytes]], forced: bool) -> list[np.ndarray]:
    from cvseg_ros.common.kernels import device_kernels
    count = len(next(iter(cameras.values())))
    with device_kernels(forced):
        return [r.mask for i in range(count) for r in engine.process([(c, u[i], i) for c, u in cameras.items()])]


def check_masks(clip: Path, device: str, forced: bool, sizes, frames: int, cameras: int) -> dict:
    from cvseg_ros.engine.pipeline import MODES
    from cvseg_ros.model.checkpoint import PACKAGE_CHECKPOINT_DIR
    out = {}
    for width, height in sizes:
        streams = _cameras(_units(clip, (width, height), frames, gop=6), cameras)
        for name, checkpoint in (("fast", "fast"), ("accurate", "accurate"),
                                 ("paper", PACKAGE_CHECKPOINT_DIR / "cvseg_paper.safetensors")):
            for mode in MODES:
                options = {"checkpoint": checkpoint, "mode": mode, "precision": "fp32"}
                cpu = _masks(_engine("cpu", False, **options), streams, False)
                dev = _masks(_engine(device, forced, **options), streams, forced)
                differ = [float((a != b).mean()) for a, b in zip(cpu, dev)]
                out[f"{width}x{height}/{name}/{mode}"] = {"frames": len(differ), "mean": round(float(np.mean(differ)), 6),
                                                          "max": round(max(differ), 6)}
    return out


def time_rounds(clip: Path, device: str, forced: bool, rounds, frames: int, precisions) -> dict:
    """Per (cameras, size, precision): the median ms of the I rounds and of the P rounds."""
    from cvseg_ros.common.kernels import device_kernels
    out = {}
    for cameras, width, height in rounds:
        streams = _cameras(_units(clip, (width, height), frames, gop=12), cameras)
        for precision in precisions:
            engine = _engine(device, forced, precision=precision)
            times = collections.defaultdict(list)
            with device_kernels(forced):
                for i in range(frames):
                    start = time.perf_counter()
                    results = engine.process([(c, u[i], i) for c, u in streams.items()])
                    took = (time.perf_counter() - start) * 1e3
                    if results and i > 0:   # the first I round: the engine's warm-up does its share
                        times[results[0].kind].append(took)
            out[f"{cameras}x{width}x{height}/{engine.precision}"] = {
                kind: {"rounds": len(t), "p50_ms": stats.percentile(t, 50, 2), "p99_ms": stats.percentile(t, 99, 2)} for kind, t in sorted(times.items())}
    return out


def profile_p_round(clip: Path, device: str, forced: bool, cameras: int = 4) -> dict:
    """One P round of ``cameras`` cameras after an I round: what it dispatches and, on CUDA, launches."""
    import torch

    from cvseg_ros.common.kernels import OperationCounter, device_kernels

    streams = _cameras(_units(clip, (480, 360), 12, gop=12), cameras)
    engine = _engine(device, forced, precision="fp32")
    with device_kernels(forced):
        for i in range(2):
            engine.process([(c, u[i], i) for c, u in streams.items()])
        with OperationCounter() as count:
            engine.process([(c, u[2], 2) for c, u in streams.items()])
        out = {"tensor_operations": count.total, "most_common": count.ops.most_common(12)}
        if engine.device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                engine.process([(c, u[3], 3) for c, u in streams.items()])
            events = collections.Counter(e.name for e in prof.events())
            out["launches"] = sum(n for k, n in events.items() if k in ("cudaLaunchKernel", "cuLaunchKernel",
                                                                          "cudaLaunchKernelExC"))
            out["copies"] = sum(n for k, n in events.items() if k.startswith("cudaMemcpy"))
            out["synchronisations"] = sum(n for k, n in events.items() if "Synchronize" in k)
            out["cuda_events"] = events.most_common(20)
            torch.cuda.synchronize()
    return out


def node_command(clip: Path, json_out: Path) -> list[str]:
    return [sys.executable, "-m", "cvseg_ros.tools.cli", "bench", "--video", str(clip), "--device", "cuda",
            "--cameras", "8", "--fps", "30", "--width", "1280", "--height", "720", "--passes", "2",
            "--seconds", "20", "--no-progress", "--json", str(json_out)]


def gpu_check(json_out: Path, clip: str | None = None, dry_run: bool = False, log: Callable[[str], None] = print) -> dict:
    import torch
    clip_path = find_clip(clip)
    cuda = torch.cuda.is_available()
    if not cuda and not dry_run:
        raise RuntimeError(f"no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
                           f"--dry-run runs the GPU formulations on the CPU")
    device, forced = ("cpu", True) if dry_run else ("cuda", False)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dry_run": dry_run, "clip": str(clip_path),
              "torch": torch.__version__, "cuda": torch.version.cuda,
              "card": torch.cuda.get_device_name(0) if cuda else None, "steps": {}}
    tests = [sys.executable, "-m", "pytest", "-q", *TESTS]
    node_json = json_out.with_name(json_out.stem + "_node.json")
    steps: dict[str, Callable[[], object]] = {
        "tests": (lambda: " ".join(tests)) if dry_run else (lambda: _run(tests)),
        "masks": lambda: check_masks(clip_path, device, forced, SIZES[:1] if dry_run else SIZES,
                                     6 if dry_run else 24, 2 if dry_run else 4),
        "rounds": lambda: time_rounds(clip_path, device, forced, ROUNDS[:2] if dry_run else ROUNDS,
                                      12 if dry_run else 36, ("fp32",) if dry_run else ("fp32", "fp16", "bf16")),
        "profile": lambda: profile_p_round(clip_path, device, forced),
        "node": (lambda: " ".join(node_command(clip_path, node_json))) if dry_run
        else (lambda: _run(node_command(clip_path, node_json)) | _read_json(node_json)),
    }
    for name, step in steps.items():
        start = time.perf_counter()
        log(f"[gpu-check] {name} ...")
        try:
            value = step()
            entry = {"ok": True, "result": value} if not (dry_run and isinstance(value, str)) \
                else {"ok": True, "dry_run_command": value}
        except Exception as exc:  # noqa: BLE001 - one step's failure must not hide the others' figures
            entry = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
        entry["seconds"] = round(time.perf_counter() - start, 1)
        result["steps"][name] = entry
        log(f"[gpu-check] {name}: {'ok' if entry['ok'] else entry['error']} ({entry['seconds']} s)")
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=1))
    return result


def _run(command: list[str]) -> dict:
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"exit {done.returncode}: {(done.stdout + done.stderr)[-1500:]}")
    return {"returncode": 0, "tail": done.stdout[-800:]}


def _read_json(path: Path) -> dict:
    return {"bench": json.loads(path.read_text())} if path.is_file() else {}


def register(sub) -> None:
    p = sub.add_parser("gpu-check", help="the CUDA tests, CUDA-vs-CPU masks, round timings, a P round's "
                                         "profile and the node at 8 x 720p: one JSON")
    p.add_argument("--json", dest="json_out", default="out/gpu_check.json")
    p.add_argument("--clip", default=None, help="a real video (default: a shared driving clip, else the demo footage)")
    p.add_argument("--dry-run", action="store_true", help="on the CPU, the GPU formulations forced, small and short")
    p.set_defaults(func=_main)


def _main(args) -> int:
    result = gpu_check(Path(args.json_out), args.clip, args.dry_run)
    failed = [name for name, step in result["steps"].items() if not step["ok"]]
    print(f"[gpu-check] {args.json_out}: " + (f"failed: {', '.join(failed)}" if failed else "every step ok"))
    return 1 if failed else 0
