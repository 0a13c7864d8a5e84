"""The message path's per-camera parts: stamp and queue policies, latencies, counters, their report.

:class:`~cvseg_ros.ros.message_path.MessagePath` holds one :class:`CameraState` per camera (its
:class:`FrameQueue`, :class:`StampTracker`, :class:`LatencyWindow` and outcome counters) and
changes it under its lock. The two policies here, each applied on purpose, counted and reported:

- **Stamps**: a non-IDR message whose stamp is not newer than the last accepted one (late,
  reordered, clock went back) is dropped before decoding, so masks on a topic never go back in
  time; an IDR with an older stamp is a camera or clock restart: accepted, counted
  (``stamp_resets``), and stamps are followed from there (so are :data:`LATE_LIMIT` late
  messages in a row). A jump of more than ``max_stamp_gap_periods`` frame periods (a camera that
  went silent) restarts the model state.
- **Queue** (the model falls behind; :class:`FrameQueue`): nothing is dropped before decoding
  while the decoder can keep up, so the reference pictures stay intact. With ``queue_depth``
  frames waiting, a new frame makes the oldest waiting one *decode-only* (no mask; the newest
  frames keep theirs): where the model accumulates the motion (the shipped ones) its vectors are
  carried into the state (``queue_carried``) and the next frame continues it; otherwise, or if
  the chain is broken, the model state restarts at the next segmented frame; if an IDR is
  waiting, everything before it is discarded undecoded instead (nothing after an IDR refers to
  it, and the IDR restarts the state anyway). If even decoding falls behind (more than
  ``backlog_limit`` units queued), units are discarded undecoded and the camera waits for its
  next IDR: an I-frame is never dropped without the state restarting at a clean IDR, and no
  mask is ever made from a picture decoded with missing references because of the queue. All
  of these are ``queue_drops``. After such a skip the state restarts at an IDR, or on the first
  frame taken when the camera's queue is empty again; frames taken while it is still behind are
  decoded only (also ``queue_drops``): a restart on a P-frame runs the I-frame network, which
  would only put it further behind. Per batch a queue hands over at most
  :data:`MAX_SKIPPED_PER_TURN` frames without a mask, so a camera far behind (or flooding) pays
  for its backlog itself.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cvseg_ros.codec.h264_syntax import FrameNumTracker
from cvseg_ros.common import stats

#: Reasons a received message got no mask; each message counts in at most one.
DROP_REASONS = ("wrong_format", "over_limits", "duplicates", "out_of_order", "queue_drops", "skipped_before_keyframe",
                "awaiting_idr", "decode_errors", "no_output", "no_state", "engine_errors",
                "bad_outputs", "publish_errors")
#: Counters that mean something went wrong (their growth turns the diagnostics to WARN).
ERROR_COUNTERS = ("wrong_format", "over_limits", "duplicates", "out_of_order", "queue_drops", "awaiting_idr", "decode_errors",
                  "no_state", "engine_errors", "bad_outputs", "publish_errors", "lost_units",
                  "stamp_gaps", "stamp_resets")
#: input below this share of a camera's expected rate turns its diagnostics to WARN
SLOW_INPUT = 0.8
#: Diagnostic levels of a camera's report (``diagnostic_msgs/DiagnosticStatus``'s values).
OK, WARN, ERROR, STALE = 0, 1, 2, 3
#: Frames without a mask (decoded, or carried through) a camera's queue hands the engine per batch.
MAX_SKIPPED_PER_TURN = 4
#: Late (not newer) messages in a row after which their stamps are accepted as a clock reset.
LATE_LIMIT = 30


@dataclass
class QueuedFrame:
    """A received message waiting in a :class:`FrameQueue`."""
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
    """A camera's bounded queue in front of the engine, with the queue policy of the module doc.

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
        """(frames without a mask to decode first, the next frame to segment or None). At most
        :data:`MAX_SKIPPED_PER_TURN` of the former per call: a camera far behind (or flooding)
        takes no more than that of a batch's time; its backlog then overflows (``backlog_limit``)
        and the rest is discarded up to an IDR, at its own cost, not the other cameras'."""
        skipped = []
        while self._items:
            if not self._items[0].segment and len(skipped) == MAX_SKIPPED_PER_TURN:
                return skipped, None
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
    the state), ``"reset"`` (accept, a counted clock/camera restart), ``"late"`` (drop).

    A stream with B-frames sends each B-frame after the later picture it is predicted from, so
    its stamp goes back: a B-frame's stamp (``b_frame``) is accepted between the two pictures
    (of the other kinds) sent before it, once per stamp; the other pictures' stamps only go on."""

    def __init__(self, gap_periods: float = 3.0, history: int = 15, min_history: int = 3,
                 late_limit: int = LATE_LIMIT) -> None:
        self.gap_periods = gap_periods
        self.min_history = min_history
        self.late_limit = late_limit
        self._steps: deque = deque(maxlen=history)
        self.last: int | None = None
        self._before_last: int | None = None   # the accepted stamp before ``last`` (not a B-frame's)
        self._b_stamps: set[int] = set()       # B-frames' stamps accepted since ``last``
        self._late_run = 0

    @property
    def period_ns(self) -> float | None:
        if len(self._steps) < self.min_history:
            return None
        return float(np.median(self._steps))

    def check(self, stamp_ns: int, idr: bool = False, b_frame: bool = False) -> tuple[str, str | None]:
        last = self.last
        if last is None:
            self.last = stamp_ns
            return "ok", None
        if (b_frame and self._before_last is not None and self._before_last < stamp_ns < last
                and stamp_ns not in self._b_stamps and len(self._b_stamps) < 16):
            self._b_stamps.add(stamp_ns)
            return "ok", None
        step = stamp_ns - last
        if step <= 0:
            what = f"stamp went back by {-step / 1e6:.1f} ms" if step else "stamp repeated"
            self._late_run += 1
            if idr or self._late_run >= self.late_limit:
                why = "at an IDR: camera restarted" if idr else f"for {self._late_run} messages in a row"
                self._late_run = 0
                self._steps.clear()
                self._accept(stamp_ns, None)
                return "reset", f"{what} {why}; stamps followed from here"
            return "late", f"{what} (late or reordered message)"
        self._late_run = 0
        self._accept(stamp_ns, last)
        period = self.period_ns
        if period is not None and step > self.gap_periods * period:
            return "gap", f"stamp gap of {step / 1e6:.1f} ms ({step / period:.1f} frame periods)"
        self._steps.append(step)
        return "ok", None

    def _accept(self, stamp_ns: int, before: int | None) -> None:
        self._before_last, self.last = before, stamp_ns
        self._b_stamps.clear()


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
class CameraState:
    """One camera's queue, trackers and counters; read and changed under the message path's lock."""
    name: str
    topic: str
    queue: FrameQueue
    stamps: StampTracker
    frame_nums: FrameNumTracker = field(default_factory=FrameNumTracker)
    latency: LatencyWindow = field(default_factory=LatencyWindow)
    counts: dict = field(default_factory=lambda: dict.fromkeys(
        ("received", "published", "extra_frames", "discontinuities", "carried", "lost_units", "stamp_gaps",
         "stamp_resets", *DROP_REASONS), 0))
    last_data: bytes | None = None
    awaiting_idr: bool = False             # stream continuity lost: decode nothing but an IDR
    restart_reason: str | None = None      # frames were decoded without a mask: restart at the next
    last_published_stamp: int | None = None
    last_published_epoch: int = -1         # the stamp epoch of that mask
    in_flight: int = 0
    expected_rate_hz: float = 0.0          # the camera's rate; input below 80 % of it is a WARN (0: none)
    held: dict = field(default_factory=dict)   # stamp_ns -> QueuedFrame whose picture the decoder holds back
    skipped_stamps: deque = field(default_factory=lambda: deque(maxlen=32))   # of queue-skipped messages
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
        return c["published"] + sum(c[k] for k in DROP_REASONS) + len(self.queue) + self.in_flight + len(self.held)

    def report(self, engine, lock, elapsed: float | None, now: float, input_timeout_s: float,
               device: str = "") -> tuple[int, str, list[tuple[str, str]]]:
        """(level, message, key/values) for ``/diagnostics``; levels: :data:`OK`, :data:`WARN`,
        :data:`STALE` (no input for ``input_timeout_s``). The counters are read under ``lock`` (the
        message path's), then ``engine.stats``. ``elapsed``: seconds since the previous report (for
        the rates); the report remembers what it saw."""
        with lock:
            c = dict(self.counts)
            queue_size, backlog, in_flight = len(self.queue), self.queue.backlog, self.in_flight
            decode_only, discarded = self.queue.decode_only, self.queue.discarded
        st = engine.stats(self.name)
        prev = self.prev or dict.fromkeys(c, 0)
        elapsed = max(elapsed or 0.0, 1e-3)
        errors = {k: c[k] - prev.get(k, 0) for k in ERROR_COUNTERS if c[k] > prev.get(k, 0)}
        rate_in = (c["received"] - prev.get("received", 0)) / elapsed
        level, message = OK, "ok"
        if c["received"] == 0:
            message = f"waiting for {self.topic}"
        elif self.last_received is not None and now - self.last_received > input_timeout_s:
            level = STALE
            message = f"no input for {now - self.last_received:.1f} s (no mask published meanwhile)"
        elif errors:
            level = WARN
            grew = ", ".join(f"{k} +{v}" for k, v in errors.items())
            message = f"{grew}: {self.last_error or st.get('last_error', '')}"
        elif self.last_published is None or now - self.last_published > input_timeout_s:
            since = "yet" if self.last_published is None else f"for {now - self.last_published:.1f} s"
            level = WARN
            message = f"input arriving but no mask {since}: {self.last_error or st.get('last_error', '')}"
        elif self.prev and self.expected_rate_hz and rate_in < SLOW_INPUT * self.expected_rate_hz:
            level = WARN
            message = (f"input at {rate_in:.1f} Hz, below the expected {self.expected_rate_hz:g} Hz "
                       f"(messages lost before the node, or a slow camera)")
        self.prev = c
        lat = self.latency.percentiles(50, 99)
        values = [
            ("topic", self.topic),
            ("input_rate_hz", f"{rate_in:.2f}"),
            ("expected_rate_hz", f"{self.expected_rate_hz:g}"),
            ("output_rate_hz", f"{(c['published'] - prev.get('published', 0)) / elapsed:.2f}"),
            ("latency_ms_p50", f"{lat[0]:.2f}" if lat else "nan"),
            ("latency_ms_p99", f"{lat[1]:.2f}" if lat else "nan"),
            ("frames_in", str(c["received"])),
            ("masks_out", str(c["published"])),
            *((k, str(c[k])) for k in DROP_REASONS),
            ("i_frames", str(st.get("i_frames", 0))),
            ("p_frames", str(st.get("p_frames", 0))),
            ("b_frames", str(st.get("b_frames", 0))),
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
            ("queue_carried", str(c["carried"])),
            ("queue_discarded", str(discarded)),
            ("in_flight", str(in_flight)),
            ("reorder_held", str(len(self.held))),
            ("seconds_since_input", f"{now - self.last_received:.2f}" if self.last_received else "nan"),
            ("seconds_since_mask", f"{now - self.last_published:.2f}" if self.last_published else "nan"),
            ("last_error", self.last_error or st.get("last_error", "")),
        ]
        if device:
            values.append(("device", device))
        return level, message, values
