"""``cvseg_node`` in a process of its own, and this process's side of talking to it over DDS.

:class:`NodeProcess` starts ``python -m cvseg_ros.ros.node --ros-args --params-file FILE -p ...``
on a ROS domain of its own (``ROS_DOMAIN_ID``; discovery on localhost unless the environment says
otherwise), its output in a log file; waits until it is up; samples its memory (``VmRSS``,
``VmHWM``) and CPU time from ``/proc``; stops it with SIGINT (then SIGTERM, then SIGKILL) and
keeps its exit status. :class:`LocalNode` is this process's rclpy context and node on the same
domain, spinning in a thread; :class:`DiagnosticsListener` keeps what the node says on
``/diagnostics``. rclpy is imported inside the functions that need it only.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from cvseg_ros.common import procfs
from cvseg_ros.common.paths import REPO_ROOT

DISCOVERY_RANGE = "ROS_AUTOMATIC_DISCOVERY_RANGE"


def params_file() -> Path:
    """The installed ``share/cvseg_ros/config/cvseg.yaml``, else the source tree's."""
    try:
        from ament_index_python.packages import get_package_share_directory
        path = Path(get_package_share_directory("cvseg_ros")) / "config" / "cvseg.yaml"
        if path.is_file():
            return path
    except Exception:  # noqa: BLE001 - not installed through ament
        pass
    path = REPO_ROOT / "config" / "cvseg.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"cannot find the node's params file (looked for {path})")
    return path


def node_command(overrides: Mapping[str, Any] | None = None, args: Sequence[str] = (),
                 params: str | Path | None = None) -> list[str]:
    """The command line of the node: the params file (default :func:`params_file`), one
    ``-p key:=value`` per override, then ``args`` (later values win)."""
    cmd = [sys.executable, "-m", "cvseg_ros.ros.node", "--ros-args", "--params-file",
           str(params or params_file())]
    for key, value in (overrides or {}).items():
        cmd += ["-p", f"{key}:={value}"]
    return cmd + list(args)


def random_domain(low: int = 1, high: int = 200) -> int:
    """A ROS domain id drawn from ``low..high``."""
    return random.SystemRandom().randint(low, high)


def discovery_range(value: str | None = None) -> str:
    """``value``, else this process's ``ROS_AUTOMATIC_DISCOVERY_RANGE``, else ``LOCALHOST``."""
    return value or os.environ.get(DISCOVERY_RANGE) or "LOCALHOST"


def node_env(domain_id: int, discovery: str | None = None) -> dict[str, str]:
    """This process's environment with the node's ROS domain, discovery range
    (:func:`discovery_range`) and unbuffered Python output."""
    return dict(os.environ, ROS_DOMAIN_ID=str(domain_id), PYTHONUNBUFFERED="1",
                **{DISCOVERY_RANGE: discovery_range(discovery)})


def wait_until(ready: Callable[[], bool], timeout: float, node: Any = None, what: str = "the node",
               error: type[Exception] = RuntimeError, poll: float = 0.05) -> None:
    """Poll ``ready()`` until it is true. Raise ``error`` if ``node`` (a :class:`NodeProcess` or a
    ``Popen``) exits first, or after ``timeout`` seconds; with the node's log tail where known."""
    deadline = time.monotonic() + timeout
    while not ready():
        if node is not None and node.poll() is not None:
            raise error(f"the node exited with status {node.returncode} while waiting for {what}"
                        + _log_tail(node))
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout:.0f} s waiting for {what}" + _log_tail(node, 0))
        time.sleep(poll)


def _log_tail(node: Any, chars: int = 2000) -> str:
    log_path = getattr(node, "log_path", None)
    if log_path is None:
        return ""
    if not chars:
        return f" (node log: {log_path})"
    try:
        return f"; node log {log_path}:\n" + Path(log_path).read_text(errors="replace")[-chars:]
    except OSError:
        return f" (node log: {log_path})"


