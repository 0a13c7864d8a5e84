"""The node's message path, without ROS: H.264 messages in, masks out, every outcome counted.

:class:`MessagePath` is what ``cvseg_node`` runs: its subscription callbacks call
:meth:`MessagePath.receive`, its worker thread :meth:`MessagePath.take_batch` and
:meth:`MessagePath.run_batch`, its ``/diagnostics`` come from :meth:`MessagePath.camera_values`.
The fuzz, soak and eval-bag commands and the tests drive the same object in-process, without
DDS. Messages are duck-typed (:mod:`cvseg_ros.ros.inputs`): a ``sensor_msgs/CompressedImage``, a
``foxglove_msgs/CompressedVideo``, an ``ffmpeg_image_transport_msgs/FFMPEGPacket``, their rosbags
counterparts, :func:`make_message`.

Every message received ends in exactly one outcome, counted per camera (:data:`DROP_REASONS`):
a published mask, or one of the reasons it got none. Hence, at any time,
``frames_in == masks_out + sum(drop reasons) + queue_size + in_flight + reorder_held``.

Policies (each applied on purpose, counted and reported):

- **Wrong format**: ignored, counted, warned once per camera.
- **Duplicates** (the same bytes as the camera's previous message): dropped before decoding (a
  repeated P-frame would be decoded against itself).
- **Stamps**: late or reordered messages are dropped before decoding, so masks on a topic never
  go back in time; an IDR with an older stamp is a camera or clock restart; a long silence
  restarts the model state (:class:`~cvseg_ros.ros.policies.StampTracker`).
- **Lost pictures**: H.264 ``frame_num`` continuity (:mod:`cvseg_ros.codec.h264_syntax`) catches lost
  or reordered reference pictures that stamps cannot (``lost_units``). One or two lost: the
  decoder conceals them and the model state restarts at that frame. More, or pictures out of
  order or from another stream (a camera restarted and its IDR was lost): nothing is decoded
  until the next IDR (``awaiting_idr``), so no mask comes from a picture decoded against the
  wrong references.
- **Queue** (the model falls behind): frames lose their mask, never their reference pictures,
  and the state restarts at a clean point (:class:`~cvseg_ros.ros.policies.FrameQueue`, whose
  module states the policy in full).
- **Outputs**: a mask is published only with the header of the message its picture was coded
  in, and only when its size equals that frame's decoded size (else ``bad_outputs``). A stream
  with B-frames gives its pictures in display order, some messages later: such a message waits
  (``reorder_held``) until its picture comes out, and its latency includes the wait.
"""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Callable, Iterable

from cvseg_ros.codec.annexb import NAL_IDR, UnsupportedStreamError, check_format, nal_unit_count, nal_unit_spans
from cvseg_ros.codec.limits import StreamLimits
from cvseg_ros.codec.h264_syntax import SLICE_B, first_slice_type
from cvseg_ros.ros.policies import (DROP_REASONS, ERROR, ERROR_COUNTERS, LATE_LIMIT, OK, STALE, WARN,
                                    CameraState, FrameQueue, LatencyWindow, QueuedFrame, StampTracker)
from cvseg_ros.ros.inputs import default_topic, unpack
from cvseg_ros.ros.outputs import MaskOutput, masks_of, settle_held

# the per-camera parts live in policies; their names are importable from here too
__all__ = ["DROP_REASONS", "ERROR_COUNTERS", "LATE_LIMIT", "OK", "WARN", "ERROR", "STALE", "CameraState",
           "FrameQueue", "LatencyWindow", "MaskOutput", "MessagePath", "QueuedFrame", "StampTracker",
           "make_message", "stamp_ns_of"]


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


# -- the path ---------------------------------------------------------------------------------------

