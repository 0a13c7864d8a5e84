"""The shared helpers of the common layer: statistics, the ms/frame definition, /proc, sizes."""
from __future__ import annotations

import math
import mmap
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from cvseg_ros.common import procfs, stats, timing
from cvseg_ros.common.sizes import round8


# -- stats -----------------------------------------------------------------------------------------

def test_percentiles_interpolate_linearly_and_round():
    values = [4.0, 1.0, 3.0, 2.0]
    assert stats.percentile(values, 50) == 2.5
    assert stats.percentile(values, 90) == pytest.approx(3.7)
    assert stats.percentiles(values, (0, 25, 100)) == [1.0, 1.75, 4.0]
    assert stats.percentile([1.0, 2.0, 2.0, 10.0], 99, ndigits=2) == 9.76
    assert stats.percentile([], 50) is None and stats.percentiles([], (50, 99)) is None


def test_summary_mean_median():
    lat = [10.0, 20.0, 30.0, 40.0, 100.0]
    s = stats.summary(lat, "latency_ms_")
    assert list(s) == ["latency_ms_p50", "latency_ms_p90", "latency_ms_p99", "latency_ms_max", "latency_ms_mean"]
    assert s["latency_ms_p50"] == 30.0 and s["latency_ms_p90"] == 76.0 and s["latency_ms_p99"] == 97.6
    assert s["latency_ms_max"] == 100.0 and s["latency_ms_mean"] == 40.0
    assert stats.summary([], "x_") == dict.fromkeys(["x_p50", "x_p90", "x_p99", "x_max", "x_mean"])
    assert stats.mean([1.0, 2.0, 4.0], 2) == 2.33 and stats.mean([]) is None
    assert stats.median([3, 1, 2]) == 2.0 and stats.median([4, 1, 3, 2]) == 2.5 and stats.median([]) is None


def test_ratio():
    assert stats.ratio(3.0, 4.0) == 0.75 and stats.ratio(2.0, 3.0, 3) == 0.667
    assert stats.ratio(1.0, -2.0) == -0.5           # gap ratios may have a negative denominator
    for num, den in ((1.0, 0.0), (None, 1.0), (1.0, None), (math.nan, 1.0), (1.0, math.inf)):
        assert stats.ratio(num, den) is None


# -- the ms/frame definition -----------------------------------------------------------------------

def _gops(i_ms: float, p_ms: list[float], gops: int):
    times, kinds = [], []
    for _ in range(gops):
        times += [i_ms] + p_ms
        kinds += ["I"] + ["P"] * len(p_ms)
    return times, kinds


def test_ms_per_frame_weights_the_kind_medians_by_their_shares():
    times, kinds = _gops(40.0, [2.0, 3.0, 9.0], gops=2)        # GOP 4: I 40 ms, P median 3 ms
    assert timing.kind_medians(times, kinds) == {"I": 40.0, "P": 3.0}
    assert timing.ms_per_frame(times, kinds) == pytest.approx((40.0 + 3 * 3.0) / 4)   # 12.25, the GOP average
    assert timing.ms_per_frame(times, kinds) != pytest.approx(np.mean(times))        # not the mean (13.5)
    # a stream that is not whole GOPs: the kinds' shares of its frames (1 I-frame in 3)
    assert timing.ms_per_frame([30.0, 3.0, 5.0], ["I", "P", "P"]) == pytest.approx(30.0 / 3 + 4.0 * 2 / 3)


def test_units_without_output_are_a_kind_of_their_own():
    times = [40.0, 3.0, 3.0, 1.0]
    for missing in (None, "-"):
        kinds = ["I", "P", "P", missing]
        assert timing.kind_medians(times, kinds)[missing] == 1.0
        assert timing.ms_per_frame(times, kinds) == pytest.approx(40.0 / 4 + 3.0 / 2 + 1.0 / 4)
    assert timing.ms_per_frame([], []) is None
    with pytest.raises(ValueError):
        timing.kind_medians([1.0], ["I", "P"])


def test_median_over_passes_and_timed():
    assert timing.median_over_passes([5.0, None, 1.0, 3.0]) == 3.0
    assert timing.median_over_passes([None]) is None
    out, ms = timing.timed(lambda a, b: time.sleep(0.02) or a + b, 2, 3)
    assert out == 5 and 20.0 <= ms < 2000.0
    assert "median" in timing.MS_PER_FRAME_IS and "share" in timing.MS_PER_FRAME_IS


# -- /proc -----------------------------------------------------------------------------------------

linux = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")


@linux
def test_memory_of_this_process_follows_an_allocation():
    before = procfs.memory()
    assert set(before) == {"VmRSS", "VmHWM"} and 0 < before["VmRSS"] <= before["VmHWM"]
    # fresh pages, touched: resident (a malloc'd block may reuse heap pages that are resident
    # already, since the engine's malloc tuning keeps freed heap memory)
    block = mmap.mmap(-1, 96 * 2**20)
    np.frombuffer(block, np.uint8)[:] = 1
    after = procfs.rss_bytes()
    assert after - before["VmRSS"] >= 64 * 2**20, (before, after)
    assert procfs.memory()["VmHWM"] >= after
    block.close()


@linux
def test_cpu_seconds_of_this_process():
    start, t0 = procfs.cpu_seconds(), time.process_time()
    while time.process_time() - t0 < 0.3:
        sum(range(10_000))
    assert procfs.cpu_seconds() - start >= 0.25


@linux
def test_a_process_that_is_gone():
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(child.stdout)
    assert procfs.memory(pid) == {} and procfs.cpu_seconds(pid) is None
    with pytest.raises(RuntimeError, match="VmRSS"):
        procfs.rss_bytes(pid)


@linux
def test_cpu_flags_and_model_are_those_of_cpuinfo():
    text = open("/proc/cpuinfo").read()
    line = next((line for line in text.splitlines() if line.split(":")[0].strip() == "flags"), None)
    if line is None:
        pytest.skip("no 'flags' in /proc/cpuinfo (not x86)")
    assert procfs.cpu_flags() == frozenset(line.split(":", 1)[1].split())
    assert "fpu" in procfs.cpu_flags()
    assert procfs.cpu_model() and procfs.cpu_model() in text


def test_round8():
    assert [round8(n) for n in (0, 3, 8, 11, 12, 363, 364, 1023.9)] == [8, 8, 8, 8, 16, 360, 368, 1024]
