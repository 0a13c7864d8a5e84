"""Helpers of the tests that run ``cvseg_node`` in another process and talk to it over real DDS.

Each test module picks its own ROS domain(s) (random within a range of its own) so that modules,
and other people's test runs on the same machine, do not hear each other.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import rclpy

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "config" / "cvseg.yaml"


def env_for(domain: int) -> dict:
    return dict(os.environ, ROS_DOMAIN_ID=str(domain), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
                PYTHONUNBUFFERED="1")


def node_cmd(*args: str, threads: int | None = 1) -> list[str]:
    extra = ["-p", f"threads:={threads}"] if threads is not None else []
    return [sys.executable, "-m", "cvseg_ros.ros.node", "--ros-args", "--params-file", str(PARAMS), *extra, *args]


def checkpoint_args(tmp: Path) -> list[str]:
    """The shipped checkpoint when present; else a seeded random one (the node's I/O is under test)."""
    from cvseg_ros.model.checkpoint import DEFAULT_CHECKPOINT
    if DEFAULT_CHECKPOINT.exists():
        return []
    import torch

    from cvseg_ros.model.checkpoint import save_checkpoint
    from cvseg_ros.model.classes import CAMVID_CLASSES, CAMVID_PALETTE
    from cvseg_ros.model.segmenter import CompressedSegmenter, make_config
    torch.manual_seed(0)
    path = save_checkpoint(CompressedSegmenter(make_config("improved")), tmp / "random.safetensors",
                           classes=CAMVID_CLASSES, palette=CAMVID_PALETTE, input_size=(240, 320))
    return ["-p", f"checkpoint:={path}"]


def start_node(log_path: Path, args: list[str], domain: int, threads: int = 1) -> subprocess.Popen:
    """``python -m cvseg_ros.ros.node`` with the params file, ``threads`` torch threads and ``args``,
    on ROS domain ``domain`` (discovery on localhost); output to ``log_path``."""
    return subprocess.Popen(node_cmd(*args, threads=threads), env=env_for(domain), stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT, cwd=REPO)


def stop_node(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


class Ros:
    """This process's side: a context on the module's domain, a node spinning in a thread."""

    def __init__(self, name: str, domain: int) -> None:
        self._env = os.environ.get("ROS_AUTOMATIC_DISCOVERY_RANGE")
        os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
        from rclpy.executors import SingleThreadedExecutor
        self.context = rclpy.context.Context()
        rclpy.init(context=self.context, domain_id=domain)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=5)
        self.thread.join(5)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        if self._env is None:
            os.environ.pop("ROS_AUTOMATIC_DISCOVERY_RANGE", None)
        else:
            os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = self._env


def wait_until(predicate, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the node exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Outputs:
    """Every mask / colour image / diagnostics message the node publishes."""

    def __init__(self, node, cameras) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image
        self.lock = threading.Lock()
        self.images: dict[tuple[str, str], list] = {(c, k): [] for c in cameras for k in ("mask", "color")}
        self.diagnostics: list = []
        qos = QoSProfile(depth=500, reliability=ReliabilityPolicy.RELIABLE)
        for cam in cameras:
            for kind in ("mask", "color"):
                node.create_subscription(Image, f"/{cam}/semantic/{kind}",
                                         lambda m, key=(cam, kind): self._add(key, m), qos)
        node.create_subscription(DiagnosticArray, "/diagnostics", self._diag, 50)

    def _add(self, key, msg) -> None:
        with self.lock:
            self.images[key].append(msg)

    def _diag(self, msg) -> None:
        with self.lock:
            self.diagnostics.append(msg)

    def count(self, kind: str) -> int:
        with self.lock:
            return sum(len(v) for (c, k), v in self.images.items() if k == kind)

    def latest_status(self, camera: str):
        with self.lock:
            for arr in reversed(self.diagnostics):
                for st in arr.status:
                    if st.hardware_id == camera:
                        return st, {kv.key: kv.value for kv in st.values}
        return None, {}


def stop_node_cleanly(proc: subprocess.Popen, log) -> None:
    """Stop the node (SIGINT) and assert it exited with status 0 and no traceback in its log."""
    code = stop_node(proc)
    text = log.read_text()
    assert code == 0, f"node exit status {code}:\n{text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]