def _skip(engine, cam: CameraState, skipped: list[QueuedFrame], continuity) -> None:
    """The frames the queue policy took the masks of (counted already): the camera's state carried
    through them where the engine can, else decoded only and the state set to restart
    (``cam.restart_reason``). ``continuity``: :meth:`MessagePath._continuity`."""
    broken = 0
    for s in skipped:
        cam.skipped_stamps.append(s.stamp_ns)   # its picture may come out later: counted already
        lost = continuity(cam, s)
        if lost is None:      # waiting for an IDR
            continue
        if lost:              # references lost: the state restarts anyway
            cam.restart_reason = f"{cam.restart_reason}; {lost}" if cam.restart_reason else lost
        carried = False
        try:
            if cam.restart_reason:
                engine.decode_only(cam.name, s.data, s.stamp_ns)
            else:
                carried = engine.skim(cam.name, s.data, s.stamp_ns)
        except Exception as exc:  # noqa: BLE001
            cam.last_error = f"decoder failure: {type(exc).__name__}: {exc}"
        if carried:
            cam.counts["carried"] += 1
        else:
            broken += 1
    settle_held(engine, cam, "queue_drops", "engine behind: a held message's picture came out unsegmented")
    if broken:
        why = f"{broken} frame(s) not segmented (engine behind)"
        cam.restart_reason = f"{cam.restart_reason}; {why}" if cam.restart_reason else why


