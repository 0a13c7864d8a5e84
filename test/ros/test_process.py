"""The node-process harness without ROS: command line, environment, waiting, stopping, /proc figures.

A stand-in child process (plain Python) takes the node's place where the behaviour under test is
the harness's own.
"""
from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from cvseg_ros.ros import process
from cvseg_ros.ros.process import NodeProcess, diagnostic_number, node_command, node_env, wait_until

CLEAN = ("import signal, sys, time\n"
         "signal.signal(signal.SIGINT, lambda *a: sys.exit(0))\n"
         "block = bytearray(b'x' * (40 << 20))\n"
         "print('up', flush=True)\n"
         "while True: time.sleep(0.05)\n")
DEAF = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nprint('up', flush=True)\ntime.sleep(60)\n"


def stand_in(tmp_path, code: str, **kwargs) -> NodeProcess:
    proc = NodeProcess({"threads": 1}, log_path=tmp_path / "node.log", domain_id=42, **kwargs)
    proc.command = [sys.executable, "-c", code]
    return proc.start()


def test_command_line_and_environment(tmp_path, monkeypatch):
    params = tmp_path / "p.yaml"
    cmd = node_command({"cameras": "[a, b]", "threads": 2}, ["-p", "threads:=3"], params)
    assert cmd[:6] == [sys.executable, "-m", "cvseg_ros.ros.node", "--ros-args", "--params-file", str(params)]
    assert cmd[6:] == ["-p", "cameras:=[a, b]", "-p", "threads:=2", "-p", "threads:=3"]   # args come last: they win
    assert node_command()[5].endswith("cvseg.yaml")       # the source tree's (or the installed) params file
    monkeypatch.delenv("ROS_AUTOMATIC_DISCOVERY_RANGE", raising=False)
    env = node_env(17)
    assert env["ROS_DOMAIN_ID"] == "17" and env["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"
    assert env["PYTHONUNBUFFERED"] == "1" and env["PATH"] == os.environ["PATH"]
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "SUBNET")
    assert node_env(17)["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "SUBNET"
    assert node_env(17, "LOCALHOST")["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"
    assert 1 <= process.random_domain() <= 200


def test_clean_stop_with_memory_and_cpu(tmp_path):
    proc = stand_in(tmp_path, CLEAN)
    proc.wait_until(lambda: "up" in proc.log_path.read_text(), 30, "the stand-in to start")
    time.sleep(0.2)
    assert proc.memory()["VmRSS"] >= 40 << 20
    assert proc.stop() == 0 and proc.exit_code == 0 and proc.poll() == 0
    report = proc.report()
    assert report["node_exit_code"] == 0 and report["peak_rss_mib"] >= 40 and report["node_cpu_s"] >= 0
    assert report["domain_id"] == 42 and report["node_log"] == str(proc.log_path)
    assert proc.memory() == {} and proc.cpu_seconds() is None     # gone


def test_stop_escalates_when_sigint_is_ignored(tmp_path):
    proc = stand_in(tmp_path, DEAF)
    proc.wait_until(lambda: "up" in proc.log_path.read_text(), 30, "the stand-in to start")
    start = time.monotonic()
    assert proc.stop(timeout=0.5) == -signal.SIGTERM
    assert time.monotonic() - start < 5


def test_wait_until_reports_an_exit_with_the_log(tmp_path):
    proc = stand_in(tmp_path, "import sys; print('cannot start: no engine', flush=True); sys.exit(3)",
                    error=LookupError)
    with pytest.raises(LookupError, match=r"exited with status 3 while waiting for the topics(.|\n)*no engine"):
        proc.wait_until(lambda: False, 30, "the topics")
    assert proc.stop() == 3


def test_wait_until_times_out(tmp_path):
    start = time.monotonic()
    with pytest.raises(AssertionError, match="timed out after 0 s waiting for nothing"):
        wait_until(lambda: False, 0.2, what="nothing", error=AssertionError)
    assert time.monotonic() - start < 2
    proc = NodeProcess(log_path=tmp_path / "n.log")
    proc.command = [sys.executable, "-c", CLEAN]
    with proc:                                                # started on entry, stopped on exit
        proc.wait_until(lambda: "up" in proc.log_path.read_text(), 30, "the stand-in to start")
    assert proc.exit_code == 0


def test_diagnostic_number():
    values = {"masks_out": "12", "latency_ms_p99": "3.25", "frames_in": "7.0", "device": "cpu"}
    assert diagnostic_number(values, "masks_out") == 12 and diagnostic_number(values, "frames_in") == 7
    assert diagnostic_number(values, "latency_ms_p99", float) == 3.25
    assert diagnostic_number(values, "device") is None and diagnostic_number(values, "missing") is None
