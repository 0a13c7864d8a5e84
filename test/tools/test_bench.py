"""`cvseg bench` end to end on a few real frames: one camera, a short node run over DDS.

Only the structure of the result and the arithmetic of its derived figures are checked (timings
on a shared CI machine prove nothing).
"""
from __future__ import annotations

import json
import math
import random

import pytest

from conftest import SMALL_CLIP, require
from cvseg_ros.common.timing import MS_PER_FRAME_IS
from cvseg_ros.tools.cli import main

GOP = 6
FRAMES = 2 * GOP


pytestmark = pytest.mark.usefixtures("restore_threads")


def _run(tmp_path, *extra) -> dict:
    out = tmp_path / "bench.json"
    rc = main(["bench", "--video", str(require(SMALL_CLIP, "real clip")), "--frames", str(FRAMES + 3),
               "--gop", str(GOP), "--width", "160", "--height", "120", "--passes", "2", "--threads", "1",
               "--device", "cpu", "--json", str(out), "--no-progress", *extra])
    assert rc == 0
    return json.loads(out.read_text())


def _check_offline(result: dict) -> None:
    assert result["frames"] == FRAMES and result["gop"] == GOP          # cut to whole GOPs
    assert (result["width"], result["height"]) == (160, 120)
    assert result["passes"] == 2 and result["device"] == "cpu" and result["threads"] == 1
    for key in ("date", "command", "machine", "timing_is", "targets", "targets_met"):
        assert result[key], key
    assert MS_PER_FRAME_IS in result["timing_is"]          # the definition `cvseg eval` uses too
    assert "bench" in result["command"] and result["machine"]["cpus"] >= 1
    methods = result["methods"]
    assert list(methods) == ["decode_only", "compressed", "per_frame"]   # no teacher unless asked
    for name, m in methods.items():
        assert m["frames_per_pass"] == FRAMES and m["missing_outputs"] == 0, name
        assert len(m["passes"]) == 2, name
        for p in m["passes"]:
            assert p["frames_i"] == FRAMES // GOP and p["frames_p"] == FRAMES - FRAMES // GOP
            # ms/frame of a pass: the I- and P-frame medians weighted by their shares (whole GOPs)
            assert p["ms_gop"] == pytest.approx((p["ms_i"] + (GOP - 1) * p["ms_p"]) / GOP, rel=0.01, abs=0.002)
        for key in ("ms_i", "ms_p", "ms_gop", "ms_mean"):
            assert m[key] > 0, (name, key)
        # reported: the median over the passes (of two: their mean, so the weighting holds for it too)
        assert m["ms_gop"] == pytest.approx(sum(p["ms_gop"] for p in m["passes"]) / 2, abs=0.002)
        assert m["ms_gop"] == pytest.approx((m["ms_i"] + (GOP - 1) * m["ms_p"]) / GOP, rel=0.01, abs=0.002)
    r = result["ratios"]
    assert r["per_frame_over_compressed"] == pytest.approx(
        methods["per_frame"]["ms_gop"] / methods["compressed"]["ms_gop"], rel=0.01)
    assert r["compressed_p_over_decode_only"] == pytest.approx(
        methods["compressed"]["ms_p"] / methods["decode_only"]["ms_p"], rel=0.01)
    met = result["targets_met"]
    t = result["targets"]
    assert met["per_frame_over_compressed"] == (r["per_frame_over_compressed"] >= t["per_frame_over_compressed_min"])
    assert met["compressed_p_over_decode_only"] == (
        r["compressed_p_over_decode_only"] <= t["compressed_p_over_decode_only_max"])


def test_bench_offline_only(tmp_path):
    result = _run(tmp_path, "--no-node")
    _check_offline(result)
    assert result["node"] is None and "node_latency_p99" not in result["targets_met"]


def test_bench_with_the_node(tmp_path):
    pytest.importorskip("rclpy", reason="rclpy is not importable (ROS 2 wheels missing)")
    domain = random.SystemRandom().randint(151, 200)
    result = _run(tmp_path, "--cameras", "1", "--seconds", "2", "--warmup", "1", "--domain-id", str(domain))
    _check_offline(result)
    node = result["node"]
    assert node["cameras"] == 1 and node["domain_id"] == domain and node["node_exit_code"] == 0
    cam = node["per_camera"]["bench0"]
    assert cam["sent"] == round(3 * result["fps"]) == node["sent"]
    # every frame sent is accounted for: a mask, a drop the node reports, or an unreported drop
    assert cam["sent"] == cam["masks_received"] + cam["reported_drops"] + cam["unreported_drops"]
    assert node["unreported_drops"] == cam["unreported_drops"]
    assert cam["masks_received"] > 0 and cam["rate_hz"] >= 0   # (no timing assertion: a busy CI box)
    if cam["latency_ms_p50"] is not None:   # None: no frame of the measured window got its mask
        assert cam["latency_ms_p50"] <= cam["latency_ms_p90"] <= cam["latency_ms_p99"] <= cam["latency_ms_max"]
        assert 0 < cam["latency_ms_mean"] <= cam["latency_ms_max"]
    for key in ("latency_ms_p50", "latency_ms_p90", "latency_ms_p99", "latency_ms_mean"):   # (one camera)
        assert node[key] == cam[key], key
    assert node["rate_hz_min"] == cam["rate_hz"]
    assert node["peak_rss_mib"] > 50 and math.isfinite(node["node_cpu_cores"])
    assert node["node_cpu_ms_per_mask"] > 0     # the node's own cost, beside the engine's offline one
    assert result["ratios"]["node_cpu_per_mask_over_engine"] == pytest.approx(
        node["node_cpu_ms_per_mask"] / result["methods"]["compressed"]["ms_gop"], rel=0.01)
    met = result["targets_met"]
    assert met["node_latency_p99"] == (node["latency_ms_p99"] is not None
                                       and node["latency_ms_p99"] <= result["targets"]["node_latency_p99_ms_max"])
    assert met["node_unreported_drops"] == (node["unreported_drops"] == 0)
