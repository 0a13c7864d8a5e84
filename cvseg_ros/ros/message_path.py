"""The node's message path, without ROS: ``CompressedImage`` messages in, masks out, every outcome counted.

:class:`MessagePath` is what ``cvseg_node`` runs: its subscription callbacks call
:meth:`MessagePath.receive`, its worker thread :meth:`MessagePath.take_batch` and
:meth:`MessagePath.run_batch`, its ``/diagnostics`` come from :meth:`MessagePath.camera_values`.
The fuzz, soak and eval-bag commands and the tests drive the same object in-process, without
DDS. Messages are duck-typed: anything with ``format``, ``data`` and ``header.stamp.sec/nanosec`` (a
``sensor_msgs/CompressedImage``, a rosbags message, :func:`make_message`).

Every message received ends in exactly one outcome, counted per camera (:data:`DROP_REASONS`):
a published mask, or one of the reasons it got none. Hence, at any time,
``frames_in == masks_out + sum(drop reasons) + queue_size + in_flight``.

Policies (each applied on purpose, counted and reported):

- **Wrong format**: ignored, counted, warned once per camera.
- **Duplicates** (the same bytes as the camera's previous message): dropped before decoding (a
  repeated P-frame would be decoded against itself).
- **Stamps**: a non-IDR message whose stamp is not newer than the last accepted one (late,
  reordered, clock went back) is dropped before decoding, so masks on a topic never go back in
  time; an IDR with an older stamp is a camera or clock restart: accepted, counted
  (``stamp_resets``), and stamps are followed from there (so are :data:`LATE_LIMIT` late
  messages in a row). A jump of more than ``max_stamp_gap_periods`` frame periods (a camera that
  went silent) restarts the model state.
- **Lost pictures**: H.264 ``frame_num`` continuity (:mod:`cvseg_ros.codec.h264_syntax`) catches lost
  or reordered reference pictures that stamps cannot (``lost_units``). One or two lost: the
  decoder conceals them and the model state restarts at that frame. More, or pictures out of
  order or from another stream (a camera restarted and its IDR was lost): nothing is decoded
  until the next IDR (``awaiting_idr``), so no mask comes from a picture decoded against the
  wrong references.
- **Queue** (the model falls behind; :class:`FrameQueue`): nothing is dropped before decoding
  while the decoder can keep up, so the reference pictures stay intact. With ``queue_depth``
  frames waiting, a new frame makes the oldest waiting one *decode-only* (no mask; the newest
  frames keep theirs) and the model state restarts at the next segmented frame; if an IDR is
  waiting, everything before it is discarded undecoded instead (nothing after an IDR refers to
  it, and the IDR restarts the state anyway). If even decoding falls behind (more than
  ``backlog_limit`` units queued), units are discarded undecoded and the camera waits for its
  next IDR: an I-frame is never dropped without the state restarting at a clean IDR, and no
  mask is ever made from a picture decoded with missing references because of the queue. All
  of these are ``queue_drops``. After such a skip the state restarts at an IDR, or on the first
  frame taken when the camera's queue is empty again; frames taken while it is still behind are
  decoded only (also ``queue_drops``): a restart on a P-frame runs the I-frame network, which
  would only put it further behind.
- **Outputs**: a mask is published only with the header of the message it was computed from,
  and only when its size equals that frame's decoded size (else ``bad_outputs``).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Iterable

import numpy as np

from cvseg_ros.common import stats
from cvseg_ros.codec.h264_syntax import FrameNumTracker
from cvseg_ros.codec.annexb import NAL_IDR, UnsupportedStreamError, check_format, nal_unit_types

#: Reasons a received message got no mask; each message counts in at most one.
DROP_REASONS = ("wrong_format", "duplicates", "out_of_order", "queue_drops", "skipped_before_keyframe",
                "awaiting_idr", "decode_errors", "no_output", "b_frames", "no_state", "engine_errors",
                "bad_outputs", "publish_errors")
#: Counters that mean something went wrong (their growth turns the diagnostics to WARN).
ERROR_COUNTERS = ("wrong_format", "duplicates", "out_of_order", "queue_drops", "awaiting_idr", "decode_errors",
                  "b_frames", "no_state", "engine_errors", "bad_outputs", "publish_errors", "lost_units",
                  "stamp_gaps", "stamp_resets")
#: Late (not newer) messages in a row after which their stamps are accepted as a clock reset.
LATE_LIMIT = 30
OK, WARN, ERROR, STALE = 0, 1, 2, 3


def stamp_ns_of(header) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def make_message(data: bytes, stamp_ns: int, fmt: str = "h264", frame_id: str = ""):
    """A ``sensor_msgs/CompressedImage`` when the ROS 2 messages are importable, else a stand-in
    with the same fields (``format``, ``data``, ``header.stamp.sec/nanosec``, ``header.frame_id``)."""
    sec, nanosec = divmod(int(stamp_ns), 1_000_000_000)
    try:
        from sensor_msgs.msg import CompressedImage
    except ImportError:
        stamp = SimpleNamespace(sec=sec, nanosec=nanosec)
        return SimpleNamespace(format=fmt, data=bytes(data),
                               header=SimpleNamespace(stamp=stamp, frame_id=frame_id))
    msg = CompressedImage(format=fmt, data=bytes(data))
    msg.header.stamp.sec, msg.header.stamp.nanosec = sec, nanosec
    msg.header.frame_id = frame_id
    return msg


# -- building blocks --------------------------------------------------------------------------------

@dataclass
class QueuedFrame:
    camera: str
    data: bytes
    stamp_ns: int
    header: Any               # the input's header, copied to the outputs
    received_ns: int          # time.monotonic_ns() when the message was received
    idr: bool = False
    reason: str | None = None  # restart the model state at this frame (stamp gap / reset)
    segment: bool = True       # False: decode only (skipped by the queue policy)
    stamp_epoch: int = 0       # counted stamp resets before this message


class FrameQueue:
    """A camera's bounded queue in front of the engine, with the drop policy of the module doc.

    ``len()`` is the number of frames waiting for a mask (at most ``depth``); ``backlog`` the
    decode-only ones in front of them. ``drops`` counts frames that lost their mask here.
    """

    def __init__(self, depth: int, backlog_limit: int | None = None) -> None:
        if depth < 1:
            raise ValueError("queue depth must be >= 1")
        self.depth = depth
        self.backlog_limit = max(backlog_limit, depth + 1) if backlog_limit else max(4 * depth, 16)
        self._items: deque[QueuedFrame] = deque()
        self._waiting = 0
        self.drops = 0             # frames that got no mask because of the policy
        self.decode_only = 0       # ... of which made decode-only (references kept, unless a later IDR
                                   #     made them unneeded and they were discarded)
        self.discarded = 0         # ... of which discarded while waiting (never decoded)
        self.awaiting_idr = False  # units were discarded: take nothing but an IDR next

    def __len__(self) -> int:
        return self._waiting

    @property
    def backlog(self) -> int:
        return len(self._items) - self._waiting

    def _newest_idr(self) -> int | None:
        for i in range(len(self._items) - 1, 0, -1):
            if self._items[i].idr:
                return i
        return None

    def _discard_front(self, count: int) -> None:
        for _ in range(count):
            item = self._items.popleft()
            if item.segment:
                self._waiting -= 1
                self.drops += 1
                self.discarded += 1

    def push(self, item: QueuedFrame) -> int:
        """Enqueue; returns how many frames lost their mask because of it (0 while keeping up)."""
        before = self.drops
        if self.awaiting_idr and not item.idr:
            self.drops += 1
            self.discarded += 1
            return 1
        self.awaiting_idr = False
        item.segment = True
        self._items.append(item)
        self._waiting += 1
        while self._waiting > self.depth:
            idr = self._newest_idr()
            if idr is not None:            # jump to the newest IDR: what precedes it is not needed
                self._discard_front(idr)
                continue
            for queued in self._items:     # the oldest waiting frame becomes decode-only
                if queued.segment:
                    queued.segment = False
                    self._waiting -= 1
                    self.drops += 1
                    self.decode_only += 1
                    break
        if len(self._items) > self.backlog_limit:   # the decoder is behind too
            idr = self._newest_idr()
            if idr is not None:
                self._discard_front(idr)
            else:
                self._discard_front(len(self._items))
                self.awaiting_idr = not item.idr
        return self.drops - before

    def pop(self) -> tuple[list[QueuedFrame], QueuedFrame | None]:
        """(decode-only frames to feed first, the next frame to segment or None)."""
        skipped = []
        while self._items:
            item = self._items.popleft()
            if not item.segment:
                skipped.append(item)
                continue
            self._waiting -= 1
            return skipped, item
        return skipped, None

    def oldest_waiting(self) -> QueuedFrame | None:
        return next((i for i in self._items if i.segment), None)


class StampTracker:
    """Judges each message's stamp against the camera's last accepted one (see the module doc).

    :meth:`check` returns ``(verdict, reason)``; verdicts: ``"ok"``, ``"gap"`` (accept, restart
    the state), ``"reset"`` (accept, a counted clock/camera restart), ``"late"`` (drop)."""

    def __init__(self, gap_periods: float = 3.0, history: int = 15, min_history: int = 3,
                 late_limit: int = LATE_LIMIT) -> None:
        self.gap_periods = gap_periods
        self.min_history = min_history
        self.late_limit = late_limit
        self._steps: deque = deque(maxlen=history)
        self.last: int | None = None
        self._late_run = 0

    @property
    def period_ns(self) -> float | None:
        if len(self._steps) < self.min_history:
            return None
        return float(np.median(self._steps))

    def check(self, stamp_ns: int, idr: bool = False) -> tuple[str, str | None]:
        last = self.last
        if last is None:
            self.last = stamp_ns
            return "ok", None
        step = stamp_ns - last
        if step <= 0:
            what = f"stamp went back by {-step / 1e6:.1f} ms" if step else "stamp repeated"
            self._late_run += 1
            if idr or self._late_run >= self.late_limit:
                why = "at an IDR: camera restarted" if idr else f"for {self._late_run} messages in a row"
                self._late_run = 0
                self._steps.clear()
                self.last = stamp_ns
                return "reset", f"{what} {why}; stamps followed from here"
            return "late", f"{what} (late or reordered message)"
        self._late_run = 0
        self.last = stamp_ns
        period = self.period_ns
        if period is not None and step > self.gap_periods * period:
            return "gap", f"stamp gap of {step / 1e6:.1f} ms ({step / period:.1f} frame periods)"
        self._steps.append(step)
        return "ok", None


class LatencyWindow:
    """The last ``size`` latencies (ms) of a camera; percentiles for the diagnostics."""

    def __init__(self, size: int = 5000) -> None:
        self._values: deque = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, ms: float) -> None:
        with self._lock:
            self._values.append(ms)

    def percentiles(self, *qs: float) -> list[float] | None:
        with self._lock:
            values = list(self._values)
        return stats.percentiles(values, qs)


@dataclass
class MaskOutput:
    """A mask ready to publish, with the header of the message it was computed from."""
    camera: str
    header: Any
    stamp_ns: int
    mask: np.ndarray          # HxW uint8 class ids, the decoded frame's size
    network: str              # "i_frame" / "p_frame" / "copy"
    kind: str                 # "I" / "P"
    reset: bool               # the model state (re)started on this frame
    received_ns: int
    stamp_epoch: int = 0      # stamp resets counted before it: within an epoch, stamps only increase


@dataclass
class CameraState:
    name: str
    topic: str
    queue: FrameQueue
    stamps: StampTracker
    frame_nums: FrameNumTracker = field(default_factory=FrameNumTracker)
    latency: LatencyWindow = field(default_factory=LatencyWindow)
    counts: dict = field(default_factory=lambda: dict.fromkeys(
        ("received", "published", "extra_frames", "discontinuities", "lost_units", "stamp_gaps",
         "stamp_resets", *DROP_REASONS), 0))
    last_data: bytes | None = None
    awaiting_idr: bool = False             # stream continuity lost: decode nothing but an IDR
    restart_reason: str | None = None      # frames were decoded without a mask: restart at the next
    last_published_stamp: int | None = None
    in_flight: int = 0
    last_error: str = ""
    last_received: float | None = None     # time.monotonic()
    last_published: float | None = None
    format_warned: bool = False
    prev: dict = field(default_factory=dict)   # counters at the previous report

    def count(self, key: str, n: int = 1, error: str | None = None) -> None:
        self.counts[key] += n
        if error:
            self.last_error = error

    def accounted(self) -> int:
        """Messages whose outcome is known or pending; equals ``received`` at any quiet moment."""
        c = self.counts
        return c["published"] + sum(c[k] for k in DROP_REASONS) + len(self.queue) + self.in_flight


# -- the path ---------------------------------------------------------------------------------------

class MessagePath:
    """See the module docstring. ``engine``: a :class:`~cvseg_ros.engine.pipeline.SegmentationEngine`."""

    def __init__(self, engine, cameras: Iterable[str], *, topics: dict[str, str] | None = None,
                 queue_depth: int = 5, backlog_limit: int | None = None, batch_window_ms: float = 5.0,
                 max_stamp_gap_periods: float = 3.0, input_timeout_s: float = 1.0,
                 warn: Callable[[str], None] | None = None) -> None:
        self.engine = engine
        self.batch_window_ms = batch_window_ms
        self.input_timeout_s = input_timeout_s
        self._warn_sink = warn
        self._warned_at: dict[str, float] = {}
        self._cond = threading.Condition()
        self.cameras: dict[str, CameraState] = {}
        for name in cameras:
            topic = (topics or {}).get(name, f"/{name}/image_raw/h264")
            self.cameras[name] = CameraState(name, topic, FrameQueue(queue_depth, backlog_limit),
                                             StampTracker(max_stamp_gap_periods))
            engine.add_camera(name)
        if not self.cameras:
            raise ValueError("no camera")

    # -- warnings ------------------------------------------------------------------------------------
    def _warn(self, key: str, message: str, period: float = 5.0) -> None:
        now = time.monotonic()
        last = self._warned_at.get(key)
        if last is not None and (period == float("inf") or now - last < period):
            return
        self._warned_at[key] = now
        if self._warn_sink is not None:
            self._warn_sink(message)

    # -- input (the subscription callback) -------------------------------------------------------------
    def receive(self, camera: str, msg, received_ns: int | None = None) -> str:
        """Take one message of ``camera``; returns ``"queued"`` or the reason it was dropped."""
        received_ns = time.monotonic_ns() if received_ns is None else received_ns
        cam = self.cameras[camera]
        try:
            check_format(msg.format)
        except UnsupportedStreamError as exc:
            with self._cond:
                cam.last_received = received_ns / 1e9
                cam.counts["received"] += 1
                cam.count("wrong_format", error=str(exc))
            self._warn(f"format:{camera}", f"camera '{camera}' ({cam.topic}): {exc}; such messages are "
                       f"ignored and counted (diagnostics 'wrong_format'); warned once", float("inf"))
            return "wrong_format"
        data = bytes(msg.data)
        stamp_ns = stamp_ns_of(msg.header)
        idr = NAL_IDR in nal_unit_types(data)
        with self._cond:
            cam.last_received = received_ns / 1e9
            cam.counts["received"] += 1
            if data and data == cam.last_data:
                cam.count("duplicates", error="duplicate message (same bytes as the previous one): dropped")
                self._warn(f"dup:{camera}", f"camera '{camera}': duplicate message dropped "
                           f"({cam.counts['duplicates']} so far)")
                return "duplicates"
            verdict, reason = cam.stamps.check(stamp_ns, idr)
            if verdict == "late":
                cam.count("out_of_order", error=f"{reason}: dropped")
                self._warn(f"late:{camera}", f"camera '{camera}': {reason}: dropped "
                           f"({cam.counts['out_of_order']} so far)")
                return "out_of_order"
            if verdict == "gap":
                cam.count("stamp_gaps", error=reason)
            elif verdict == "reset":
                cam.count("stamp_resets", error=reason)
                self._warn(f"reset:{camera}", f"camera '{camera}': {reason}")
            cam.last_data = data
            item = QueuedFrame(camera, data, stamp_ns, msg.header, received_ns, idr,
                               reason if verdict in ("gap", "reset") else None,
                               stamp_epoch=cam.counts["stamp_resets"])
            lost = cam.queue.push(item)
            if lost:
                cam.count("queue_drops", lost, error=f"engine behind: {cam.queue.drops} frame(s) skipped so far")
                self._warn(f"queue:{camera}", f"camera '{camera}': engine behind, {cam.queue.drops} frame(s) "
                           f"skipped so far (decoded only, or discarded up to an IDR; counted in "
                           f"queue_drops); the state restarts")
            self._cond.notify()
        return "queued"

    # -- the worker ----------------------------------------------------------------------------------
    def queue_sizes(self) -> dict[str, tuple[int, int]]:
        """``{camera: (frames waiting, decode-only backlog)}``."""
        with self._cond:
            return {n: (len(c.queue), c.queue.backlog) for n, c in self.cameras.items()}

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def take_batch(self, timeout: float = 0.2, window: bool = True,
                   stop: threading.Event | None = None) -> list:
        """Wait up to ``timeout`` s for work; then (``window``) up to ``batch_window_ms`` for every
        camera to have a frame; take at most one frame to segment per camera (with the
        decode-only frames queued before it). ``[]`` when there is nothing."""
        cams = list(self.cameras.values())
        with self._cond:
            if not any(len(c.queue) for c in cams):
                if timeout > 0:
                    self._cond.wait(timeout)
                if not any(len(c.queue) for c in cams) or (stop is not None and stop.is_set()):
                    return []
            if window and len(cams) > 1:
                window_ns = int(self.batch_window_ms * 1e6)
                oldest = min(c.queue.oldest_waiting().received_ns for c in cams if len(c.queue))
                while not all(len(c.queue) for c in cams) and not (stop is not None and stop.is_set()):
                    left = oldest + window_ns - time.monotonic_ns()
                    if left <= 0:
                        break
                    self._cond.wait(left / 1e9)
            batch = []
            for c in cams:
                if len(c.queue) or c.queue.backlog:
                    skipped, item = c.queue.pop()
                    if item is not None:
                        c.in_flight += 1
                    batch.append((c, skipped, item))
            return batch

    def run_batch(self, batch: list, publish: Callable[[MaskOutput], None] | None = None) -> list[MaskOutput]:
        """Decode and segment a batch from :meth:`take_batch`; ``publish`` each mask as soon as the
        engine has it (it may raise: counted). Never raises on bad data; returns the masks
        published, in the order published."""
        engine = self.engine
        units, work = [], {}
        try:
            for cam, skipped, item in batch:
                for s in skipped:     # decode only (already counted as queue drops)
                    if self._continuity(cam, s) is not None:
                        try:
                            engine.decode_only(cam.name, s.data, s.stamp_ns)
                        except Exception as exc:  # noqa: BLE001
                            cam.last_error = f"decoder failure: {type(exc).__name__}: {exc}"
                if skipped:
                    cam.restart_reason = f"{len(skipped)} frame(s) not segmented (engine behind)"
                if item is None:
                    continue
                reasons = []
                lost = self._continuity(cam, item)
                if lost is None:          # waiting for an IDR
                    cam.count("awaiting_idr")
                    continue
                if cam.restart_reason and self._defer_restart(cam, item):
                    if lost:
                        cam.restart_reason += f"; {lost}"
                    try:
                        engine.decode_only(cam.name, item.data, item.stamp_ns)
                    except Exception as exc:  # noqa: BLE001
                        cam.last_error = f"decoder failure: {type(exc).__name__}: {exc}"
                    cam.count("queue_drops", error="engine behind: the state restarts when it has caught up "
                                                   "or at the next IDR")
                    continue
                if lost:
                    reasons.append(lost)
                if cam.restart_reason:
                    reasons.append(cam.restart_reason)
                    cam.restart_reason = None
                if item.reason:
                    reasons.append(item.reason)
                if reasons:
                    cam.counts["discontinuities"] += 1
                    engine.mark_discontinuity(cam.name, "; ".join(reasons))
                work[cam.name] = (cam, item, engine.stats(cam.name))
                units.append((cam.name, item.data, item.stamp_ns))
            outputs, finished = [], set()

            def camera_done(name: str, results: list) -> None:   # published as soon as it is ready
                finished.add(name)
                out = self._publish(*work[name], results, publish)
                if out is not None:
                    outputs.append(out)
            try:
                if units:
                    engine.process(units, on_camera_done=camera_done)
            except Exception as exc:  # noqa: BLE001 - keep serving: count, restart the state
                message = f"engine failure: {type(exc).__name__}: {exc}"
                self._warn("engine", message)
                for name, (cam, item, _) in work.items():
                    if name in finished:     # published (or counted) already
                        continue
                    cam.count("engine_errors", error=message)
                    try:
                        engine.mark_discontinuity(cam.name, "engine failure")
                    except Exception:  # noqa: BLE001
                        pass
                return outputs
            for name, (cam, item, before) in work.items():   # no frame decoded: the reason counted
                if name not in finished:
                    self._publish(cam, item, before, [], publish)
            return outputs
        finally:
            with self._cond:
                for cam, _, item in batch:
                    if item is not None:
                        cam.in_flight -= 1

    def _publish(self, cam: CameraState, item: QueuedFrame, before: dict, results: list,
                 publish: Callable[[MaskOutput], None] | None) -> MaskOutput | None:
        """``item``'s mask from the engine's ``results`` for it, published and counted; or None
        with the reason counted."""
        out = self._output(cam, item, before, results)
        if out is None:
            return None
        if publish is not None:
            try:
                publish(out)
            except Exception as exc:  # noqa: BLE001
                cam.count("publish_errors", error=f"publish failed: {type(exc).__name__}: {exc}")
                return None
        now = time.monotonic_ns()
        cam.counts["published"] += 1
        cam.last_published = now / 1e9
        cam.last_published_stamp = item.stamp_ns
        cam.latency.add((now - item.received_ns) / 1e6)
        return out

    def _defer_restart(self, cam: CameraState, item: QueuedFrame) -> bool:
        """After frames were skipped, restart the state only on an IDR or once the camera's queue
        is empty: a restart on a P-frame runs the I-frame network (several P-frames' cost), which
        would put an engine that is already behind further behind. Then ``item`` is decoded only
        (a counted queue drop). Not where a restart costs no more than any frame
        (:attr:`SegmentationEngine.restart_is_costly`)."""
        if item.idr or not self.engine.restart_is_costly:
            return False
        with self._cond:
            if not len(cam.queue):
                return False
            cam.queue.drops += 1
            cam.queue.decode_only += 1
            return True

    def _continuity(self, cam: CameraState, item: QueuedFrame) -> str | None:
        """Whether ``item`` may be decoded: ``None`` (no: the stream waits for an IDR), ``""``
        (yes), or the reason the model state must restart at it (reference pictures lost)."""
        if cam.awaiting_idr and not item.idr:
            return None
        cam.awaiting_idr = False
        status, reason = cam.frame_nums.check(item.data)
        if status == "ok":
            return ""
        cam.count("lost_units", error=reason)
        if status == "lost":
            return reason
        cam.awaiting_idr = True
        self._warn(f"broken:{cam.name}", f"camera '{cam.name}': {reason}: frames up to the next IDR are "
                   f"not decoded (counted in awaiting_idr)")
        return None

    def _output(self, cam: CameraState, item: QueuedFrame, before: dict, results: list) -> MaskOutput | None:
        """The mask of ``item``, checked; or None with the reason counted."""
        if not results:
            after = self.engine.stats(cam.name)
            grew = {k: after.get(k, 0) - before.get(k, 0) for k in after if isinstance(after.get(k), int)}
            for stat, reason in (("skipped_before_keyframe", "skipped_before_keyframe"),
                                 ("corrupt", "decode_errors"), ("b_frames", "b_frames"),
                                 ("no_output", "no_output")):
                if grew.get(stat, 0) > 0:
                    error = after.get("last_error") if reason in ("decode_errors", "b_frames") else None
                    cam.count(reason, error=error)
                    return None
            cam.count("no_state", error=f"no mask for a decoded frame ({after.get('last_error', '')})")
            return None
        if len(results) > 1:     # one message decoded to several pictures: keep the newest
            cam.counts["extra_frames"] += len(results) - 1
        res = results[-1]
        mask = res.mask
        problem = None
        if res.stamp != item.stamp_ns:
            problem = f"mask stamp {res.stamp} is not the message's {item.stamp_ns}"
        elif not isinstance(mask, np.ndarray) or mask.dtype != np.uint8 or mask.shape != (res.height, res.width):
            problem = (f"mask {getattr(mask, 'shape', None)} {getattr(mask, 'dtype', None)} does not match "
                       f"the decoded frame {res.width}x{res.height}")
        if problem:
            cam.count("bad_outputs", error=problem)
            self.engine.mark_discontinuity(cam.name, "bad output")
            return None
        return MaskOutput(cam.name, item.header, item.stamp_ns, mask, res.network, res.kind, res.reset,
                          item.received_ns, item.stamp_epoch)

    # -- synchronous use (fuzz, soak, tests) -------------------------------------------------------------
    def drain(self, publish: Callable[[MaskOutput], None] | None = None) -> list[MaskOutput]:
        """Process everything queued now, in this thread (no batching window)."""
        out = []
        while True:
            batch = self.take_batch(timeout=0, window=False)
            if not batch:
                return out
            out.extend(self.run_batch(batch, publish))

    # -- diagnostics ---------------------------------------------------------------------------------
    def camera_values(self, camera: str, elapsed: float | None = None, device: str = "",
                      now: float | None = None) -> tuple[int, str, list[tuple[str, str]]]:
        """(level, message, key/values) of one camera for ``/diagnostics``; levels: :data:`OK`,
        :data:`WARN`, :data:`STALE` (no input for ``input_timeout_s``). ``elapsed``: seconds
        since the previous report (for the rates); the report remembers what it saw."""
        cam = self.cameras[camera]
        now = time.monotonic() if now is None else now
        with self._cond:
            c = dict(cam.counts)
            queue_size, backlog, in_flight = len(cam.queue), cam.queue.backlog, cam.in_flight
            decode_only, discarded = cam.queue.decode_only, cam.queue.discarded
        st = self.engine.stats(camera)
        prev = cam.prev or dict.fromkeys(c, 0)
        elapsed = max(elapsed or 0.0, 1e-3)
        errors = {k: c[k] - prev.get(k, 0) for k in ERROR_COUNTERS if c[k] > prev.get(k, 0)}
        level, message = OK, "ok"
        if c["received"] == 0:
            message = f"waiting for {cam.topic}"
        elif cam.last_received is not None and now - cam.last_received > self.input_timeout_s:
            level = STALE
            message = f"no input for {now - cam.last_received:.1f} s (no mask published meanwhile)"
        elif errors:
            level = WARN
            grew = ", ".join(f"{k} +{v}" for k, v in errors.items())
            message = f"{grew}: {cam.last_error or st.get('last_error', '')}"
        elif cam.last_published is None or now - cam.last_published > self.input_timeout_s:
            since = "yet" if cam.last_published is None else f"for {now - cam.last_published:.1f} s"
            level = WARN
            message = f"input arriving but no mask {since}: {cam.last_error or st.get('last_error', '')}"
        cam.prev = c
        lat = cam.latency.percentiles(50, 99)
        values = [
            ("topic", cam.topic),
            ("input_rate_hz", f"{(c['received'] - prev.get('received', 0)) / elapsed:.2f}"),
            ("output_rate_hz", f"{(c['published'] - prev.get('published', 0)) / elapsed:.2f}"),
            ("latency_ms_p50", f"{lat[0]:.2f}" if lat else "nan"),
            ("latency_ms_p99", f"{lat[1]:.2f}" if lat else "nan"),
            ("frames_in", str(c["received"])),
            ("masks_out", str(c["published"])),
            *((k, str(c[k])) for k in DROP_REASONS),
            ("i_frames", str(st.get("i_frames", 0))),
            ("p_frames", str(st.get("p_frames", 0))),
            ("resyncs", str(st.get("resyncs", 0))),
            ("resolution_changes", str(st.get("resolution_changes", 0))),
            ("decoder_corrupt_total", str(st.get("corrupt", 0))),
            ("decoder_restarts", str(st.get("decoder_restarts", 0))),
            ("discontinuities", str(c["discontinuities"])),
            ("lost_units", str(c["lost_units"])),
            ("stamp_gaps", str(c["stamp_gaps"])),
            ("stamp_resets", str(c["stamp_resets"])),
            ("extra_frames", str(c["extra_frames"])),
            ("queue_size", str(queue_size)),
            ("queue_backlog", str(backlog)),
            ("queue_decode_only", str(decode_only)),
            ("queue_discarded", str(discarded)),
            ("in_flight", str(in_flight)),
            ("seconds_since_input", f"{now - cam.last_received:.2f}" if cam.last_received else "nan"),
            ("seconds_since_mask", f"{now - cam.last_published:.2f}" if cam.last_published else "nan"),
            ("last_error", cam.last_error or st.get("last_error", "")),
        ]
        if device:
            values.append(("device", device))
        return level, message, values