class NodeProcess:
    """``cvseg_node`` in its own process (see the module docstring).

    ``overrides``: parameters (``-p key:=value``); ``args``: more ``--ros-args`` arguments;
    ``domain_id``: default :func:`random_domain`; ``error``: the exception type that
    :meth:`wait_until` raises. Use as a context manager (started on entry, stopped on exit) or
    call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, overrides: Mapping[str, Any] | None = None, *, log_path: str | Path,
                 args: Sequence[str] = (), domain_id: int | None = None, params: str | Path | None = None,
                 discovery: str | None = None, cwd: str | Path | None = None,
                 error: type[Exception] = RuntimeError) -> None:
        self.domain_id = random_domain() if domain_id is None else domain_id
        self.command = node_command(overrides, args, params)
        self.env = node_env(self.domain_id, discovery)
        self.log_path = Path(log_path)
        self.cwd = cwd
        self.error = error
        self.popen: subprocess.Popen | None = None
        self.exit_code: int | None = None
        self.peak_rss_bytes = 0
        self.cpu_s: float | None = None      # CPU time at the last sample
        self._log = None

    # -- life ------------------------------------------------------------------------------------
    def start(self) -> NodeProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.popen = subprocess.Popen(self.command, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                      cwd=self.cwd)
        return self

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str = "the node") -> None:
        """:func:`wait_until` on this node, raising its ``error``."""
        wait_until(ready, timeout, self, what, self.error)

    def wait_up(self, local, timeout: float, subscribes: Iterable[str] = (), publishes: Iterable[str] = (),
                what: str | None = None) -> None:
        """Wait until ``local`` (an rclpy node on the same domain) sees the node subscribe to every
        topic of ``subscribes`` and publish on every topic of ``publishes``: it has loaded its
        engine and is matched with this process."""
        subscribes, publishes = list(subscribes), list(publishes)
        self.wait_until(lambda: all(local.count_subscribers(t) > 0 for t in subscribes)
                        and all(local.count_publishers(t) > 0 for t in publishes), timeout,
                        what or f"the node to subscribe to {', '.join(subscribes) or '-'} and publish "
                                f"{', '.join(publishes) or '-'}")

    def stop(self, timeout: float = 15.0) -> int:
        """Sample it, then SIGINT (a clean shutdown) and ``timeout`` s, then SIGTERM and SIGKILL
        5 s each. Returns (and keeps in :attr:`exit_code`) the exit status."""
        if self.popen is None:
            raise RuntimeError("the node was not started")
        if self.popen.poll() is None:
            self.sample()
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if self.popen.poll() is not None:
                break
            self.popen.send_signal(sig)
            try:
                self.popen.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        self.exit_code = self.popen.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.exit_code

    def __enter__(self) -> NodeProcess:
        return self if self.popen is not None else self.start()

    def __exit__(self, *exc) -> None:
        if self.exit_code is None:
            self.stop()

    # -- measurements ----------------------------------------------------------------------------
    def memory(self) -> dict[str, int]:
        """``VmRSS`` and ``VmHWM`` of the node, bytes (``{}`` once it is gone)."""
        return procfs.memory(self.pid)

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the node so far (``None`` once it is gone)."""
        return procfs.cpu_seconds(self.pid)

    def sample(self) -> dict[str, int]:
        """:meth:`memory`, also kept in :attr:`peak_rss_bytes` (the largest ``VmHWM`` seen) and
        :attr:`cpu_s`. :meth:`stop` samples before it signals."""
        mem = self.memory()
        self.peak_rss_bytes = max(self.peak_rss_bytes, mem.get("VmHWM", 0))
        cpu = self.cpu_seconds()
        if cpu is not None:
            self.cpu_s = cpu
        return mem

    @property
    def peak_rss_mib(self) -> float:
        return self.peak_rss_bytes / 2**20

    def report(self) -> dict:
        """Exit status, peak RSS (MiB) and CPU seconds (at the last sample), command, domain, log."""
        return {"node_exit_code": self.exit_code, "peak_rss_mib": round(self.peak_rss_mib, 1),
                "node_cpu_s": None if self.cpu_s is None else round(self.cpu_s, 2),
                "node_command": " ".join(self.command[1:]), "domain_id": self.domain_id,
                "node_log": str(self.log_path)}


class LocalNode:
    """This process's side: an rclpy context on ``domain_id`` and a node spinning in a thread.

    Discovery as :func:`discovery_range` (``ROS_AUTOMATIC_DISCOVERY_RANGE`` is set for
    ``rclpy.init`` and restored by :meth:`close`)."""

    def __init__(self, name: str, domain_id: int, discovery: str | None = None) -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        self._saved = os.environ.get(DISCOVERY_RANGE)
        os.environ[DISCOVERY_RANGE] = discovery_range(discovery)
        self.context = rclpy.context.Context()
        try:
            rclpy.init(context=self.context, domain_id=domain_id)
            self.node = rclpy.create_node(name, context=self.context)
        except BaseException:
            rclpy.try_shutdown(context=self.context)
            self._restore_env()
            raise
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, name=f"{name}_spin", daemon=True)
        self.thread.start()

    def close(self) -> None:
        import rclpy

        self.executor.shutdown(timeout_sec=5)
        self.thread.join(5)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self._restore_env()

    def _restore_env(self) -> None:
        if self._saved is None:
            os.environ.pop(DISCOVERY_RANGE, None)
        else:
            os.environ[DISCOVERY_RANGE] = self._saved

    def __enter__(self) -> LocalNode:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DiagnosticsListener:
    """Subscribes ``node`` to ``/diagnostics``; keeps each hardware id's latest status (and every
    message with ``history``). ``lock``: the lock guarding them (default its own)."""

    def __init__(self, node, hardware_ids: Iterable[str] | None = None, *, history: bool = False,
                 lock: threading.Lock | None = None, depth: int = 10) -> None:
        from diagnostic_msgs.msg import DiagnosticArray

        self.lock = lock or threading.Lock()
        self.ids = None if hardware_ids is None else set(hardware_ids)
        self.statuses: dict[str, Any] = {}           # hardware id -> its latest DiagnosticStatus
        self.history: list | None = [] if history else None
        self.subscription = node.create_subscription(DiagnosticArray, "/diagnostics", self._on_message, depth)

    def _on_message(self, msg) -> None:
        with self.lock:
            if self.history is not None:
                self.history.append(msg)
            for status in msg.status:
                if self.ids is None or status.hardware_id in self.ids:
                    self.statuses[status.hardware_id] = status

    def latest_status(self, hardware_id: str):
        """``(status, {key: value})`` of the latest status of ``hardware_id``, or ``(None, {})``."""
        with self.lock:
            status = self.statuses.get(hardware_id)
        return (None, {}) if status is None else (status, {kv.key: kv.value for kv in status.values})

    def values(self, hardware_id: str) -> dict[str, str]:
        """The latest ``{key: value}`` of ``hardware_id`` (``{}`` before its first status)."""
        return self.latest_status(hardware_id)[1]

    def all_values(self) -> dict[str, dict[str, str]]:
        """``{hardware id: {key: value}}`` of the latest statuses."""
        with self.lock:
            ids = list(self.statuses)
        return {hw: self.values(hw) for hw in ids}


def diagnostic_number(values: Mapping[str, str], key: str, cast: Callable = int):
    """``cast`` of a diagnostics value (values are strings; ints may be written as floats), or
    ``None`` if it is missing or not a number."""
    try:
        return cast(float(values[key]))
    except (KeyError, TypeError, ValueError):
        return None