class MessagePath:
    """See the module docstring. ``engine``: a :class:`~cvseg_ros.engine.pipeline.SegmentationEngine`."""

    def __init__(self, engine, cameras: Iterable[str], *, topics: dict[str, str] | None = None,
                 queue_depth: int = 5, backlog_limit: int | None = None, batch_window_ms: float = 5.0,
                 max_stamp_gap_periods: float = 3.0, input_timeout_s: float = 1.0,
                 warn: Callable[[str], None] | None = None, expected_rates: dict[str, float] | None = None) -> None:
        """``expected_rates``: per camera, the rate below 80 % of which its diagnostics WARN."""
        self.engine = engine
        self.batch_window_ms = batch_window_ms
        self.input_timeout_s = input_timeout_s
        self._warn_sink = warn
        self._warned_at: dict[str, float] = {}
        self._cond = threading.Condition()
        self.cameras: dict[str, CameraState] = {}
        for name in cameras:
            topic = (topics or {}).get(name) or default_topic(name)
            self.cameras[name] = CameraState(name, topic, FrameQueue(queue_depth, backlog_limit),
                                             StampTracker(max_stamp_gap_periods),
                                             expected_rate_hz=float((expected_rates or {}).get(name, 0.0)))
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
    def receive(self, camera: str, msg, received_ns: int | None = None, header=None) -> str:
        """Take one message of ``camera`` (any of :data:`~cvseg_ros.ros.inputs.INPUT_TYPES`; a
        ``CompressedVideo``'s outputs get ``header``, default one made of its timestamp and
        frame_id); returns ``"queued"`` or the reason it was dropped."""
        received_ns = time.monotonic_ns() if received_ns is None else received_ns
        cam = self.cameras[camera]
        fmt, payload, header = unpack(msg, header)
        try:
            check_format(fmt)
        except UnsupportedStreamError as exc:
            with self._cond:
                cam.last_received = received_ns / 1e9
                cam.counts["received"] += 1
                cam.count("wrong_format", error=str(exc))
            self._warn(f"format:{camera}", f"camera '{camera}' ({cam.topic}): {exc}; such messages are "
                       f"ignored and counted (diagnostics 'wrong_format'); warned once", float("inf"))
            return "wrong_format"
        limits = getattr(self.engine, "limits", None) or StreamLimits()
        if len(payload) > limits.max_unit_bytes:   # not copied, not queued: the stream restarts after it
            with self._cond:
                cam.last_received = received_ns / 1e9
                cam.counts["received"] += 1
                cam.count("over_limits", error=f"message of {len(payload)} bytes, more than the limit of "
                                               f"{limits.max_unit_bytes}: dropped")
            self._warn(f"limits:{camera}", f"camera '{camera}': {cam.last_error}")
            return "over_limits"
        data = bytes(payload)
        stamp_ns = stamp_ns_of(header)
        # (a unit of too many NAL units is not scanned: the decoder refuses it)
        spans = nal_unit_spans(data) if nal_unit_count(data) <= limits.max_nal_units else []
        idr = any(data[start] & 0x1F == NAL_IDR for start, _ in spans)
        b_frame = not idr and first_slice_type(data, spans) == SLICE_B
        with self._cond:
            cam.last_received = received_ns / 1e9
            cam.counts["received"] += 1
            if data and data == cam.last_data:
                cam.count("duplicates", error="duplicate message (same bytes as the previous one): dropped")
                self._warn(f"dup:{camera}", f"camera '{camera}': duplicate message dropped "
                           f"({cam.counts['duplicates']} so far)")
                return "duplicates"
            verdict, reason = cam.stamps.check(stamp_ns, idr, b_frame)
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
            item = QueuedFrame(camera, data, stamp_ns, header, received_ns, idr,
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
                _skip(engine, cam, skipped, self._continuity)
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
                    cam.skipped_stamps.append(item.stamp_ns)   # its picture may come out later
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
                outputs.extend(self._publish(*work[name], results, publish))
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

    def _publish(self, cam: CameraState, item: QueuedFrame | None, before: dict, results: list,
                 publish: Callable[[MaskOutput], None] | None) -> list[MaskOutput]:
        """The masks of the engine's ``results`` for ``item`` (its own, and those of held messages
        whose pictures came out with it), published and counted; what got none counted."""
        published = []
        for out in masks_of(self.engine, cam, item, before, results):
            if out.stamp_epoch == cam.last_published_epoch and out.stamp_ns <= cam.last_published_stamp:
                # (a B-frame's earlier stamp, accepted on receipt, whose picture came out after a
                # later one's: a stream that is not what its slice types say)
                cam.count("out_of_order", error=f"mask of stamp {out.stamp_ns} after that of {cam.last_published_stamp}: "
                                                f"not published (masks never go back in time)")
                continue
            if publish is not None:
                try:
                    publish(out)
                except Exception as exc:  # noqa: BLE001
                    cam.count("publish_errors", error=f"publish failed: {type(exc).__name__}: {exc}")
                    continue
            now = time.monotonic_ns()
            cam.counts["published"] += 1
            cam.last_published = now / 1e9
            cam.last_published_stamp, cam.last_published_epoch = out.stamp_ns, out.stamp_epoch
            cam.latency.add((now - out.received_ns) / 1e6)
            published.append(out)
        return published

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

    # -- synchronous use (fuzz, soak, tests) -------------------------------------------------------------
    def drain(self, publish: Callable[[MaskOutput], None] | None = None) -> list[MaskOutput]:
        """Process everything queued now, in this thread (no batching window)."""
        out = []
        while True:
            batch = self.take_batch(timeout=0, window=False)
            if not batch:
                return out
            out.extend(self.run_batch(batch, publish))

    def flush(self, publish: Callable[[MaskOutput], None] | None = None) -> list[MaskOutput]:
        """End of the input (a bag's last message processed): the masks of the messages whose
        pictures the decoders still hold back (B-frame streams), published in display order."""
        out = []
        for cam in self.cameras.values():
            if cam.held:
                out.extend(self._publish(cam, None, {}, self.engine.flush(cam.name), publish))
        return out

    # -- diagnostics ---------------------------------------------------------------------------------
    def camera_values(self, camera: str, elapsed: float | None = None, device: str = "",
                      now: float | None = None) -> tuple[int, str, list[tuple[str, str]]]:
        """(level, message, key/values) of one camera for ``/diagnostics``: see
        :meth:`~cvseg_ros.ros.policies.CameraState.report`."""
        now = time.monotonic() if now is None else now
        cam = self.cameras[camera]
        return cam.report(self.engine, self._cond, elapsed, now, self.input_timeout_s, device)
