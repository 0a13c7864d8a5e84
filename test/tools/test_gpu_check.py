"""`scripts/gpu_check.sh --dry-run`: the GPU check's whole flow on the CPU (the GPU formulations
forced), on a real clip, so that the one command kept for a GPU machine works when one comes."""
from __future__ import annotations

import json
import subprocess

from conftest import REPO, SMALL_CLIP, require


def test_the_gpu_check_runs_dry_on_the_cpu(tmp_path):
    clip = require(SMALL_CLIP, "a real clip")
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", "--json", str(out),
                           "--clip", str(clip)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    steps = result["steps"]
    assert result["dry_run"] and list(steps) == ["tests", "masks", "rounds", "profile", "node"]
    assert all(step["ok"] for step in steps.values()), steps
    assert "test_device_paths.py" in steps["tests"]["dry_run_command"]
    node = steps["node"]["dry_run_command"]
    assert "--device cuda" in node and "--cameras 8" in node and "--width 1280 --height 720" in node
    masks = steps["masks"]["result"]
    assert len(masks) == 9 and all(m["frames"] == 12 for m in masks.values())   # fast, accurate, paper x 3 modes
    assert masks["480x360/fast/compressed"]["max"] <= 0.002 and masks["480x360/accurate/compressed"]["max"] <= 0.002
    assert all(m["max"] == 0 for key, m in masks.items() if not key.endswith("/compressed"))
    rounds = steps["rounds"]["result"]
    assert set(rounds) == {"1x480x360/fp32", "4x480x360/fp32"}
    assert all(r["P"]["rounds"] == 11 and r["P"]["p50_ms"] > 0 for r in rounds.values())
    assert 50 < steps["profile"]["result"]["tensor_operations"] < 250
