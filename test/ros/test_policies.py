"""The message path's per-camera policies without ROS: the frame queue, the stamp tracker, the latency window.

These run without rclpy (``cvseg_ros.ros.policies`` and ``cvseg_ros.ros.message_path`` are ROS-free).
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from cvseg_ros.ros.message_path import FrameQueue, LatencyWindow, QueuedFrame, StampTracker


def _frame(i: int, idr: bool = False) -> QueuedFrame:
    return QueuedFrame("front", b"%d" % i, i, None, i, idr)


def test_queue_keeps_the_newest_frames_and_counts_what_it_skips():
    q = FrameQueue(2)
    assert q.push(_frame(0)) == 0 and q.push(_frame(1)) == 0
    assert q.push(_frame(2)) == 1          # full: frame 0 is decoded only (no mask)
    assert q.drops == q.decode_only == 1 and len(q) == 2 and q.backlog == 1
    skipped, item = q.pop()
    assert [s.stamp_ns for s in skipped] == [0] and item.stamp_ns == 1
    skipped, item = q.pop()
    assert skipped == [] and item.stamp_ns == 2 and len(q) == 0
    with pytest.raises(ValueError):
        FrameQueue(0)


def test_stamp_tracker_backwards_repeat_and_gap():
    period = 40_000_000
    t = StampTracker(gap_periods=3.0)
    stamps = [i * period for i in range(6)]
    assert all(t.check(s) == ("ok", None) for s in stamps)
    assert t.check(stamps[-1] + 2 * period) == ("ok", None)  # one lost frame: within 3 periods
    verdict, reason = t.check(stamps[-1] + 10 * period)
    assert verdict == "gap" and "gap" in reason
    assert t.check(0)[0] == "late"                            # not newer: dropped, not followed
    assert t.check(stamps[-1] + 10 * period) == ("late", "stamp repeated (late or reordered message)")
    verdict, reason = t.check(0, idr=True)                    # an IDR from the past: camera restart
    assert verdict == "reset" and "IDR" in reason
    assert StampTracker().check(123) == ("ok", None)          # first stamp: nothing to compare


def test_latency_window():
    w = LatencyWindow(size=3)
    assert w.percentiles(50) is None
    for v in (100.0, 1.0, 2.0, 3.0):       # 100 falls out of the window
        w.add(v)
    assert w.percentiles(50, 99)[0] == pytest.approx(2.0)


def test_the_policies_and_the_message_path_need_no_ros():
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('rclpy', 'rcl_interfaces', 'sensor_msgs', 'std_msgs'):\n"
            "            raise ImportError(name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import pytest\n"
            "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-k', 'not need_no_ros', sys.argv[1]]))\n")
    proc = subprocess.run([sys.executable, "-c", code, __file__], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout


def test_a_camera_far_behind_hands_over_at_most_max_skipped_per_turn():
    """Ten frames pushed into a depth-2 queue: eight lose their mask; each pop hands at most
    MAX_SKIPPED_PER_TURN of them to the engine (in order), then the frame to segment."""
    from cvseg_ros.ros.policies import MAX_SKIPPED_PER_TURN
    q = FrameQueue(2, backlog_limit=20)
    for i in range(10):
        q.push(_frame(i))
    turns = []
    while len(q) or q.backlog:
        skipped, item = q.pop()
        turns.append(([s.stamp_ns for s in skipped], item and item.stamp_ns))
    assert MAX_SKIPPED_PER_TURN == 4
    assert turns == [([0, 1, 2, 3], None), ([4, 5, 6, 7], 8), ([], 9)]
