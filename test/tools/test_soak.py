"""``cvseg soak``: four cameras through the node's message path for a bounded time; RSS and queues.

These runs are short (10-12 s): they check the command and its figures, and catch a gross leak
(RSS growth bound 20 %); after a few seconds of warm-up allocations still settle by a few percent
(first batches of each shape). The < 5 % target is for a real soak: ``cvseg soak --seconds 300``.
"""
from __future__ import annotations

import json
import random

import pytest

from conftest import SMALL_CLIP, require
from cvseg_ros.tools.cli import main


def test_soak_four_cameras(tmp_path, capsys):
    require(SMALL_CLIP, "real clip")
    out = tmp_path / "soak.json"
    code = main(["soak", "--cameras", "4", "--seconds", "12", "--warmup", "4", "--fps", "10", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["cameras"] == 4 and report["samples"] >= 20
    for name, cam in report["per_camera"].items():
        assert cam["masks_out"] > 0 and cam["frames_in"] >= cam["masks_out"], (name, cam)
        assert cam["queue_max"] <= report["queue_depth"] and not cam["queue_growing"], (name, cam)
        assert cam["decode_errors"] == 0, (name, cam)
    assert report["rss_growth_pct"] is not None and report["rss_growth_pct"] < 20.0, report
    assert report["queues_ok"] and code in (0, 1) and report["ok"] == (code == 0), report
    assert '"rss_growth_pct"' in capsys.readouterr().out


def test_soak_the_node_process_over_dds(tmp_path):
    """``cvseg soak --node``: the real node in its own process; RSS from its /proc entry."""
    pytest.importorskip("rclpy", reason="rclpy is not importable (ROS 2 wheels missing)")
    require(SMALL_CLIP, "real clip")
    out = tmp_path / "soak_node.json"
    code = main(["soak", "--node", "--cameras", "4", "--seconds", "10", "--warmup", "3", "--fps", "10",
                 "--domain-id", str(random.SystemRandom().randint(151, 160)), "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["mode"] == "node" and report["node_exit_code"] == 0
    for name, cam in report["per_camera"].items():
        assert cam["masks_out"] > 0 and cam["decode_errors"] == 0, (name, cam)
        assert cam["queue_max"] <= report["queue_depth"] and not cam["queue_growing"], (name, cam)
    assert report["rss_growth_pct"] < 20.0 and report["queues_ok"] and report["ok"] == (code == 0), report
