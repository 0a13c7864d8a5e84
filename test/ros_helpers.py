"""Helpers of the tests that run ``cvseg_node`` in another process and talk to it over real DDS.

The process harness is :mod:`cvseg_ros.ros.process`; what is here is what only the tests need:
the source tree's params file, one torch thread, assertions instead of tool errors, a random
checkpoint where the shipped one is absent, and a recorder of every output message.

Each test module picks its own ROS domain(s) (random within a range of its own) so that modules,
and other people's test runs on the same machine, do not hear each other.
"""
from __future__ import annotations

import threading
from pathlib import Path

from cvseg_ros.ros import process
from cvseg_ros.ros.process import DiagnosticsListener, LocalNode, NodeProcess

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "config" / "cvseg.yaml"
DISCOVERY = "LOCALHOST"


def env_for(domain: int) -> dict:
    """The environment of a node on ROS domain ``domain`` (discovery on localhost)."""
    return process.node_env(domain, DISCOVERY)


def node_cmd(*args: str, threads: int | None = 1) -> list[str]:
    """The node's command line with the source tree's params file, ``threads`` torch threads, ``args``."""
    return process.node_command({} if threads is None else {"threads": threads}, args, PARAMS)


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


def start_node(log_path: Path, args: list[str], domain: int, threads: int | None = 1) -> NodeProcess:
    """``python -m cvseg_ros.ros.node`` with the params file, ``threads`` torch threads (None: the
    file's) and ``args``, on ROS domain ``domain`` (discovery on localhost); output to ``log_path``."""
    return NodeProcess({} if threads is None else {"threads": threads}, args=args, log_path=log_path, domain_id=domain, params=PARAMS,
                       discovery=DISCOVERY, cwd=REPO, error=AssertionError).start()


def stop_node(proc: NodeProcess) -> int:
    """SIGINT, 20 s to exit, then escalate; the exit status."""
    return proc.stop(timeout=20.0)


def stop_node_cleanly(proc: NodeProcess, log) -> None:
    """Stop the node (SIGINT) and assert it exited with status 0 and no traceback in its log."""
    code = stop_node(proc)
    text = log.read_text()
    assert code == 0, f"node exit status {code}:\n{text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]


class Ros(LocalNode):
    """This process's side: a context on the module's domain, a node spinning in a thread."""

    def __init__(self, name: str, domain: int) -> None:
        super().__init__(name, domain, DISCOVERY)


def wait_until(predicate, timeout: float, proc=None, what: str = "") -> None:
    """Poll ``predicate`` (AssertionError if ``proc`` exits first or ``timeout`` s pass)."""
    process.wait_until(predicate, timeout, proc, what, AssertionError)


class Outputs:
    """Every mask / colour image / diagnostics message the node publishes."""

    def __init__(self, node, cameras) -> None:
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image
        self.lock = threading.Lock()
        self.images: dict[tuple[str, str], list] = {(c, k): [] for c in cameras for k in ("mask", "color")}
        self._diagnostics = DiagnosticsListener(node, history=True, lock=self.lock, depth=50)
        self.diagnostics: list = self._diagnostics.history
        qos = QoSProfile(depth=500, reliability=ReliabilityPolicy.RELIABLE)
        for cam in cameras:
            for kind in ("mask", "color"):
                node.create_subscription(Image, f"/{cam}/semantic/{kind}",
                                         lambda m, key=(cam, kind): self._add(key, m), qos)

    def _add(self, key, msg) -> None:
        with self.lock:
            self.images[key].append(msg)

    def count(self, kind: str) -> int:
        with self.lock:
            return sum(len(v) for (c, k), v in self.images.items() if k == kind)

    def latest_status(self, camera: str):
        """``(DiagnosticStatus, {key: value})`` of ``camera``'s latest status, or ``(None, {})``."""
        return self._diagnostics.latest_status(camera)
